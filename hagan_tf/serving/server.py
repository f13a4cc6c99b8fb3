"""`hagan-serve`: TF Serving's gRPC and REST APIs over a model base directory, for development.

It serves the newest version of every model DIR/NAME/V that `hagan-export` writes, polls DIR so
a new version (or model) is picked up without a restart, and answers the same requests, with
the same status codes, as TF Serving: clients written against this server work against the
real one. Every request is checked against the signature before it runs, a failing request
never takes the server down, and request size, batch size and concurrent executions are capped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from . import MAX_MESSAGE_BYTES, ServingError
from .export import versions

log = logging.getLogger("hagan_tf.serving")

MAX_REST_BYTES = 256 << 20  # a 256^3 float32 volume is ~200 MB of JSON; parsing holds ~7x
RUN_VOXELS = 2 * 256**3  # samples per execution: 2 at 256^3 (~2 GB each on CPU), 16 at 128^3

DEFAULT_SIGNATURE = "serving_default"
_GRPC_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
_TF_TRACE_LINE = re.compile(r"^(Graph execution error:|Detected at node|<stack traces|\s*\[\[)")


def _tf_message(e: tf.errors.OpError) -> str:
    """The useful lines of a TF runtime error (the assertion text), without node traces."""
    lines = [ln.strip() for ln in str(e.message).splitlines()]
    kept = [ln for ln in lines if ln and not _TF_TRACE_LINE.match(ln)]
    return " ".join(kept) or str(e.message)


class Servable:
    """One loaded version: its signature functions, their input specs and signature defs."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.loaded = tf.saved_model.load(path)  # keeps the variables alive
        self.functions = dict(self.loaded.signatures)
        self.inputs = {k: dict(f.structured_input_signature[1]) for k, f in self.functions.items()}
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signature_defs = get_model_metadata_pb2.SignatureDefMap()
        for k, v in proto.meta_graphs[0].signature_def.items():
            self.signature_defs.signature_def[k].CopyFrom(v)
        self.sample_voxels = {k: _sample_voxels(f) for k, f in self.functions.items()}


def _sample_voxels(function) -> int | None:
    """The largest input or output of one sample (its elements), which sizes an execution;
    None when an output has no batch dimension, so that a batch cannot run in groups."""
    outputs = tf.nest.flatten(function.structured_outputs)
    if not all(s.shape.rank for s in outputs):
        return None
    specs = list(function.structured_input_signature[1].values()) + outputs
    return max(int(np.prod([d or 1 for d in s.shape[1:]])) for s in specs if s.shape.rank)


def _stamp(path: str) -> tuple:
    """Changes when a version directory is rewritten, so a failed load is retried then."""
    return tuple(os.path.getmtime(p) if os.path.exists(p) else None
                 for p in (path, os.path.join(path, "saved_model.pb"),
                           os.path.join(path, "variables")))


