"""Parameters per network, and time + peak memory of one full-volume generate and one encode.

Each (size, op) runs in a fresh subprocess so its peak RSS is its own:
    python benchmarks/models.py [--sizes 32 64 128 256] [--repeats 3]
Prints a markdown table and writes benchmarks/results/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_mb() -> float:
    """This process's peak resident set in MB. On Linux VmHWM, the high-water mark of this
    process's own memory: getrusage's ru_maxrss also keeps the largest RSS of the process image
    that exec replaced, here the parent's (on fork+exec the child starts from the parent's
    high-water mark, 1.5-1.9 GB once the parent has built the 256^3 and 512^3 models)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(size: int, op: str, repeats: int, tile_depth: int | None) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from hagan_tf import HAGAN, HAGANConfig

    gan = HAGAN(HAGANConfig(size=size))
    rss_model = peak_rss_mb()
    z = tf.constant(gan.sample_z(1, seed=0))
    if op == "generate":  # eagerly, as HAGAN.generate runs for hagan-sample --run and the apps
        fn, arg = (lambda z: gan.generate(z, tile_depth=tile_depth)), z
    else:
        fn = tf.function(lambda v: gan.encoder(v))
        arg = tf.random.uniform((1, size, size, size, 1), -1, 1, seed=0)
    times = []
    for _ in range(repeats + 1):  # the first call traces
        t = time.perf_counter()
        out = None  # the last call's volume is not kept through this one (512 MiB at 512^3)
        out = np.asarray(fn(arg))
        times.append(time.perf_counter() - t)
    assert np.isfinite(out.sum())  # (not isfinite(out): a 128 MiB mask at 512^3)
    return {"size": size, "op": op, "seconds_median": float(np.median(times[1:])),
            "seconds_first": times[0], "peak_rss_mb": peak_rss_mb(),
            "model_rss_mb": rss_model, "repeats": repeats,
            "tile_depth": _tile_depth(gan.config, tile_depth)}


def _tile_depth(config, tile_depth: int | None) -> int:
    """The slices generate decodes at a time: --tile-depth, else the config's, else the auto
    rule's (>= S: the whole volume at once)."""
    from hagan_tf.tiled import auto_tile_depth

    depth = config.tile_depth if tile_depth is None else tile_depth
    return auto_tile_depth(config.size) if depth is None else depth


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile-depth", type=int, help="slices G decodes at a time (default: the "
                   "config's, by default 32 * (256 / S)^2; 0: the whole volume at once)")
    p.add_argument("--ops", nargs="+", default=["generate", "encode"], choices=["generate", "encode"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "models.json"))
    p.add_argument("--child", nargs=2, metavar=("SIZE", "OP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.repeats, args.tile_depth)))
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hagan_tf import HAGAN, HAGANConfig

    rows = []
    for size in args.sizes:
        params = HAGAN(HAGANConfig(size=size)).parameter_counts()
        row = {"size": size, "params": params}
        for op in args.ops:
            tile = [] if args.tile_depth is None else ["--tile-depth", str(args.tile_depth)]
            out = subprocess.run([sys.executable, __file__, "--child", str(size), op,
                                  "--repeats", str(args.repeats)] + tile, capture_output=True, text=True)
            if out.returncode != 0:
                row[op] = {"error": out.stderr.strip().splitlines()[-1:]}
            else:
                row[op] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"done {size}", file=sys.stderr)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/models.py " +
            " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("| S | G^A | G^L | G^H | D^H | D^L | E^H | E^G | all | generate s | generate peak MB | encode s | encode peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p_ = r["params"]
        g, e = r.get("generate"), r.get("encode")

        def cell(d, k, fmt):  # "-": not run (--ops)
            return "-" if d is None else fmt.format(d[k]) if k in d else "error"
        print(f"| {r['size']} | " + " | ".join(f"{p_[k]:,}" for k in
              ("G^A", "G^L", "G^H", "D^H", "D^L", "E^H", "E^G", "all")) +
              f" | {cell(g, 'seconds_median', '{:.2f}')} | {cell(g, 'peak_rss_mb', '{:.0f}')}"
              f" | {cell(e, 'seconds_median', '{:.2f}')} | {cell(e, 'peak_rss_mb', '{:.0f}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
