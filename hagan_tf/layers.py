"""Building blocks shared by the HA-GAN networks.

Spectral normalisation: we follow the reference (BigGAN-style SN), not Keras's
`SpectralNormalization` wrapper: the stored kernel stays unnormalised, every forward pass
(training and inference) divides it by sigma from one power iteration, the gradient flows
through sigma, and the vector `u` is updated only in training. Keras's wrapper instead
rescales the stored kernel in place and passes no gradient through sigma, which trains a
different function and cannot load the published weights with forward parity.
"""

from __future__ import annotations

import functools
import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

SERIAL_PACKAGE = "hagan_tf"
GN_EPSILON = 1e-5
GN_GROUPS = 8


def _normalize(x, eps=1e-12):
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x))), eps)


class _SpectralNorm:
    """Mixin for layers with a `_kernel` [..., out]: reference-style spectral normalisation."""

    def _add_u(self, units):
        self.u = self.add_weight(
            name="u",
            shape=(1, units),
            initializer=keras.initializers.RandomNormal(seed=None),
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )

    def sigma(self, training=False):
        """Largest singular value estimate of the kernel (one power iteration from `u`)."""
        w = ops.reshape(self._kernel, (-1, self.u.shape[-1]))  # [fan_in, out]
        u = ops.cast(self.u, w.dtype)
        v = _normalize(ops.stop_gradient(ops.transpose(ops.matmul(w, ops.transpose(u)))))  # u W^T
        u_new = _normalize(ops.stop_gradient(ops.matmul(v, w)))
        if training:
            self.u.assign(ops.cast(u_new, self.u.dtype))
        return ops.sum(ops.matmul(v, w) * u_new)

    def normalized_kernel(self, training=False):
        return _divide(tf.convert_to_tensor(self._kernel), self.sigma(training))

    # Keras's Conv/Dense save only kernel and bias; u is state of the function, so keep it.
    def _own_variables(self):
        return [self._kernel] + ([self.bias] if self.use_bias else []) + [self.u]

    def save_own_variables(self, store):
        for i, v in enumerate(self._own_variables()):
            store[str(i)] = v

    def load_own_variables(self, store):
        own = self._own_variables()
        if len(store.keys()) != len(own):
            raise ValueError(f"layer {self.name!r} expects {len(own)} variables, got {len(store.keys())}")
        for i, v in enumerate(own):
            v.assign(store[str(i)])


_ONES = [1, 1, 1, 1, 1]


def _pads(k: int, padding: str):
    """(before, after) padding of one spatial axis for a stride-1 convolution."""
    if padding == "VALID":
        return (0, 0)
    return ((k - 1) // 2, k - 1 - (k - 1) // 2)


def _padded_conv(x, kernel, pads):
    """Stride-1 VALID conv3d of x padded by pads [(before, after)] * 3 (no copy if 'SAME')."""
    k = kernel.shape[:3]
    if not any(sum(p) for p in pads):
        return tf.nn.conv3d(x, kernel, _ONES, "VALID")
    if None not in k and list(pads) == [_pads(n, "SAME") for n in k]:
        return tf.nn.conv3d(x, kernel, _ONES, "SAME")
    return tf.nn.conv3d(tf.pad(x, [(0, 0), *pads, (0, 0)]), kernel, _ONES, "VALID")


def _after_dy(grad_fn):
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


def _divide(w, sigma):
    """w / sigma whose gradient waits for dy: autodiff's would compute -w (a kernel-sized
    copy) during the forward pass and hold it, for every D call, until the backward pass."""
    @tf.custom_gradient
    def divide(w, sigma):
        @_after_dy
        def grad(dy):
            g = dy / sigma
            return g, -tf.reduce_sum(g * w) / sigma
        return w / sigma, grad
    return divide(w, sigma)


def leaky_relu(x, alpha=0.2):
    """LeakyReLU whose gradient reads its output (same sign as its input), as ReLU's does.

    TF's gradient reads the input, so each discriminator layer kept both its pre-activation
    and its output alive for the backward pass; now only the output, which the next layer's
    gradient keeps anyway.
    """
    @tf.custom_gradient
    def act(x):
        y = tf.nn.leaky_relu(x, alpha)
        return y, lambda dy: tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=alpha)
    return act(tf.convert_to_tensor(x))