class ModelRegistry:
    """The newest loadable version of each model under the model base, refreshed on demand."""

    def __init__(self, model_base: str):
        self.model_base = model_base
        self._models: dict[str, Servable] = {}
        self._failed: dict[tuple[str, int], tuple[tuple, str]] = {}  # (name, v) -> (stamp, error)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    def refresh(self) -> None:
        with self._refresh_lock:
            names = sorted(n for n in os.listdir(self.model_base) if not n.startswith(".")
                           and os.path.isdir(os.path.join(self.model_base, n)))
            present = set()
            for name in names:
                model_dir = os.path.join(self.model_base, name)
                loadable = [v for v in versions(model_dir) if not self._known_bad(name, v)]
                if not loadable:
                    continue
                present.add(name)
                current = self._models.get(name)
                for version in reversed(loadable):  # the newest that loads; a broken one falls back
                    if current is not None and current.version >= version:
                        break
                    if self._load(name, version):
                        break
            with self._lock:
                for name in set(self._models) - present:
                    log.info("model %s is gone from %s: unloaded", name, self.model_base)
                    del self._models[name]

    def _known_bad(self, name: str, version: int) -> bool:
        failed = self._failed.get((name, version))
        path = os.path.join(self.model_base, name, str(version))
        return failed is not None and failed[0] == _stamp(path)

    def _load(self, name: str, version: int) -> bool:
        path = os.path.join(self.model_base, name, str(version))
        log.info("loading %s version %d from %s", name, version, path)
        try:
            servable = Servable(name, version, path)
        except Exception as e:  # a broken export must not stop the others being served
            log.error("could not load %s version %d: %s", name, version, e)
            with self._lock:
                self._failed[(name, version)] = (_stamp(path), f"{type(e).__name__}: {e}")
            return False
        with self._lock:
            self._models[name] = servable
            self._failed.pop((name, version), None)
        log.info("serving %s version %d", name, version)
        return True

    def get(self, name: str, version: int | None = None) -> Servable:
        with self._lock:
            servable = self._models.get(name)
        if servable is None or (version is not None and servable.version != version):
            what = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise ServingError("NOT_FOUND", f"Servable not found for request: {what}")
        return servable

    def status(self, name: str,
               version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        with self._lock:
            servable = self._models.get(name)
            failed = list(self._failed.items())
        response = get_model_status_pb2.GetModelStatusResponse()
        rows = {}
        for (n, v), (_, error) in failed:
            if n == name:
                rows[v] = (get_model_status_pb2.ModelVersionStatus.END, "UNKNOWN", error)
        if servable is not None:
            rows[servable.version] = (get_model_status_pb2.ModelVersionStatus.AVAILABLE, "OK", "")
        if version is not None:
            rows = {v: r for v, r in rows.items() if v == version}
        if not rows:
            if version is None:
                raise ServingError("NOT_FOUND", f"Could not find any versions of model {name!r}")
            raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name!r}")
        for v in sorted(rows, reverse=True):
            state, code, message = rows[v]
            status = response.model_version_status.add(version=v, state=state)
            status.status.error_code = getattr(grpc.StatusCode, code).value[0]
            status.status.error_message = message
        return response

    def names(self) -> list[str]:
        with self._lock:
            return [f"{n} v{s.version}" for n, s in sorted(self._models.items())]


