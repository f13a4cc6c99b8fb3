"""`hagan-preprocess`: a Beam job from scans to training records, accounting for every input.

The launcher lists the inputs, joins labels and assigns folds and shards (all cheap, on file
names); the pipeline groups the scans by shard and, per shard, runs the shared transform on each
scan and streams the records into that shard. Every input ends up either in the records (and in
`manifest.jsonl`, with the shard it is in) or in `dead_letter.jsonl` with a one-line reason.

Why not `WriteToTFRecord`: with a fixed shard count it groups the serialised volumes themselves,
which the DirectRunner holds in memory all at once (32 GB per 1,000 scans at 256^3), and it
cannot say which shard a record went to. Grouping the small scan entries instead keeps one
volume per worker in memory and names each record's shard exactly (`records.shard_name`).

The workers' code (`WriteShard`, `WriteJsonl`) imports neither TensorFlow nor `data.records`
(which imports it): it writes through Beam's own file systems and `tfrecord`'s TF-free encoder,
so a worker process starts in ~2 s instead of ~9 s. The launcher still uses `tf.io.gfile`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import uuid

# Importing Beam warns on the root logger, at every run, that its optional BigQuery client is
# missing: the job uses none of BigQuery.
logging.getLogger().addFilter(lambda r: not str(r.msg).startswith("apitools not found"))
import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402

from ..config import HAGANConfig  # noqa: E402
from .readers import DicomSeries, expand_inputs  # noqa: E402
from .tfrecord import encode_example_parts, write_record  # noqa: E402
from .transform import CT_WINDOW, ScanError, preprocess_file, subject_id  # noqa: E402

TMP_PREFIX = ".tmp-"
SHARD_BYTES = 256 * 2 ** 20
MIN_SHARDS = 16  # shards are the unit of parallel work
WORKER_BYTES = 2 * 2 ** 30  # a local worker's peak on a 512 x 512 x 300 CT, with headroom
STAGES = ("copy", "read", "normalise", "resample", "write")  # seconds summed over scans
_RECORDS_NAMES = ("DEAD_LETTER", "MANIFEST", "SHARD_PATTERN", "SUMMARY")
log = logging.getLogger("hagan_tf.preprocess")


def __getattr__(name):
    """The launcher's TensorFlow-backed names, imported on first use (workers never use them)."""
    if name in _RECORDS_NAMES:
        from ..data import records

        return getattr(records, name)
    if name == "gfile":
        return _gfile()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# -- the launcher's plan: inputs, labels, folds, shards ------------------------------------------

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


