"""Seconds per training iteration (median after warm-up) and peak memory, batch 2, full width.

    python benchmarks/train_step.py [--sizes 32 64 128 256] [--steps 3] [--policy float32]
                                    [--jit] [--strategy default|mirrored]
                                    [--convs auto|rewrites|tf] [--grappler-off remapping ...]
                                    [--profile-ops N] [--data DIR]

`--data DIR` feeds the step from records at S^3 through the training input pipeline, as
hagan-train does (shuffle 64, the records' own dtype), instead of from one volume in memory: on
a GPU the difference is the time the step waits for its input. Each size runs in its own subprocess (peak RSS is its own). Prints a markdown table and writes
benchmarks/results/train_step[-POLICY][-xla].json. On a GPU the same script reports GPU time;
peak GPU memory comes from tf.config.experimental.get_memory_info.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))


def print_table(header, rows):
    """A markdown table; short rows (errors) are padded with empty cells."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [str(c) for c in row] + [""] * (len(header) - len(row))
        print("| " + " | ".join(cells) + " |")


class MemorySampler:
    """Peak resident memory split into anonymous (heap: tensors, weights) and file-backed
    (mapped shared libraries) pages, sampled from /proc/self/status (Linux) every 20 ms:
    getrusage's peak RSS counts TensorFlow's ~0.5 GB of mapped library code too."""

    def __init__(self, period=0.02):
        import threading
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def sample(self):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) // 1024)
        except OSError:
            pass

    def restart(self):
        """Forget the peaks so far: the next ones are those of the steady-state iterations."""
        before, self.peak = self.peak, dict.fromkeys(self.peak, 0)
        self.sample()
        return before

    def _run(self, period):
        while not self._stop.wait(period):
            self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


PROGRESS = "[train_step]"