class Predictor:
    """Protocol-independent request handling: look up, validate, run, map errors."""

    def __init__(self, registry: ModelRegistry, max_batch: int = 16, max_concurrent: int = 4,
                 run_voxels: int = RUN_VOXELS):
        self.registry = registry
        self.max_batch, self.run_voxels = max_batch, run_voxels
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def signature(self, servable: Servable, name: str) -> str:
        name = name or DEFAULT_SIGNATURE
        if name not in servable.functions:
            raise ServingError("INVALID_ARGUMENT",
                               f"Serving signature name: {name!r} not found in signature def; "
                               f"available: {', '.join(sorted(servable.functions))}")
        return name

    def check(self, servable: Servable, signature: str, tensors: dict[str, tuple]) -> None:
        """Inputs {name: (numpy dtype, shape)} against the signature, before any is built."""
        specs = servable.inputs[signature]
        missing = sorted(set(specs) - set(tensors))
        extra = sorted(set(tensors) - set(specs))
        if missing or extra:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"signature {signature!r} takes inputs {sorted(specs)}; "
                + (f"missing {missing}" if missing else "") + (" and " if missing and extra else "")
                + (f"unknown {extra}" if extra else ""))
        for key, spec in specs.items():
            dtype, shape = np.dtype(tensors[key][0]), tuple(tensors[key][1])
            if dtype != spec.dtype.as_numpy_dtype and not (
                    spec.dtype == tf.string and dtype.kind in "OS"):
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} must be {spec.dtype.name}, got {dtype}")
            if not spec.shape.is_compatible_with(shape):
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} has shape {list(shape)}, signature "
                                   f"{signature!r} expects {spec.shape.as_list()} (None = any)")
            if spec.shape.rank and shape[0] > self.max_batch:
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} has a batch of {shape[0]}; this server "
                                   f"takes at most {self.max_batch} (--max-batch)")

    def predict(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                output_filter=()) -> dict[str, np.ndarray]:
        specs = servable.inputs[signature]
        self.check(servable, signature, {k: (v.dtype, v.shape) for k, v in inputs.items()})
        outputs = servable.functions[signature].structured_outputs
        unknown = sorted(set(output_filter) - set(outputs))
        if unknown:
            raise ServingError("INVALID_ARGUMENT", f"output_filter names unknown outputs {unknown}")
        keep = set(output_filter) or set(outputs)
        # A batch runs in groups of at most run_voxels: 16 volumes at 256^3 in one execution
        # would need ~16x the memory of one, for the same answer.
        batches = {len(v) for k, v in inputs.items() if specs[k].shape.rank}
        n = max(batches, default=0)
        voxels = servable.sample_voxels[signature]  # None: an output without a batch dimension
        group = (max(1, self.run_voxels // voxels) if voxels and len(batches) == 1
                 else max(n, 1))  # unequal batches run whole: the signature says what is wrong
        if n == 0 and batches:  # an empty batch runs as one zero sample, cut to none: oneDNN's
            # CPU convolutions mis-shape empty batches ("Incompatible shapes: [0,8,8,8,64] vs.")
            inputs = {k: np.zeros((1,) + v.shape[1:], v.dtype) if specs[k].shape.rank else v
                      for k, v in inputs.items()}
        runs = []
        with self._slots:
            for i in range(0, max(n, 1), group):
                try:
                    result = servable.functions[signature](**{
                        k: tf.constant(v[i:i + group] if specs[k].shape.rank else v,
                                       dtype=specs[k].dtype) for k, v in inputs.items()})
                except tf.errors.OpError as e:
                    raise ServingError(_GRPC_CODE_NAMES.get(e.error_code, "UNKNOWN"), _tf_message(e))
                runs.append({k: np.asarray(v.numpy()) for k, v in result.items() if k in keep})
        if n == 0 and batches:
            return {k: v[:0] if v.ndim else v for k, v in runs[0].items()}
        if len(runs) == 1:
            return runs[0]
        return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}

    def metadata(self, servable: Servable,
                 fields) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(fields)
        if fields != ["signature_def"]:
            raise ServingError("INVALID_ARGUMENT",
                               f"metadata_field must be ['signature_def'], got {fields}")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signature_defs)
        return response


# ---------------------------------------------------------------- gRPC

def _version_of(spec: model_pb2.ModelSpec) -> int | None:
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise ServingError("INVALID_ARGUMENT",
                           "version labels are not supported by hagan-serve; use a version number")
    return spec.version.value if choice == "version" else None


