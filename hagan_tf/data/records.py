"""The one TFRecord schema shared by the Beam pipeline (writer) and training (reader).

A dataset directory holds `*.tfrecord` shards, `manifest.jsonl` (one JSON object per volume)
and `summary.json`. Each record is a `tf.train.Example` with:
  volume     bytes   raw little-endian voxels, C order over `shape`
  dtype      bytes   "float16" or "float32"
  shape      int64[3] [D, H, W], D the axial (slab) axis
  subject_id bytes
  label      int64   class label, -1 when unlabelled
  fold       int64   cross-validation fold, -1 when unassigned
"""

from __future__ import annotations

import collections
import concurrent.futures
import fnmatch
import json
import os
import posixpath
import struct

import numpy as np
import tensorflow as tf

from ..arrays import STORED_DTYPES, stored_voxels

SHARD_PATTERN = "*.tfrecord"
MANIFEST = "manifest.jsonl"
DEAD_LETTER = "dead_letter.jsonl"
SUMMARY = "summary.json"
DTYPES = STORED_DTYPES

FEATURES = {
    "volume": tf.io.FixedLenFeature([], tf.string),
    "dtype": tf.io.FixedLenFeature([], tf.string),
    "shape": tf.io.FixedLenFeature([3], tf.int64),
    "subject_id": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "fold": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


def shard_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.tfrecord"


def encode_example(volume: np.ndarray, subject_id: str, label: int = -1, fold: int = -1,
                   dtype: str = "float16") -> bytes:
    """Serialise one [D, H, W] volume (values in [-1, 1]) as a tf.train.Example."""
    stored = stored_voxels(volume, subject_id, dtype)
    data = stored.tobytes()

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    return tf.train.Example(features=tf.train.Features(feature={
        "volume": b(data), "dtype": b(dtype.encode()), "shape": i(stored.shape),
        "subject_id": b(str(subject_id).encode()), "label": i([int(label)]), "fold": i([int(fold)]),
    })).SerializeToString()


def parse_example(serialized, dtype=tf.float32) -> dict:
    """tf.function-friendly parse: {'volume': `dtype` [D, H, W, 1], 'subject_id', 'label', 'fold'}."""
    f = tf.io.parse_single_example(serialized, FEATURES)
    volume = tf.cond(
        tf.equal(f["dtype"], "float16"),
        lambda: tf.cast(tf.io.decode_raw(f["volume"], tf.float16, little_endian=True), dtype),
        lambda: tf.cast(tf.io.decode_raw(f["volume"], tf.float32, little_endian=True), dtype))
    volume = tf.reshape(volume, tf.concat([f["shape"], [1]], 0))
    return {"volume": volume, "subject_id": f["subject_id"], "label": f["label"], "fold": f["fold"]}


def first_record(data_dir: str) -> dict:
    """The first record's features as stored (volume bytes, dtype, shape, ...): it stands for a
    dataset's voxel type, and for its size when there is no manifest. Shards may be empty
    (hagan-preprocess writes one per input when inputs are few, and a refused scan's stays empty)."""
    first = next(iter(tf.data.TFRecordDataset(shard_paths(data_dir)).take(1)), None)
    if first is None:
        why = (" (hagan-preprocess refused every scan: see its dead_letter.jsonl)"
               if tf.io.gfile.exists(os.path.join(data_dir, DEAD_LETTER)) else "")
        raise ValueError(f"no records in {data_dir!r}: every shard is empty{why}")
    return {k: v.numpy() for k, v in tf.io.parse_single_example(first, FEATURES).items()}


def decode_example(serialized: bytes) -> dict:
    """NumPy-side parse of one record (tests, tools)."""
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in parse_example(serialized).items()}


def join(*parts: str) -> str:
    """os.path.join, but with "/" for URLs (gs://, hdfs://) whatever the local OS."""
    return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def files_in(directory: str, pattern: str) -> list[str]:
    """Files of `directory` (local, gs://, hdfs://) whose names match `pattern`. Unlike
    glob(DIR/pattern), brackets or stars in the directory's own name are not a pattern: a
    glob of "runs/a[12]/*" would read or delete the files of runs/a1 and runs/a2."""
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(join(directory, n.rstrip("/")) for n in tf.io.gfile.listdir(directory)
                  if fnmatch.fnmatchcase(n.rstrip("/"), pattern))


