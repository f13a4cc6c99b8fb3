"""JSON for large numeric arrays, fast: the REST API's volumes without a Python object per voxel.

`json.dumps(arr.tolist())` spends ~1 us per float32 on the shortest repr of its float64 value
(`0.1f` is written `0.10000000149011612`), and `np.asarray(json.loads(body))` builds a Python
list per innermost row (a [1, 32, 32, 32, 1] volume is 32,768 one-element lists, which also
sets off the garbage collector). Here:

- `dumps` writes float32 arrays with NumPy, digits and brackets included, as the shortest of
  6 to 9 significant digits that reads back as the same float32 (TF Serving also writes
  float32 at float32 precision, not as float64); non-finite values as TF Serving's REST API
  writes them: `NaN`, `Infinity`, `-Infinity`. Everything else goes through `json.dumps`.
- `loads` finds the large arrays of plain numbers in a body, checks from its brackets and commas
  that each is one regular (non-ragged) array, reads its numbers as one flat list (json.loads
  still checks each of them) into a `NumberArray`, and the rest of the body with `json.loads`.
  What it cannot show to be such an array is left to `json.loads`, so a body is accepted or
  refused exactly as `json.loads` would, with the same error.
"""

from __future__ import annotations

import json
import re
import secrets

import numpy as np

# --------------------------------------------------------------------------- writing

CHUNK = 1 << 17  # elements formatted at once: bounds the character matrices (~60 B each)
_DIGITS = 9  # float32 needs at most 9 significant digits to read back exactly
_POW10 = 10.0 ** np.arange(23)  # exact in float64, so n / 10^s and n * 10^s round once
_POW10_INT = 10 ** np.arange(_DIGITS + 1, dtype=np.int64)
_WIDTH = 26  # sign + the longest token: "-1.2345678901234567e-308" (repr) is 24 characters
_FIXED_WIDTH = 20  # without repr's tokens: "-1234567890000000.0" is 19

# A token is gathered from a row of 17 characters per element: its digits (0-8), "0" (9),
# "." (10), "e" (11), the exponent's sign and two digits (12-14), nothing (15), its sign (16).
_ZERO, _POINT, _E, _NOTHING, _SIGN = 9, 10, 11, 15, 16


def _layouts() -> np.ndarray:
    """[kind, _WIDTH] indices into that row. Kinds 0-179: fixed notation with 1-9 digits and
    -3..16 digits before the point (repr's range, 1e-4 <= |x| < 1e16); 180-188: d.ddde-05."""
    table = np.full((189, _WIDTH), _NOTHING, np.int8)
    for d in range(1, _DIGITS + 1):
        for point in range(-3, 17):
            if point <= 0:  # 0.000ddd
                cols = [_ZERO, _POINT] + [_ZERO] * -point + list(range(d))
            elif point < d:  # dd.ddd
                cols = list(range(point)) + [_POINT] + list(range(point, d))
            else:  # ddd000.0
                cols = list(range(d)) + [_ZERO] * (point - d) + [_POINT, _ZERO]
            table[(d - 1) * 20 + point + 3, :len(cols) + 1] = [_SIGN] + cols
        cols = [0] + ([_POINT] + list(range(1, d)) if d > 1 else []) + [_E, 12, 13, 14]
        table[180 + d - 1, :len(cols) + 1] = [_SIGN] + cols
    return table


_LAYOUTS = _layouts()
_CONSTANTS = {"nan": b"NaN", "inf": b"Infinity", "zero": b"0.0"}


def _scaled(n: np.ndarray, s: np.ndarray) -> np.ndarray:
    """n / 10^s, one rounding, for |s| <= 22 (|s| is clipped to that)."""
    p = np.take(_POW10, np.abs(s), mode="clip")
    if s.min() >= 0:
        return n / p
    if s.max() < 0:
        return n * p
    return np.where(s >= 0, n / p, n * p)