def child(size, steps, policy, jit, strategy_kind, batch, heap_default=False, convs="auto",
          grappler_off=(), profile_ops=0, data=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if convs != "auto":
        os.environ["HAGAN_CONV_REWRITES"] = "1" if convs == "rewrites" else "0"
    sampler = MemorySampler()
    from hagan_tf.training import import_tensorflow_lean, keep_channels_last_on_gpu, limit_heap_growth

    if not heap_default:
        limit_heap_growth()  # as hagan-train does
    import_tensorflow_lean()  # as hagan-train does
    import keras
    import numpy as np
    import tensorflow as tf

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.training.cli import make_strategy

    keep_channels_last_on_gpu()  # as hagan-train does
    if grappler_off:
        tf.config.optimizer.set_experimental_options({name: False for name in grappler_off})
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    strategy = make_strategy(strategy_kind)
    cfg = HAGANConfig(size=size, batch_size=batch, mixed_precision=policy, jit_compile=jit)
    with strategy.scope():
        gan = HAGAN(cfg)
        gan.compile()
    if data:
        from hagan_tf.training.cli import training_input

        ds = training_input(strategy, data, cfg)  # what hagan-train gives fit()
    else:
        vol = tf.random.uniform((batch, size, size, size, 1), -1, 1, seed=0)
        ds = tf.data.Dataset.from_tensors({"volume": vol}).repeat()
        if strategy_kind != "default":
            ds = strategy.experimental_distribute_dataset(ds)
    it = iter(ds)
    gan.make_train_function()
    fn = gan.train_function
    times, first_peak = [], None
    for i in range(steps + 1):
        if i == 1:
            first_peak = sampler.restart()
        t = time.perf_counter()
        logs = fn(it)
        float(np.asarray(logs["d_loss"]))  # wait for the step
        times.append(time.perf_counter() - t)
        # as it goes: an XLA step that compiles again at every iteration shows here at once
        print(f"{PROGRESS} S={size} iteration {i + 1}/{steps + 1}: {times[-1]:.3f} s"
              + (" (tracing and compiling)" if i == 0 else ""), file=sys.stderr, flush=True)
    out = {"size": size, "batch": batch, "policy": policy, "jit": jit, "strategy": strategy_kind,
           "input": f"records in {data}" if data else "one volume in memory",
           "convs": convs, "grappler_off": list(grappler_off),
           "heap": "glibc default" if heap_default else "limit_heap_growth",
           "first_step_s": times[0], "median_step_s": float(np.median(times[1:])),
           "step_times_s": [round(t, 4) for t in times],
           "steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "losses_finite": bool(all(np.isfinite(float(np.asarray(v))) for v in logs.values()))}
    peak = sampler.stop()
    out["peak_anon_mb"] = max(peak["RssAnon"], first_peak["RssAnon"])
    out["peak_file_mb"] = max(peak["RssFile"], first_peak["RssFile"])
    out["steady_peak_rss_mb"], out["steady_peak_anon_mb"] = peak["VmRSS"], peak["RssAnon"]
    if tf.config.list_physical_devices("GPU"):
        out["peak_gpu_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        out["device"] = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]).get("device_name")
    if profile_ops:  # one more step under the profiler, after the times and memory are taken
        import shutil
        import tempfile
        logdir = tempfile.mkdtemp(prefix="hagan-profile-")
        try:
            tf.profiler.experimental.start(logdir)
            float(np.asarray(fn(it)["d_loss"]))
            tf.profiler.experimental.stop()
            from hagan_tf.training.callbacks import profile_traces, top_ops

            out["top_ops_ms"] = top_ops(profile_traces(logdir), profile_ops)
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--steps", type=int, default=3, help="timed iterations after the warm-up one")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--jit", action="store_true", help="XLA-compile the step")
    p.add_argument("--strategy", default="default", choices=["default", "mirrored"])
    p.add_argument("--heap-default", action="store_true",
                   help="keep glibc's default malloc settings (hagan-train changes them)")
    p.add_argument("--convs", default="auto", choices=["auto", "rewrites", "tf"],
                   help="force conv3d's CPU rewrites on or off (HAGAN_CONV_REWRITES); auto: off on a GPU "
                        "or where TF runs oneDNN")
    p.add_argument("--grappler-off", nargs="+", default=[], metavar="OPTIMIZER",
                   help="Grappler optimizers to turn off, e.g. remapping")
    p.add_argument("--profile-ops", type=int, default=0, metavar="N",
                   help="profile one extra step and report its N most expensive op types")
    p.add_argument("--data", help="records at S^3 to feed the step through the input pipeline "
                                   "(one --sizes value)")
    p.add_argument("--out")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.policy, args.jit, args.strategy, args.batch,
                              args.heap_default, args.convs, args.grappler_off, args.profile_ops,
                              args.data)))
        return 0
    if args.data and len(args.sizes) != 1:
        p.error("--data takes the records' one size in --sizes")
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--steps", str(args.steps),
               "--batch", str(args.batch), "--policy", args.policy, "--strategy", args.strategy]
        cmd += ["--jit"] if args.jit else []
        cmd += ["--heap-default"] if args.heap_default else []
        cmd += ["--convs", args.convs, "--profile-ops", str(args.profile_ops)]
        cmd += ["--grappler-off", *args.grappler_off] if args.grappler_off else []
        cmd += ["--data", args.data] if args.data else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = []
        for line in proc.stderr:  # the child's stdout is one JSON line: no deadlock
            if line.startswith(PROGRESS):
                print(line.rstrip(), file=sys.stderr, flush=True)
            elif line.strip():
                errors.append(line.strip())
        stdout = proc.stdout.read()
        if proc.wait():
            rows.append({"size": size, "error": (errors or ["?"])[-1]})
        else:
            rows.append(json.loads(stdout.strip().splitlines()[-1]))
        print(f"done {size}: {rows[-1]}", file=sys.stderr)
    tag = (("" if args.policy == "float32" else "-" + args.policy) + ("-xla" if args.jit else "")
           + ("-records" if args.data else ""))
    out = args.out or os.path.join(HERE, "results", f"train_step{tag}.json")
    meta = {"machine": facts(),
            "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print_table(["S", "batch", "policy", "XLA", "convs", "s/iteration (median)", "first step s",
                 "peak RSS MB", "peak anon MB", "peak GPU MB"],
                [[r["size"], args.batch, args.policy, args.jit, args.convs, f"error: {r['error']}"]
                 if "error" in r
                 else [r["size"], r["batch"], r["policy"], r["jit"], r["convs"], f"{r['median_step_s']:.3f}",
                       f"{r['first_step_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}",
                       f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else ""]
                 for r in rows])
    for r in rows:
        if r.get("top_ops_ms"):
            print(f"\nS={r['size']}: op types by time in one profiled step (ms, count)")
            print_table(["op", "ms", "count"], r["top_ops_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