def _in_xla() -> bool:
    """Whether the graph being traced is compiled by XLA (a `jit_compile` tf.function)."""
    from tensorflow.python.ops import control_flow_util  # private; tested, as _onednn_on
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def depth_slab(x, start, depth: int):
    """x[:, start:start + depth] of [B, D, H, W, C], for a start drawn anew every iteration (r).

    XLA takes tf.slice's begin (and its gradient's padding) as compile-time constants. The
    iteration counter that r is drawn from then became one too, and XLA compiled the whole
    step again at every iteration. Its DynamicSlice takes the start as data; the gradient
    writes dy into zeros with DynamicUpdateSlice.
    """
    begin = tf.stack([0, tf.cast(start, tf.int32), 0, 0, 0])
    if not _in_xla():
        return tf.slice(x, begin, [-1, depth, -1, -1, -1])
    from tensorflow.compiler.tf2xla.python import xla
    size = tf.concat([tf.shape(x)[:1], [depth], tf.shape(x)[2:]], 0)

    @tf.custom_gradient
    def cut(x):
        def grad(dy):
            return xla.dynamic_update_slice(tf.zeros_like(x), dy, begin)
        return xla.dynamic_slice(x, begin, size), grad
    return cut(tf.convert_to_tensor(x))


CONV_REWRITES_ENV = "HAGAN_CONV_REWRITES"


