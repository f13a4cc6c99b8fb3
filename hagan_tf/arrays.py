"""NumPy helpers on batches of volumes and labels, shared by `evaluation`, `apps` and
`training` (which do not import each other)."""

from __future__ import annotations

import numpy as np

STORED_DTYPES = ("float16", "float32")  # the voxel types a training record may hold


def stored_voxels(volume, subject_id: str, dtype: str) -> np.ndarray:
    """A [D, H, W] (or [D, H, W, 1]) volume as the little-endian `dtype` array a record holds,
    for both record writers (`data.records`, and `preprocess.tfrecord` without TensorFlow).
    Refuses another voxel type, another shape, and values that float16 would store as inf."""
    if dtype not in STORED_DTYPES:
        raise ValueError(f"dtype must be one of {STORED_DTYPES}, got {dtype!r}")
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"expected a [D, H, W] volume, got shape {volume.shape}")
    with np.errstate(over="ignore"):  # an overflow is refused below, with its cause
        stored = np.ascontiguousarray(volume, dtype=np.dtype(dtype).newbyteorder("<"))
    if dtype == "float16" and np.isinf(stored).any() and not np.isinf(volume).any():
        raise ValueError(f"{subject_id}: values beyond float16's range (65504) would be stored "
                         "as inf: normalise the volume to [-1, 1] first")
    return stored


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
