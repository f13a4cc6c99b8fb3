"""The reference's training iteration in PyTorch, timed on this machine for a fair comparison.

The networks are the PyTorch re-statement of the authors' architecture used by the parity tests
(tests/torch_reference.py); the iteration follows the authors' train.py: D, G, E^H, E^G updates
with Adam(0, 0.999), BCE-with-logits and L1, batch 2, nearest downsampling for real X^L.

    python benchmarks/reference_torch.py [--sizes 128] [--steps 2] [--device cpu|cuda] [--out F]
Needs the [torch] extra. Prints a markdown table and writes benchmarks/results/reference_torch.json
(reference_torch-cuda.json on a GPU, where the peak is torch's allocated GPU memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
from train_step import MemorySampler, print_table  # noqa: E402  (same memory split and table)


def child(size: int, steps: int, batch: int, device: str = "cpu") -> dict:
    sampler = MemorySampler()
    import torch
    import torch.nn.functional as F
    from torch_reference import Discriminator, Encoder, Generator, SubEncoder

    torch.manual_seed(0)
    G, D = Generator(size).to(device), Discriminator(size).to(device)
    E, SE = Encoder().to(device), SubEncoder(size).to(device)
    opt = {"g": torch.optim.Adam(G.parameters(), 1e-4, betas=(0.0, 0.999)),
           "d": torch.optim.Adam(D.parameters(), 4e-4, betas=(0.0, 0.999)),
           "e": torch.optim.Adam(E.parameters(), 1e-4, betas=(0.0, 0.999)),
           "se": torch.optim.Adam(SE.parameters(), 1e-4, betas=(0.0, 0.999))}
    bce = torch.nn.BCEWithLogitsLoss()
    real = torch.rand(batch, 1, size, size, size, device=device) * 2 - 1
    depth = size // 8

    def gen(z, crop):
        a = G.common(z)
        return G.high_res(a[:, :, crop // 4:crop // 4 + size // 32]), G.sub_G(a)

    def iteration(step):
        crop = 4 * int(torch.randint(0, (size - depth) // 4 + 1, ()))
        real_crop = real[:, :, crop:crop + depth]
        real_small = F.interpolate(real, scale_factor=0.25)
        ones, zeros = torch.ones(batch, 1, device=device), torch.zeros(batch, 1, device=device)
        # D
        opt["d"].zero_grad()
        with torch.no_grad():
            fake, fake_small = gen(torch.randn(batch, 1024, device=device), crop)
        d_loss = bce(D(real_crop, real_small, crop), ones) + bce(D(fake, fake_small, crop), zeros)
        d_loss.backward()
        opt["d"].step()
        # G
        for p in D.parameters():
            p.requires_grad_(False)
        opt["g"].zero_grad()
        fake, fake_small = gen(torch.randn(batch, 1024, device=device), crop)
        bce(D(fake, fake_small, crop), ones).backward()
        opt["g"].step()
        for p in D.parameters():
            p.requires_grad_(True)
        # E^H
        opt["e"].zero_grad()
        F.l1_loss(G.high_res(E(real_crop)), real_crop).backward()
        opt["e"].step()
        # E^G
        opt["se"].zero_grad()
        with torch.no_grad():
            feats = torch.cat([E(s) for s in real.chunk(8, dim=2)], dim=2)
        x, x_small = gen(SE(feats), crop)
        ((F.l1_loss(x, real_crop) + F.l1_loss(x_small, real_small)) / 2).backward()
        opt["se"].step()
        G.zero_grad(set_to_none=True)  # G's grads from E^H/E^G are not applied, as in train.py

    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        iteration(step)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times_sorted = sorted(times[1:])
    peak = sampler.stop()
    out = {"size": size, "batch": batch, "threads": torch.get_num_threads(), "device": device,
           "first_step_s": times[0], "median_step_s": times_sorted[len(times_sorted) // 2],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_anon_mb": peak["RssAnon"], "peak_file_mb": peak["RssFile"], "torch": torch.__version__}
    if device != "cpu":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device_name"] = torch.cuda.get_device_name()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.device)))
        return 0
    rows = []
    for size in args.sizes:
        res = subprocess.run([sys.executable, __file__, "--child", str(size), "--steps",
                              str(args.steps), "--batch", str(args.batch), "--device", args.device],
                             capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0
                    else {"size": size, "error": res.stderr.strip().splitlines()[-1:]})
    out = args.out or os.path.join(
        HERE, "results", "reference_torch.json" if args.device == "cpu" else "reference_torch-cuda.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print_table(["S", "batch", "torch s/iteration (median)", "first step s", "peak RSS MB", "peak anon MB",
                 "peak GPU MB"],
                [[r["size"], args.batch, f"error: {r['error']}"] if "error" in r
                 else [r["size"], r["batch"], f"{r['median_step_s']:.2f}", f"{r['first_step_s']:.1f}",
                       f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}",
                       f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"]
                 for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
