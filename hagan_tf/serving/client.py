"""Talk to a served HA-GAN over gRPC or REST: `hagan-sample` and `hagan-encode`.

The same requests work against `hagan-serve` and the real TF Serving. `Client.config()` reads
the model's HAGANConfig from its `config` signature, so a client needs nothing but an address.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np

from . import DEFAULT_MODEL_NAME, GRPC_OPTIONS, HTTP_STATUS, ServingError

_HTTP_CODES = {v: k for k, v in reversed(list(HTTP_STATUS.items()))}
_HTTP_CODES.update({411: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED"})
_NUMPY_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32,
                 "DT_INT64": np.int64, "DT_BOOL": np.bool_}


def _from_json(value, dtype: str) -> np.ndarray:
    """A JSON output as gRPC would give it: typed numbers, strings as bytes objects."""
    if dtype in _NUMPY_DTYPES:
        return np.asarray(value, _NUMPY_DTYPES[dtype])
    arr = np.asarray(value, object)
    return np.asarray([s.encode() for s in arr.flat], object).reshape(arr.shape)


def parse_server(server: str) -> tuple[str, int]:
    """HOST:PORT (an http:// prefix and [v6] brackets allowed) -> (host, port)."""
    s = server.split("://", 1)[-1].rstrip("/")
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


def _signature_map(signature_defs: dict) -> dict:
    """{signature: {"inputs"/"outputs": {name: (dtype, shape)}}} from SignatureDefMap JSON."""
    def tensors(d):
        return {k: (v.get("dtype"), [int(x.get("size", -1)) for x in v.get("tensor_shape", {})
                                     .get("dim", [])]) for k, v in d.items()}
    return {name: {"inputs": tensors(sig.get("inputs", {})),
                   "outputs": tensors(sig.get("outputs", {}))}
            for name, sig in signature_defs.get("signature_def", {}).items()}


class GrpcTransport:
    """PredictionService / ModelService stubs on one channel with 2 GiB message limits."""

    def __init__(self, host: str, port: int, timeout: float):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self._grpc = grpc
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout = timeout

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise ServingError(e.code().name, e.details() or str(e)) from None

    @staticmethod
    def _spec(spec, model, version, signature=""):
        spec.name = model
        if version is not None:
            spec.version.value = version
        spec.signature_name = signature

    def predict(self, model, version, signature, inputs) -> dict:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model, version, signature)
        for k, v in inputs.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        response = self._call(self.predictions.Predict, request)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def metadata(self, model, version) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version)
        response = self._call(self.predictions.GetModelMetadata, request)
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        return _signature_map(json_format.MessageToDict(signature_defs,
                                                        preserving_proto_field_name=True))

    def status(self, model, version) -> list[dict]:
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version)
        response = self._call(self.models.GetModelStatus, request)
        return [{"version": s.version, "state": get_model_status_pb2.ModelVersionStatus.State.Name(
            s.state)} for s in response.model_version_status]

    def close(self):
        self.channel.close()


