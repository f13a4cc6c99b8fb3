"""Ops with hand-written gradients that keep less memory alive, on every device.

Autodiff of these ops would compute parts of the backward pass early, or keep extra
activation-sized tensors, for every layer until the backward pass reaches it. Each function
here computes the same values as the plain TF ops (the tests compare values and gradients).
The CPU-only convolution rewrites are in `conv_rewrites`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import _compat
from .dtypes import upcast


def after_dy(grad_fn):
    """A custom gradient none of whose ops starts before dy exists.

    TF's executor runs an op as soon as its inputs are ready: the parts of a backward pass
    that read only forward tensors (a flipped kernel, a transposed padded input, GroupNorm's
    normalised input) would run during the forward pass and be held, all layers' at once,
    until the backward pass reaches them (~200 MB at the G update's peak at 128^3).
    """
    def grad(dy):
        with tf.control_dependencies([dy]):
            return grad_fn(dy)
    return grad


def divide(w, sigma):
    """w / sigma whose gradient waits for dy: autodiff's would compute -w (a kernel-sized
    copy) during the forward pass and hold it, for every D call, until the backward pass."""
    @tf.custom_gradient
    def divide(w, sigma):
        @after_dy
        def grad(dy):
            g = dy / sigma
            return g, -tf.reduce_sum(g * w) / sigma
        return w / sigma, grad
    return divide(w, sigma)


def leaky_relu(x, alpha=0.2):
    """LeakyReLU whose gradient reads its output (same sign as its input), as ReLU's does.

    TF's gradient reads the input, so each discriminator layer kept both its pre-activation
    and its output alive for the backward pass; now only the output, which the next layer's
    gradient keeps anyway. In float64 the ops' alpha, a float32 attribute (0.2 -> 0.2000000030),
    would put float32 rounding on every negative value: there alpha is a float64 tensor.
    """
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.float64 and 0 < alpha < 1:
        a = tf.constant(alpha, tf.float64)

        @tf.custom_gradient
        def act64(x):
            y = tf.maximum(x, a * x)
            return y, lambda dy: tf.where(y > 0, dy, dy * a)
        return act64(x)

    @tf.custom_gradient
    def act(x):
        y = tf.nn.leaky_relu(x, alpha)
        return y, lambda dy: tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=alpha)
    return act(x)


def depth_slab(x, start, depth: int):
    """x[:, start:start + depth] of [B, D, H, W, C], for a start drawn anew every iteration (r).

    XLA takes tf.slice's begin (and its gradient's padding) as compile-time constants. The
    iteration counter that r is drawn from then became one too, and XLA compiled the whole
    step again at every iteration. Its DynamicSlice takes the start as data; the gradient
    writes dy into zeros with DynamicUpdateSlice.
    """
    begin = tf.stack([0, tf.cast(start, tf.int32), 0, 0, 0])
    if not _compat.in_xla_context():
        return tf.slice(x, begin, [-1, depth, -1, -1, -1])
    size = tf.concat([tf.shape(x)[:1], [depth], tf.shape(x)[2:]], 0)

    @tf.custom_gradient
    def cut(x):
        def grad(dy):
            return _compat.xla_dynamic_update_slice(tf.zeros_like(x), dy, begin)
        return _compat.xla_dynamic_slice(x, begin, size), grad
    return cut(tf.convert_to_tensor(x))


def spatial_shape(x):
    """x's [D, H, W]: Python ints where the shape is static, which keeps the training graph
    small (each dynamic dimension is a few more nodes, in every layer and its gradient)."""
    dims = x.shape[1:4]
    if all(n is not None for n in dims):
        return list(dims)
    s = tf.shape(x)
    return [s[1], s[2], s[3]]


def upsample_nearest(x):
    """Nearest x2 upsampling of [B, D, H, W, C]: one broadcast per axis, innermost first, each
    on a rank-4 view (TF's CPU BroadcastTo stops at rank 5). Half the graph nodes of three
    ops.repeat, forward and backward: a GPU step is bound by dispatching its ops."""
    d, h, w = spatial_shape(x)
    c = x.shape[-1]
    inner = c  # elements per step of the axis being repeated, after the earlier repeats
    for n in (w, h, d):
        x = tf.reshape(x, [-1, n, 1, inner])
        x = tf.broadcast_to(x, tf.concat([tf.shape(x)[:1], [n, 2, inner]], 0))
        inner *= 2 * n
    return tf.reshape(x, [-1, 2 * d, 2 * h, 2 * w, c])


def channel_sums(x):
    """Sums of x [B, ..., C] over its spatial axes -> [B, C], one axis at a time.

    TF's CPU kernels sum over outer axes one element at a time: reducing 32^3 voxels at once
    puts ~2e-4 relative error on a variance (3e-4 on G's output against the PyTorch reference);
    axis by axis each sum has at most S terms, and no transposed copy is needed.
    """
    for axis in range(len(x.shape) - 2, 0, -1):
        x = tf.reduce_sum(x, axis)
    return x


def group_norm_op(x, gamma, beta, groups, epsilon):
    """GroupNorm over channels-last x, in at least float32 (dtypes.upcast), with a hand-written
    gradient.

    Autodiff of the normalisation keeps three more activation-sized tensors per layer (the
    centred, the normalised and the gathered input) for the backward pass; this gradient keeps
    only x and recomputes the normalised values from it, as PyTorch's fused kernel does.
    """
    c = x.shape[-1]
    group = c // groups

    def per_channel(group_stat, rank):  # [B, groups] -> broadcastable [B, 1, .., 1, C]
        # (x * ones, not tf.repeat: the same values in 4 graph nodes instead of ~25)
        stat = tf.expand_dims(group_stat, -1) * tf.ones([group], group_stat.dtype)
        return tf.reshape(stat, [-1] + [1] * (rank - 2) + [c])

    def group_mean(channel_sums, count):  # [B, C] channel sums -> [B, groups] group means
        return tf.reduce_sum(tf.reshape(channel_sums, [-1, groups, group]), -1) / count

    @tf.custom_gradient
    def norm(x, gamma, beta):
        xf = upcast(x)
        rank = len(x.shape)
        spatial = x.shape[1:-1]
        count = (float(np.prod(spatial.as_list()) * group) if spatial.is_fully_defined()
                 else tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]) * group, xf.dtype))
        mean = per_channel(group_mean(channel_sums(xf), count), rank)
        centred = xf - mean
        inv = per_channel(tf.math.rsqrt(group_mean(channel_sums(tf.square(centred)), count)
                                        + epsilon), rank)
        y = centred * (inv * gamma) + beta

        @after_dy
        def grad(dy):
            dy = tf.cast(dy, xf.dtype)
            xhat = (xf - mean) * inv
            dy_xhat = channel_sums(dy * xhat)  # [B, C]
            dy_sum = channel_sums(dy)
            m1 = per_channel(group_mean(dy_sum * gamma, count), rank)
            m2 = per_channel(group_mean(dy_xhat * gamma, count), rank)
            dx = (dy * gamma - m1 - xhat * m2) * inv
            return tf.cast(dx, x.dtype), tf.reduce_sum(dy_xhat, 0), tf.reduce_sum(dy_sum, 0)

        return tf.cast(y, x.dtype), grad

    return norm(x, gamma, beta)
