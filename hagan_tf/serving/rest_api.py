"""TF Serving's REST API for `hagan-serve`: routes, JSON <-> tensors, row and columnar formats.

`RestApp.handle` takes a method, a path and a body and returns (HTTP status, JSON object, its
numeric tensors as NumPy arrays for `json_arrays.dumps`); the HTTP server around it is
`rest_http`. TF Serving's JSON rules, stricter where JSON itself is: booleans are not numbers,
and NaN / Infinity (not JSON) are refused in requests. Outputs are written as TF Serving writes
them, float32 at float32 precision and a non-finite value as `NaN`, `Infinity` or `-Infinity`
(TF Serving's tokens, which Python's json, rapidjson and Jackson read; strict parsers such as
JavaScript's JSON.parse do not).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from . import ServingError, bounded, shown
from .json_arrays import NumberArray
from .json_arrays import loads as json_loads
from .predictor import Predictor
from .registry import Servable

log = logging.getLogger("hagan_tf.serving")

_REST_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
                        r"(?P<action>/metadata|:predict|:classify|:regress)?/?$")
_VERSION = re.compile(r"[0-9]{1,19}", re.ASCII)  # str.isdigit would take "²", which int() refuses


def _refuse_constant(name: str):
    raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {name} is not a JSON number, and "
                                           "hagan-serve takes finite values only")


def _holds_bool(value) -> bool:
    if isinstance(value, list):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, bool)


def _json_array(key: str, value, spec: tf.TensorSpec, may_hold_bools: bool) -> np.ndarray:
    """A JSON value as the array the signature input `key` expects (TF Serving's rules)."""
    if isinstance(value, NumberArray):  # a large array of plain numbers, read by json_arrays
        if spec.dtype.is_floating:
            return value.values.astype(spec.dtype.as_numpy_dtype)
        value = value.json()  # integers exactly (float64 would round those over 2^53)
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
    # NumPy reads [true, 0] as the integers [1, 0]: look for booleans only when the body has one
    if arr.dtype.kind not in kinds or (kinds != "b" and may_hold_bools and _holds_bool(value)):
        got = ("booleans" if kinds != "b" and _holds_bool(value) else
               {"f": "floats", "b": "booleans", "U": "strings"}.get(arr.dtype.kind, "mixed values"))
        raise ServingError("INVALID_ARGUMENT",
                           f"input {key!r} must be {spec.dtype.name}, got {got}")
    if spec.dtype.is_integer and arr.size:
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise ServingError("INVALID_ARGUMENT",
                               f"input {key!r} is out of {spec.dtype.name} range")
    return arr.astype(want)


def _json_value(arr: np.ndarray):
    """An output for json_arrays.dumps: numbers stay an array, strings become a list."""
    if arr.dtype.kind in "OS":
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(arr).tolist()
    return arr


def _column(values: list):
    """One input's values from every instance: stacked when each is a NumberArray."""
    if any(isinstance(v, NumberArray) for v in values):
        if all(isinstance(v, NumberArray) for v in values):
            return NumberArray.stack(values)
        return [v.json() if isinstance(v, NumberArray) else v for v in values]
    return values


class RestApp:
    """TF Serving's REST API: model status, metadata and :predict (row and columnar formats)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        try:
            return 200, self._route(method, path.split("?", 1)[0], body)
        except ServingError as e:
            return e.http_status, {"error": bounded(e.message)}
        except Exception as e:  # noqa: BLE001 - the server must survive any request
            log.exception("REST %s %s failed", method, shown(path, 200))
            return 500, {"error": bounded(f"{type(e).__name__}: {e}")}

    def _route(self, method, path, body):
        m = _REST_PATH.match(path)
        if m is None:
            raise ServingError("NOT_FOUND", f"Malformed request: {shown(method)} {shown(path)}")
        name, action = m["name"], m["action"]
        version = None
        if m["version"] is not None:
            if not _VERSION.fullmatch(m["version"]) or int(m["version"]) >= 2**63:
                raise ServingError("INVALID_ARGUMENT", "version must be a non-negative 64-bit "
                                                       f"integer, got {shown(m['version'])}")
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
            return self._predict(registry.get(name, version), body or b"")
        if method == "POST" and action in (":classify", ":regress"):
            raise ServingError("UNIMPLEMENTED", f"{action[1:]} is not supported; use :predict")
        raise ServingError("NOT_FOUND", f"Malformed request: {shown(method)} {shown(path)}")

    def _predict(self, servable: Servable, body: bytes) -> dict:
        try:
            request = json_loads(body, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as e:  # the last: nesting; UnicodeDecodeError is a
            raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {e}")  # ValueError
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
        may_hold_bools = b"true" in body or b"false" in body  # a scan of bytes, not of values
        inputs = {k: _json_array(k, v, specs[k], may_hold_bools) for k, v in columns.items()}
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
        if isinstance(instances, NumberArray):  # a list of rows of plain numbers
            if len(names) != 1:
                raise ServingError("INVALID_ARGUMENT",
                                   f"each instance must be an object naming the inputs {names}")
            return {names[0]: instances}
        if not isinstance(instances, list) or not instances:
            raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
        if all(isinstance(r, dict) for r in instances):
            keys = set(instances[0])
            if any(set(r) != keys for r in instances):
                raise ServingError("INVALID_ARGUMENT", "every instance must name the same inputs")
            return {k: _column([r[k] for r in instances]) for k in keys}
        if len(names) != 1 or any(isinstance(r, dict) for r in instances):
            raise ServingError("INVALID_ARGUMENT",
                               f"each instance must be an object naming the inputs {names}")
        return {names[0]: instances}
