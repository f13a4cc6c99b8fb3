"""Memory of one batched request at 256^3: hagan-serve's grouped execution vs the whole batch.

Exports a paper_256 model (random weights, --width), then, in a fresh process per row, loads
it into hagan-serve's Predictor and answers one `generate` request of --batch volumes with
`--run-voxels` at its default (2 x 256^3: 2 volumes per execution) and with no limit (the whole
batch in one execution, as before). Reports seconds and the process's peak RSS:
    python benchmarks/serving_memory.py [--batch 4] [--width 1.0]
Prints a markdown table and writes benchmarks/results/serving_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))

ROW = r"""
import json, resource, sys, time
import numpy as np
from hagan_tf.serving.server import ModelRegistry, Predictor
base, batch, run_voxels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
registry = ModelRegistry(base)
registry.refresh()
servable = registry.get("hagan")
z = np.random.default_rng(0).standard_normal((batch, 1024)).astype(np.float32)
predictor = Predictor(registry, max_batch=batch, run_voxels=run_voxels)
t = time.perf_counter()
volume = predictor.predict(servable, "generate", {"z": z})["volume"]
seconds = time.perf_counter() - t
assert volume.shape == (batch, 256, 256, 256, 1) and np.isfinite(volume).all()
print("ROW", json.dumps({"seconds": seconds,
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving_memory.json"))
    args = p.parse_args(argv)

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.serving.export import export_model
    from hagan_tf.serving.server import RUN_VOXELS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HAGANConfig.from_yaml(os.path.join(os.path.dirname(HERE), "hagan_tf", "configs",
                                                 "paper_256.yaml")).replace(width=args.width)
        export_model(HAGAN(cfg), os.path.join(tmp, "models"), "hagan", 1)
        for name, run_voxels in (("grouped (default --run-voxels)", RUN_VOXELS),
                                 ("whole batch in one execution", 2**62)):
            out = subprocess.run([sys.executable, "-c", ROW, os.path.join(tmp, "models"),
                                  str(args.batch), str(run_voxels)],
                                 capture_output=True, text=True, env={**os.environ,
                                                                      "TF_CPP_MIN_LOG_LEVEL": "2"})
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            row = {"mode": name, "batch": args.batch,
                   "volumes_per_execution": min(args.batch, max(1, run_voxels // 256**3))}
            if out.returncode or not line:  # a crash is the finding, not the benchmark's failure
                last = [x for x in out.stderr.splitlines() if x.strip()][-2:]
                row.update(seconds=None, peak_rss_mb=None,
                           failed=f"exit code {out.returncode}: {' '.join(last)[-300:]}")
            else:
                row.update(json.loads(line[0][4:]))
            rows.append(row)
    print(f"| mode (batch {args.batch} at 256^3, width {args.width}) | volumes per execution "
          "| seconds | peak RSS MB |\n|---|---|---|---|")
    for r in rows:
        if r.get("failed"):
            print(f"| {r['mode']} | {r['volumes_per_execution']} | failed: {r['failed']} | |")
        else:
            print(f"| {r['mode']} | {r['volumes_per_execution']} | {r['seconds']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": facts(), "width": args.width, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