def shard_paths(data_dir: str) -> list[str]:
    """Shards of a dataset directory, local or on any filesystem TF reads (gs://, hdfs://)."""
    paths = files_in(data_dir, SHARD_PATTERN)
    if not paths:
        raise FileNotFoundError(f"no {SHARD_PATTERN} shards in {data_dir!r}")
    return paths


def shard_problems(data_dir: str) -> list[str]:
    """What is wrong with the shards' files, one line each: a record cut short (a partial copy),
    or a record count that differs from the manifest's. Reads only the 12-byte record headers,
    so it costs a seek per volume (16 shards at a time); a flipped bit inside a record is left
    to the CRC check."""
    rows = read_manifest(data_dir)
    expected = collections.Counter(r["shard"] for r in rows) if all("shard" in r for r in rows) else {}
    paths = shard_paths(data_dir)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # on gs:// each header is a request
        counted = list(pool.map(_count_records, paths))
    found, problems = set(), []
    for path, (count, problem) in zip(paths, counted):
        name = os.path.basename(path)
        found.add(name)
        if problem:
            problems.append(f"{name}: {problem}")
        elif expected and count != expected.get(name, 0):
            problems.append(f"{name}: {count} record(s), the manifest lists {expected.get(name, 0)}")
    problems += [f"{name}: missing, the manifest lists {n} record(s) in it"
                 for name, n in sorted(expected.items()) if name not in found]
    return problems


def unreadable_shards(data_dir: str) -> list[str]:
    """Shards with a record that fails TF's CRC check, one line each. Reads every byte, so it
    runs only after reading failed, to name the file that TF's error leaves out."""
    bad = []
    for path in shard_paths(data_dir):
        try:
            tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1)
        except tf.errors.DataLossError as e:
            bad.append(f"{os.path.basename(path)}: {e.message.split('}}')[-1].split(' [Op:')[0].strip()}")
    return bad


def _count_records(path: str) -> tuple[int, str | None]:
    """Walks TFRecord framing: uint64 length, uint32 CRC, data, uint32 CRC."""
    with tf.io.gfile.GFile(path, "rb") as f:
        size, pos, count = f.size(), 0, 0
        while pos < size:
            if size - pos < 12:
                return count, f"{size - pos} stray byte(s) after record {count}"
            f.seek(pos)
            length = struct.unpack("<Q", f.read(8))[0]
            if pos + 16 + length > size:
                return count, (f"record {count} is cut short ({length} bytes announced, "
                               f"{max(size - pos - 12, 0)} present): the file is truncated")
            pos += 16 + length
            count += 1
    return count, None


def read_manifest(data_dir: str) -> list[dict]:
    path = os.path.join(data_dir, MANIFEST)
    if not tf.io.gfile.exists(path):
        return []
    rows = []
    with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}, line {number}: not a JSON row (a truncated "
                                     "copy?): re-copy the dataset or re-run hagan-preprocess") from None
    return rows


class ShardWriter:
    """Writes examples round-robin into N shards plus the manifest (the non-Beam writer)."""

    def __init__(self, out_dir: str, shards: int = 1):
        os.makedirs(out_dir, exist_ok=True)
        for name in files_in(out_dir, "data-*-of-*.tfrecord") + [
                os.path.join(out_dir, n) for n in (MANIFEST, SUMMARY, DEAD_LETTER)]:
            if tf.io.gfile.exists(name):  # a dataset written here before: stale shards would
                tf.io.gfile.remove(name)  # be read along with the new ones
        self.out_dir, self.count, self.n = out_dir, shards, 0
        self.names = [shard_name(i, shards) for i in range(shards)]
        self.writers = [tf.io.TFRecordWriter(os.path.join(out_dir, n)) for n in self.names]
        self.manifest = open(os.path.join(out_dir, MANIFEST), "w")

    def write(self, volume, subject_id, label=-1, fold=-1, dtype="float16", **meta):
        shard = self.n % self.count
        self.writers[shard].write(encode_example(volume, subject_id, label, fold, dtype))
        row = {"subject_id": str(subject_id), "label": int(label), "fold": int(fold),
               "shape": list(np.shape(volume)[:3]), "shard": self.names[shard], **meta}
        self.manifest.write(json.dumps(row) + "\n")
        self.n += 1

    def close(self, complete: bool = True, **summary):
        """Closes the files; the summary, which marks the dataset finished, only if complete."""
        for w in self.writers:
            w.close()
        self.manifest.close()
        if complete:
            with open(os.path.join(self.out_dir, SUMMARY), "w") as f:
                json.dump({"written": self.n, "shards": self.count, **summary}, f, indent=2)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(complete=exc_type is None)