def _shortest_digits(a: np.ndarray):
    """For positive finite float32 values `a` (as float64): (n, q, ok), a == float32(n * 10^q)
    with n the shortest of 6 to 9 digits, trailing zeros removed. ok is False where that could
    not be shown with exactly rounded float64 arithmetic (|q| > 22); repr writes those."""
    q = np.floor(np.log10(a)).astype(np.int64) - (_DIGITS - 1)
    inside = np.abs(q) <= 21
    q = np.where(inside, q, 0)
    for _ in range(2):  # log10 can be one off next to a power of ten
        n = np.rint(_scaled(a, q))
        q += (n >= 10.0 ** _DIGITS).astype(np.int64) - (n < 10.0 ** (_DIGITS - 1))
    n = np.rint(_scaled(a, q))
    target = a.astype(np.float32)
    ok = inside & (_scaled(n, -q).astype(np.float32) == target)
    n_out, q_out, done = n.copy(), q.copy(), ~ok
    for k in range(6, _DIGITS):  # the shortest that reads back, from n's own digits
        shift = _DIGITS - k
        nk = np.rint(n / 10.0 ** shift)
        good = ~done & (q + shift <= 22) & (
            _scaled(nk, -(q + shift)).astype(np.float32) == target)
        n_out, q_out = np.where(good, nk, n_out), np.where(good, q + shift, q_out)
        done |= good
    n_out = np.where(ok, n_out, 0).astype(np.int64)
    z = np.flatnonzero((n_out % 10 == 0) & (n_out != 0))
    while len(z):  # 5000e-4 -> 5e-1
        n_out[z] //= 10
        q_out[z] += 1
        z = z[n_out[z] % 10 == 0]
    return n_out, q_out, ok


def _number_chars(x: np.ndarray) -> np.ndarray:
    """uint8 [len(x), width]: each float32 of x as JSON text, 0 where no character is."""
    m = len(x)
    row = np.zeros((m, 17), np.uint8)
    row[:, _ZERO], row[:, _POINT], row[:, _E] = ord("0"), ord("."), ord("e")
    row[:, _SIGN] = np.where(np.signbit(x) & ~np.isnan(x), ord("-"), 0)
    kind = np.full(m, 180, np.int64)  # a token of one digit, overwritten below
    special = []

    regular = np.isfinite(x) & (x != 0)
    idx = np.flatnonzero(regular) if not regular.all() else slice(None)
    if np.any(regular):
        n, q, ok = _shortest_digits(np.abs(x[idx]).astype(np.float64))
        d = 1 + sum((n >= 10 ** j).astype(np.int64) for j in range(1, _DIGITS))
        exp10 = q + d - 1
        left = n * _POW10_INT[_DIGITS - d]  # 9 digits, the first d of them n's
        for j in range(_DIGITS - 1, -1, -1):
            left, digit = np.divmod(left, 10)
            row[idx, j] = digit + ord("0")
        row[idx, 12] = np.where(exp10 < 0, ord("-"), ord("+"))
        row[idx, 13] = np.abs(exp10) // 10 % 10 + ord("0")
        row[idx, 14] = np.abs(exp10) % 10 + ord("0")
        fixed = (exp10 >= -4) & (exp10 < 16)
        kind[idx] = np.where(fixed, (d - 1) * 20 + np.clip(exp10 + 1, -3, 16) + 3, 180 + d - 1)
        if not ok.all():  # |q| > 22: beyond exact powers of ten; rare
            special += [(i, repr(float(abs(x[i]))).encode())
                        for i in np.arange(m)[idx][~ok]]
    width = _WIDTH if special else _FIXED_WIDTH
    chars = np.take(row.reshape(-1), np.arange(0, m * 17, 17, dtype=np.int32)[:, None]
                    + _LAYOUTS[:, :width][kind])  # row[i, layout[i]], as one flat gather
    if not regular.all():
        for name, mask in (("zero", x == 0), ("nan", np.isnan(x)), ("inf", np.isinf(x))):
            text = np.frombuffer(_CONSTANTS[name], np.uint8)
            chars[mask, 1:] = np.pad(text, (0, width - 1 - len(text)))
    for i, text in special:
        chars[i, 1:] = 0
        chars[i, 1:1 + len(text)] = np.frombuffer(text, np.uint8)
    return chars


