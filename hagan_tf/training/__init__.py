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