@functools.cache  # fixed for the process; asked by every convolution when a step is traced
def _onednn_on() -> bool:
    """Whether TF runs its CPU ops with oneDNN (by default on CPUs with AVX-512 VNNI/BF16/AMX,
    or with TF_ENABLE_ONEDNN_OPTS=1)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a private API: if it moves, assume Eigen's kernels
        return False


def _rewrite_convs(dtype=None) -> bool:
    """Whether conv3d and upsample_conv3d rewrite TF's convolutions (below). The rewrites are
    for the Eigen CPU kernels TF uses without oneDNN. cuDNN's and oneDNN's own gradients are
    faster: at 128^3 an H100 ran 0.044 s per iteration with them, 0.082 s with the rewrites,
    and two AMX Xeon cores in mixed bfloat16 3.75 s against 8.02 s (benchmarks/RESULTS.md).
    But on an AVX-512 BF16 EPYC (TF 2.21) oneDNN's bfloat16 Conv3DBackpropFilter returned NaN
    for E^H's 3^3 conv on a 2-deep slab, so bfloat16 convolutions on a oneDNN CPU are rewritten.
    HAGAN_CONV_REWRITES=1/0 forces the choice (for benchmarks); it is read when a step is traced.
    """
    forced = os.environ.get(CONV_REWRITES_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if tf.config.list_logical_devices("GPU"):
        return False
    return not _onednn_on() or dtype == tf.bfloat16


def conv3d(x, kernel, strides=1, padding="SAME"):
    """tf.nn.conv3d whose gradients are forward convolutions too (on CPU).

    TF's CPU Conv3DBackpropInput/Filter kernels build im2col buffers: a 2 x 32^3 x 128 -> 64
    layer's backward takes ~0.9 GB of temporaries, which made G's backward pass the training
    step's memory peak (and both are 1-3x slower than the forward). Here the input gradient is
    dy convolved with the flipped kernel, and the kernel gradient x convolved with dy as the
    filter (the batch becomes the channels), both on Eigen's patch-free forward convolution:
    the same sums in another order. A stride-2 convolution (even kernel, even input) is first
    turned into a stride-1 one on the space-to-depth input (exact), so it gets them too.
    """
    padding = padding.upper()
    if not _rewrite_convs(tf.as_dtype(x.dtype)):
        return tf.nn.conv3d(x, kernel, [1, strides, strides, strides, 1], padding)
    x, kernel = tf.convert_to_tensor(x), tf.convert_to_tensor(kernel)  # read variables here
    k = kernel.shape[:3]
    if padding == "VALID" and None not in k and tuple(x.shape[1:4]) == tuple(k):
        # The kernel covers the whole input (E^G's last layer: 4^3 x 256 -> 1024, 67 MB): a
        # matmul, whose gradients need no flipped or transposed copies of the kernel.
        y = tf.matmul(tf.reshape(x, [-1, math.prod(k) * x.shape[-1]]),
                      tf.reshape(kernel, [-1, kernel.shape[-1]]))
        return tf.reshape(y, [-1, 1, 1, 1, kernel.shape[-1]])
    if strides != 1:
        dims = x.shape[1:4]
        if strides != 2 or any(n % 2 for n in k) or any(d is None or d % 2 for d in dims):
            return tf.nn.conv3d(x, kernel, [1, strides, strides, strides, 1], padding)
        if padding == "SAME":  # TF pads an even input by k - 2, split evenly
            x = tf.pad(x, [(0, 0)] + [((n - 2) // 2, (n - 2) - (n - 2) // 2) for n in k] + [(0, 0)])
        return conv3d(_space_to_depth(x), _kernel_to_depth(kernel), 1, "VALID")
    pads = [_pads(n, padding) for n in k]

    @tf.custom_gradient
    def conv(x, kernel):
        @_after_dy
        def grad(dy):
            return _conv_grads(x, kernel, dy, pads)
        return _padded_conv(x, kernel, pads), grad

    return conv(x, kernel)


def _conv_grads(x, kernel, dy, pads):
    """(dx, dkernel) of a stride-1 conv3d of x padded by pads, both as forward convolutions.

    The kernel gradient correlates the padded x with dy. When x would need padding and has
    more channels than dy, dy is padded instead and correlated with x, which gives the kernel
    reversed: the padded copy is the smaller one, and Eigen runs it faster (G^A's last 32^3
    layer at 128^3: 40 -> 18 MB, 1.0 -> 0.7 s).
    """
    k = kernel.shape[:3]
    flipped = tf.transpose(tf.reverse(kernel, [0, 1, 2]), [0, 1, 2, 4, 3])
    dy_pads = [(n - 1 - b, n - 1 - a) for n, (b, a) in zip(k, pads)]
    dx = _padded_conv(dy, flipped, dy_pads)
    if any(sum(p) for p in pads) and kernel.shape[-1] < kernel.shape[-2]:
        xt = tf.transpose(x, [1, 2, 3, 0, 4])  # [D, H, W, batch, in]
        dk = _padded_conv(tf.transpose(dy, [4, 1, 2, 3, 0]), xt, dy_pads)  # [out, k, k, k, in]
        return dx, tf.transpose(tf.reverse(dk, [1, 2, 3]), [1, 2, 3, 4, 0])
    xt = tf.transpose(x, [4, 1, 2, 3, 0])  # [in, D, H, W, batch]
    dk = _padded_conv(xt, tf.transpose(dy, [1, 2, 3, 0, 4]), pads)  # [in, k, k, k, out]
    return dx, tf.transpose(dk, [1, 2, 3, 0, 4])


_PARITIES = [(p, q, r) for p in (0, 1) for q in (0, 1) for r in (0, 1)]


def _parity_convs(x, kernel):
    """upsample_conv3d's 8 VALID 2^3 convolutions, parity (p, q, r) on the window of x padded
    by one that starts at (p, q, r), with the parity kernels derived from the 3^3 kernel
    -> [B, d, h, w, 8, out].

    The gradient keeps only x and the 3^3 kernel, and pads x, derives the parity kernels (4.7x
    the kernel's size: 34 MB in G^A's third block) and cuts each window again itself, one
    parity after the other. Autodiff would keep the kernels, the padded input and the 8
    windows (~290 MB in G^A's last layer at 256^3).
    """
    taps = tf.constant(np.stack([_PARITY_TAPS[p][:, p:p + 2] for p in (0, 1)]), kernel.dtype)
    d, h, w = _spatial(x)

    def window(xp, p, q, r):
        return xp[:, p:p + d + 1, q:q + h + 1, r:r + w + 1]

    def padded(x):
        return tf.pad(x, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]])

    @tf.custom_gradient
    def convs(x, kernel):
        @_after_dy
        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                k = _per_parity_kernels(kernel, taps)
            xp = padded(x)
            dxp, dk = None, []
            for i, (p, q, r) in enumerate(_PARITIES):
                with tf.control_dependencies([] if dxp is None else [dxp]):
                    dwin, dk_i = _conv_grads(window(xp, p, q, r), k[p, q, r], dy[..., i, :],
                                             [(0, 0)] * 3)
                placed = tf.pad(dwin, [(0, 0), (p, 1 - p), (q, 1 - q), (r, 1 - r), (0, 0)])
                dxp = placed if dxp is None else dxp + placed
                dk.append(dk_i)
            dk = tf.reshape(tf.stack(dk), k.shape)
            return dxp[:, 1:-1, 1:-1, 1:-1], tape.gradient(k, kernel, output_gradients=dk)

        k, xp = _per_parity_kernels(kernel, taps), padded(x)
        y = [tf.nn.conv3d(window(xp, p, q, r), k[p, q, r], _ONES, "VALID") for p, q, r in _PARITIES]
        return tf.stack(y, axis=-2), grad

    return convs(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))  # read variables here


def _spatial(x):
    """x's [D, H, W]: Python ints where the shape is static, which keeps the training graph
    small (each dynamic dimension is a few more nodes, in every layer and its gradient)."""
    dims = x.shape[1:4]
    if all(n is not None for n in dims):
        return list(dims)
    s = tf.shape(x)
    return [s[1], s[2], s[3]]


def _space_to_depth(x):
    """[B, D, H, W, C] (even D, H, W) -> [B, D/2, H/2, W/2, 8C], channels ordered (p, q, r, C)."""
    d, h, w = _spatial(x)
    c = x.shape[-1]
    x = tf.reshape(x, [-1, d // 2, 2, h // 2, 2, w // 2, 2, c])
    x = tf.transpose(x, [0, 1, 3, 5, 2, 4, 6, 7])
    return tf.reshape(x, [-1, d // 2, h // 2, w // 2, 8 * c])


def _kernel_to_depth(kernel):
    """[2a, 2b, 2c, in, out] -> [a, b, c, 8 in, out] matching _space_to_depth's channels."""
    a, b, c, i, o = kernel.shape
    k = tf.reshape(kernel, [a // 2, 2, b // 2, 2, c // 2, 2, i, o])
    k = tf.transpose(k, [0, 2, 4, 1, 3, 5, 6, 7])
    return tf.reshape(k, [a // 2, b // 2, c // 2, 8 * i, o])


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class Conv3D(layers.Conv3D):
    """keras Conv3D computed by `conv3d` (memory-lean gradients). Same weights and config."""

    def convolution_op(self, inputs, kernel):
        strides = set(self.strides)
        if len(strides) != 1 or set(self.dilation_rate) != {1} or self.groups != 1:
            return super().convolution_op(inputs, kernel)
        return conv3d(inputs, kernel, strides.pop(), self.padding)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class SNConv3D(_SpectralNorm, Conv3D):
    """Conv3D with spectral normalisation of its kernel (bias left alone, as in the reference)."""

    def build(self, input_shape):
        super().build(input_shape)
        self._add_u(self.filters)

    def call(self, inputs, training=False):
        out = self.convolution_op(inputs, self.normalized_kernel(training))
        if self.use_bias:
            out = out + self.bias
        return self.activation(out) if self.activation is not None else out


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class SNDense(_SpectralNorm, layers.Dense):
    """Dense with spectral normalisation of its kernel."""

    def build(self, input_shape):
        super().build(input_shape)
        self._add_u(self.units)

    def call(self, inputs, training=False):
        out = ops.matmul(inputs, self.normalized_kernel(training))
        if self.use_bias:
            out = out + self.bias
        return self.activation(out) if self.activation is not None else out


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class BlockDense(layers.Layer):
    """A Dense layer whose kernel is held as `blocks` column blocks, one variable each.

    The function and the initial distribution are Dense's (glorot-uniform over the whole
    kernel); only the optimizer sees a difference: Adam's update of a variable holds its
    gradient plus one temporary of its size, and for G^A's first layer (1024 x 32768, 134 MB)
    that was the G update's memory peak. Per block, each gradient can be applied, and freed, as
    soon as its own matmul is done. `kernel` gives the joined matrix.
    """

    def __init__(self, units, blocks=8, **kwargs):
        super().__init__(**kwargs)
        if units % blocks:
            raise ValueError(f"{units} units do not split into {blocks} blocks")
        self.units, self.blocks = units, blocks

    def build(self, input_shape):
        fan_in = input_shape[-1]
        limit = math.sqrt(6.0 / (fan_in + self.units))
        for i in range(self.blocks):  # attributes, not a list: tf.train.Checkpoint skips lists
            setattr(self, f"kernel_{i}", self.add_weight(
                name=f"kernel_{i}", shape=(fan_in, self.units // self.blocks),
                initializer=keras.initializers.RandomUniform(-limit, limit)))
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    @property
    def kernels(self):
        return [getattr(self, f"kernel_{i}") for i in range(self.blocks)]

    @property
    def kernel(self):
        return ops.concatenate(self.kernels, axis=-1)

    def assign_kernel(self, value):
        for k, part in zip(self.kernels, np.split(np.asarray(value), self.blocks, axis=-1)):
            k.assign(part)

    def call(self, inputs):
        return ops.concatenate([ops.matmul(inputs, k) for k in self.kernels], axis=-1) + self.bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "blocks": self.blocks}


def _channel_sums(x):
    """Sums of x [B, ..., C] over its spatial axes -> [B, C], one axis at a time.

    TF's CPU kernels sum over outer axes one element at a time: reducing 32^3 voxels at once
    puts ~2e-4 relative error on a variance (3e-4 on G's output against the PyTorch reference);
    axis by axis each sum has at most S terms, and no transposed copy is needed.
    """
    for axis in range(len(x.shape) - 2, 0, -1):
        x = tf.reduce_sum(x, axis)
    return x


def group_norm_op(x, gamma, beta, groups, epsilon):
    """GroupNorm over channels-last x, in float32, with a hand-written gradient.

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
        xf = tf.cast(x, tf.float32)
        rank = len(x.shape)
        spatial = x.shape[1:-1]
        count = (float(np.prod(spatial.as_list()) * group) if spatial.is_fully_defined()
                 else tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]) * group, tf.float32))
        mean = per_channel(group_mean(_channel_sums(xf), count), rank)
        centred = xf - mean
        inv = per_channel(tf.math.rsqrt(group_mean(_channel_sums(tf.square(centred)), count)
                                        + epsilon), rank)
        y = centred * (inv * gamma) + beta

        @_after_dy
        def grad(dy):
            dy = tf.cast(dy, tf.float32)
            xhat = (xf - mean) * inv
            dy_xhat = _channel_sums(dy * xhat)  # [B, C]
            dy_sum = _channel_sums(dy)
            m1 = per_channel(group_mean(dy_sum * gamma, count), rank)
            m2 = per_channel(group_mean(dy_xhat * gamma, count), rank)
            dx = (dy * gamma - m1 - xhat * m2) * inv
            return tf.cast(dx, x.dtype), tf.reduce_sum(dy_xhat, 0), tf.reduce_sum(dy_sum, 0)

        return tf.cast(y, x.dtype), grad

    return norm(x, gamma, beta)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class GroupNorm(layers.GroupNormalization):
    """Channels-last GroupNormalization computed by `group_norm_op` (same weights and config)."""

    def call(self, inputs):
        return group_norm_op(inputs, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
                             self.groups, self.epsilon)


def group_norm(name=None, groups=GN_GROUPS):
    return GroupNorm(groups=groups, epsilon=GN_EPSILON, name=name)


# Nearest x2 upsampling followed by a 'same' 3^3 convolution reads, for each output parity p
# along an axis, only the input voxels i-1+p and i+p: output 2i+p is a 2-tap convolution of the
# original signal whose taps sum the original taps landing on the same input voxel.
# _PARITY_TAPS[p, t, j]: original tap t (offsets -1, 0, +1) -> input offset j (-1, 0, +1).
_PARITY_TAPS = np.array([[[1, 0, 0], [0, 1, 0], [0, 1, 0]],
                         [[0, 1, 0], [0, 1, 0], [0, 0, 1]]], np.float32)


def upsample_nearest(x):
    """Nearest x2 upsampling of [B, D, H, W, C]: one broadcast per axis, innermost first, each
    on a rank-4 view (TF's CPU BroadcastTo stops at rank 5). Half the graph nodes of three
    ops.repeat, forward and backward: a GPU step is bound by dispatching its ops."""
    d, h, w = _spatial(x)
    c = x.shape[-1]
    inner = c  # elements per step of the axis being repeated, after the earlier repeats
    for n in (w, h, d):
        x = tf.reshape(x, [-1, n, 1, inner])
        x = tf.broadcast_to(x, tf.concat([tf.shape(x)[:1], [n, 2, inner]], 0))
        inner *= 2 * n
    return tf.reshape(x, [-1, 2 * d, 2 * h, 2 * w, c])


def _per_parity_kernels(kernel, taps):
    """[3,3,3,in,out] kernel, taps [P,3,J] -> [P,P,P, J,J,J, in, out], one spatial axis at a time."""
    k = kernel
    for _ in range(3):  # contracts the leading spatial axis, appends (P, J)
        k = tf.tensordot(k, taps, axes=[[0], [1]])
    return tf.transpose(k, [2, 4, 6, 3, 5, 7, 0, 1])


def _weights_dominate(x) -> bool:
    """Below 8^3 input voxels (G^A's first upsampling, 512 channels) deriving the 8 parity
    kernels costs more than it saves: upsample and convolve directly there."""
    dims = x.shape[1:4]
    return all(n is not None for n in dims) and int(np.prod(dims)) < 512


def upsample_conv3d(x, kernel):
    """conv3d(nearest_upsample_x2(x), kernel, 'SAME') for a 3^3 kernel, without upsampling.

    The same function (up to float rounding) that never materialises the 8x larger upsampled
    tensor (2 GiB in G^H's last layer at 256^3). Wide outputs: eight 2^3 convolutions, one per
    output parity, at 8/27 of the multiply-adds. Narrow outputs (G^H's last layer, 1 channel),
    where eight tiny convolutions are slow on CPU: one 3^3 convolution with the 8 parities as
    output channels. (TF's conv3d_transpose would do it in one op but is 100x slower on CPU
    for batches larger than one.)
    """
    d, h, w = _spatial(x)
    c_in, c_out = kernel.shape[-2], kernel.shape[-1]
    if c_out < 8:  # k: [p,q,r, 3,3,3, in, out] -> one 3^3 conv with (p,q,r,out) channels
        k = _per_parity_kernels(kernel, tf.constant(_PARITY_TAPS, dtype=kernel.dtype))
        k = tf.reshape(tf.transpose(k, [3, 4, 5, 6, 0, 1, 2, 7]), [3, 3, 3, c_in, 8 * c_out])
        y = conv3d(x, k)
    else:  # one VALID 2^3 conv per parity on a shifted window
        y = _parity_convs(x, kernel)
    y = tf.reshape(y, [-1, d, h, w, 2, 2, 2, c_out])
    y = tf.transpose(y, [0, 1, 4, 2, 5, 3, 6, 7])  # interleave the parities
    return tf.reshape(y, [-1, 2 * d, 2 * h, 2 * w, c_out])


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class ConvBlock(layers.Layer):
    """[nearest upsample x2] -> Conv3D -> [GroupNorm(8) -> ReLU | tanh | nothing].

    The one unit every generator and encoder stage is made of. `post` picks what follows the
    convolution: "gn_relu" (hidden layers), "tanh" (image outputs) or "none" (E^G's last conv).
    """

    def __init__(self, filters, kernel_size=3, strides=1, padding="same", upsample=False,
                 post="gn_relu", groups=GN_GROUPS, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.padding, self.upsample, self.post, self.groups = padding, upsample, post, groups
        if upsample and (kernel_size != 3 or strides != 1 or padding != "same"):
            raise ValueError("upsampling blocks are 3^3, stride 1, 'same' convolutions")
        self.conv = Conv3D(filters, kernel_size, strides=strides, padding=padding, name="conv")
        self.norm = group_norm("norm", min(groups, filters)) if post == "gn_relu" else None

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.upsample:
            shape = shape[:1] + tuple(None if s is None else 2 * s for s in shape[1:4]) + shape[4:]
        self.conv.build(shape)
        if self.norm is not None:
            self.norm.build(self.conv.compute_output_shape(shape))

    def call(self, x):
        if self.upsample and (_weights_dominate(x) or not _rewrite_convs(tf.as_dtype(x.dtype))):
            x = self.conv(upsample_nearest(x))
        elif self.upsample:
            x = upsample_conv3d(x, self.conv.kernel) + self.conv.bias
        else:
            x = self.conv(x)
        if self.post == "gn_relu":
            return ops.relu(self.norm(x))
        if self.post == "tanh":
            return ops.tanh(x)
        return x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "upsample": self.upsample,
                "post": self.post, "groups": self.groups}


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class MinibatchStd(layers.Layer):
    """Appends one channel: the spread of the features across the batch (ProGAN's minibatch
    standard deviation). A D that sees it can tell a batch of one repeated sample from a
    varied real batch, which makes a generator that ignores z lose."""

    def call(self, x):
        xf = tf.cast(x, tf.float32)
        std = tf.sqrt(tf.math.reduce_variance(xf, axis=0) + 1e-8)  # [D, H, W, C]
        spread = tf.cast(tf.reduce_mean(std), x.dtype)
        return tf.concat([x, tf.ones_like(x[..., :1]) * spread], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + 1,)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class SNConvLeaky(layers.Layer):
    """Spectrally normalised Conv3D followed by LeakyReLU(0.2): the discriminator's unit."""

    def __init__(self, filters, kernel_size=4, strides=2, padding="same", activate=True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.padding, self.activate = padding, activate
        self.conv = SNConv3D(filters, kernel_size, strides=strides, padding=padding, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x, training=False):
        x = self.conv(x, training=training)
        return leaky_relu(x, 0.2) if self.activate else x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "activate": self.activate}
