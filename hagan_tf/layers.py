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


def group_norm(name=None):
    return layers.GroupNormalization(groups=GN_GROUPS, epsilon=GN_EPSILON, name=name)


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
        self.up = layers.UpSampling3D(2, name="up") if upsample else None
        self.conv = layers.Conv3D(filters, kernel_size, strides=strides, padding=padding, name="conv")
        self.norm = group_norm("norm") if post == "gn_relu" else None

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.up is not None:
            shape = shape[:1] + tuple(None if s is None else 2 * s for s in shape[1:4]) + shape[4:]
        self.conv.build(shape)
        if self.norm is not None:
            self.norm.build(self.conv.compute_output_shape(shape))

    def call(self, x):
        if self.up is not None:
            x = self.up(x)
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
