"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

With few training scans D memorises them and its gradient stops telling G anything useful.
Augmenting real and fake inputs alike (fresh random parameters per example and per call),
with ops that gradients flow through, lets D see more variety without G learning the
augmentations: G is judged only through augmented views of its output.

Ops (any subset, comma separated in `HAGANConfig.augment`):
  translation  shift H and W by up to 1/8 of their size, filling with air (-1)
  cutout       set a box of half the H and W size (the whole depth) to 0
  intensity    brightness +-0.2 and contrast x[0.8, 1.25] about the volume's mean
Volumes are [B, D, H, W, C]; D (the axial axis) is left alone: a slab is only S/8 deep and
its position r is an input of D^H.
"""

from __future__ import annotations

import tensorflow as tf

from .dtypes import at_least_float32

OPS = ("translation", "cutout", "intensity")


def parse_ops(spec: str) -> tuple[str, ...]:
    """"translation, cutout" -> ("translation", "cutout"); refuses unknown names."""
    ops = tuple(o.strip() for o in spec.split(",") if o.strip())
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown augment op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return ops


def _uniform(shape, seed, lo, hi, dtype=tf.float32):
    return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=dtype)


def _shift_axis(x, shift, axis, fill):
    """x shifted by shift[b] voxels along `axis` (1..3) per example, `fill` where it came from
    outside: a gather of clipped indices, so the gradient reaches every kept voxel."""
    n = tf.shape(x)[axis]
    idx = tf.range(n)[None, :] - shift[:, None]  # [B, n]: source index of each target voxel
    inside = tf.logical_and(idx >= 0, idx < n)
    moved = tf.gather(x, tf.clip_by_value(idx, 0, n - 1), axis=axis, batch_dims=1)
    mask_shape = [-1, 1, 1, 1, 1]
    mask_shape[axis] = n
    mask = tf.reshape(tf.cast(inside, x.dtype), tf.stack(mask_shape))
    return moved * mask + fill * (1 - mask)


def translation(x, seed, ratio=0.125):
    b = tf.shape(x)[0]
    for i, axis in enumerate((2, 3)):
        limit = tf.cast(tf.cast(tf.shape(x)[axis], tf.float32) * ratio + 0.5, tf.int32)
        shift = tf.random.stateless_uniform([b], seed + [0, i], -limit, limit + 1, dtype=tf.int32)
        x = _shift_axis(x, shift, axis, tf.constant(-1.0, x.dtype))
    return x


def cutout(x, seed, ratio=0.5):
    """A box of ratio * (H, W), through the whole depth, set to 0, at a random centre."""
    shape = tf.shape(x)
    b = shape[0]
    mask = tf.ones([b, 1, 1, 1, 1], x.dtype)
    for i, axis in enumerate((2, 3)):
        n = shape[axis]
        half = tf.cast(tf.cast(n, tf.float32) * ratio / 2 + 0.5, tf.int32)
        centre = tf.random.stateless_uniform([b], seed + [0, i], 0, n, dtype=tf.int32)
        pos = tf.range(n)[None, :]
        out = tf.logical_or(pos < (centre - half)[:, None], pos >= (centre + half)[:, None])
        axis_shape = [-1, 1, 1, 1, 1]
        axis_shape[axis] = n
        # inside the box along both axes -> 0; build as "outside along H or outside along W"
        mask = mask * tf.reshape(1 - tf.cast(out, x.dtype), tf.stack(axis_shape))
    return x * (1 - mask)


def intensity(x, seed, brightness=0.2, contrast=1.25):
    """The draws in at least float32 (the same numbers under mixed precision), then x's type."""
    b = tf.shape(x)[0]
    dtype = at_least_float32(x.dtype)
    shift = tf.cast(_uniform([b, 1, 1, 1, 1], seed, -brightness, brightness, dtype), x.dtype)
    log_c = tf.math.log(tf.constant(contrast, dtype))
    scale = tf.cast(tf.exp(_uniform([b, 1, 1, 1, 1], seed + [0, 1], -log_c, log_c, dtype)), x.dtype)
    mean = tf.reduce_mean(x, axis=[1, 2, 3, 4], keepdims=True)
    return (x - mean) * scale + mean + shift


_FUNCS = {"translation": translation, "cutout": cutout, "intensity": intensity}


def augment(x, ops: tuple[str, ...], seed):
    """x with each op applied in order; `seed` is a stateless [2] int seed for this call."""
    seed = tf.cast(seed, tf.int32)
    for i, name in enumerate(ops):
        x = _FUNCS[name](x, seed + [0, 1000 * (i + 1)])
    return x
