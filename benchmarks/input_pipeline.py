"""Input pipeline: volumes/s and peak memory of the training tf.data pipeline (`make_dataset`).

A GPU iteration is short (0.044 s at 128^3 and 0.130 s at 256^3 on an H100, batch 2: see
RESULTS.md), so the records must be read, parsed and shuffled at 45 and 15 volumes/s for the
GPU not to wait. This writes N float16 records of noise at S^3 (or reads --data DIR), then, in a
fresh process per row, times `--batches` batches of 2 after the first (which fills the shuffle
block) and reports the peak RSS. Freshly written records sit in the page cache, so the figures
are of parsing and shuffling, not of the disk. Prints a markdown table and writes JSON.

    python benchmarks/input_pipeline.py                          # S = 128 and 256, shuffle 0 / 16 / 64
    python benchmarks/input_pipeline.py --sizes 128 --shuffle 64 --records 80
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

GPU_ITERATION_S = {128: 0.0442, 256: 0.1297}  # H100, batch 2 (RESULTS.md, fifth session)


def write_records(out: str, size: int, n: int, shards: int) -> None:
    from hagan_tf.data.records import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(out, shards) as w:
        for i in range(n):
            volume = rng.standard_normal((size, size, size), np.float32).clip(-1, 1)
            w.write(volume, f"noise{i:04d}", dtype="float16")


def child(data: str, size: int, shuffle: int, batches: int, dtype: str) -> dict:
    from hagan_tf.data.pipeline import make_dataset
    from hagan_tf.data.records import first_record

    if dtype == "stored":  # as hagan-train reads them
        dtype = first_record(data)["dtype"].decode()
    it = iter(make_dataset(data, 2, size=size, shuffle=shuffle, dtype=dtype))
    start = time.perf_counter()
    next(it)["volume"]
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)["volume"]
    wall = time.perf_counter() - start
    return {"first_batch_s": first, "volumes_per_s": 2 * batches / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--shuffle", type=int, nargs="+", default=[0, 16, 64])
    p.add_argument("--records", type=int, default=80, help="records written per size")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batches", type=int, default=40, help="timed batches of 2")
    p.add_argument("--data", help="time this records directory instead (one size)")
    p.add_argument("--dtype", default="stored", choices=["stored", "float32", "float16"],
                   help="the volumes' type out of the pipeline (default: the records' own, as "
                        "hagan-train reads them)")
    p.add_argument("--child", nargs=3, type=int, metavar=("SIZE", "SHUFFLE", "BATCHES"),
                   help=argparse.SUPPRESS)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "input_pipeline.json"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.data, *args.child, args.dtype)))
        return 0
    if args.data and len(args.sizes) != 1:
        p.error("--data takes the records' one size in --sizes")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            data = args.data
            if data is None:
                data = os.path.join(tmp, str(size))
                start = time.perf_counter()
                write_records(data, size, args.records, args.shards)
                print(f"[input_pipeline] wrote {args.records} records at {size}^3 in "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
            for shuffle in args.shuffle:
                out = subprocess.run(
                    [sys.executable, __file__, "--data", data, "--dtype", args.dtype, "--child",
                     str(size), str(shuffle), str(args.batches)], check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                need = 2 / GPU_ITERATION_S[size] if size in GPU_ITERATION_S else None
                rows.append({"size": size, "shuffle": shuffle, **r, "h100_needs_volumes_per_s": need})
                print(f"[input_pipeline] S={size} shuffle={shuffle}: {r['volumes_per_s']:.1f} vol/s, "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr)

    print("| S | shuffle | volumes/s | float32-equivalent MB/s | first batch s | peak RSS MB | an H100 needs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mbs = r["volumes_per_s"] * r["size"] ** 3 * 4 / 2 ** 20
        need = f"{r['h100_needs_volumes_per_s']:.1f}" if r["h100_needs_volumes_per_s"] else ""
        print(f"| {r['size']} | {r['shuffle']} | {r['volumes_per_s']:.1f} | {mbs:.0f} | "
              f"{r['first_batch_s']:.2f} | {r['peak_rss_mb']:.0f} | {need} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": facts(),
                   "dtype": args.dtype, "records": args.records, "shards": args.shards, "batch_size": 2,
                   "timed_batches": args.batches, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
