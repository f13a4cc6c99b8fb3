"""The HA-GAN networks, one generic implementation for every output size S.

Paper symbol -> attribute (docs/architecture.md has the whole map):
  G^A -> Generator.common        G^L -> Generator.low_res_head   G^H -> Generator.high_res_head
  D^H -> Discriminator.high_res  D^L -> Discriminator.low_res
  E^H -> Encoder.high_res        E^G -> Encoder.latent_head      r   -> `crop` (start slice)

Channels-last throughout: volumes are [B, D, H, W, 1] and sub-volumes (slabs) are cut along D.
The per-size layer lists follow from S alone (see `_stride2_channels`), which reproduces the
reference's 128^3 and 256^3 networks exactly and extends them to 32..512.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from .config import HAGANConfig, g_knots, parse_knots, parse_windows
from .dtypes import at_least_float32
from .layers import (SERIAL_PACKAGE, BlockDense, ConvBlock, IntensityMap, IntensityWindow, MinibatchStd,
                     SNConvLeaky, SNDense)
from .lean_ops import depth_slab, leaky_relu

# G^A's convolutions after the 4^3 reshape; blocks 2..1+log2(S/16) follow an upsample (all at 512).
COMMON_CHANNELS = (512, 512, 256, 128, 64)


def checked_labels(labels, num_classes: int, n: int) -> np.ndarray | None:
    """n class labels as int32, or None for an unconditional model. Refuses what one_hot would
    quietly turn into an all-zero class (a label out of range) or ignore (labels without classes)."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError("this model is unconditional (num_classes 0): it takes no labels")
        return None
    if labels is None:
        raise ValueError(f"this model is class-conditional: pass {n} labels in 0..{num_classes - 1}")
    arr = np.asarray(labels)
    if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"labels must be {n} integers (one per sample), got shape "
                         f"{list(arr.shape)} of {arr.dtype}")
    bad = sorted({int(x) for x in arr if not 0 <= x < num_classes})
    if bad:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {bad[:5]}")
    return arr.astype(np.int32)


