"""Preprocessing throughput: `hagan-preprocess` (Beam, DirectRunner) vs a serial loop, per stage.

Generates chest-CT-like int16 NIfTI scans of 512 x 512 x (100..300) voxels, then measures volumes/s
at each S for (a) a plain loop over `preprocess_file` in this process, (b) `hagan-preprocess` as
a user runs it (the DirectRunner's default here: one thread per core) and (c) with worker
processes (`--direct_running_mode multi_processing --direct_num_workers W`, start-up included),
as cluster runners run it. One scan per shard, so every scan is a unit of parallel work. Also
reports where the time goes: each stage summed over scans (read = file + gzip + reorientation,
normalise, resample = anti-aliasing + zoom, write = encode + TFRecord), the gzip codec alone,
and what a fresh worker process pays to import its code with and without TensorFlow.

    python benchmarks/preprocess.py              # 6 scans, S = 128 and 256
    python benchmarks/preprocess.py --volumes 4 --sizes 128 --modes serial threads
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib

import nibabel as nib
import numpy as np
from tqdm import tqdm

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import preprocess_file
from hagan_tf.preprocess.beam import main as preprocess_main
from machine import describe, facts  # noqa: E402  (benchmarks/ is sys.path[0])

SPACING = (0.7, 0.7, 1.25)  # x, y, z in mm: a typical chest CT


def make_scan(path: str, depth: int, seed: int) -> str:
    """A 512 x 512 x depth int16 HU scan: a half-resolution phantom upsampled, plus noise."""
    rng = np.random.default_rng(seed)
    vol = phantom_hu(((depth + 1) // 2, 256, 256), rng.uniform(0.6, 0.95), rng)
    vol = vol.repeat(2, 0)[:depth].repeat(2, 1).repeat(2, 2).astype(np.int16)
    vol += rng.integers(-20, 21, size=vol.shape, dtype=np.int16)
    vol[:3] = -2048  # padding outside the field of view, trimmed by the transform
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.diag([*SPACING, 1.0])), path)
    return path


MODES = {  # name -> (label, Beam options)
    "threads": ("hagan-preprocess (default: threads)", []),
    "processes": ("hagan-preprocess, worker processes",
                  ["--direct_running_mode", "multi_processing", "--direct_num_workers", "W"]),
}


def run_beam(scans: str, out: str, size: int, extra: list[str]) -> tuple[float, dict, int]:
    args = ["--input", scans, "--output", out, "--size", str(size), "--overwrite",
            "--shards", str(len(os.listdir(scans))), *extra]
    start = time.perf_counter()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        if preprocess_main(args) != 0:
            raise RuntimeError(f"the pipeline failed: {err.getvalue()[-2000:]}")
    wall = time.perf_counter() - start
    summary = json.load(open(os.path.join(out, "summary.json")))
    if summary["written"] != len(os.listdir(scans)):
        raise RuntimeError(f"only {summary['written']} scans written: see {out}")
    threads = re.search(r"(\d+) threads\)", err.getvalue())
    return wall, summary["stage_seconds"], int(threads.group(1)) if threads else 1


def cpu_seconds() -> float:
    """User + system time of this process (all threads) and its finished child processes."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def import_seconds(module: str, repeats: int = 2) -> float:
    """What a fresh worker process pays to import `module` (the best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True,
                       capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        best = min(best, time.perf_counter() - start)
    return round(best, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=6)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="worker processes in the 'processes' mode (default: one per core)")
    p.add_argument("--modes", nargs="+", default=["serial", "threads", "processes"],
                   choices=["serial", *MODES])
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each mode, interleaved (serial, threads, processes, serial, ...), "
                        "so that load from other jobs falls on every mode alike")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "preprocess.json"))
    args = p.parse_args(argv)
    if min(args.volumes, args.workers, args.repeats) < 1:
        p.error("--volumes, --workers and --repeats must be positive")

    rows, load = [], [os.getloadavg()[0]]
    startup = {"import tensorflow": import_seconds("tensorflow"),
               "import the worker's code (hagan_tf.preprocess.beam)":
                   import_seconds("hagan_tf.preprocess.beam")}
    with tempfile.TemporaryDirectory() as tmp:
        scans = os.path.join(tmp, "scans")
        os.makedirs(scans)
        depths = np.linspace(100, 300, args.volumes).round().astype(int)
        paths = [make_scan(os.path.join(scans, f"ct{i:03d}.nii.gz"), int(d), i)
                 for i, d in enumerate(tqdm(depths, desc="generating scans", unit="scan"))]
        start = time.perf_counter()
        for path in paths:
            zlib.decompress(open(path, "rb").read(), 31)
        gzip_s = round(time.perf_counter() - start, 2)
        preprocess_file(paths[0], args.sizes[0])  # warm: the first call pays one-off costs
        runs = []
        for size in args.sizes:
            for repeat in range(args.repeats):
                for mode in args.modes:
                    load_now, cpu = os.getloadavg()[0], cpu_seconds()
                    if mode == "serial":
                        stages, start = {}, time.perf_counter()
                        for path in tqdm(paths, desc=f"serial S={size}", unit="scan"):
                            preprocess_file(path, size, timings=stages)
                        wall, workers, label = time.perf_counter() - start, 1, "serial loop"
                        stages = {k: round(v, 2) for k, v in stages.items()}
                    else:
                        label, extra = MODES[mode]
                        extra = [str(args.workers) if a == "W" else a for a in extra]
                        print(f"{label} S={size} ...", file=sys.stderr)
                        wall, stages, threads = run_beam(scans, os.path.join(tmp, "out"), size,
                                                         extra)
                        workers = args.workers if mode == "processes" else threads
                    runs.append({"size": size, "mode": label, "workers": workers,
                                 "repeat": repeat, "seconds": round(wall, 2),
                                 "cpu_seconds": round(cpu_seconds() - cpu, 2),
                                 "load_avg_1m_at_start": round(load_now, 2),
                                 "stage_seconds": stages})
    rows = []
    for size in args.sizes:
        for label in dict.fromkeys(r["mode"] for r in runs if r["size"] == size):
            mine = [r for r in runs if r["size"] == size and r["mode"] == label]
            mean = round(float(np.mean([r["seconds"] for r in mine])), 2)
            stages = {k: round(float(np.mean([r["stage_seconds"].get(k, 0) for r in mine])), 2)
                      for k in mine[0]["stage_seconds"]}
            rows.append({"size": size, "mode": label, "workers": mine[0]["workers"],
                         "seconds": mean, "best_seconds": min(r["seconds"] for r in mine),
                         "volumes_per_s": round(args.volumes / mean, 3),
                         "cpu_seconds": round(float(np.mean([r["cpu_seconds"] for r in mine])), 2),
                         "stage_seconds": stages})
    for r in rows:
        serial = [s for s in rows if s["size"] == r["size"] and s["mode"] == "serial loop"]
        if serial:
            r["vs_serial"] = round(serial[0]["seconds"] / r["seconds"], 2)
            r["vs_serial_best"] = round(serial[0]["best_seconds"] / r["best_seconds"], 2)

    result = {
        "benchmark": "preprocess", "volumes": args.volumes,
        "scan": f"512x512x({depths.min()}..{depths.max()}) int16 .nii.gz",
        "machine": facts(),
        "load_avg_1m_before_after": [round(x, 2) for x in load + [os.getloadavg()[0]]],
        "gzip_decode_seconds_all_scans": gzip_s, "worker_startup_seconds": startup,
        "repeats": args.repeats, "rows": rows, "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.volumes} scans of {result['scan']} on {describe(result['machine'])}, load "
          f"average {result['load_avg_1m_before_after']} (before, after)\n")
    print(f"Mean of {args.repeats} interleaved runs (best in brackets); CPU s = user + system "
          "of this process and its workers:\n")
    print("| S | mode | workers | seconds | volumes/s | vs serial | CPU s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['workers']} | {r['seconds']} "
              f"({r['best_seconds']}) | {r['volumes_per_s']} | {r.get('vs_serial', '')} "
              f"({r.get('vs_serial_best', '')}) | {r['cpu_seconds']} |")
    stages = ("read", "normalise", "resample", "write")
    print("\nTime per stage, summed over the scans (s; several workers overlap):\n")
    print("| S | mode | " + " | ".join(stages) + " |\n|---|---|" + "---|" * len(stages))
    for r in rows:
        st = r["stage_seconds"]
        print(f"| {r['size']} | {r['mode']} | "
              + " | ".join(str(st.get(k, "-")) for k in stages) + " |")
    print(f"\ngzip decoding alone (all scans, zlib): {gzip_s} s; a fresh worker process imports "
          + ", ".join(f"{k}: {v} s" for k, v in startup.items()))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
