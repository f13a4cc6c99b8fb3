"""Building blocks shared by the HA-GAN networks.

Spectral normalisation: we follow the reference (BigGAN-style SN), not Keras's
`SpectralNormalization` wrapper: the stored kernel stays unnormalised, every forward pass
(training and inference) divides it by sigma from one power iteration, the gradient flows
through sigma, and the vector `u` is updated only in training. Keras's wrapper instead
rescales the stored kernel in place and passes no gradient through sigma, which trains a
different function and cannot load the published weights with forward parity.
"""

from __future__ import annotations

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
        v = _normalize(ops.stop_gradient(ops.matmul(u, ops.transpose(w))))
        u_new = _normalize(ops.stop_gradient(ops.matmul(v, w)))
        if training:
            self.u.assign(ops.cast(u_new, self.u.dtype))
        return ops.sum(ops.matmul(v, w) * u_new)

    def normalized_kernel(self, training=False):
        return self._kernel / self.sigma(training)

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


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class SNConv3D(_SpectralNorm, layers.Conv3D):
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
class GroupNorm(layers.GroupNormalization):
    """Channels-last GroupNormalization whose moments are reduced over contiguous memory.

    TF's CPU kernels sum over outer axes one element at a time: at 32^3 x 128 Keras's layer puts
    ~2e-4 relative error on the variance (3e-4 on G's output against the PyTorch reference) and
    is 2-3x slower than gathering each group's values first.
    """

    def call(self, inputs):
        shape = ops.shape(inputs)
        c = inputs.shape[-1]
        x = ops.reshape(ops.cast(inputs, "float32"), (shape[0], -1, self.groups, c // self.groups))
        mean, var = ops.moments(ops.transpose(x, (0, 2, 1, 3)), axes=(2, 3), keepdims=True)
        mean = ops.transpose(mean, (0, 2, 1, 3))
        inv = ops.transpose(ops.rsqrt(var + self.epsilon), (0, 2, 1, 3))
        y = ops.reshape((x - mean) * inv, shape)
        y = y * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(y, inputs.dtype)


def group_norm(name=None):
    return GroupNorm(groups=GN_GROUPS, epsilon=GN_EPSILON, name=name)


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
    shape = tf.shape(x)
    b, d, h, w = shape[0], shape[1], shape[2], shape[3]
    c_in, c_out = kernel.shape[-2], kernel.shape[-1]
    taps = _PARITY_TAPS if c_out < 8 else np.stack([_PARITY_TAPS[p][:, p:p + 2] for p in (0, 1)])
    k = _per_parity_kernels(kernel, tf.constant(taps, dtype=kernel.dtype))
    if c_out < 8:  # k: [p,q,r, 3,3,3, in, out] -> one 3^3 conv with (p,q,r,out) channels
        k = tf.reshape(tf.transpose(k, [3, 4, 5, 6, 0, 1, 2, 7]), [3, 3, 3, c_in, 8 * c_out])
        y = tf.nn.conv3d(x, k, [1] * 5, "SAME")
    else:  # k: [p,q,r, 2,2,2, in, out] -> one VALID 2^3 conv per parity on a shifted window
        xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]])
        y = tf.stack([tf.nn.conv3d(xp[:, p:p + d + 1, q:q + h + 1, r:r + w + 1], k[p, q, r],
                                   [1] * 5, "VALID")
                      for p in (0, 1) for q in (0, 1) for r in (0, 1)], axis=-2)
    y = tf.reshape(y, [b, d, h, w, 2, 2, 2, c_out])
    y = tf.transpose(y, [0, 1, 4, 2, 5, 3, 6, 7])  # interleave the parities
    return tf.reshape(y, [b, 2 * d, 2 * h, 2 * w, c_out])


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class ConvBlock(layers.Layer):
    """[nearest upsample x2] -> Conv3D -> [GroupNorm(8) -> ReLU | tanh | nothing].

    The one unit every generator and encoder stage is made of. `post` picks what follows the
    convolution: "gn_relu" (hidden layers), "tanh" (image outputs) or "none" (E^G's last conv).
    """

    def __init__(self, filters, kernel_size=3, strides=1, padding="same", upsample=False,
                 post="gn_relu", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.padding, self.upsample, self.post = padding, upsample, post
        if upsample and (kernel_size != 3 or strides != 1 or padding != "same"):
            raise ValueError("upsampling blocks are 3^3, stride 1, 'same' convolutions")
        self.conv = layers.Conv3D(filters, kernel_size, strides=strides, padding=padding, name="conv")
        self.norm = group_norm("norm") if post == "gn_relu" else None

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.upsample:
            shape = shape[:1] + tuple(None if s is None else 2 * s for s in shape[1:4]) + shape[4:]
        self.conv.build(shape)
        if self.norm is not None:
            self.norm.build(self.conv.compute_output_shape(shape))

    def call(self, x):
        if self.upsample and _weights_dominate(x):
            x = self.conv(ops.repeat(ops.repeat(ops.repeat(x, 2, 1), 2, 2), 2, 3))
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
                "post": self.post}


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
        return ops.leaky_relu(x, 0.2) if self.activate else x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "activate": self.activate}