def _grpc(method):
    """Run a servicer method, turning ServingError (or anything else) into a gRPC status."""
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as e:
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception as e:  # noqa: BLE001 - the server must survive any request
            log.exception("gRPC %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    wrapper.__name__ = method.__name__
    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService.Predict and GetModelMetadata; Classify/Regress stay UNIMPLEMENTED."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @_grpc
    def Predict(self, request, context):
        p = self.predictor
        servable = p.registry.get(request.model_spec.name, _version_of(request.model_spec))
        signature = p.signature(servable, request.model_spec.signature_name)
        declared = {}
        for key, proto in request.inputs.items():
            try:
                dtype = np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype)
            except Exception:  # noqa: BLE001 - DT_INVALID, resource and variant types
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} has an unusable dtype "
                                                       f"({proto.dtype})") from None
            shape = [d.size for d in proto.tensor_shape.dim]
            if any(n < 0 for n in shape) or proto.tensor_shape.unknown_rank:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} must have a known shape")
            declared[key] = (dtype, shape)
        p.check(servable, signature, declared)  # before a declared shape can allocate anything
        inputs = {}
        for key, proto in request.inputs.items():
            try:
                inputs[key] = tf.make_ndarray(proto)
            except Exception as e:  # noqa: BLE001 - malformed TensorProto
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not a valid tensor: {e}")
        outputs = p.predict(servable, signature, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    @_grpc
    def GetModelMetadata(self, request, context):
        p = self.predictor
        servable = p.registry.get(request.model_spec.name, _version_of(request.model_spec))
        return p.metadata(servable, request.metadata_field)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """ModelService.GetModelStatus; HandleReloadConfigRequest stays UNIMPLEMENTED (we poll)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    @_grpc
    def GetModelStatus(self, request, context):
        return self.registry.status(request.model_spec.name, _version_of(request.model_spec))


# ---------------------------------------------------------------- REST

_REST_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
                        r"(?P<action>/metadata|:predict|:classify|:regress)?/?$")


def _json_array(key: str, value, spec: tf.TensorSpec) -> np.ndarray:
    """A JSON value as the array the signature input `key` expects (TF Serving's rules)."""
    try:
        if spec.dtype == tf.string:
            arr = np.asarray(value, dtype=object)
            if not all(isinstance(x, str) for x in arr.flat):
                raise ValueError("not all strings")
            return np.vectorize(lambda s: s.encode(), otypes=[object])(arr) if arr.size else arr
        arr = np.asarray(value)
    except ValueError as e:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not a valid {spec.dtype.name} "
                                               f"tensor (ragged or mixed values?): {e}")
    want = spec.dtype.as_numpy_dtype
    kinds = "iuf" if spec.dtype.is_floating else "iu" if spec.dtype.is_integer else "b"
    if arr.dtype.kind not in kinds:
        got = {"f": "floats", "b": "booleans", "U": "strings"}.get(arr.dtype.kind, "mixed values")
        raise ServingError("INVALID_ARGUMENT",
                           f"input {key!r} must be {spec.dtype.name}, got {got}")
    if spec.dtype.is_integer and arr.size:
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise ServingError("INVALID_ARGUMENT",
                               f"input {key!r} is out of {spec.dtype.name} range")
    return arr.astype(want)


def _json_value(arr: np.ndarray):
    if arr.dtype.kind in "OS":
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(arr).tolist()
    return arr.tolist()


class RestApp:
    """TF Serving's REST API: model status, metadata and :predict (row and columnar formats)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        try:
            return 200, self._route(method, path.split("?", 1)[0], body)
        except ServingError as e:
            return e.http_status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - the server must survive any request
            log.exception("REST %s %s failed", method, path)
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def _route(self, method, path, body):
        m = _REST_PATH.match(path)
        if m is None:
            raise ServingError("NOT_FOUND", f"Malformed request: {method} {path}")
        name, action = m["name"], m["action"]
        version = None
        if m["version"] is not None:
            if not m["version"].isdigit():
                raise ServingError("INVALID_ARGUMENT",
                                   f"version must be a non-negative integer, got {m['version']!r}")
            version = int(m["version"])
        registry = self.predictor.registry
        if method == "GET" and action is None:
            return json_format.MessageToDict(registry.status(name, version),
                                             always_print_fields_with_no_presence=True,
                                             preserving_proto_field_name=True)
        if method == "GET" and action == "/metadata":
            servable = registry.get(name, version)
            response = self.predictor.metadata(servable, ["signature_def"])
            return {"model_spec": json_format.MessageToDict(response.model_spec,
                                                            preserving_proto_field_name=True),
                    "metadata": {"signature_def": json_format.MessageToDict(
                        servable.signature_defs, preserving_proto_field_name=True)}}
        if method == "POST" and action == ":predict":
            return self._predict(registry.get(name, version), body)
        if method == "POST" and action in (":classify", ":regress"):
            raise ServingError("UNIMPLEMENTED", f"{action[1:]} is not supported; use :predict")
        raise ServingError("NOT_FOUND", f"Malformed request: {method} {path}")

    def _predict(self, servable: Servable, body: bytes) -> dict:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # the last: nesting
            raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {e}")
        if not isinstance(request, dict):
            raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
        if ("instances" in request) == ("inputs" in request):
            raise ServingError("INVALID_ARGUMENT",
                               "the request must have exactly one of 'instances' (row format) "
                               "or 'inputs' (columnar)")
        sig_name = request.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
        signature = self.predictor.signature(servable, sig_name)
        specs = servable.inputs[signature]
        names = sorted(specs)
        rows = "instances" in request
        columns = (self._rows_to_columns(request["instances"], names) if rows
                   else self._named(request["inputs"], names))
        if set(columns) != set(specs):  # let check() name what is missing or unknown
            self.predictor.check(servable, signature, {k: (np.float32, ()) for k in columns})
        inputs = {k: _json_array(k, v, specs[k]) for k, v in columns.items()}
        outputs = self.predictor.predict(servable, signature, inputs)
        if not rows:
            if len(outputs) == 1:
                return {"outputs": _json_value(next(iter(outputs.values())))}
            return {"outputs": {k: _json_value(v) for k, v in outputs.items()}}
        if any(v.ndim == 0 for v in outputs.values()):
            raise ServingError("INVALID_ARGUMENT", "this signature returns unbatched outputs; "
                                                   "use the columnar 'inputs' format")
        lists = {k: _json_value(v) for k, v in outputs.items()}
        if len(lists) == 1:
            return {"predictions": next(iter(lists.values()))}
        n = len(next(iter(lists.values())))
        return {"predictions": [{k: v[i] for k, v in lists.items()} for i in range(n)]}

    @staticmethod
    def _named(value, names):
        if isinstance(value, dict):
            return value
        if len(names) != 1:
            raise ServingError("INVALID_ARGUMENT",
                               f"'inputs' must be an object naming the signature's inputs {names}")
        return {names[0]: value}

    @staticmethod
    def _rows_to_columns(instances, names):
        if not isinstance(instances, list) or not instances:
            raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
        if all(isinstance(r, dict) for r in instances):
            keys = set(instances[0])
            if any(set(r) != keys for r in instances):
                raise ServingError("INVALID_ARGUMENT", "every instance must name the same inputs")
            return {k: [r[k] for r in instances] for k in keys}
        if len(names) != 1 or any(isinstance(r, dict) for r in instances):
            raise ServingError("INVALID_ARGUMENT",
                               f"each instance must be an object naming the inputs {names}")
        return {names[0]: instances}


class _RestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that send many requests
    server_version = "hagan-serve"
    timeout = 300  # seconds a connection may sit idle or stall mid-request

    def do_GET(self):
        self._reply(*self.server.app.handle("GET", self.path, None))

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._reply(411, {"error": "a POST needs a Content-Length header"})
        if int(length) > self.server.max_body:
            # Read the body away (without keeping it): closing on unread data would reset the
            # connection before the client reads this answer.
            left = int(length)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self.close_connection = True
            return self._reply(413, {"error": f"request body of {length} bytes exceeds the limit "
                                              f"of {self.server.max_body} (hagan-serve --max-rest-bytes)"})
        with self.server.bodies:  # JSON parsing holds several times the body: a few at once
            self._reply(*self.server.app.handle("POST", self.path, self.rfile.read(int(length))))

    def _refuse(self):
        self.close_connection = True
        self._reply(405, {"error": f"{self.command} is not supported; use GET or POST"})

    do_PUT = do_DELETE = do_PATCH = _refuse

    def _reply(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("REST %s " + fmt, self.address_string(), *args)


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app: RestApp, max_body: int, max_concurrent: int = 4):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app, self.max_body = app, max_body
        self.bodies = threading.BoundedSemaphore(max_concurrent)
        super().__init__(address, _RestHandler)

    def handle_error(self, request, client_address):
        """A client that went away mid-request is routine: a line at debug level, where
        socketserver would print a traceback to stderr as if the server had failed."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("REST %s: connection lost: %s", client_address[0], error)
        else:
            log.error("REST %s: request failed", client_address[0], exc_info=error)


# ---------------------------------------------------------------- the server

class Server:
    """gRPC + REST servers over one model registry, with a thread that polls the model base."""

    def __init__(self, model_base: str, host: str = "127.0.0.1", port: int = 8500,
                 rest_port: int | None = 8501, poll_seconds: float = 5.0,
                 max_request_bytes: int = MAX_MESSAGE_BYTES, max_batch: int = 16,
                 max_concurrent: int = 4, grpc_threads: int = 16,
                 max_rest_bytes: int = MAX_REST_BYTES, run_voxels: int = RUN_VOXELS):
        if not os.path.isdir(model_base):
            raise FileNotFoundError(f"model base {model_base!r} is not a directory")
        self.registry = ModelRegistry(model_base)
        self.predictor = Predictor(self.registry, max_batch, max_concurrent, run_voxels)
        self.host, self.poll_seconds = host, poll_seconds
        self._stop = threading.Event()
        self._started = False
        self.registry.refresh()

        limit = min(max_request_bytes, MAX_MESSAGE_BYTES)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=grpc_threads, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     # gRPC shares a port with SO_REUSEPORT by default: a second server on a
                     # taken port would split the clients with the first, without an error
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.predictor), self.grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry), self.grpc_server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.grpc_server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC to {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.rest = None
        self.rest_port = None
        if rest_port is not None:
            try:
                self.rest = _RestServer((host, rest_port), RestApp(self.predictor),
                                        max_rest_bytes, max_concurrent)
            except OSError as e:
                raise OSError(f"cannot bind REST to {host}:{rest_port}: {e}") from None
            self.rest_port = self.rest.server_address[1]

    def start(self) -> "Server":
        self._started = True
        self.grpc_server.start()
        threads = [threading.Thread(target=self._poll, name="model-poll", daemon=True)]
        if self.rest is not None:
            threads.append(threading.Thread(target=self.rest.serve_forever, name="rest",
                                            daemon=True))
        for t in threads:
            t.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.registry.refresh()
            except Exception:  # noqa: BLE001 - e.g. the model base vanished for a moment
                log.exception("polling %s failed", self.registry.model_base)

    def stop(self):
        self._stop.set()
        if self.rest is not None:
            if self._started:
                self.rest.shutdown()
            self.rest.server_close()
        self.grpc_server.stop(grace=1.0).wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-serve",
        description="Serve the newest version of every model under DIR over TF Serving's gRPC "
                    "and REST APIs (development server; TF Serving itself serves the same DIR).")
    p.add_argument("--model-base", required=True, help="directory of NAME/VERSION SavedModels")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    p.add_argument("--rest-port", type=int, default=8501, help="REST port; 0 picks a free one")
    p.add_argument("--no-rest", action="store_true", help="serve gRPC only")
    p.add_argument("--poll-seconds", type=float, default=5.0,
                   help="how often to look for new versions (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help="largest gRPC message accepted (default: 2 GiB - 1)")
    p.add_argument("--max-rest-bytes", type=int, default=MAX_REST_BYTES,
                   help="largest REST body accepted (default: 256 MiB, one 256^3 volume as JSON; "
                        "parsing JSON takes several times the body)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="largest batch one request may ask for (default: %(default)s)")
    p.add_argument("--run-voxels", type=int, default=RUN_VOXELS,
                   help="a request's samples run in groups of at most this many voxels (default: "
                        "2 x 256^3, i.e. 2 volumes at 256^3 and 16 at 128^3): bounds the memory "
                        "of one execution")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="model executions at once; more requests wait (default: %(default)s)")
    p.add_argument("--grpc-max-threads", type=int, default=16,
                   help="gRPC worker threads (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every REST request")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("port", "rest_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')} must be in 0..65535")
    for flag in ("max_request_bytes", "max_rest_bytes", "max_batch", "max_concurrent",
                 "grpc_max_threads", "run_voxels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.poll_seconds <= 0:
        parser.error("--poll-seconds must be > 0")
    if not os.path.isdir(args.model_base):
        parser.error(f"--model-base {args.model_base!r} is not a directory")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = Server(args.model_base, args.host, args.port,
                        None if args.no_rest else args.rest_port, args.poll_seconds,
                        args.max_request_bytes, args.max_batch, args.max_concurrent,
                        args.grpc_max_threads, args.max_rest_bytes, args.run_voxels)
    except OSError as e:
        print(f"hagan-serve: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    models = ", ".join(server.registry.names()) or f"none yet (watching {args.model_base})"
    rest = f", REST on http://{args.host}:{server.rest_port}" if server.rest else ""
    print(f"hagan-serve: gRPC on {args.host}:{server.port}{rest}; models: {models}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
