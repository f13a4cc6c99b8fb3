"""The launcher's plan for `hagan-preprocess`, on file names alone: the inputs, their labels,
subject ids and folds, and which shard each scan goes to."""

from __future__ import annotations

import csv
import hashlib
import io
import math

from .readers import DicomSeries, expand_inputs
from .scans import subject_id
from .workers import _gfile, _join

SHARD_BYTES = 256 * 2 ** 20
MIN_SHARDS = 16  # shards are the unit of parallel work


class _GfileFS:
    """What `readers.expand_inputs` asks of a file system, through tf.io.gfile (gs://, hdfs://)."""

    def __init__(self):
        gfile = _gfile()
        self.isdir, self.exists, self.walk, self.glob = (gfile.isdir, gfile.exists, gfile.walk,
                                                         gfile.glob)
        self.join = _join
        self.open = lambda p: gfile.GFile(p, "rb") if "://" in p else open(p, "rb")


def list_inputs(patterns: list[str]) -> list:
    """Expands DIRs (recursively) and globs into sources: scan files (NIfTI, NRRD, MetaImage) by
    name, DICOM series by content (`readers.expand_inputs`). Explicit paths are kept as given even
    when missing, so that they are reported rather than silently dropped."""
    return [source for _, source in expand_inputs(patterns, _GfileFS())]


def read_labels(path: str) -> dict[str, int]:
    """`name,label` CSV -> {subject id: label}; names may carry .nii/.nii.gz and directories."""
    with _gfile().GFile(path, "r") as f:  # without the BOM that spreadsheets write first
        rows = list(csv.reader(io.StringIO(f.read().removeprefix("\ufeff"))))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["name", "label"]:
        raise ValueError(f"{path}: the first line must be the header 'name,label'")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise ValueError(f"{path}:{line}: expected 'name,label', got {row!r}")
        name, value = subject_id(row[0].strip()), row[1].strip()
        try:
            label = int(value)
        except ValueError:
            label = -1
        if label < 0:
            raise ValueError(f"{path}:{line}: label must be a non-negative integer, got {value!r}")
        if labels.get(name, label) != label:
            raise ValueError(f"{path}:{line}: {name!r} has two labels, {labels[name]} and {label}")
        labels[name] = label
    return labels


def _rank(sid: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest()


def plan(paths: list, labels: dict[str, int] | None = None, folds: int = 0,
         seed: int = 0) -> list[dict]:
    """One entry per input (a path or a `DicomSeries`): subject id, label, fold, or the reason
    it cannot be used. A series' entry also carries it ("series") and its UID.

    Folds are KFold-equivalent and deterministic: subjects sorted by a seeded hash of their id,
    dealt round-robin, so every fold gets n/K subjects (+-1) whatever order the files come in.
    """
    entries, first = [], {}
    for source in paths:
        path = str(source)
        if isinstance(source, DicomSeries):
            sid = source.subject_id
            entry = {"source": path, "subject_id": sid, "label": -1, "fold": -1,
                     "series_uid": source.uid, "series": source}
        else:
            sid = subject_id(path)
            entry = {"source": path, "subject_id": sid, "label": -1, "fold": -1}
        if sid in first:
            entry["reason"] = f"duplicate subject id {sid!r} (also {first[sid]})"
        else:
            first[sid] = path
            if labels is not None:
                if sid in labels:
                    entry["label"] = labels[sid]
                else:
                    entry["reason"] = f"no label for {sid!r} in the labels CSV"
        entries.append(entry)
    usable = sorted((e for e in entries if "reason" not in e),
                    key=lambda e: _rank(e["subject_id"], seed))
    for i, entry in enumerate(usable):
        entry["fold"] = i % folds if folds else -1
    return entries


def default_shards(n: int, size: int, dtype: str) -> int:
    nbytes = n * size ** 3 * (2 if dtype == "float16" else 4)
    return max(1, min(n, max(MIN_SHARDS, math.ceil(nbytes / SHARD_BYTES))))


def assign_shards(entries: list[dict], shards: int, seed: int = 0) -> list[tuple[int, dict]]:
    """Deals entries to shards round-robin in seeded-hash order: shards mix subjects and folds."""
    ranked = sorted(entries, key=lambda e: (_rank(e["subject_id"], seed), e["source"]))
    return [(i % shards, e) for i, e in enumerate(ranked)]
