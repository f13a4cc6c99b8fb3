"""HAGAN: the whole model as one keras.Model (generator, discriminator, encoder)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from . import diffaugment
from .config import HAGANConfig
from .dtypes import upcast
from .iteration import DRAWS, _Iteration  # noqa: F401 (DRAWS: importable from here, as before)
from .layers import SERIAL_PACKAGE
from .models import ConfigAlias, Discriminator, Encoder, Generator, checked_labels


# ----------------------------------------------------------------------------------------
# Training: the four updates of the paper and their losses; `iteration` runs them in order.
# ----------------------------------------------------------------------------------------

def _bce_sum(logits, target: float):
    logits = upcast(logits)
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.fill(tf.shape(logits), tf.constant(target, logits.dtype)), logits=logits))


def _ce_sum(logits, labels):
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=upcast(logits)))


def _l1_sum_per_example(a, b):
    """Sum over examples of the per-example mean |a - b| (F.l1_loss once divided by the batch)."""
    diff = tf.abs(upcast(a) - upcast(b))
    return tf.reduce_sum(tf.reduce_mean(tf.reshape(diff, (tf.shape(diff)[0], -1)), axis=1))


def _intensity_w1_sum(fake, real):
    """1-D Wasserstein distance between the voxel values of a fake and a real batch (the mean
    |difference| of both sorted), times the batch size: a sum over examples like the other
    losses. Pooled over the batch, so it fixes how much of each intensity the batch holds,
    not how much each sample does."""
    f, r = (tf.sort(tf.reshape(upcast(x), [-1])) for x in (fake, real))
    return tf.reduce_mean(tf.abs(f - r)) * tf.cast(tf.shape(fake)[0], f.dtype)


class _Training(_Iteration):
    """Mixin holding HAGAN's four updates (D, G, E^H, E^G); compile() and train_step() are
    `iteration._Iteration`'s."""

    # -- the four updates; each takes the batch pieces and returns its logged values --
    def d_update(self, real_slab, real_low, labels, crop, z, global_b, aug_seed=None):
        cfg = self.config
        fake_slab, fake_low = self.generator(z, labels=labels, crop=crop)
        real_slab, real_low = self._augmented(real_slab, real_low, aug_seed, 0)
        fake_slab, fake_low = self._augmented(fake_slab, fake_low, aug_seed, 1)
        with tf.GradientTape() as tape:
            if cfg.r1_gamma:
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch([real_slab, real_low])
                    d_real = self.discriminator(real_slab, real_low, crop, training=True)
                    logit = d_real[0] if cfg.num_classes else d_real
                    total = tf.reduce_sum(upcast(logit))
                grads = inner.gradient(total, [real_slab, real_low])
                r1 = tf.add_n([tf.reduce_sum(tf.square(upcast(g))) for g in grads])
            else:
                d_real = self.discriminator(real_slab, real_low, crop, training=True)
            d_fake = self.discriminator(fake_slab, fake_low, crop, training=True)
            out = {}
            if cfg.num_classes:
                (d_real, c_real), (d_fake, _) = d_real, d_fake
                out["d_class"] = _ce_sum(c_real, labels) / global_b
                out["d_accuracy"] = tf.reduce_mean(tf.cast(
                    tf.equal(tf.argmax(c_real, -1, output_type=tf.int32), tf.cast(labels, tf.int32)),
                    tf.float32))
            out["d_real"] = self._d_loss_sum(d_real, real=True) / global_b
            out["d_fake"] = self._d_loss_sum(d_fake, real=False) / global_b
            loss = out["d_real"] + out["d_fake"] + out.get("d_class", 0.0)
            if cfg.r1_gamma:
                out["d_r1"] = 0.5 * cfg.r1_gamma * r1 / global_b
                loss = loss + out["d_r1"]
            scaled = self.d_optimizer.scale_loss(loss)
        out["d_loss"] = loss
        return self._apply(self.d_optimizer, tape, scaled, self.discriminator.trainable_variables, out)

    def g_update(self, labels, crop, z, global_b, aug_seed=None, real=None):
        """`real` = (volume, real slab, real X^L) adds config.lambda_recon times the L1 of
        G(E(x)) against x, with E fixed: G must then reproduce every training scan, which a
        generator that ignores z cannot (a mode-regularised GAN, Che et al. 2017); and
        config.lambda_hist times the distance between the fake and real intensity
        distributions (the slab's at r, and X^L's), which D, blind to a level shift of dark
        tissue, does not see: without it small Gs put lungs at the level of air."""
        cfg = self.config
        z_hat = None
        if real is not None and cfg.lambda_recon:
            z_hat = tf.stop_gradient(self.encoder(real[0]))
        with tf.GradientTape() as tape:
            raw_slab, raw_low = self.generator(z, labels=labels, crop=crop, training=True)
            fake_slab, fake_low = self._augmented(raw_slab, raw_low, aug_seed, 2)
            d_fake = self.discriminator(fake_slab, fake_low, crop, training=True)
            out = {}
            if cfg.num_classes:
                d_fake, c_fake = d_fake
                out["g_class"] = _ce_sum(c_fake, labels) / global_b
            adversarial = (_bce_sum(d_fake, 1.0) if cfg.loss == "bce"
                           else -tf.reduce_sum(upcast(d_fake)))
            loss = adversarial / global_b + cfg.lambda_class * out.get("g_class", 0.0)
            if cfg.lambda_ms:
                out["g_ms"] = self._mode_seeking(z, fake_low)
                loss = loss + cfg.lambda_ms * out["g_ms"]
            if cfg.lambda_hist and real is not None:
                out["g_hist"] = (_intensity_w1_sum(raw_slab, real[1])
                                 + _intensity_w1_sum(raw_low, real[2])) / (2.0 * global_b)
                loss = loss + cfg.lambda_hist * out["g_hist"]
            if z_hat is not None:
                slab, low = self.generator(z_hat, labels=labels, crop=crop, training=True)
                out["g_recon"] = (_l1_sum_per_example(slab, real[1])
                                  + _l1_sum_per_example(low, real[2])) / (2.0 * global_b)
                loss = loss + cfg.lambda_recon * out["g_recon"]
            scaled = self.g_optimizer.scale_loss(loss)
        out["g_loss"] = loss
        out = self._apply(self.g_optimizer, tape, scaled, self.generator.trainable_variables, out)
        if self.ema is None:
            return out
        with tf.control_dependencies(list(out.values())):
            return self._update_ema(out)

    @staticmethod
    def _mode_seeking(z, low):
        """Mode-seeking term (MSGAN, Mao et al. 2019): 1 / (|X^L_i - X^L_j| / |z_i - z_j|) over
        neighbouring pairs of the batch, so a G whose output ignores z pays for it. On X^L,
        the whole volume at S/4, where the anatomy's variation is, not the slab's texture."""
        low = upcast(low)
        n = tf.shape(low)[0]
        d_out = tf.reduce_mean(tf.abs(low - tf.roll(low, 1, 0)), axis=[1, 2, 3, 4])
        d_z = tf.reduce_mean(tf.abs(z - tf.roll(z, 1, 0)), axis=1)
        term = tf.reduce_mean(1.0 / (d_out / (d_z + 1e-8) + 1e-5))
        return tf.where(n > 1, term, 0.0)  # one sample per replica has no pair

    def _d_loss_sum(self, logits, real: bool):
        """D's loss on a batch of logits, summed: BCE (the paper) or hinge."""
        if self.config.loss == "bce":
            return _bce_sum(logits, 1.0 if real else 0.0)
        logits = upcast(logits)
        return tf.reduce_sum(tf.nn.relu(1.0 - logits if real else 1.0 + logits))

    def _augmented(self, slab, low, seed, call: int):
        """DiffAugment of one D input pair (config.augment); a fresh draw for each call."""
        if not self.augment_ops or seed is None:
            return slab, low
        seed = seed + tf.constant([0, 10 * call], seed.dtype)
        return (diffaugment.augment(slab, self.augment_ops, seed),
                diffaugment.augment(low, self.augment_ops, seed + tf.constant([0, 5], seed.dtype)))

    def _update_ema(self, out):
        """ema <- d * ema + (1 - d) * G, with d = min(ema_decay, (1 + t) / (10 + t)) so the
        average forgets the random initialisation early on (t: G's update count). Returns `out`
        made to wait for it."""
        t = tf.cast(self.g_optimizer.iterations, tf.float32)
        decay = tf.minimum(self.config.ema_decay, (1.0 + t) / (10.0 + t))

        def update(strategy):
            ops = []
            for e, g in zip(self.ema.weights, self.generator.weights):
                ops += strategy.extended.update(
                    e.value, lambda e_, g_: e_.assign(tf.cast(decay, e_.dtype) * e_
                                                      + tf.cast(1.0 - decay, e_.dtype) * g_),
                    args=(g.value,), group=False)
            return ops

        ctx = tf.distribute.get_replica_context()
        ops = ctx.merge_call(update) if ctx is not None else update(tf.distribute.get_strategy())
        with tf.control_dependencies(tf.nest.flatten(ops)):
            return {k: tf.identity(v) for k, v in out.items()}

    def eh_update(self, real_slab, global_b):
        variables = self.encoder.high_res.trainable_variables
        with tf.GradientTape() as tape:
            recon = self.generator.decode(self.encoder.high_res(real_slab, training=True))
            loss = _l1_sum_per_example(recon, real_slab) / global_b
            scaled = self.eh_optimizer.scale_loss(loss)
        return self._apply(self.eh_optimizer, tape, scaled, variables, {"eh_loss": loss})

    def eg_update(self, volume, real_slab, real_low, labels, crop, global_b):
        variables = self.encoder.latent_head.trainable_variables
        features = tf.stop_gradient(self.encoder.features(volume))  # E^H frozen
        with tf.GradientTape() as tape:
            z_hat = self.encoder.latent_head(features, training=True)
            slab, low = self.generator(z_hat, labels=labels, crop=crop)
            loss = (_l1_sum_per_example(slab, real_slab)
                    + _l1_sum_per_example(low, real_low)) / (2.0 * global_b)
            scaled = self.eg_optimizer.scale_loss(loss)
        return self._apply(self.eg_optimizer, tape, scaled, variables, {"eg_loss": loss})