def _stride2_channels(n: int, last: int) -> list[int]:
    """Channels of a chain of n stride-2 convs ending at `last`, halving towards the input.

    D^H's 4^3 stride-2 stem, D^L and E^G are all such chains in the reference; the larger model
    simply has one more layer in front (at S=256: 16,32,64 vs 32,64 at S=128).
    """
    return [last // 2 ** (n - 1 - i) for i in range(n)]


def _minibatch_std(cfg: HAGANConfig) -> list:
    """The layer D^H and D^L put before their last convolution when config.minibatch_std."""
    return [MinibatchStd(name="minibatch_std")] if cfg.minibatch_std else []


def _window(cfg: HAGANConfig) -> list:
    """The layers D^H and D^L put first: config.intensity_map's f (with intensity_map_d), then
    a channel per window of config.d_window."""
    return _intensity_map(cfg) + [IntensityWindow(low, high, name="window" if i == 0 else f"window_{i}")
            for i, (low, high) in enumerate(parse_windows(cfg.d_window))]


def _intensity_map(cfg: HAGANConfig) -> list:
    """config.intensity_map's f, D's first layer with intensity_map_d (G's f^-1: ConvBlock)."""
    knots = parse_knots(cfg.intensity_map) if cfg.intensity_map_d else []
    return [IntensityMap(knots, name="intensity_map")] if knots else []


def _log2(x: int) -> int:
    return int(round(math.log2(x)))


class ConfigAlias:
    """`config_`, the deprecated name of `.config` (the HAGANConfig), for scripts that use it."""

    @property
    def config_(self) -> HAGANConfig:
        warnings.warn("`.config_` is deprecated: use `.config`", DeprecationWarning, stacklevel=2)
        return self.config


class _Network(ConfigAlias, keras.Model):
    """Base: built from its HAGANConfig at construction, serialisable through that config."""

    def __init__(self, config: HAGANConfig | dict, **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, HAGANConfig) else HAGANConfig.from_dict(config)

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    def build(self, input_shape=None):  # sub-layers are built in __init__; nothing left to do
        self.built = True


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class Generator(_Network):
    """G = (G^A, G^L, G^H). z [B, latent] (+ labels [B]) -> volumes in [-1, 1]."""

    def __init__(self, config, **kwargs):
        super().__init__(config, name=kwargs.pop("name", "generator"), **kwargs)
        cfg = self.config
        ch = cfg.channels
        n_up = _log2(cfg.size // 16)
        c0 = ch(COMMON_CHANNELS[0])
        groups = cfg.g_norm_groups
        blocks = [
            ConvBlock(ch(c), upsample=min(1, len(COMMON_CHANNELS) - n_up) <= i <= n_up,
                      groups=groups, name=f"block{i + 1}")
            for i, c in enumerate(COMMON_CHANNELS)
        ]
        if n_up > len(COMMON_CHANNELS):
            raise ValueError(f"size {cfg.size} needs more upsampling stages than G^A has")
        self.common = keras.Sequential(
            [keras.Input((cfg.latent_dim + cfg.num_classes,)),
             BlockDense(4 * 4 * 4 * c0, name="fc"), layers.Reshape((4, 4, 4, c0))] + blocks,
            name="common")
        a_ch = ch(COMMON_CHANNELS[-1])
        self.feature_channels = a_ch
        out_map = g_knots(parse_knots(cfg.intensity_map))  # f^-1 after the tanh
        self.low_res_head = keras.Sequential(
            [keras.Input((None, None, None, a_ch)), ConvBlock(ch(32), groups=groups, name="block1"),
             ConvBlock(ch(16), groups=groups, name="block2"),
             ConvBlock(1, post=cfg.g_output, output_map=out_map, name="block3")],
            name="low_res_head")
        self.high_res_head = keras.Sequential(
            [keras.Input((None, None, None, a_ch)),
             ConvBlock(ch(32), upsample=True, groups=groups, name="block1"),
             ConvBlock(1, upsample=True, post=cfg.g_output, output_map=out_map, name="block2")],
            name="high_res_head")
        self.built = True

    def latent_input(self, z, labels=None):
        """z, with the one-hot class appended for the conditional model."""
        z = ops.convert_to_tensor(z)
        if self.config.num_classes == 0:
            return z
        if labels is None:
            raise ValueError("this generator is class-conditional: pass labels")
        onehot = ops.one_hot(ops.cast(labels, "int32"), self.config.num_classes, dtype=z.dtype)
        return ops.concatenate([z, onehot], axis=-1)

    def features(self, z, labels=None, training=False):
        """A = G^A(z): [B, S/4, S/4, S/4, 64]."""
        return self.common(self.latent_input(z, labels), training=training)

    def feature_slab(self, a, crop):
        """The slab of A that G^H turns into the sub-volume starting at slice `crop`."""
        depth = self.config.size // 32
        return depth_slab(a, ops.cast(crop, "int32") // 4, depth)

    def decode(self, a, training=False):
        """G^H on given features: a whole A gives [S, S, S], a slab of A gives its slab."""
        return self.high_res_head(a, training=training)

    def call(self, z, labels=None, crop=None, training=False):
        """Full volume [B, S, S, S, 1] when `crop` is None; else (slab at `crop`, X^L)."""
        a = self.features(z, labels, training=training)
        if crop is None:
            return self.decode(a, training=training)
        slab = self.decode(self.feature_slab(a, crop), training=training)
        return slab, self.low_res_head(a, training=training)

    def volume(self, z, labels=None, tile_depth: int | None = None, out=None):
        """Full volumes [B, S, S, S, 1], equal to `self(z)`, decoded `tile_depth` slices at a
        time below G^A's second-to-last block (hagan_tf.tiled): memory then stays bounded at
        512^3. A NumPy array eagerly, a tensor inside a tf.function. tile_depth: default the
        config's, whose own default (None) is `tiled.auto_tile_depth(S)`, 32 * (256 / S)^2
        slices; 0 or >= S decodes the whole volume at once. Eagerly, `out` (see tiled.decode:
        an array-like taking `out[:, c:e] = rows`, e.g. io.NiftiVolumes) receives the slabs as
        they are decoded, so the volume need never be whole in memory; it is returned."""
        from . import tiled

        depth = self.config.tile_depth if tile_depth is None else int(tile_depth)
        if depth is None:
            depth = tiled.auto_tile_depth(self.config.size)
        if out is not None and not tf.executing_eagerly():
            raise ValueError("a traced volume() returns its output: out must be None")
        if depth <= 0 or depth >= self.config.size:
            whole = self(z, labels=labels)
            if not tf.executing_eagerly():
                return whole
            if out is None:
                return whole.numpy()
            out[:, 0:self.config.size] = whole.numpy()
            return out
        x = self.latent_input(z, labels)
        for layer in self.common.layers[:-2]:
            x = layer(x)
        # G^A's last two blocks and G^H hold most of the work: G^A's second-to-last map is made
        # slab by slab, then the rest decodes from it (eagerly the map stays the NumPy array it
        # was written into: a tensor copy of it would be 128 MiB more at 512^3)
        x = tiled.decode(self.common.layers[-2:-1], x, depth)
        return tiled.decode(self.common.layers[-1:] + self.high_res_head.layers, x, depth, out)

    def preview(self, z, labels=None):
        """X^L = G^L(G^A(z)), the fast low-resolution volume."""
        return self.low_res_head(self.features(z, labels))


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class HighResDiscriminator(_Network):
    """D^H: a high-res slab and its normalised position r/(7S/8) -> logit (+ class logits)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, name=kwargs.pop("name", "high_res"), **kwargs)
        cfg = self.config
        ch = cfg.channels
        convs = [SNConvLeaky(ch(c), 4, 2, name=f"conv_s{i}")
                 for i, c in enumerate(_stride2_channels(_log2(cfg.size // 32), 64))]
        convs += [
            SNConvLeaky(ch(128), (2, 4, 4), 2, name="conv_a"),
            SNConvLeaky(ch(256), (2, 4, 4), 2, name="conv_b"),
            SNConvLeaky(ch(512), (1, 4, 4), (1, 2, 2), name="conv_c"),
        ] + _minibatch_std(cfg) + [
            SNConvLeaky(ch(128), (1, 4, 4), 1, padding="valid", name="conv_d"),
        ]
        self.convs = keras.Sequential(
            [keras.Input((cfg.slab_depth, cfg.size, cfg.size, 1))] + _window(cfg) + convs
            + [layers.Flatten()],
            name="convs")
        self.fc1 = SNDense(ch(64), name="fc1")
        self.fc1.build((None, ch(128) + 1))
        self.fc2 = SNDense(1, name="fc2")
        self.fc2.build((None, ch(64)))
        self.fc_class = None
        if cfg.num_classes:
            self.fc_class = SNDense(cfg.num_classes, name="fc_class")
            self.fc_class.build((None, ch(64)))
        self.built = True

    def call(self, slab, position, training=False):
        h = self.convs(slab, training=training)
        pos = ops.reshape(ops.cast(position, h.dtype), (-1, 1)) * ops.ones_like(h[:, :1])
        h = leaky_relu(self.fc1(ops.concatenate([h, pos], -1), training=training), 0.2)
        logit = self.fc2(h, training=training)
        if self.fc_class is None:
            return logit
        return logit, self.fc_class(h, training=training)


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class LowResDiscriminator(_Network):
    """D^L: the whole low-res volume X^L -> logit (+ class logits)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, name=kwargs.pop("name", "low_res"), **kwargs)
        cfg = self.config
        ch = cfg.channels
        convs = [SNConvLeaky(ch(c), 4, 2, name=f"conv{i}")
                 for i, c in enumerate(_stride2_channels(_log2(cfg.size // 16), 256))]
        convs += _minibatch_std(cfg)
        convs.append(SNConvLeaky(1 + cfg.num_classes, 4, 1, padding="valid", activate=False,
                                 name="conv_out"))
        self.convs = keras.Sequential(
            [keras.Input((cfg.a_size, cfg.a_size, cfg.a_size, 1))] + _window(cfg) + convs
            + [layers.Flatten()],
            name="convs")
        self.built = True

    def call(self, x, training=False):
        h = self.convs(x, training=training)
        if self.config.num_classes == 0:
            return h
        return h[:, :1], h[:, 1:]


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class Discriminator(_Network):
    """D = mean of D^H(slab, r) and D^L(X^L) logits (and of their class heads)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, name=kwargs.pop("name", "discriminator"), **kwargs)
        self.high_res = HighResDiscriminator(self.config)
        self.low_res = LowResDiscriminator(self.config)
        self.built = True

    def call(self, slab, low_res, crop, training=False):
        position = ops.cast(crop, at_least_float32(self.compute_dtype)) / float(self.config.max_crop)
        h = self.high_res(slab, position, training=training)
        l = self.low_res(low_res, training=training)
        if self.config.num_classes == 0:
            return (h + l) / 2.0
        return (h[0] + l[0]) / 2.0, (h[1] + l[1]) / 2.0


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class Encoder(_Network):
    """E = (E^H, E^G): volume [B, S, S, S, 1] -> z-hat [B, latent]."""

    def __init__(self, config, **kwargs):
        super().__init__(config, name=kwargs.pop("name", "encoder"), **kwargs)
        cfg = self.config
        ch = cfg.channels
        a_ch = ch(COMMON_CHANNELS[-1])
        self.high_res = keras.Sequential(
            [keras.Input((None, cfg.size, cfg.size, 1)),
             ConvBlock(ch(32), 4, 2, name="block1"), ConvBlock(ch(32), 3, 1, name="block2"),
             ConvBlock(a_ch, 4, 2, name="block3")],
            name="high_res")
        blocks = [ConvBlock(ch(c), 4, 2, name=f"block{i + 1}")
                  for i, c in enumerate(_stride2_channels(_log2(cfg.size // 16), 256))]
        self.ground = keras.Sequential(
            [keras.Input((cfg.a_size, cfg.a_size, cfg.a_size, a_ch))] + blocks
            + [ConvBlock(cfg.latent_dim, 4, 1, padding="valid", post="none", name="out"),
               layers.Reshape((cfg.latent_dim,))],
            name="ground")
        self.built = True

    @property
    def latent_head(self):
        """E^G: E^H's 8 slab features joined along D (an A) -> z-hat. Stored as `ground` (the
        paper's "ground encoder"), the name that checkpoints and the Keras layer carry."""
        return self.ground

    def slabs(self, volume):
        """[B, S, S, S, 1] -> its 8 slabs as a batch [B*8, S/8, S, S, 1], in D order."""
        s, d = self.config.size, self.config.slab_depth
        return ops.reshape(volume, (-1, d, s, s, 1))

    def features(self, volume, training=False):
        """E^H on every slab, concatenated back along D: an A-like [B, S/4, S/4, S/4, 64].

        The slabs go through E^H two positions at a time, one group after the other: all 8 at
        once held ~1.1 GB of E^H activations at 256^3, the E^G update's peak. Beyond 256^3 one
        position at a time: two 512^3 slabs hold 0.5 GiB in E^H's first layer alone.
        """
        a, d = self.config.a_size, self.config.slab_depth
        group = 2 if self.config.size <= 256 else 1
        parts = []
        for start in range(0, 8 * d, group * d):
            with tf.control_dependencies(parts[-1:]):
                f = self.high_res(self.slabs(volume[:, start:start + group * d]), training=training)
            parts.append(ops.reshape(f, (-1, group * d // 4, a, a, f.shape[-1])))  # D/4 per slab
        return ops.concatenate(parts, axis=1)

    def call(self, volume, training=False):
        return self.latent_head(self.features(volume, training=training), training=training)
