"""The Keras layers of the HA-GAN networks.

Spectral normalisation: we follow the reference (BigGAN-style SN), not Keras's
`SpectralNormalization` wrapper: the stored kernel stays unnormalised, every forward pass
(training and inference) divides it by sigma from one power iteration, the gradient flows
through sigma, and the vector `u` is updated only in training. Keras's wrapper instead
rescales the stored kernel in place and passes no gradient through sigma, which trains a
different function and cannot load the published weights with forward parity.

The ops under the layers are elsewhere: memory-lean gradients in `lean_ops`, and the one
convolution entry point `conv_rewrites.conv3d`, which picks TF's convolution or the CPU rewrites.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from ._compat import kernel_variable
from .config import G_OUTPUTS as TANH_POSTS
from .conv_rewrites import conv3d
from .dtypes import upcast
from .lean_ops import divide, group_norm_op, leaky_relu

SERIAL_PACKAGE = "hagan_tf"
GN_EPSILON = 1e-5
GN_GROUPS = 8


def _normalize(x, eps=1e-12):
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x))), eps)


class _SpectralNorm:
    """Mixin for Keras Conv/Dense layers (kernel [..., out]): reference-style spectral norm."""

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
        w = ops.reshape(kernel_variable(self), (-1, self.u.shape[-1]))  # [fan_in, out]
        u = ops.cast(self.u, w.dtype)
        v = _normalize(ops.stop_gradient(ops.transpose(ops.matmul(w, ops.transpose(u)))))  # u W^T
        u_new = _normalize(ops.stop_gradient(ops.matmul(v, w)))
        if training:
            self.u.assign(ops.cast(u_new, self.u.dtype))
        return ops.sum(ops.matmul(v, w) * u_new)

    def normalized_kernel(self, training=False):
        return divide(tf.convert_to_tensor(kernel_variable(self)), self.sigma(training))

    # Keras's Conv/Dense save only kernel and bias; u is state of the function, so keep it.
    def _own_variables(self):
        return [kernel_variable(self)] + ([self.bias] if self.use_bias else []) + [self.u]

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


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class GroupNorm(layers.GroupNormalization):
    """Channels-last GroupNormalization computed by `group_norm_op` (same weights and config)."""

    def call(self, inputs):
        return group_norm_op(inputs, upcast(self.gamma), upcast(self.beta), self.groups, self.epsilon)


INWARD_SLOPE = 0.06  # tanh's slope at -0.97, the darkest real voxel (air, -1000 HU)


@tf.custom_gradient
def tanh_inward(x):
    """tanh whose gradient does not vanish in the direction that leaves saturation.

    A descent step that would move an output toward 0 gets at least INWARD_SLOPE (tanh's own
    is ~0.002 at the -3.9 where small Gs park air and lungs); one that would push it further
    out gets tanh's own. So a voxel that D drove to -1 early can come back, nothing runs away
    outward, and voxels within the data's range train exactly as under tanh (a slope of 1
    inward, tried first, biased every voxel toward grey: RESULTS.md)."""
    y = tf.tanh(x)

    def grad(g):
        slope = 1.0 - y * y
        inward = g * tf.sign(x) > 0  # descent moves y by -g: toward 0 when sign(g) == sign(y)
        return g * tf.where(inward, tf.maximum(slope, INWARD_SLOPE), slope)

    return y, grad


def group_norm(name=None, groups=GN_GROUPS):
    return GroupNorm(groups=groups, epsilon=GN_EPSILON, name=name)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class IntensityMap(layers.Layer):
    """A monotone piecewise-linear map through `knots` [(x, y), ...], extended linearly past
    the ends, or its inverse: config.intensity_map's f (D's input) and f^-1 (G's output).
    Written as a sum of ReLUs, so f(f^-1(y)) == y up to rounding and the gradient is the
    segment's slope."""

    def __init__(self, knots, inverse=False, **kwargs):
        super().__init__(**kwargs)
        self.knots = [tuple(float(v) for v in k) for k in knots]
        self.inverse = bool(inverse)
        xs, ys = zip(*self.knots)
        if self.inverse:
            xs, ys = ys, xs
        slopes = [(y1 - y0) / (x1 - x0) for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])]
        self._x0, self._y0, self._s0 = xs[0], ys[0], slopes[0]
        self._hinges = [(x, s1 - s0) for x, s0, s1 in zip(xs[1:-1], slopes, slopes[1:])]

    def call(self, x):
        y = self._y0 + self._s0 * (x - self._x0)
        for at, change in self._hinges:
            y = y + change * ops.relu(x - at)
        return ops.cast(y, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "knots": self.knots, "inverse": self.inverse}


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class ConvBlock(layers.Layer):
    """[nearest upsample x2] -> Conv3D -> [GroupNorm(8) -> ReLU | tanh | nothing].

    The one unit every generator and encoder stage is made of. `post` picks what follows the
    convolution: "gn_relu" (hidden layers), "tanh" (image outputs; "tanh_st": the same values,
    but in training the gradient passes straight through, so a saturated voxel still learns;
    "tanh_inward": straight through only toward 0, see `tanh_inward`) or "none" (E^G's last
    conv). `output_map`: the knots of config.intensity_map, whose f^-1 an image output's tanh
    goes through.
    """

    def __init__(self, filters, kernel_size=3, strides=1, padding="same", upsample=False,
                 post="gn_relu", groups=GN_GROUPS, output_map=None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.padding, self.upsample, self.post, self.groups = padding, upsample, post, groups
        self.output_map = [tuple(k) for k in output_map] if output_map else None
        self.out_map = IntensityMap(self.output_map, inverse=True) if self.output_map else None
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

    def call(self, x, training=False):
        if self.upsample:  # conv3d fuses the upsampling into the convolution where it pays
            x = conv3d(x, self.conv.kernel, upsample=True, inference=not training) + self.conv.bias
        else:
            x = self.conv(x)
        if self.post == "gn_relu":
            return ops.relu(self.norm(x))
        if self.post == "tanh_st" and training:
            x = x + ops.stop_gradient(ops.tanh(x) - x)
        elif self.post == "tanh_inward" and training:
            x = tanh_inward(x)
        elif self.post in TANH_POSTS:
            x = ops.tanh(x)
        return self.unmap(x)

    def unmap(self, y):
        """An image output's f^-1 (config.intensity_map): tanh's range -> volume units."""
        return y if self.out_map is None or self.post not in TANH_POSTS else self.out_map(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "upsample": self.upsample,
                "post": self.post, "groups": self.groups, "output_map": self.output_map}


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class MinibatchStd(layers.Layer):
    """Appends one channel: the spread of the features across the batch (ProGAN's minibatch
    standard deviation). A D that sees it can tell a batch of one repeated sample from a
    varied real batch, which makes a generator that ignores z lose."""

    def call(self, x):
        xf = upcast(x)
        std = tf.sqrt(tf.math.reduce_variance(xf, axis=0) + 1e-8)  # [D, H, W, C]
        spread = tf.cast(tf.reduce_mean(std), x.dtype)
        return tf.concat([x, tf.ones_like(x[..., :1]) * spread], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + 1,)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class IntensityWindow(layers.Layer):
    """Appends one channel: the volume (channel 0) through the window [low, high], stretched
    to [-1, 1]. Dark tissues 0.17 apart in the CT window (lung, air) are ~5x further apart in
    it, so D tells their levels apart as easily as it tells tissue from air (config.d_window;
    several windows are several of these layers, each reading channel 0)."""

    def __init__(self, low, high, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)

    def call(self, x):
        scale = 2.0 / (self.high - self.low)
        window = ops.clip((x[..., :1] - self.low) * scale - 1.0, -1.0, 1.0)
        return ops.concatenate([x, ops.cast(window, x.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + 1,)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


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
