"""Two hagan-serve versions side by side: the same model, measurements alternating in rounds.

On a shared machine the load moves between two back-to-back runs of benchmarks/serving.py by
more than the difference being looked for; here both servers run at once, each round measures
A then B (B then A in odd rounds), and the median of the per-round p50s is compared:
    python benchmarks/serving_ab.py --a /path/to/old/checkout --b . [--size 32] [--rounds 6]
        [--signatures generate_preview generate encode] [--protocols grpc rest] [--clients 1 8]
--a/--b are source trees (put first on PYTHONPATH of their server). Both can be the same tree:
that A/A run shows the noise. Prints one line per row and writes results/serving_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import describe, facts  # noqa: E402
from serving import CONFIGS, _inputs, measure  # noqa: E402


def _start(tree: str, base: str):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "hagan_tf.serving.server", "--model-base", base,
                             "--port", "0", "--rest-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tempfile.gettempdir())
    m = re.search(r"gRPC on [^:]+:(\d+), REST on http://[^:]+:(\d+)", proc.stdout.readline())
    return proc, {"grpc": int(m[1]), "rest": int(m[2])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="source tree of server A (e.g. an old checkout)")
    p.add_argument("--b", required=True, help="source tree of server B")
    p.add_argument("--size", type=int, default=32, choices=[32, 128])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=None, help="per measurement (64 / 4)")
    p.add_argument("--signatures", nargs="+", default=["generate_preview", "generate", "encode"])
    p.add_argument("--protocols", nargs="+", default=["grpc", "rest"], choices=["grpc", "rest"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving_ab.json"))
    args = p.parse_args(argv)
    machine = facts()
    print(describe(machine), flush=True)

    import numpy as np

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.serving.client import Client
    from hagan_tf.serving.export import export_model

    cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, "tiny_32.yaml" if args.size == 32
                                             else "paper_128.yaml"))
    base = tempfile.mkdtemp(prefix="hagan-serving-ab-")
    export_model(HAGAN(cfg), base, "m", 1)
    requests = args.requests or (64 if args.size == 32 else 4)
    servers = {"A": _start(args.a, base), "B": _start(args.b, base)}
    rng = np.random.default_rng(0)
    p50 = {}
    try:
        for r in range(args.rounds):
            for signature in args.signatures:
                inputs = _inputs(signature, cfg, rng)
                for protocol in args.protocols:
                    for clients in args.clients:
                        for which in ("AB" if r % 2 == 0 else "BA"):
                            address = f"127.0.0.1:{servers[which][1][protocol]}"
                            row = measure(lambda: Client(address, rest=protocol == "rest",
                                                         model="m"),
                                          signature, inputs, clients, max(requests, clients))
                            p50.setdefault(f"{signature} {protocol} x{clients}", {}).setdefault(
                                which, []).append(row["p50_ms"])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for key, runs in p50.items():
        a, b = float(np.median(runs["A"])), float(np.median(runs["B"]))
        rows.append({"row": key, "a_p50_ms": runs["A"], "b_p50_ms": runs["B"],
                     "a_median": a, "b_median": b, "b_vs_a": b / a - 1})
        print(f"{args.size}^3 {key}: A {a:.1f} ms, B {b:.1f} ms ({100 * (b / a - 1):+.0f}%); "
              f"per round A {[round(x, 1) for x in runs['A']]} B {[round(x, 1) for x in runs['B']]}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"a": args.a, "b": args.b, "size": args.size, "rounds": args.rounds,
                   "requests": requests, "machine": machine, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
