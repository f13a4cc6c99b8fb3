"""NumPy helpers on batches of volumes and labels, shared by `evaluation`, `apps` and
`training` (which do not import each other)."""

from __future__ import annotations

import numpy as np


def downsample(volumes: np.ndarray, factor: int) -> np.ndarray:
    """Average pooling of [B, S, S, S, 1] by an integer factor (area resampling); a factor of
    1 (or less) returns `volumes` as they are."""
    if factor <= 1:
        return volumes
    b, s = volumes.shape[0], volumes.shape[1] // factor
    return volumes.reshape(b, s, factor, s, factor, s, factor, 1).mean((2, 4, 6))


def class_counts(labels, num_classes: int, total: int) -> np.ndarray:
    """`total` split over classes in the proportions of `labels` (largest remainder)."""
    share = np.bincount(labels, minlength=num_classes) / len(labels) * total
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share, kind="stable")[: total - counts.sum()]] += 1
    return counts


def mean_pairwise_l1(volumes) -> float:
    """Mean |a - b| over distinct pairs of volumes [N, ...]: 0 when every volume is the same.

    The diversity measure of the collapse check in hagan-train and of benchmarks/fidelity.py
    (as a difference of means it is computed in one pass per pair, not N^2 copies)."""
    v = np.asarray(volumes, np.float32).reshape(len(volumes), -1)
    if len(v) < 2:
        raise ValueError("pairwise L1 needs at least 2 volumes")
    total = sum(float(np.abs(v[i + 1:] - v[i]).mean(axis=1).sum()) for i in range(len(v) - 1))
    return total / (len(v) * (len(v) - 1) / 2)
