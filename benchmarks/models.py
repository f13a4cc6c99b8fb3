"""Parameters per network, and time + peak memory of one full-volume generate and one encode.

Ops: `generate`, HAGAN.generate returning the volume as one NumPy array (as the apps use it);
`stream`, the same decode written slab by slab into a .nii file (io.NiftiVolumes, what
`hagan-sample --run` does), so the volume is never whole in memory; `encode`. Each (size, op)
runs in a fresh subprocess so its peak RSS is its own:
    python benchmarks/models.py [--sizes 32 64 128 256] [--repeats 3] [--ops generate stream]
Prints a markdown table and the peak and time ratios between consecutive sizes, and writes
benchmarks/results/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from machine import describe, facts  # noqa: E402  (benchmarks/ is sys.path[0])

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


def child(size: int, op: str, repeats: int, tile_depth: int | None,
          stream_dir: str | None = None) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import shutil
    import tempfile

    import numpy as np
    import tensorflow as tf

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.io import NiftiVolumes

    gan = HAGAN(HAGANConfig(size=size))
    rss_model = peak_rss_mb()
    z = tf.constant(gan.sample_z(1, seed=0))
    tmp = tempfile.mkdtemp(dir=stream_dir) if op == "stream" else None
    path = tmp and os.path.join(tmp, "sample.nii")
    if op == "generate":  # eagerly, as HAGAN.generate runs for the apps
        fn, arg = (lambda z: np.asarray(gan.generate(z, tile_depth=tile_depth))), z
    elif op == "stream":  # each slab into the file as it is decoded, as hagan-sample --run
        def fn(z):
            with NiftiVolumes([path], size) as files:
                gan.generate(z, tile_depth=tile_depth, out=files)
        arg = z
    else:
        fn = tf.function(lambda v: gan.encoder(v))
        arg = tf.random.uniform((1, size, size, size, 1), -1, 1, seed=0)
    times = []
    for _ in range(repeats + 1):  # the first call traces
        t = time.perf_counter()
        out = None  # the last call's volume is not kept through this one (512 MiB at 512^3)
        out = fn(arg)
        times.append(time.perf_counter() - t)
    peak = peak_rss_mb()
    try:
        if op == "stream":  # the whole file written, finite (read back after the peak is taken)
            assert os.path.getsize(path) == 352 + 4 * size**3
            vol = np.memmap(path, np.float32, "r", 352, (size, size, size))
            assert all(np.isfinite(vol[i:i + 8].sum()) for i in range(0, size, 8))
            del vol
        else:
            assert np.isfinite(np.asarray(out).sum())  # (not isfinite(out): 128 MiB at 512^3)
    finally:
        if tmp:
            shutil.rmtree(tmp)
    return {"size": size, "op": op, "seconds_median": float(np.median(times[1:])),
            "seconds_first": times[0], "peak_rss_mb": peak,
            "model_rss_mb": rss_model, "repeats": repeats,
            "tile_depth": _tile_depth(gan.config, tile_depth), "loadavg_end": os.getloadavg()}


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
    p.add_argument("--ops", nargs="+", default=["generate", "stream", "encode"],
                   choices=["generate", "stream", "encode"])
    p.add_argument("--stream-dir", help="where `stream` writes its .nii (default: the temp dir)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "models.json"))
    p.add_argument("--child", nargs=2, metavar=("SIZE", "OP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.repeats, args.tile_depth,
                               args.stream_dir)))
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hagan_tf import HAGAN, HAGANConfig

    rows, load_start = [], os.getloadavg()
    for size in args.sizes:
        params = HAGAN(HAGANConfig(size=size)).parameter_counts()
        row = {"size": size, "params": params}
        for op in args.ops:
            tile = [] if args.tile_depth is None else ["--tile-depth", str(args.tile_depth)]
            tile += [] if args.stream_dir is None else ["--stream-dir", args.stream_dir]
            out = subprocess.run([sys.executable, __file__, "--child", str(size), op,
                                  "--repeats", str(args.repeats)] + tile, capture_output=True, text=True)
            if out.returncode != 0:
                row[op] = {"error": out.stderr.strip().splitlines()[-1:]}
            else:
                row[op] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"done {size}", file=sys.stderr)
    meta = {"machine": facts(), "command": "python benchmarks/models.py " +
            " ".join(argv or sys.argv[1:]), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    ops = ("generate", "stream", "encode")
    print(describe(meta["machine"]))
    print("| S | G^A | G^L | G^H | D^H | D^L | E^H | E^G | all | model MB | "
          + " | ".join(f"{op} s | {op} peak MB" for op in ops) + " |")
    print("|---" * (11 + 2 * len(ops)) + "|")

    def cell(d, k, fmt):  # "-": not run (--ops)
        return "-" if d is None else fmt.format(d[k]) if k in d else "error"
    for r in rows:
        p_ = r["params"]
        model = next((r[op]["model_rss_mb"] for op in ops if "model_rss_mb" in r.get(op, {})), None)
        print(f"| {r['size']} | " + " | ".join(f"{p_[k]:,}" for k in
              ("G^A", "G^L", "G^H", "D^H", "D^L", "E^H", "E^G", "all")) +
              f" | {'-' if model is None else f'{model:.0f}'} | " +
              " | ".join(f"{cell(r.get(op), 'seconds_median', '{:.2f}')} | "
                         f"{cell(r.get(op), 'peak_rss_mb', '{:.0f}')}" for op in ops) + " |")
    for a, b in zip(rows, rows[1:]):  # the targets compare consecutive sizes
        for op in ops:
            x, y = a.get(op, {}), b.get(op, {})
            if "peak_rss_mb" in x and "peak_rss_mb" in y:
                print(f"{op} {b['size']}^3 / {a['size']}^3: peak "
                      f"{y['peak_rss_mb'] / x['peak_rss_mb']:.2f}x, time "
                      f"{y['seconds_median'] / x['seconds_median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
