"""A 512^3 volume through hagan-serve equals HAGAN.generate, with the server's time and memory.

Builds a paper_512 HAGAN with random weights (width from --width), exports it, starts
`hagan-serve` as a subprocess, asks it for `generate_from_seed` over gRPC and compares the
volume with `HAGAN.generate` of the same seed in this process (slab by slab, both):
    python benchmarks/serve_512.py [--width 1.0] [--seed 7]
Prints a table and writes benchmarks/results/serve_512.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_mb(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve_512.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.serving.client import Client
    from hagan_tf.serving.export import export_model, seed_latents

    cfg = HAGANConfig.from_yaml(os.path.join(os.path.dirname(HERE), "configs", "paper_512.yaml"))
    gan = HAGAN(cfg.replace(width=args.width))
    row = {"size": cfg.size, "width": args.width, "tile_depth": cfg.tile_depth}
    with tempfile.TemporaryDirectory() as base:
        t = time.perf_counter()
        export_model(gan, base, "hagan", 1)
        row["export_s"] = time.perf_counter() - t
        server = subprocess.Popen(
            [sys.executable, "-m", "hagan_tf.serving.server", "--model-base", base, "--port", "0",
             "--rest-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            m = re.search(r"gRPC on [^:]+:(\d+), REST", server.stdout.readline())
            row["server_idle_peak_mb"] = _peak_mb(server.pid)
            with Client(f"127.0.0.1:{m[1]}", timeout=3600) as client:
                t = time.perf_counter()
                served = client.generate_from_seed(np.array([args.seed], np.int64))
                row["served_s"] = time.perf_counter() - t
            row["server_peak_mb"] = _peak_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
        t = time.perf_counter()
        local = gan.generate(seed_latents([args.seed], cfg.latent_dim))
        row["generate_s"] = time.perf_counter() - t
        row["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["shape"] = list(served.shape)
    row["max_abs_diff"] = float(np.abs(served - local).max())
    row["std"] = float(local.std())
    meta = {"machine": facts(),
            "command": "python benchmarks/serve_512.py " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "row": row}, f, indent=2)
    print("| S | width | served shape | max abs diff vs HAGAN.generate | served s | generate s "
          "| server peak MB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['size']} | {row['width']} | {tuple(row['shape'])} | {row['max_abs_diff']:.2e} "
          f"| {row['served_s']:.1f} | {row['generate_s']:.1f} | {row['server_peak_mb']:.0f} "
          f"| {row['export_s']:.1f} |")
    return 0 if row["max_abs_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
