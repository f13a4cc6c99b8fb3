"""Serving latency and throughput: hagan-serve on loopback, gRPC or REST clients, batch 1.

Exports a tiny model (configs/tiny_32.yaml) and a 128^3 model (configs/paper_128.yaml, width
from --width-128) with random weights, starts `hagan-serve` as a subprocess with its default
settings, and for generate_preview, generate and encode measures p50/p99 request latency and
requests/s with 1 and 8 concurrent clients (one gRPC channel, or one REST client, per thread):
    python benchmarks/serving.py [--sizes 32 128] [--width-128 1.0] [--requests-32 64]
                                 [--protocols grpc rest]
REST sends and receives whole volumes as JSON, so at 128^3 it measures JSON as much as serving.
Prints a markdown table and writes benchmarks/results/serving.json.
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
import threading
import time
from machine import facts  # noqa: E402  (benchmarks/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "hagan_tf", "configs")
SIGNATURES = ("generate_preview", "generate", "encode")


def _inputs(signature: str, cfg, rng):
    import numpy as np

    if signature == "encode":
        s = cfg.size
        return {"volume": rng.uniform(-1, 1, (1, s, s, s, 1)).astype(np.float32)}
    return {"z": rng.standard_normal((1, cfg.latent_dim)).astype(np.float32)}


def measure(client_factory, signature, inputs, clients: int, requests: int) -> dict:
    """Run `requests` requests spread over `clients` threads; latencies in ms."""
    import numpy as np

    per_client = max(1, requests // clients)
    latencies, errors = [], []
    barrier = threading.Barrier(clients + 1)

    def worker():
        with client_factory() as client:
            client.predict(signature, **inputs)  # connect and warm up outside the timing
            barrier.wait()
            for _ in range(per_client):
                t = time.perf_counter()
                try:
                    client.predict(signature, **inputs)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    errors.append(repr(e))
                latencies.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    return {"signature": signature, "clients": clients, "requests": len(lat),
            "errors": len(errors), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "throughput_rps": len(lat) / wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128], choices=[32, 128])
    p.add_argument("--width-128", type=float, default=1.0, help="channel width of the 128^3 model")
    p.add_argument("--requests-32", type=int, default=64, help="requests per row at 32^3")
    p.add_argument("--requests-128", type=int, default=16, help="requests per row at 128^3")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--protocols", nargs="+", default=["grpc"], choices=["grpc", "rest"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from hagan_tf import HAGAN, HAGANConfig
    from hagan_tf.serving.client import Client
    from hagan_tf.serving.export import export_model

    base = tempfile.mkdtemp(prefix="hagan-serving-bench-")
    models = {}
    for size in args.sizes:
        if size == 32:
            cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, "tiny_32.yaml"))
        else:
            cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, "paper_128.yaml")).replace(
                width=args.width_128)
        name = f"s{size}"
        t = time.perf_counter()
        export_model(HAGAN(cfg), base, name, 1)
        print(f"exported {name} ({cfg.size}^3, width {cfg.width}, latent {cfg.latent_dim}) "
              f"in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        models[name] = cfg

    server = subprocess.Popen(
        [sys.executable, "-m", "hagan_tf.serving.server", "--model-base", base, "--port", "0",
         "--rest-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rows = []
    try:
        line = server.stdout.readline()
        m = re.search(r"gRPC on [^:]+:(\d+), REST on http://[^:]+:(\d+)", line)
        ports = {"grpc": int(m[1]), "rest": int(m[2])}
        rng = np.random.default_rng(0)
        for name, cfg in models.items():
            requests = args.requests_32 if cfg.size == 32 else args.requests_128
            for signature in SIGNATURES:
                inputs = _inputs(signature, cfg, rng)
                for protocol in args.protocols:
                    address = f"127.0.0.1:{ports[protocol]}"
                    for clients in args.clients:
                        row = measure(lambda: Client(address, rest=protocol == "rest", model=name),
                                      signature, inputs, clients, max(requests, clients))
                        row.update(size=cfg.size, width=cfg.width, latent_dim=cfg.latent_dim,
                                   protocol=protocol)
                        rows.append(row)
                        print(f"{name} {signature} {protocol} x{clients}: p50 "
                              f"{row['p50_ms']:.1f} ms, {row['throughput_rps']:.2f} req/s",
                              file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    result = {"benchmark": "serving", "protocol": f"{'/'.join(args.protocols)}, loopback, "
                                                  "batch 1 per request",
              "server": "hagan-serve defaults (--max-concurrent 4)",
              "machine": {**facts(), "device": "CPU"},
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print("| model | signature | protocol | clients | requests | p50 ms | p99 ms | req/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^3 w{r['width']:g} z{r['latent_dim']} | {r['signature']} | "
              f"{r['protocol']} | {r['clients']} | {r['requests']} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['throughput_rps']:.2f} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