class RestTransport:
    """TF Serving's REST API with JSON in the columnar ("inputs") format."""

    def __init__(self, host: str, port: int, timeout: float):
        host = f"[{host}]" if ":" in host else host
        self.base = f"http://{host}:{port}/v1/models"
        self.timeout = timeout
        self._metadata = {}

    def _url(self, model, version, suffix=""):
        v = "" if version is None else f"/versions/{version}"
        return f"{self.base}/{model}{v}{suffix}"

    def _request(self, url, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = str(e.reason)
            raise ServingError(_HTTP_CODES.get(e.code, "UNKNOWN"), message, e.code) from None
        except TimeoutError as e:  # sent, but no answer in time (urllib wraps connect errors)
            raise ServingError("DEADLINE_EXCEEDED", f"no answer from {url} within "
                               f"{self.timeout:g} s (raise --timeout): {e}") from None
        except OSError as e:  # URLError included: the server was not reached
            raise ServingError("UNAVAILABLE", f"cannot reach {url}: {e}") from None
        except (http.client.HTTPException, ValueError) as e:  # gRPC's HTTP/2 frames, not JSON
            raise ServingError("UNAVAILABLE", f"{url} did not answer as TF Serving's REST API "
                               f"(is this the gRPC port? REST is usually 8501): "
                               f"{type(e).__name__}") from None

    def predict(self, model, version, signature, inputs) -> dict:
        def as_json(v):
            v = np.asarray(v)
            if v.dtype.kind in "OSU":
                return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else str(s),
                                    otypes=[object])(v).tolist()
            return v.tolist()

        body = {"signature_name": signature, "inputs": {k: as_json(v) for k, v in inputs.items()}}
        out = self._request(self._url(model, version, ":predict"), body)["outputs"]
        outputs = self.metadata(model, version)[signature or "serving_default"]["outputs"]
        if not isinstance(out, dict) or set(out) != set(outputs):
            out = {next(iter(outputs)): out}  # one output comes back unnamed
        return {k: _from_json(v, outputs[k][0]) for k, v in out.items()}

    def metadata(self, model, version) -> dict:
        key = (model, version)
        if key not in self._metadata:
            reply = self._request(self._url(model, version, "/metadata"))
            self._metadata[key] = _signature_map(reply["metadata"]["signature_def"])
        return self._metadata[key]

    def status(self, model, version) -> list[dict]:
        reply = self._request(self._url(model, version))
        return [{"version": int(s["version"]), "state": s["state"]}
                for s in reply["model_version_status"]]

    def close(self):
        pass


class Client:
    """One served HA-GAN model; methods take and return NumPy arrays."""

    def __init__(self, server: str, rest: bool = False, model: str = DEFAULT_MODEL_NAME,
                 version: int | None = None, timeout: float = 600.0):
        host, port = parse_server(server)
        self.transport = (RestTransport if rest else GrpcTransport)(host, port, timeout)
        self.model, self.version = model, version
        self._config = None

    def predict(self, signature: str, **inputs) -> dict[str, np.ndarray]:
        return self.transport.predict(self.model, self.version, signature, inputs)

    def metadata(self) -> dict:
        return self.transport.metadata(self.model, self.version)

    def status(self) -> list[dict]:
        return self.transport.status(self.model, self.version)

    def config(self) -> dict:
        """The model's HAGANConfig as a dict (size, latent_dim, num_classes, spacing, ...)."""
        if self._config is None:
            import yaml

            text = self.predict("config", format=np.asarray(b"yaml", object))["config"]
            self._config = yaml.safe_load(np.asarray(text).item().decode())
        return self._config

    def _with_labels(self, inputs: dict, labels) -> dict:
        if labels is not None:
            inputs["label"] = np.asarray(labels, np.int32)
        return inputs

    def generate(self, z, labels=None) -> np.ndarray:
        inputs = self._with_labels({"z": np.asarray(z, np.float32)}, labels)
        return self.predict("generate", **inputs)["volume"]

    def generate_from_seed(self, seeds, labels=None) -> np.ndarray:
        inputs = self._with_labels({"seed": np.asarray(seeds, np.int64)}, labels)
        return self.predict("generate_from_seed", **inputs)["volume"]

    def preview(self, z, labels=None) -> np.ndarray:
        inputs = self._with_labels({"z": np.asarray(z, np.float32)}, labels)
        return self.predict("generate_preview", **inputs)["volume"]

    def encode(self, volumes) -> np.ndarray:
        return self.predict("encode", volume=np.asarray(volumes, np.float32))["z"]

    def reconstruct(self, volumes, labels=None) -> np.ndarray:
        inputs = self._with_labels({"volume": np.asarray(volumes, np.float32)}, labels)
        return self.predict("reconstruct", **inputs)["volume"]

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- CLIs

