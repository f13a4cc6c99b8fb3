"""Convolutions whose gradients are forward convolutions: for TF's Eigen CPU kernels.

Without oneDNN, TF's CPU Conv3DBackpropInput/Filter build im2col buffers (about 0.9 GB of
temporaries for one 2 x 32^3 x 128 -> 64 layer) and run 1-3x slower than the forward
convolution. The rewrites here compute the same sums in another order on the patch-free
forward convolution, and fuse nearest upsampling into the convolution that follows it.

`conv3d` is the one entry point (Conv3D and ConvBlock in `layers` call it): it runs TF's own
convolution, or these rewrites where `rewrites_on` says they pay. cuDNN's and oneDNN's own
gradients are faster, so a GPU or a oneDNN CPU gets TF's ops (but see `rewrites_on` for
bfloat16 on oneDNN).
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf

from . import _compat
from .lean_ops import after_dy, spatial_shape, upsample_nearest

CONV_REWRITES_ENV = "HAGAN_CONV_REWRITES"


def rewrites_on(dtype=None) -> bool:
    """Whether `conv3d` uses the rewrites below instead of TF's convolutions. The rewrites are
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
    return not _compat.onednn_enabled() or dtype == tf.bfloat16


def conv3d(x, kernel, strides=1, padding="SAME", upsample=False, inference=False):
    """conv3d(x, kernel) (no bias), or with `upsample` conv3d(nearest_upsample_x2(x), kernel)
    (3^3 kernel, stride 1, 'SAME'): TF's own ops, or the rewrites where `rewrites_on(x.dtype)`.

    An upsampling convolution is fused (`upsample_conv3d`) on the rewrite path and in inference
    (forward only: faster on oneDNN too, and never the 8x upsampled tensor; the tiled decode of
    hagan_tf.tiled uses it, so a whole decode and a tiled one agree), but not where the weights
    dominate (see `_weights_dominate`).
    """
    rewrite = rewrites_on(tf.as_dtype(x.dtype))
    if upsample:
        if (rewrite or inference) and not _weights_dominate(x):
            return upsample_conv3d(x, kernel)
        x = upsample_nearest(x)
    if not rewrite:
        return tf.nn.conv3d(x, kernel, [1, strides, strides, strides, 1], padding.upper())
    return rewritten_conv3d(x, kernel, strides, padding)


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


def rewritten_conv3d(x, kernel, strides=1, padding="SAME"):
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
        return rewritten_conv3d(_space_to_depth(x), _kernel_to_depth(kernel), 1, "VALID")
    pads = [_pads(n, padding) for n in k]

    @tf.custom_gradient
    def conv(x, kernel):
        @after_dy
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
    d, h, w = spatial_shape(x)

    def window(xp, p, q, r):
        return xp[:, p:p + d + 1, q:q + h + 1, r:r + w + 1]

    def padded(x):
        return tf.pad(x, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]])

    @tf.custom_gradient
    def convs(x, kernel):
        @after_dy
        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                k = parity_kernels(kernel)
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

        k, xp = parity_kernels(kernel), padded(x)
        y = [tf.nn.conv3d(window(xp, p, q, r), k[p, q, r], _ONES, "VALID") for p, q, r in _PARITIES]
        return tf.stack(y, axis=-2), grad

    return convs(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))  # read variables here



def _space_to_depth(x):
    """[B, D, H, W, C] (even D, H, W) -> [B, D/2, H/2, W/2, 8C], channels ordered (p, q, r, C)."""
    d, h, w = spatial_shape(x)
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


# Nearest x2 upsampling followed by a 'same' 3^3 convolution reads, for each output parity p
# along an axis, only the input voxels i-1+p and i+p: output 2i+p is a 2-tap convolution of the
# original signal whose taps sum the original taps landing on the same input voxel.
# _PARITY_TAPS[p, t, j]: original tap t (offsets -1, 0, +1) -> input offset j (-1, 0, +1).
_PARITY_TAPS = np.array([[[1, 0, 0], [0, 1, 0], [0, 1, 0]],
                         [[0, 1, 0], [0, 1, 0], [0, 0, 1]]], np.float32)


def _per_parity_kernels(kernel, taps):
    """[3,3,3,in,out] kernel, taps [P,3,J] -> [P,P,P, J,J,J, in, out], one spatial axis at a time."""
    k = kernel
    for _ in range(3):  # contracts the leading spatial axis, appends (P, J)
        k = tf.tensordot(k, taps, axes=[[0], [1]])
    return tf.transpose(k, [2, 4, 6, 3, 5, 7, 0, 1])


# The 2 taps each parity keeps: _TWO_TAPS[p, t, j], j over input offsets p - 1 and p.
_TWO_TAPS = np.stack([_PARITY_TAPS[p][:, p:p + 2] for p in (0, 1)])


def parity_kernels(kernel):
    """An upsampling 3^3 convolution's kernel per output parity: for 8 or more outputs,
    [2,2,2, 2,2,2, in, out] (parity, then its 2^3 kernel, VALID on the input padded by one and
    cut at the parity's offset); for fewer, [3,3,3, in, 8 * out] (the parities as output
    channels of one 'same' 3^3 convolution). `interleave_parities` puts the results in place."""
    c_in, c_out = kernel.shape[-2], kernel.shape[-1]
    if c_out >= 8:
        return _per_parity_kernels(kernel, tf.constant(_TWO_TAPS, kernel.dtype))
    k = _per_parity_kernels(kernel, tf.constant(_PARITY_TAPS, kernel.dtype))
    return tf.reshape(tf.transpose(k, [3, 4, 5, 6, 0, 1, 2, 7]), [3, 3, 3, c_in, 8 * c_out])


def interleave_parities(y, c_out: int):
    """[B, D, H, W, 8 * c_out] (or [..., 8, c_out]), parity (p, q, r) in the channels ->
    [B, 2D, 2H, 2W, c_out], output voxel (2i + p, 2j + q, 2k + r) from parity (p, q, r) at
    (i, j, k). Static sizes where known (the tiled decode's depth changes from step to step)."""
    s = tf.shape(y)
    d, h, w = (y.shape[i] if y.shape[i] is not None else s[i] for i in (1, 2, 3))
    y = tf.reshape(y, [-1, d, h, w, 2, 2, 2, c_out])
    y = tf.transpose(y, [0, 1, 4, 2, 5, 3, 6, 7])
    return tf.reshape(y, [-1, 2 * d, 2 * h, 2 * w, c_out])


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
    c_out = kernel.shape[-1]
    if c_out < 8:  # one 3^3 conv with (p,q,r,out) channels
        y = rewritten_conv3d(x, parity_kernels(kernel))
    else:  # one VALID 2^3 conv per parity on a shifted window
        y = _parity_convs(x, kernel)
    return interleave_parities(y, c_out)
