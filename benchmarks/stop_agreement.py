"""What multi-worker training pays per step to stop together on a signal.

With several workers, `hagan-train` stops on SIGTERM/SIGINT only when every worker agrees on
the step, so after each step the workers add up what they received (`StopOnSignal._any_worker`:
one all-reduce of two numbers in its own tf.function). This starts N local worker processes
under TF_CONFIG (MultiWorkerMirroredStrategy on the CPU, loopback gRPC), times `--calls` such
agreements after a first (tracing) one, and reports the median and 99th percentile per worker.
Across machines add the network's round trip. Prints a markdown table and writes JSON.

    python benchmarks/stop_agreement.py [--workers 2] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

_WORKER = """
import json, sys, time
import tensorflow as tf
from hagan_tf.training.callbacks import StopOnSignal
stopper = StopOnSignal(tf.distribute.MultiWorkerMirroredStrategy())
assert stopper._any_worker() is None  # traces it
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    stopper._any_worker()
    times.append(time.perf_counter() - start)
print("RESULT", json.dumps(times))
"""


def run(workers: int, calls: int) -> list[dict]:
    from hagan_tf.training import local_tf_configs

    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(calls)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
             "TF_CONFIG": tf_config}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for tf_config in local_tf_configs(workers)]
    rows = []
    for i, p in enumerate(procs):
        out = p.communicate(timeout=600)[0]
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not lines:
            raise RuntimeError(f"worker {i} failed:\n{out[-3000:]}")
        ms = np.array(json.loads(lines[-1][len("RESULT "):])) * 1e3
        rows.append({"worker": i, "calls": calls, "median_ms": round(float(np.median(ms)), 3),
                     "p99_ms": round(float(np.percentile(ms, 99)), 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "stop_agreement.json"))
    args = p.parse_args(argv)
    rows = run(args.workers, args.calls)
    print(f"| worker of {args.workers} | calls | median ms | p99 ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['worker']} | {r['calls']} | {r['median_ms']} | {r['p99_ms']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": facts(), "workers": args.workers, "rows": rows}, f,
                  indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
