"""Training: distribution strategy, callbacks (checkpoints, TensorBoard, progress) and the CLI."""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def limit_heap_growth(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """glibc malloc settings for training (the same as MALLOC_MMAP_THRESHOLD_=1048576
    MALLOC_ARENA_MAX=2): tensors of 1 MiB and more get their own mappings, returned to the
    system when freed, instead of heap space that glibc's adaptive threshold keeps and
    fragments. Measured at 128^3: ~400 MB less peak RSS, no slower. No-op off glibc.
    Call before TensorFlow starts its threads, as importing hagan_tf.training.cli does."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                    and libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def import_tensorflow_lean() -> bool:
    """Import TensorFlow and Keras without the scikit-learn, SciPy and matplotlib that Keras
    imports for optional integrations (its scikit-learn wrappers, `plot_image_gallery`) and
    training never uses: ~60 MB of heap for the whole run. Both stay importable afterwards;
    only those two Keras integrations go without. Returns False (and does nothing) when
    TensorFlow is already imported. Call at start, as importing hagan_tf.training.cli does."""
    if "tensorflow" in sys.modules:
        return False
    blocked = [m for m in ("sklearn", "matplotlib") if m not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked, None))  # `import sklearn` raises ImportError
    try:
        import keras  # noqa: F401  (imports tensorflow)
    except ImportError:  # a version that needs them after all
        _unblock(blocked)
        import keras  # noqa: F401
    finally:
        _unblock(blocked)
    return True


def keep_channels_last_on_gpu() -> bool:
    """Turn Grappler's layout optimizer off when a GPU is visible. It wraps every cuDNN
    convolution of our channels-last (NDHWC) graph in transposes to NCDHW, which cuDNN does not
    need; an iteration on a GPU is bound by dispatching its ops. Measured on an H100 at 128^3
    (benchmarks/RESULTS.md): 0.044 s and 1302 MB per iteration without it, 0.050 s and 1414 MB
    with it. A process-wide TF option; hagan-train sets it at start. No-op without a GPU."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return False
    tf.config.optimizer.set_experimental_options({"layout_optimizer": False})
    return True


def local_tf_configs(workers: int) -> list[str]:
    """TF_CONFIG values for `workers` worker processes on this machine (free loopback ports),
    worker i's at [i]: multi-worker training tried out, tested and benchmarked on one host."""
    import json
    import socket

    ports = []
    for _ in range(workers):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(workers)]


def _unblock(names):
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