def _float32_text(arr: np.ndarray) -> bytes:
    """A float32 array of rank >= 1 as nested JSON lists."""
    flat = arr.reshape(-1)
    rank = arr.ndim
    # element i opens t lists when i is a multiple of the size of its last t axes, and closes
    # t lists when i + 1 is
    blocks = [int(b) for b in np.cumprod(arr.shape[::-1])]
    ranks = np.arange(rank, dtype=np.int8)[None, :]
    parts = []
    for start in range(0, flat.size, CHUNK):
        x = flat[start:start + CHUNK]
        opens, closes = np.zeros(len(x), np.int8), np.zeros(len(x), np.int8)
        for b in blocks:
            opens[-start % b::b] += 1
            closes[(b - 1 - start) % b::b] += 1
        rows = np.concatenate([
            np.where(ranks < opens[:, None], np.uint8(ord("[")), np.uint8(0)),
            _number_chars(x),
            np.where(ranks < closes[:, None], np.uint8(ord("]")), np.uint8(0)),
            np.full((len(x), 1), ord(","), np.uint8)], axis=1)
        if start + len(x) == flat.size:
            rows[-1, -1] = 0
        parts.append(rows[rows != 0].tobytes())
    return b"".join(parts)


def array_text(arr: np.ndarray) -> bytes:
    """One array as JSON: float32 (rank >= 1, non-empty) by `_float32_text`, else json.dumps."""
    if arr.dtype == np.float32 and arr.size:
        return _float32_text(arr) if arr.ndim else _float32_text(arr.reshape(1))[1:-1]
    if arr.dtype.kind == "f":  # float64, float16, or a float32 scalar: repr of the value
        return json.dumps(arr.astype(np.float64).tolist()).encode()
    return json.dumps(arr.tolist()).encode()


