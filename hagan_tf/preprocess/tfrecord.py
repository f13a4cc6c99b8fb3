"""The records' bytes without TensorFlow, so that Beam workers start without importing it.

Importing TensorFlow costs a worker process ~7 s and ~0.5 GB before its first scan (Dataflow
runs one such process per vCPU). The schema stays `hagan_tf.data.records`'s: `encode_example`
here gives a `tf.train.Example` equal to `records.encode_example`'s (tests check it field by
field), framed as TFRecord (length, masked CRC-32C of it, data, masked CRC-32C of the data).
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np

DTYPES = ("float16", "float32")


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it: negatives take ten bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:  # Feature{bytes_list: BytesList{value: [value]}}
    return _field(1, _field(1, value))


def _int64_feature(values) -> bytes:  # Feature{int64_list: Int64List{value: packed}}
    return _field(3, _field(1, b"".join(_varint(int(v)) for v in values)))


def encode_example(volume: np.ndarray, subject_id: str, label: int = -1, fold: int = -1,
                   dtype: str = "float16") -> bytes:
    """`records.encode_example`, serialised by hand: one [D, H, W] volume in [-1, 1]."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"expected a [D, H, W] volume, got shape {volume.shape}")
    with np.errstate(over="ignore"):  # an overflow is refused below, with its cause
        stored = np.ascontiguousarray(volume, dtype=np.dtype(dtype).newbyteorder("<"))
    if dtype == "float16" and np.isinf(stored).any() and not np.isinf(volume).any():
        raise ValueError(f"{subject_id}: values beyond float16's range (65504) would be stored "
                         "as inf: normalise the volume to [-1, 1] first")
    features = {"volume": _bytes_feature(stored.tobytes()), "dtype": _bytes_feature(dtype.encode()),
                "shape": _int64_feature(volume.shape),
                "subject_id": _bytes_feature(str(subject_id).encode()),
                "label": _int64_feature([label]), "fold": _int64_feature([fold])}
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, v)) for k, v in features.items())
    return _field(1, entries)  # Example{features: Features{feature: map}}


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(f, data: bytes):
    """Appends one TFRecord to a binary file object."""
    length = struct.pack("<Q", len(data))
    f.write(length + struct.pack("<I", _masked_crc(length)))
    f.write(data)
    f.write(struct.pack("<I", _masked_crc(data)))
