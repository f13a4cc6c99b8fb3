"""What the Beam workers of `hagan-preprocess` run: per shard, each scan copied in (when it is
remote), read and transformed, and its record streamed into the shard file; the manifest and
the dead letters as JSON lines. `beam` (the launcher) builds the pipeline from these.

Nothing here imports TensorFlow or `data.records` (which does): records are encoded by
`tfrecord` and written through Beam's own file systems, so a worker process starts in ~2 s
instead of ~9 s. The path helpers below are shared with the launcher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from .readers import DicomSeries
from .tfrecord import encode_example_parts, write_record
from .transform import ScanError, preprocess_file

TMP_PREFIX = ".tmp-"
STAGES = ("copy", "read", "normalise", "resample", "write")  # seconds summed over scans
log = logging.getLogger("hagan_tf.preprocess")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _records():
    from ..data import records

    return records


def _join(*parts: str) -> str:
    """`records.join` (os.path.join, "/" for URLs), without importing TensorFlow."""
    return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def shard_name(index: int, count: int) -> str:
    """`records.shard_name` (a test holds them equal), without importing TensorFlow."""
    return f"data-{index:05d}-of-{count:05d}.tfrecord"


def _beam_path(path: str) -> str:
    """Beam's file systems take local paths without the file:// that tf.io.gfile accepts."""
    return path[len("file://"):] if path.startswith("file://") else path


# -- the pipeline ---------------------------------------------------------------------------------

def _copy(src: str, dst: str):
    with FileSystems.open(_beam_path(src), compression_type=CompressionTypes.UNCOMPRESSED) as r, \
            open(dst, "wb") as w:
        shutil.copyfileobj(r, w, 16 * 2 ** 20)


def _data_file(header: str) -> str | None:
    """The separate data file a .mhd or .nhdr header names (None: inline, a list or a pattern)."""
    key = "elementdatafile" if header.lower().endswith(".mhd") else "data file"
    with open(header, "rb") as f:
        for line in f.read(65536).decode("latin-1").splitlines():
            name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
            if sep and name.strip().lower() == key:
                value = value.strip()
                simple = value and " " not in value and "%" not in value
                return value if simple and value.upper() not in ("LOCAL", "LIST") else None
    return None


def _local_copy(source, tmp_dir: str):
    """nibabel, SimpleITK and pydicom read local files: remote scans (gs://, s3://, hdfs://) are
    copied first; a DICOM series' files into a folder of their own, a header's data file beside
    it."""
    if isinstance(source, DicomSeries):
        if not any("://" in f for f in source.files):
            return source
        folder = os.path.join(tmp_dir, "series")
        os.makedirs(folder)
        files = []
        for i, remote in enumerate(source.files):
            name = posixpath.basename(remote)
            local = os.path.join(folder, name if not os.path.exists(os.path.join(folder, name))
                                 else f"{i:05d}-{name}")
            _copy(remote, local)
            files.append(local)
        return dataclasses.replace(source, files=tuple(files), folder=folder)
    path = source
    if "://" not in path:
        return path
    local = os.path.join(tmp_dir, os.path.basename(path))
    _copy(path, local)
    if local.lower().endswith((".mhd", ".nhdr")):
        data = _data_file(local)
        if data and "/" not in data:
            _copy(posixpath.join(posixpath.dirname(path), data), os.path.join(tmp_dir, data))
    return local


def _remove_copy(local, source):
    if local is None or local is source or local == source:
        return
    if isinstance(local, DicomSeries):
        shutil.rmtree(local.folder, ignore_errors=True)
        return
    if local.lower().endswith((".mhd", ".nhdr")) and os.path.exists(local):
        data = _data_file(local)
        if data and "/" not in data and os.path.exists(os.path.join(os.path.dirname(local), data)):
            os.remove(os.path.join(os.path.dirname(local), data))
    if os.path.exists(local):
        os.remove(local)


