"""Preprocessing throughput: the Beam job on the DirectRunner (1 and 2 workers) vs a serial loop.

Generates chest-CT-like int16 NIfTI scans of 512 x 512 x (100..300) voxels, then measures volumes/s
at S = 128 and 256 for (a) a plain loop over `preprocess_file` and (b) `hagan-preprocess` with
`--direct_running_mode multi_processing --direct_num_workers W` (one scan per shard, so every scan
is a unit of parallel work; worker start-up included). Prints a markdown table and writes JSON.

    python benchmarks/preprocess.py              # 6 scans, S = 128 and 256, 1 and 2 workers
    python benchmarks/preprocess.py --volumes 4 --sizes 128 --workers 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from tqdm import tqdm

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import preprocess_file
from hagan_tf.preprocess.beam import main as preprocess_main

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


def run_beam(scans: str, out: str, size: int, workers: int) -> float:
    args = ["--input", scans, "--output", out, "--size", str(size), "--overwrite",
            "--shards", str(len(os.listdir(scans))), "--direct_running_mode", "multi_processing",
            "--direct_num_workers", str(workers)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if preprocess_main(args) != 0:
            raise RuntimeError("the pipeline failed")
    wall = time.perf_counter() - start
    summary = json.load(open(os.path.join(out, "summary.json")))
    if summary["written"] != len(os.listdir(scans)):
        raise RuntimeError(f"only {summary['written']} scans written: see {out}")
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=6)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "preprocess.json"))
    args = p.parse_args(argv)
    if args.volumes < 1 or min(args.workers) < 1:
        p.error("--volumes and --workers must be positive")

    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        scans = os.path.join(tmp, "scans")
        os.makedirs(scans)
        depths = np.linspace(100, 300, args.volumes).round().astype(int)
        paths = [make_scan(os.path.join(scans, f"ct{i:03d}.nii.gz"), int(d), i)
                 for i, d in enumerate(tqdm(depths, desc="generating scans", unit="scan"))]
        for size in args.sizes:
            start = time.perf_counter()
            for path in tqdm(paths, desc=f"serial S={size}", unit="scan"):
                preprocess_file(path, size)
            rows.append({"size": size, "mode": "serial loop", "workers": 1,
                         "seconds": time.perf_counter() - start})
            for workers in args.workers:
                wall = run_beam(scans, os.path.join(tmp, "out"), size, workers)
                rows.append({"size": size, "mode": "Beam DirectRunner", "workers": workers,
                             "seconds": wall})
    for r in rows:
        r["seconds"] = round(r["seconds"], 2)
        r["volumes_per_s"] = round(args.volumes / r["seconds"], 3)

    result = {
        "benchmark": "preprocess", "volumes": args.volumes,
        "scan": f"512x512x({depths.min()}..{depths.max()}) int16 .nii.gz",
        "machine": {"cpus": os.cpu_count(),
                    "load_avg_1m_before_after": [round(x, 2) for x in load + [os.getloadavg()[0]]],
                    "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.volumes} scans of {result['scan']}, {os.cpu_count()} CPUs, load average "
          f"{result['machine']['load_avg_1m_before_after']} (before, after)\n")
    print("| S | mode | workers | seconds | volumes/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['workers']} | {r['seconds']} "
              f"| {r['volumes_per_s']} |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
