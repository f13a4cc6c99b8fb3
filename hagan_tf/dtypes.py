"""The float type that sums, losses and normalisations are computed in.

Under mixed precision the model computes in float16 or bfloat16 and upcasts where precision
matters (GroupNorm's statistics, the losses, Adam's step size). The upcast is "at least
float32": float32 stays float32 (the cast is no op at all, so a float32 model computes exactly
what it did without one), and a float64 model stays float64 (the step-parity test trains one,
tests/test_train_parity.py).
"""

from __future__ import annotations

import tensorflow as tf

_HALF = (tf.float16, tf.bfloat16)


def at_least_float32(dtype) -> tf.DType:
    """float16 / bfloat16 -> float32; any other type as it is (float32, float64)."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in _HALF else dtype


def upcast(x):
    """x as a tensor in `at_least_float32` of its type (x itself where that is its type)."""
    x = tf.convert_to_tensor(x)
    return tf.cast(x, at_least_float32(x.dtype))