# -- the command line ------------------------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict]:
    gfile = _gfile()
    if not gfile.exists(path):
        return []
    with gfile.GFile(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _existing_outputs(out_dir: str) -> list[str]:
    r = _records()
    outputs = (r.SHARD_PATTERN, r.MANIFEST, r.SUMMARY, r.DEAD_LETTER, TMP_PREFIX + "*")
    return sorted(p for pattern in outputs for p in r.files_in(out_dir, pattern))


def _prepare_output(parser, out_dir: str, overwrite: bool):
    gfile = _gfile()
    if gfile.exists(out_dir) and not gfile.isdir(out_dir):
        parser.error(f"--output {out_dir!r} exists and is not a directory")
    if gfile.exists(out_dir) and gfile.listdir(out_dir):
        if not overwrite:
            parser.error(f"--output {out_dir!r} is not empty; pass --overwrite to replace "
                         "its records, manifest, dead letters and summary")
        for path in _existing_outputs(out_dir):
            gfile.remove(path)
    try:
        gfile.makedirs(out_dir)
        probe = _join(out_dir, f"{TMP_PREFIX}probe-{uuid.uuid4().hex}")
        with gfile.GFile(probe, "w") as f:
            f.write("ok")
        gfile.remove(probe)
    except Exception as e:
        parser.error(f"cannot write to --output {out_dir!r}: {' '.join(str(e).split())}")


def _progress(out_dir: str, shards: int, done: threading.Event):
    """Shard files appear as they are finished: counting them works on every runner."""
    from tqdm import tqdm

    files_in, SHARD_PATTERN = _records().files_in, _records().SHARD_PATTERN
    with tqdm(total=shards, unit="shard", desc="preprocess", disable=None) as bar:
        while not done.wait(2.0):
            try:
                n = len(files_in(out_dir, SHARD_PATTERN))
            except Exception:
                continue
            bar.update(n - bar.n)
        bar.update(len(files_in(out_dir, SHARD_PATTERN)) - bar.n)


def _beam_options(parser, beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    stray = [a for i, a in enumerate(beam_args) if not a.startswith("-")
             and (i == 0 or not beam_args[i - 1].startswith("--") or "=" in beam_args[i - 1])]
    if stray:
        parser.error(f"unexpected arguments {stray} (quote globs given to --input)")
    options = PipelineOptions(beam_args)
    logging.getLogger("apache_beam.options.pipeline_options").setLevel(logging.ERROR)
    unknown = (set(options.get_all_options(retain_unknown_options=True))
               - set(options.get_all_options()))
    if unknown:
        parser.error("unrecognised arguments (neither ours nor Beam pipeline options): "
                     + ", ".join(f"--{u}" for u in sorted(unknown)))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    return options


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _local_parallelism(options, beam_args: list[str], shards: int) -> str:
    """On the DirectRunner, unless told otherwise, process shards in parallel threads: the
    transform's NumPy, SciPy, zlib and ITK calls release the GIL, so threads use every core
    without starting processes (each costs seconds). One per core, at most one per shard, and
    no more than memory holds (~2 GB each for a 512 x 512 x 300 CT). Returns a description."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = str(options.view_as(StandardOptions).runner)
    direct = options.view_as(DirectOptions)
    told = {a.split("=")[0] for a in beam_args} & {"--direct_running_mode", "--direct_num_workers"}
    if runner not in ("DirectRunner", "SwitchingDirectRunner") or told:
        return runner
    workers = min(os.cpu_count() or 1, shards)
    memory = _memory_bytes()
    if memory:
        workers = min(workers, max(1, memory // WORKER_BYTES))
    if workers > 1:
        direct.direct_running_mode, direct.direct_num_workers = "multi_threading", int(workers)
        return f"{runner}, {workers} threads"
    return runner


def _stage_seconds(result) -> dict:
    """The workers' per-stage times (Beam distribution metrics, ms) summed over scans, in s."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace("hagan_preprocess"))
    except Exception:  # a runner without metrics support
        return {}
    out = {}
    for d in found.get("distributions", []):
        value = d.committed if d.committed is not None else d.attempted
        if value is not None and value.count:
            out[d.key.metric.name] = round(out.get(d.key.metric.name, 0) + value.sum / 1000, 2)
    return {stage: out[stage] for stage in STAGES if stage in out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-preprocess", allow_abbrev=False,
        description="Preprocess scans (CT or MRI; NIfTI, NRRD, MetaImage or DICOM series) into "
                    "HA-GAN training records with Apache Beam. Any other --option is passed to "
                    "Beam (--runner, --direct_num_workers, --flink_master, --project, ...); the "
                    "DirectRunner is the default, with one thread per core.",
        epilog="example: hagan-preprocess --input 'scans/*.nii.gz' --output data/ct128 --size 128 "
               "--modality ct --labels labels.csv --folds 5")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB_OR_DIR",
                   help="scan files, globs (quote them) or directories (searched recursively "
                        "for .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd files and DICOM series, "
                        "grouped by SeriesInstanceUID)")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory to write")
    p.add_argument("--size", type=int, required=True, metavar="S", help="output edge S (S^3)")
    p.add_argument("--modality", choices=("ct", "mri"), default="ct")
    p.add_argument("--window", type=float, nargs=2, default=CT_WINDOW, metavar=("LOW", "HIGH"),
                   help="CT window in HU mapped to [-1, 1] (default: -1024 600)")
    p.add_argument("--percentile", type=float, default=99.9,
                   help="MRI: clip at this percentile (default: 99.9)")
    p.add_argument("--isotropic", type=float, default=None, metavar="MM",
                   help="resample to this isotropic voxel size (mm) before trimming and resizing")
    p.add_argument("--min-extent", type=int, default=None, metavar="VOXELS",
                   help="refuse scans whose trimmed extent is below this along any axis "
                        "(default: S/4, i.e. at most 4x upsampling)")
    p.add_argument("--labels", metavar="CSV",
                   help="CSV with the header 'name,label', joined on file name")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="assign K cross-validation folds by subject id (default: none)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help=f"number of shards (default: ~256 MB each, at least {MIN_SHARDS} "
                        "but at most one per scan)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="voxel type stored in the records")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the records of an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    try:
        HAGANConfig(size=args.size)
    except ValueError as e:
        parser.error(f"--size: {e}")
    if args.modality == "ct" and not args.window[1] > args.window[0]:
        parser.error(f"--window LOW HIGH needs LOW < HIGH, got {args.window}")
    if not 0 < args.percentile <= 100:
        parser.error(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.isotropic is not None and not args.isotropic > 0:
        parser.error(f"--isotropic must be a positive voxel size in mm, got {args.isotropic}")
    if args.folds and args.folds < 2:
        parser.error(f"--folds must be at least 2 (or 0 for none), got {args.folds}")
    if args.shards is not None and args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    options = _beam_options(parser, beam_args)
    import tensorflow as tf  # the launcher's file access (tf.io.gfile); workers do without

    labels = None
    if args.labels:
        try:
            labels = read_labels(args.labels)
        except (OSError, ValueError, tf.errors.OpError) as e:
            parser.error(f"--labels: {' '.join(str(e).split())}")
    paths = list_inputs(args.input)
    if not paths:
        parser.error(f"--input {' '.join(args.input)!r} matches no scans")
    out_dir = args.output.rstrip("/") or "/"
    _prepare_output(parser, out_dir, args.overwrite)

    entries = plan(paths, labels, args.folds, args.fold_seed)
    shards = min(len(entries), args.shards or default_shards(len(entries), args.size, args.dtype))
    transform = dict(size=args.size, modality=args.modality, window=tuple(args.window),
                     percentile=args.percentile, isotropic=args.isotropic,
                     min_extent=args.min_extent)
    where = _local_parallelism(options, beam_args, shards)
    print(f"hagan-preprocess: {len(entries)} scans -> {shards} shards of {args.size}^3 "
          f"in {out_dir} ({where})", file=sys.stderr)
    gfile, records = _gfile(), _records()
    MANIFEST, DEAD_LETTER, SUMMARY = records.MANIFEST, records.DEAD_LETTER, records.SUMMARY
    start = time.time()
    done = threading.Event()
    progress = threading.Thread(target=_progress, args=(out_dir, shards, done), daemon=True)
    progress.start()
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, assign_shards(entries, shards, args.fold_seed), out_dir, shards,
                       args.dtype, **transform)
        result = p.run()
        result.wait_until_finish()
    except Exception as e:
        print(f"error: the pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        done.set()
        progress.join()
        for tmp in records.files_in(out_dir, TMP_PREFIX + "*"):  # left by retried or failed bundles
            gfile.remove(tmp)
    wall = time.time() - start
    stages = _stage_seconds(result)
    rows, dead = _read_jsonl(_join(out_dir, MANIFEST)), _read_jsonl(_join(out_dir, DEAD_LETTER))
    summary = {
        "in": len(entries), "written": len(rows), "failed": len(dead),
        "reconciled": len(entries) == len(rows) + len(dead), "wall_time_s": round(wall, 2),
        "shards": shards, "size": args.size, "modality": args.modality,
        "window": list(args.window) if args.modality == "ct" else None,
        "percentile": args.percentile if args.modality == "mri" else None,
        "isotropic": args.isotropic, "min_extent": args.min_extent, "dtype": args.dtype,
        "folds": args.folds,
        "fold_seed": args.fold_seed, "labels": args.labels,
        "labels_unmatched": (sorted(set(labels) - {e["subject_id"] for e in entries})
                             if labels is not None else []),
        "input": args.input, "runner": options.get_all_options()["runner"],
        "interpolation": "linear (scipy.ndimage.zoom order=1) after Gaussian anti-aliasing",
        "stage_seconds": stages,
    }
    with gfile.GFile(_join(out_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"scans in: {summary['in']}, written: {summary['written']}, failed: {summary['failed']}"
          f" ({DEAD_LETTER}), {wall:.1f} s -> {out_dir}")
    if stages:
        print("time per stage, summed over scans: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()), file=sys.stderr)
    if summary["labels_unmatched"]:
        print(f"warning: {len(summary['labels_unmatched'])} names in --labels match no scan",
              file=sys.stderr)
    if not summary["reconciled"]:
        print("warning: counts do not reconcile (in != written + failed); see the manifest and "
              f"{DEAD_LETTER}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
