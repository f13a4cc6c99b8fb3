"""The two ways to reach TF Serving (or `hagan-serve`): gRPC stubs and the REST API's JSON.

Both take and return NumPy arrays and raise ServingError with the canonical status code, so
`client.Client` and the CLIs do not care which one they use.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request

import numpy as np

from . import GRPC_OPTIONS, HTTP_STATUS, ServingError
from .json_arrays import NumberArray
from .json_arrays import dumps as json_dumps
from .json_arrays import loads as json_loads

_HTTP_CODES = {v: k for k, v in reversed(list(HTTP_STATUS.items()))}
_HTTP_CODES.update({405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 411: "INVALID_ARGUMENT",
                    413: "RESOURCE_EXHAUSTED"})
_NUMPY_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32,
                 "DT_INT64": np.int64, "DT_BOOL": np.bool_}


def _from_json(value, dtype: str) -> np.ndarray:
    """A JSON output as gRPC would give it: typed numbers, strings as bytes objects."""
    if isinstance(value, NumberArray):
        if dtype in ("DT_FLOAT", "DT_DOUBLE"):
            return value.values.astype(_NUMPY_DTYPES[dtype])
        value = value.json()
    if dtype in _NUMPY_DTYPES:
        return np.asarray(value, _NUMPY_DTYPES[dtype])
    arr = np.asarray(value, object)
    return np.asarray([s.encode() for s in arr.flat], object).reshape(arr.shape)


def parse_server(server: str) -> tuple[str, int]:
    """HOST:PORT (an http:// prefix and [v6] brackets allowed) -> (host, port)."""
    s = server.split("://", 1)[-1].rstrip("/")
    host, sep, port = s.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
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
        data = None if payload is None else json_dumps(payload)
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json_loads(r.read())
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
        def as_json(v):  # numbers stay arrays: json_arrays writes them
            v = np.asarray(v)
            if v.dtype.kind in "OSU":
                return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else str(s),
                                    otypes=[object])(v).tolist()
            return v

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
