"""hagan_tf.serving.json_arrays: the REST API's fast JSON for volumes must read back every
float32 exactly, write non-finite values as TF Serving does, and accept or refuse a request
body exactly as json.loads does."""

import json
import math

import numpy as np
import pytest

from hagan_tf.serving import json_arrays
from hagan_tf.serving.json_arrays import NumberArray


def _same_float32(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # NaN, -0.0 included


EDGES = np.array([0.0, -0.0, 1e-4, 9.99999e-5, 1e16, 9.999999e15, 0.5, 100, 1.5e-5, 123.25,
                  16777216, 16777217, 0.1, 0.2, 0.3, 1e-20, 3.4028235e38, -3.4028235e38,
                  1.4e-45, 1.17549435e-38, 1e22, 1e23, 1e-22, 999999.94, 9.999999, 0.099999994,
                  np.inf, -np.inf], np.float32)


@pytest.mark.parametrize("shape", [(len(EDGES),), (2, len(EDGES), 1), (1, 2, 1, len(EDGES))])
def test_edge_values_read_back_exactly(shape):
    values = np.broadcast_to(EDGES, shape[:-1] + (len(EDGES),)).reshape(shape) \
        if shape[-1] == len(EDGES) else np.broadcast_to(EDGES[:, None], shape)
    text = json_arrays.dumps({"outputs": values})
    _same_float32(json.loads(text)["outputs"], values)


def test_random_floats_of_every_magnitude_read_back_exactly_and_shorter():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)  # every exponent, subnormals, NaN payloads and Inf included
    values = np.where(np.isnan(values), np.float32("nan"), values).reshape(4, -1, 1)
    _same_float32(json.loads(json_arrays.dumps(values)), values)
    tanh = np.tanh(rng.standard_normal((1, 16, 16, 16, 1))).astype(np.float32)
    text = json_arrays.dumps(tanh)
    _same_float32(json.loads(text), tanh)
    assert len(text) < 0.65 * len(json.dumps(tanh.tolist()))  # float32 digits, not float64's


def test_non_finite_outputs_are_written_as_tf_serving_writes_them():
    """TF Serving's REST API (json_tensor.cc, WriteDecimal) writes NaN, Infinity, -Infinity:
    not strict JSON, read by Python's json, rapidjson and Jackson."""
    out = json_arrays.dumps({"outputs": np.array([[np.nan, np.inf], [-np.inf, -0.0]], np.float32)})
    assert out == b'{"outputs": [[NaN,Infinity],[-Infinity,-0.0]]}'
    back = json.loads(out)["outputs"]
    assert math.isnan(back[0][0]) and back[0][1] == math.inf and back[1][0] == -math.inf


def test_dumps_is_json_dumps_for_everything_else():
    obj = {"a": [np.zeros((2, 0), np.float32), np.arange(3)], "b": "x", "c": [1, 2.5, None],
           "d": np.array(True), "e": np.float32(0.25), "f": np.array([1.5, 2], np.float64),
           "g": [{"v": np.ones((1, 2), np.float32)}]}
    assert json.loads(json_arrays.dumps(obj)) == {
        "a": [[[], []], [0, 1, 2]], "b": "x", "c": [1, 2.5, None], "d": True, "e": 0.25,
        "f": [1.5, 2.0], "g": [{"v": [[1.0, 1.0]]}]}
    assert json_arrays.dumps(np.float32(0.1)) == b"0.1"


def _plain(value):
    if isinstance(value, NumberArray):  # its float64 values, and its text for exact integers
        exact = value.json()
        np.testing.assert_array_equal(value.values, np.asarray(exact, np.float64))
        return exact
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _outcome(load, body):
    try:
        return "ok", _plain(load(body))
    except (ValueError, RecursionError) as e:
        return "error", f"{type(e).__name__}: {e}"


VOLUME = json.dumps(np.linspace(-1, 1, 64).reshape(4, 4, 4, 1).tolist())