class WriteShard(beam.DoFn):
    """(shard, entries) -> the shard file; manifest rows (main output) and dead letters.

    Runs without TensorFlow: records are encoded by `tfrecord` and written through Beam's file
    systems. Each stage's time goes to a Beam distribution metric (ms per scan), which every
    runner aggregates across workers.
    """

    DEAD = "dead"

    def __init__(self, out_dir: str, shards: int, dtype: str = "float16", **transform):
        self.out_dir, self.shards, self.dtype, self.transform = out_dir, shards, dtype, transform
        self.scans = beam.metrics.Metrics.counter("hagan_preprocess", "scans")
        self.stage_ms = {stage: beam.metrics.Metrics.distribution("hagan_preprocess", stage)
                         for stage in STAGES}

    def _dead(self, entry: dict, reason: str):
        row = {"source": entry["source"], "subject_id": entry["subject_id"], "reason": reason}
        if "series_uid" in entry:
            row["series_uid"] = entry["series_uid"]
        return beam.pvalue.TaggedOutput(self.DEAD, row)

    def _time(self, stage: str, seconds: float):
        self.stage_ms[stage].update(int(round(seconds * 1000)))

    def process(self, element):
        shard, entries = element
        name = shard_name(shard, self.shards)
        final = _beam_path(_join(self.out_dir, name))
        tmp = _beam_path(_join(self.out_dir, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex}"))
        rows, dead = [], []
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as writer, \
                tempfile.TemporaryDirectory() as scratch:
            for entry in sorted(entries, key=lambda e: (e["source"], e["subject_id"])):
                self.scans.inc()
                if "reason" in entry:
                    dead.append(self._dead(entry, entry["reason"]))
                    continue
                source = entry.get("series", entry["source"])
                local, timings = None, {}
                try:
                    start = time.perf_counter()
                    local = _local_copy(source, scratch)
                    if local is not source:
                        self._time("copy", time.perf_counter() - start)
                    volume, meta = preprocess_file(local, timings=timings, **self.transform)
                except ScanError as e:
                    dead.append(self._dead(entry, str(e)))
                    continue
                except Exception as e:  # a bug or an odd file must not stop the job
                    log.exception("unexpected error on %s", entry["source"])
                    dead.append(self._dead(entry, f"unexpected {type(e).__name__}: "
                                                  f"{' '.join(str(e).split())[:300]}"))
                    continue
                finally:  # a remote scan's local copy goes now, not with the whole shard's
                    _remove_copy(local, source)
                start = time.perf_counter()
                write_record(writer, *encode_example_parts(volume, entry["subject_id"],
                                                           entry["label"], entry["fold"],
                                                           self.dtype))
                self._time("write", time.perf_counter() - start)
                for stage, seconds in timings.items():
                    self._time(stage, seconds)
                meta.pop("subject_id")
                meta["source"] = entry["source"]
                rows.append({"subject_id": entry["subject_id"], "label": entry["label"],
                             "fold": entry["fold"], "shard": name, "shape": list(volume.shape),
                             **meta})
        FileSystems.rename([tmp], [final])  # rows go out only once their data is in place
        yield from rows
        yield from dead


class WriteJsonl(beam.DoFn):
    """A sorted list of dicts -> one JSON-lines file (small: one line per scan)."""

    def __init__(self, path: str):
        self.path = path

    def process(self, rows):
        with FileSystems.create(_beam_path(self.path),
                                compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for row in sorted(rows, key=lambda r: (r["subject_id"], r["source"])):
                f.write((json.dumps(row) + "\n").encode())


def build_pipeline(p: beam.Pipeline, keyed_entries: list[tuple[int, dict]], out_dir: str,
                   shards: int, dtype: str, **transform):
    results = (p
               | "Scans" >> beam.Create(keyed_entries)
               | "ByShard" >> beam.GroupByKey()
               | "Preprocess" >> beam.ParDo(WriteShard(out_dir, shards, dtype, **transform))
               .with_outputs(WriteShard.DEAD, main="rows"))
    records = _records()
    for tag, name in (("rows", records.MANIFEST), (WriteShard.DEAD, records.DEAD_LETTER)):
        (results[tag]
         | f"Collect {name}" >> beam.combiners.ToList()
         | f"Write {name}" >> beam.ParDo(WriteJsonl(_join(out_dir, name))))
    return p