@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class HAGAN(ConfigAlias, _Training, keras.Model):
    """HA-GAN. `generate(z)` -> [B, S, S, S, 1] in [-1, 1]; `encode(volume)` -> [B, latent]."""

    def __init__(self, config: HAGANConfig | dict | None = None, **kwargs):
        super().__init__(name=kwargs.pop("name", "hagan"), **kwargs)
        if config is None:
            config = HAGANConfig()
        self.config = config if isinstance(config, HAGANConfig) else HAGANConfig.from_dict(config)
        self.generator = Generator(self.config)
        self.discriminator = Discriminator(self.config)
        self.encoder = Encoder(self.config)
        self.augment_ops = diffaugment.parse_ops(self.config.augment)
        self.ema = None  # G's moving average (config.ema_decay), which load_hagan samples with
        if self.config.ema_decay:
            self.ema = Generator(self.config, name="ema_generator")
            self.ema.trainable = False
            self.ema.set_weights(self.generator.get_weights())
        self.built = True

    def use_ema(self) -> bool:
        """Put the moving average's weights into the generator, for sampling, evaluation and
        export (load_hagan does this); False when the model keeps none."""
        if self.ema is None:
            return False
        self.generator.set_weights(self.ema.get_weights())
        return True

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    def build(self, input_shape=None):
        self.built = True

    def call(self, z, labels=None, training=False):
        return self.generator(z, labels=labels, training=training)

    def generate(self, z, labels=None, tile_depth: int | None = None, out=None):
        """Full-resolution volumes [B, S, S, S, 1] for latent codes z [B, latent] (and class
        labels [B]): a NumPy array eagerly, decoded `tile_depth` slices at a time (default the
        config's) so that memory stays bounded (see Generator.volume); a tensor when traced.
        Eagerly, `out` (e.g. hagan_tf.io.NiftiVolumes) takes each slab as it is decoded,
        `out[:, c:e] = rows`, and is returned: the volumes then go to files, never whole in
        memory (512 MiB each at 512^3)."""
        if tf.executing_eagerly():  # a traced caller's labels are symbolic: nothing to look at
            labels = checked_labels(labels, self.config.num_classes, len(z))
        return self.generator.volume(z, labels=labels, tile_depth=tile_depth, out=out)

    def encode(self, volume):
        """Latent codes [B, latent] of preprocessed volumes [B, S, S, S, 1] in [-1, 1]."""
        return self.encoder(volume)

    def sample_z(self, n: int, seed: int | None = None):
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, self.config.latent_dim)).astype("float32")

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per network, named as in docs/architecture.md."""
        def count(m):
            return int(sum(np.prod(w.shape) for w in m.trainable_weights))

        g, d, e = self.generator, self.discriminator, self.encoder
        out = {
            "G^A": count(g.common), "G^L": count(g.low_res_head), "G^H": count(g.high_res_head),
            "D^H": count(d.high_res), "D^L": count(d.low_res),
            "E^H": count(e.high_res), "E^G": count(e.latent_head),
        }
        out["G"] = out["G^A"] + out["G^L"] + out["G^H"]
        out["D"] = out["D^H"] + out["D^L"]
        out["all"] = out["G"] + out["D"] + out["E^H"] + out["E^G"]
        return out
