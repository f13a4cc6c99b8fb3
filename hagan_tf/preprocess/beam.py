"""`hagan-preprocess`: a Beam job from scans to training records, accounting for every input.

The launcher lists the inputs, joins labels and assigns folds and shards (all cheap, on file
names); the pipeline groups the scans by shard and, per shard, runs the shared transform on each
scan and streams the records into that shard. Every input ends up either in the records (and in
`manifest.jsonl`, with the shard it is in) or in `dead_letter.jsonl` with a one-line reason.

Why not `WriteToTFRecord`: with a fixed shard count it groups the serialised volumes themselves,
which the DirectRunner holds in memory all at once (32 GB per 1,000 scans at 256^3), and it
cannot say which shard a record went to. Grouping the small scan entries instead keeps one
volume per worker in memory and names each record's shard exactly (`records.shard_name`).

The workers' code (`workers`: `WriteShard`, `WriteJsonl`) imports neither TensorFlow nor
`data.records` (which imports it): it writes through Beam's own file systems and `tfrecord`'s
TF-free encoder, so a worker process starts in ~2 s instead of ~9 s. The launcher (`plan` and
this module's command line) still uses `tf.io.gfile`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid

# Importing Beam warns on the root logger, at every run, that its optional BigQuery client is
# missing: the job uses none of BigQuery.
logging.getLogger().addFilter(lambda r: not str(r.msg).startswith("apitools not found"))
import apache_beam as beam  # noqa: E402

from ..config import HAGANConfig  # noqa: E402
from .plan import (MIN_SHARDS, assign_shards, default_shards, list_inputs, plan,  # noqa: E402,F401
                   read_labels)
from .transform import CT_WINDOW  # noqa: E402
from .workers import (STAGES, TMP_PREFIX, WriteJsonl, WriteShard, _gfile, _join,  # noqa: E402,F401
                      _records, build_pipeline, shard_name)

WORKER_BYTES = 2 * 2 ** 30  # a local worker's peak on a 512 x 512 x 300 CT, with headroom
_RECORDS_NAMES = ("DEAD_LETTER", "MANIFEST", "SHARD_PATTERN", "SUMMARY")


def __getattr__(name):
    """The launcher's TensorFlow-backed names, imported on first use (workers never use them)."""
    if name in _RECORDS_NAMES:
        from ..data import records

        return getattr(records, name)
    if name == "gfile":
        return _gfile()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
