"""Talk to a served HA-GAN over gRPC or REST (`transports`); `hagan-sample` and `hagan-encode`
are `sample_cli` and `encode_cli`.

The same requests work against `hagan-serve` and the real TF Serving. `Client.config()` reads
the model's HAGANConfig from its `config` signature, so a client needs nothing but an address.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import DEFAULT_MODEL_NAME, ServingError  # noqa: F401 (ServingError: old import path)
from .transports import GrpcTransport, RestTransport, parse_server

_MOVED = {"sample_main": "sample_cli", "encode_main": "encode_cli",
          "encode_transform": "encode_cli"}


def __getattr__(name):
    """The CLIs' old import path (hagan_tf.serving.client.sample_main ...), without importing
    them, and the tqdm and io they need, for every user of Client."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# ---------------------------------------------------------------- shared by the CLIs

def add_connection_args(p: argparse.ArgumentParser, run: bool = False):
    """The server's address and the request options; with `run`, --run RUN_DIR and --step as
    the alternative to --server (the model run in this process)."""
    where = p.add_mutually_exclusive_group(required=True) if run else p
    where.add_argument("--server", required=not run, help="HOST:PORT of hagan-serve or TF Serving "
                                                          "(gRPC port, or the REST port with --rest)")
    if run:
        where.add_argument("--run", metavar="RUN_DIR", help="no server: the checkpoint of this "
                           "run directory (hagan-train's), run in this process")
        p.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")
    p.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name (default: %(default)s)")
    p.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    p.add_argument("--batch", type=int, default=None,
                   help="volumes per request (default: 4, fewer where 4 would exceed 2*256^3 "
                        "voxels: 2 at 256^3, 1 at 512^3, whose volume is 512 MiB)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def request_batch(batch: int | None, size: int) -> int:
    """Volumes per request: the user's --batch, else 4 bounded to 2*256^3 voxels, so that a
    response at 512^3 carries one volume and the client holds one at a time."""
    return batch if batch is not None else max(1, min(4, 2 * 256**3 // size**3))


def connect(parser, args) -> Client:
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    try:
        return Client(args.server, args.rest, args.model, args.version, args.timeout)
    except ValueError as e:
        parser.error(str(e))


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]