def dumps(obj) -> bytes:
    """json.dumps for dicts, lists and scalars that may hold NumPy arrays (written by
    `array_text`); non-finite floats as NaN / Infinity / -Infinity, as TF Serving writes them."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return array_text(np.asarray(obj))
    if isinstance(obj, dict):
        return b"{" + b", ".join(json.dumps(str(k)).encode() + b": " + dumps(v)
                                 for k, v in obj.items()) + b"}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (np.ndarray, dict, list, tuple))
                                              for v in obj):
        return b"[" + b", ".join(dumps(v) for v in obj) + b"]"
    return json.dumps(obj).encode()


# --------------------------------------------------------------------------- reading

MIN_ARRAY_BYTES = 4096  # smaller arrays are left to json.loads
_NUMBER_RUN = re.compile(rb"\[[\[\]0-9eE.+\-, \t\n\r]+")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_KEY_END = re.compile(rb"[ \t\n\r]*:")
_KEEP_STRUCTURE = bytes(c for c in range(256) if c not in b"[],")
_WHITESPACE = b" \t\n\r"
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")


class NumberArray:
    """A regular JSON array of numbers, read as float64, with its text for the exact path
    (json.loads: e.g. an int64 input, whose values float64 could round)."""

    __slots__ = ("values", "text")

    def __init__(self, values: np.ndarray, text: bytes):
        self.values, self.text = values, text

    def json(self):
        return json.loads(self.text)

    @property
    def shape(self):
        return self.values.shape

    @classmethod
    def stack(cls, arrays: list[NumberArray]):
        """The list of these arrays, as one (a list of the values when they are ragged)."""
        if len({a.shape for a in arrays}) > 1:
            return [a.json() for a in arrays]
        return cls(np.stack([a.values for a in arrays]),
                   b"[" + b",".join(a.text for a in arrays) + b"]")


def _skeleton(shape) -> bytes:
    if len(shape) == 1:
        return b"[" + b"," * (shape[0] - 1) + b"]"
    return b"[" + b",".join([_skeleton(shape[1:])] * shape[0]) + b"]"


def _shape_of(structure: bytes):
    """The shape of a regular nested array from its brackets and commas, or None."""
    rank = len(structure) - len(structure.lstrip(b"["))
    if rank == 0 or rank > 32:
        return None
    lengths, dims = [], []
    for m in range(1, rank + 1):  # the first list m levels up ends at the first run of m ']'
        end = structure.find(b"]" * m)
        if end < 0:
            return None
        lengths.append(end + 2 * m - rank)
    dims.append(lengths[0] - 1)
    for inner, outer in zip(lengths, lengths[1:]):
        d, rest = divmod(outer - 1, inner + 1)
        if rest:
            return None
        dims.append(d)
    shape = tuple(reversed(dims))
    if min(shape) < 1 or _skeleton(shape) != structure:
        return None
    return shape


def read_array(text: bytes) -> NumberArray | None:
    """`text` (brackets, commas, numbers, JSON whitespace) as a NumberArray, or None unless
    it is one regular array of JSON numbers that float64 holds."""
    shape = _shape_of(text.translate(None, _KEEP_STRUCTURE))
    if shape is None:
        return None
    try:  # one flat list: json.loads checks every number and what stands between them (a
        # bracket becomes a space, so "[[1]2]" is "  1 2  ", which it refuses)
        values = np.array(json.loads(b"[" + text.translate(_BRACKETS_TO_SPACES) + b"]"),
                          np.float64)
    except (ValueError, TypeError, OverflowError):  # not JSON; an int beyond float64
        return None
    if values.shape != (int(np.prod(shape)),):
        return None
    return NumberArray(values.reshape(shape), text)


def loads(body: bytes, min_array_bytes: int = MIN_ARRAY_BYTES, **kwargs):
    """json.loads(body, **kwargs), with each array of plain numbers of at least min_array_bytes
    read as a NumberArray. Accepts and refuses exactly what json.loads does."""
    if not isinstance(body, bytes) or len(body) < min_array_bytes:
        return json.loads(body, **kwargs)
    runs = []
    for m in _NUMBER_RUN.finditer(body):
        end = body.rfind(b"]", m.start(), m.end()) + 1
        if end - m.start() >= min_array_bytes:
            runs.append((m.start(), end))
    if not runs:
        return json.loads(body, **kwargs)
    strings = [(s.start(), s.end()) for s in _STRING.finditer(body)]
    tag = secrets.token_hex(8)
    arrays, pieces, at, si = {}, [], 0, 0
    for start, end in runs:
        while si < len(strings) and strings[si][1] <= start:
            si += 1
        if si < len(strings) and strings[si][0] < end:  # inside (or across) a string
            continue
        if _KEY_END.match(body, end):  # an object key: JSON refuses
            continue  # an array there, and would take the string that stands in for it
        array = read_array(body[start:end])
        if array is None:
            continue
        key = f"\x00{tag}:{len(arrays)}"
        arrays[key] = array
        pieces += [body[at:start], json.dumps(key).encode()]
        at = end
    if not arrays:
        return json.loads(body, **kwargs)
    pieces.append(body[at:])
    try:
        parsed = json.loads(b"".join(pieces), **kwargs)
    except ValueError:  # the error as json.loads words it, positions in the body as sent
        return json.loads(body, **kwargs)
    return _restore(parsed, arrays)


def _restore(value, arrays):
    if isinstance(value, str):
        return arrays.get(value, value)
    if isinstance(value, list):
        return [_restore(v, arrays) for v in value]
    if isinstance(value, dict):
        return {k: _restore(v, arrays) for k, v in value.items()}
    return value
