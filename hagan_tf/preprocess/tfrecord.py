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

from ..arrays import STORED_DTYPES, stored_voxels

DTYPES = STORED_DTYPES
CRC_CHUNK = 4 * 2 ** 20


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


def _head(number: int, length: int) -> bytes:  # a length-delimited field's tag and length
    return _varint(number << 3 | 2) + _varint(length)


def encode_example_parts(volume: np.ndarray, subject_id: str, label: int = -1, fold: int = -1,
                         dtype: str = "float16") -> tuple[bytes, memoryview]:
    """`records.encode_example` as (head, voxels): the record is head + voxels, and the voxels
    (32 MB at 256^3) are never copied into nested byte strings. The volume goes last: a map's
    entries may come in any order."""
    stored = stored_voxels(volume, subject_id, dtype)
    features = {"dtype": _bytes_feature(dtype.encode()), "shape": _int64_feature(stored.shape),
                "subject_id": _bytes_feature(str(subject_id).encode()),
                "label": _int64_feature([label]), "fold": _int64_feature([fold])}
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, v)) for k, v in features.items())
    data = memoryview(stored).cast("B")
    bytes_list = _head(1, len(data))  # BytesList{value: [data]}
    feature = _head(1, len(bytes_list) + len(data)) + bytes_list  # Feature{bytes_list}
    value = _head(2, len(feature) + len(data)) + feature
    key = _field(1, b"volume")
    entry = _head(1, len(key) + len(value) + len(data)) + key + value  # the map entry
    features_len = len(entries) + len(entry) + len(data)
    return _head(1, features_len) + entries + entry, data  # Example{features: Features{map}}


def encode_example(volume: np.ndarray, subject_id: str, label: int = -1, fold: int = -1,
                   dtype: str = "float16") -> bytes:
    """`records.encode_example`, serialised by hand: one [D, H, W] volume in [-1, 1]."""
    head, data = encode_example_parts(volume, subject_id, label, fold, dtype)
    return head + data.tobytes()


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(f, *parts):
    """Appends one TFRecord, the concatenation of `parts` (bytes-like), to a binary file."""
    size = sum(len(p) for p in parts)
    length = struct.pack("<Q", size)
    f.write(length + struct.pack("<I", _mask(google_crc32c.value(length))))
    crc = 0
    for part in parts:
        for i in range(0, len(part), CRC_CHUNK):  # google_crc32c takes bytes, not memoryviews
            crc = google_crc32c.extend(crc, bytes(part[i:i + CRC_CHUNK]))
        f.write(part)
    f.write(struct.pack("<I", _mask(crc)))