def _add_connection_args(p: argparse.ArgumentParser):
    p.add_argument("--server", required=True, help="HOST:PORT of hagan-serve or TF Serving "
                                                   "(gRPC port, or the REST port with --rest)")
    p.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name (default: %(default)s)")
    p.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    p.add_argument("--batch", type=int, default=4,
                   help="volumes per request (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def _connect(parser, args) -> Client:
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    try:
        return Client(args.server, args.rest, args.model, args.version, args.timeout)
    except ValueError as e:
        parser.error(str(e))


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


def sample_main(argv=None) -> int:
    """hagan-sample: N reproducible samples as NIfTI files plus a PNG montage of mid slices."""
    from tqdm import tqdm

    from ..io import mid_slices, montage_png, save_nifti

    p = argparse.ArgumentParser(
        prog="hagan-sample",
        description="Ask a served HA-GAN for samples: one NIfTI per sample (voxel size from the "
                    "training config), montage.png of mid slices and samples.csv. Sample i uses "
                    "seed SEED+i, so the same command gives the same volumes.")
    _add_connection_args(p)
    p.add_argument("-n", "--num", type=int, default=8, help="number of samples (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class of a class-conditional model")
    p.add_argument("--preview", action="store_true",
                   help="the fast low-resolution S/4 volumes (G^A + G^L) instead")
    p.add_argument("--montage-max", type=int, default=16,
                   help="samples shown in montage.png (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("-n must be >= 1")
    if args.montage_max < 0:
        p.error("--montage-max must be >= 0")
    if not 0 <= args.seed <= 2**63 - 1 - args.num:
        p.error("--seed must be a non-negative 64-bit integer")
    client = _connect(p, args)
    try:
        cfg = client.config()
        classes = int(cfg.get("num_classes", 0))
        if classes and args.label is None:
            p.error(f"this model is class-conditional ({classes} classes): "
                    f"pass --label 0..{classes - 1}")
        if not classes and args.label is not None:
            p.error("this model is not class-conditional: drop --label")
        if classes and not 0 <= args.label < classes:
            p.error(f"--label must be in 0..{classes - 1}")
        spacing = float(cfg.get("spacing", 1.0)) * (4 if args.preview else 1)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            p.error(f"cannot write --out {args.out!r}: {e.strerror}")
        seeds = np.arange(args.seed, args.seed + args.num, dtype=np.int64)
        rows, shown = [], []
        with tqdm(total=args.num, unit="volume", desc="sampling") as bar:
            for chunk in _chunks(seeds, args.batch):
                labels = None if args.label is None else np.full(len(chunk), args.label, np.int32)
                if args.preview:
                    from .export import seed_latents

                    z = seed_latents(chunk, int(cfg["latent_dim"])).numpy()
                    volumes = client.preview(z, labels)
                else:
                    volumes = client.generate_from_seed(chunk, labels)
                for seed, volume in zip(chunk, volumes):
                    name = f"sample_{seed}.nii.gz"
                    save_nifti(volume, os.path.join(args.out, name), spacing)
                    rows.append((name, int(seed), "" if args.label is None else args.label))
                    if len(shown) < args.montage_max:  # slices: 16 volumes of 256^3 are 1 GiB
                        shown.append((mid_slices(volume), f"seed {seed}"))
                bar.update(len(chunk))
        with open(os.path.join(args.out, "samples.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("file", "seed", "label")] + rows)
        if shown:
            montage_png([v for v, _ in shown], os.path.join(args.out, "montage.png"),
                        titles=[t for _, t in shown])
    except ServingError as e:
        print(f"hagan-sample: error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    shown_note = " and montage.png" if shown else ""
    print(f"wrote {args.num} samples ({spacing:g} mm voxels){shown_note} to {args.out}")
    return 0


def encode_transform(args) -> dict:
    """preprocess_file's settings: the options given, else the training data's summary.json
    (`--like`), else hagan-preprocess's defaults. A scan encoded with other settings than its
    model was trained on gets a wrong embedding without any error."""
    import inspect

    from ..data.records import SUMMARY
    from ..preprocess.transform import preprocess_file

    saved = {}
    if args.like:
        path = os.path.join(args.like, SUMMARY)
        if not os.path.isfile(path):
            raise ValueError(f"--like {args.like!r}: no {SUMMARY} (hagan-preprocess writes one)")
        with open(path) as f:
            saved = json.load(f)
    defaults = inspect.signature(preprocess_file).parameters  # hagan-preprocess's own defaults
    settings = {k: defaults[k].default for k in ("modality", "window", "percentile", "isotropic",
                                                 "min_extent")}
    for key in settings:
        if saved.get(key) is not None:
            settings[key] = saved[key]
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["window"] = tuple(float(x) for x in settings["window"])
    if settings["window"][0] >= settings["window"][1]:
        raise ValueError("--window LOW must be below HIGH")
    return settings


def encode_main(argv=None) -> int:
    """hagan-encode: one CSV row of latent values per scan, preprocessed as the training data."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(
        prog="hagan-encode",
        description="Preprocess NIfTI scans exactly as hagan-preprocess does and encode them "
                    "with a served HA-GAN: one CSV row (scan, z0..z{latent-1}) per scan. A scan "
                    "that cannot be read is reported and skipped; the others are still written.")
    _add_connection_args(p)
    p.add_argument("scans", nargs="+", help="NIfTI files (.nii or .nii.gz)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--like", metavar="DATA_DIR",
                   help="the training data's directory: take the transform settings (modality, "
                        "window, percentile, isotropic, min extent) from its summary.json; the "
                        "options below override them")
    p.add_argument("--modality", choices=("ct", "mri"), help="intensity normalisation (default: ct)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT window in HU (default: -1024 600)")
    p.add_argument("--percentile", type=float, help="MRI: clip at this percentile (default: 99.9)")
    p.add_argument("--isotropic", type=float, metavar="MM",
                   help="resample to isotropic voxels first, as hagan-preprocess --isotropic")
    p.add_argument("--min-extent", type=int, metavar="VOXELS",
                   help="as hagan-preprocess --min-extent (default: S/4)")
    args = p.parse_args(argv)
    try:
        transform = encode_transform(args)
    except (OSError, ValueError) as e:
        p.error(str(e))
    client = _connect(p, args)
    from ..preprocess.transform import preprocess_file

    failed = []
    written = 0
    try:
        cfg = client.config()
        size, latent = int(cfg["size"]), int(cfg["latent_dim"])
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            f = open(args.out, "w", newline="")
        except OSError as e:
            p.error(f"cannot write --out {args.out!r}: {e.strerror}")
        with f, \
                tqdm(total=len(args.scans), unit="scan", desc="encoding") as bar:
            out = csv.writer(f)
            out.writerow(["scan"] + [f"z{i}" for i in range(latent)])
            for chunk in _chunks(args.scans, args.batch):
                names, volumes = [], []
                for path in chunk:
                    try:
                        volume, _ = preprocess_file(path, size, **transform)
                    except Exception as e:  # noqa: BLE001 - one bad scan must not stop the rest
                        failed.append((path, f"{type(e).__name__}: {e}"))
                        continue
                    names.append(path)
                    volumes.append(volume[..., None])
                if volumes:
                    try:
                        z = client.encode(np.stack(volumes))
                    except ServingError as e:
                        if e.code == "UNAVAILABLE":
                            raise
                        failed.extend((path, str(e)) for path in names)
                    else:
                        out.writerows([n] + [f"{x:.9g}" for x in row] for n, row in zip(names, z))
                        written += len(names)
                        f.flush()  # rows already encoded survive a later failure
                bar.update(len(chunk))
    except ServingError as e:
        kept = f" ({written} rows kept in {args.out})" if written else ""
        print(f"hagan-encode: error: {e}{kept}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for path, reason in failed:
        print(f"hagan-encode: skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {written} embeddings to {args.out}"
          + (f"; {len(failed)} of {len(args.scans)} scans failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(sample_main())
