"""What a benchmark ran on, read from the machine at run time (never typed in by hand): the
CPU flags decide whether TF runs Eigen's or oneDNN's kernels, so every figure carries them."""
from __future__ import annotations

import os
import platform
import time

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    field = lambda name: next((l.split(":", 1)[1].strip() for l in lines if l.startswith(name)), "")
    flags = set(field("flags").split())
    return {"model": field("model name") or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), **{k: k in flags for k in FLAGS}}


def facts() -> dict:
    """cpu() plus whether TF is on oneDNN, the load, the versions and the time."""
    try:
        from hagan_tf._compat import onednn_enabled
        onednn = onednn_enabled()
    except ImportError:
        onednn = None
    return {**cpu(), "tf_onednn": onednn, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(m: dict | None = None) -> str:
    """One line for a table's caption: 'AMD EPYC, 2 CPUs, AVX2 FMA, TF on Eigen'."""
    m = m or facts()
    flags = " ".join(k.upper() for k in FLAGS if m.get(k)) or "no AVX2"
    kernels = {True: "TF on oneDNN", False: "TF on Eigen", None: "TF kernels unknown"}
    return f"{m['model']}, {m['cpus']} CPUs, {flags}, {kernels[m.get('tf_onednn')]}"