@pytest.mark.parametrize("body", [
    '{"inputs": {"volume": %s}}' % VOLUME,
    '{"instances": [%s, %s]}' % (VOLUME, VOLUME),
    '{"instances": [{"volume": %s}, {"volume": %s}]}' % (VOLUME, VOLUME),
    '{"inputs": [[1, 2, 3], [4, 5, 6]], "note": "[1, 2, 3, 4, 5, 6, 7, 8]"}',  # in a string
    '{"a": "x\\"[1, 2, 3, 4, 5, 6, 7, 8]\\"", "b": [1, 2, 3, 4, 5, 6, 7, 8]}',  # escaped quotes
    '{[1, 2, 3, 4, 5, 6, 7, 8]: 1}',  # an array as a key: JSON refuses it, whatever stands in
    '{[1, 2, 3, 4, 5, 6, 7, 8]  \n : 1}',
    '[[1, 2], [3]]', '[[1, 2], [3, 4], 5]', '[[1]2, [3]]', '[[1 2], [3, 4]]', '[1, 2,, 3, 4]',
    '[1, 2, 3, 4,]', '[[], []]', '[[[]]]', '[01, 2, 3, 4]', '[1, 2, 3, .5]', '[1, 2, 3, 5.]',
    '[1, +2, 3, 4]', '[1, 2, 3, 1.e5]', '[1, 2, 3, -]', '[1, 2, 3, 1e]', '[1, 2, 3, 1.5.5]',
    '[1, 2, 3, --4]', '[1, 2, 3, 0x10]', '[1, 2, 3, 1e999]', '[1, 2, 3, -0, 0.0, 1E+2, 2e-3]',
    '[1, 2, 3, %s]' % ("9" * 400), '[1, 2, 3, 12345678901234567890123]',
    '[ 1 ,\t2,\n3 ,\r4 ]', '[1, 2, 3, 4\f]', '[1, 2, 3, 4\v]', '[[1, 2], [3, 4]] x',
    '{"a": [1, 2, 3, 4], "a": [5, 6, 7, 8]}', '[1, 2, 3, 4', '1, 2, 3, 4]', '[[1,2],[3,4]]]',
    '{"a": [[1, 2, 3], [4, 5, 6]], "b": [[1, 2, 3], [4, 5, 6]]}', '[-1, -2.5e-3, 3e+2, 0]',
])
def test_loads_accepts_and_refuses_as_json_loads_does(body):
    body = body.encode()
    fast = _outcome(lambda b: json_arrays.loads(b, min_array_bytes=8), body)
    assert fast == _outcome(json.loads, body)


def test_large_arrays_become_number_arrays():
    volume = np.tanh(np.random.default_rng(1).standard_normal((2, 8, 8, 8, 1))).astype(np.float32)
    body = json_arrays.dumps({"signature_name": "encode", "inputs": {"volume": volume}})
    request = json_arrays.loads(body)
    assert isinstance(request["inputs"]["volume"], NumberArray)
    _same_float32(request["inputs"]["volume"].values, volume)
    assert request["signature_name"] == "encode"
    with pytest.raises(ValueError):
        json_arrays.loads(body[:-2])


def test_loads_agrees_with_json_loads_on_mutated_bodies():
    """Thousands of bodies one to three edits away from a valid one, with the characters a
    number array is made of (and quotes and colons): same values, or the same refusal."""
    rng = np.random.default_rng(2)
    base = json.dumps({"inputs": {"z": [[-1.5, 0.25, 3e-05, 10], [0, -0.0, 7.5, 1E+2]]},
                       "s": "a[1, 2]b"}).encode()
    alphabet = b"[]0123456789eE.+-, \t\n\r\":"
    for _ in range(3000):
        body = bytearray(base)
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, len(body) + 1))
            op = rng.integers(0, 3)
            if op == 0:
                body.insert(at, alphabet[rng.integers(0, len(alphabet))])
            elif op == 1 and at < len(body):
                del body[at]
            elif at < len(body):
                body[at] = alphabet[rng.integers(0, len(alphabet))]
        body = bytes(body)
        fast = _outcome(lambda b: json_arrays.loads(b, min_array_bytes=8), body)
        assert fast == _outcome(json.loads, body), body
