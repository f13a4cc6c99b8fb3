"""HAGAN: the whole model as one keras.Model (generator, discriminator, encoder)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from . import diffaugment
from ._compat import flatten_layers, private_override
from .config import HAGANConfig
from .dtypes import at_least_float32, upcast
from .layers import SERIAL_PACKAGE
from .lean_ops import depth_slab
from .models import ConfigAlias, Discriminator, Encoder, Generator, checked_labels
from .optimizers import Adam, LossScaleOptimizer


# ----------------------------------------------------------------------------------------
# Training: one iteration = the four updates of the paper, in order (docs/architecture.md).
# ----------------------------------------------------------------------------------------

DRAWS = ("crop", "z_d", "z_g")  # an iteration's random draws a batch may carry (train_step)


def _replica():
    ctx = tf.distribute.get_replica_context()
    return (ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync) if ctx else (0, 1)


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


class _Training:
    """Mixin holding HAGAN's compile() and train_step()."""

    def compile(self, g_optimizer=None, d_optimizer=None, eh_optimizer=None, eg_optimizer=None,
                jit_compile=None, **kwargs):
        """Takes the four optimizers (G, D, E^H, E^G); defaults are the paper's Adam settings.

        Call inside the distribution strategy's scope: the optimizers' variables are created
        here, eagerly, next to the model's (lazily created ones end up outside the scope).
        """
        cfg = self.config

        def adam(lr):
            return Adam(lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2)

        opts = [g_optimizer or adam(cfg.lr_g), d_optimizer or adam(cfg.lr_d),
                eh_optimizer or adam(cfg.lr_eh), eg_optimizer or adam(cfg.lr_eg)]
        if cfg.mixed_precision == "mixed_float16":
            opts = [o if isinstance(o, LossScaleOptimizer)
                    else LossScaleOptimizer(o.inner_optimizer, o.initial_scale, o.dynamic_growth_steps)
                    if isinstance(o, keras.optimizers.LossScaleOptimizer)  # Keras's: see ours
                    else LossScaleOptimizer(o) for o in opts]
        self.g_optimizer, self.d_optimizer, self.eh_optimizer, self.eg_optimizer = opts
        if jit_compile is None:
            jit_compile = cfg.jit_compile
        # fit() and its callbacks read `model.optimizer`: let it be D's, which steps once per
        # iteration (the four optimizers are all checkpointed by the trainer).
        super().compile(optimizer=self.d_optimizer, jit_compile=jit_compile, **kwargs)
        for opt, variables in zip(opts, self._update_variables()):
            opt.build(variables)

    @private_override(keras.Model)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing for Keras to build here: the networks are built in __init__, the optimizers
        in compile(). Under a strategy Keras would take fit()'s first batch for this (it was
        never trained on) and reduce it across replicas, which MultiWorkerMirroredStrategy
        cannot do for a dict ("Attempt to convert a value ({'volume': PerReplica...")."""
        if self.optimizer is not None and self.optimizer.built and all(
                layer.built for layer in flatten_layers(self)):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _update_variables(self):
        """Trainable variables of each update: G, D, E^H, E^G."""
        e = self.encoder
        return (self.generator.trainable_variables, self.discriminator.trainable_variables,
                e.high_res.trainable_variables, e.latent_head.trainable_variables)

    @property
    def step(self):
        """Iterations done: the D optimizer steps exactly once per iteration."""
        return self.d_optimizer.iterations

    def draw_crop(self, step):
        """r for this iteration: a multiple of 4 in 0..7S/8, so real and fake slabs align.

        Stateless in (seed, step): identical on every replica and after a resume. XLA's Philox
        kernels give another stream than TF's for the same seed, so a jit_compile run draws
        other (equally reproducible) r and z than a graph run.
        """
        hi = self.config.max_crop // 4 + 1
        seed = tf.stack([tf.cast(self.config.seed, tf.int64), tf.cast(step, tf.int64)])
        return 4 * tf.random.stateless_uniform([], seed, 0, hi, dtype=tf.int32, alg="philox")

    def draw_z(self, step, n, stream: int):
        """Latent draw, distinct per replica and per update, reproducible from (seed, step)."""
        rid, _ = _replica()
        a = tf.cast(self.config.seed * 1009 + stream * 101, tf.int64) + tf.cast(rid, tf.int64) + 1
        seed = tf.stack([a, tf.cast(step, tf.int64)])
        return tf.random.stateless_normal((n, self.config.latent_dim), seed, alg="philox")

    def real_low_res(self, volume):
        """Real X^L: the volume downsampled by 4 (nearest, the paper's default, or area mean)."""
        if self.config.downsample == "area":
            return tf.nn.avg_pool3d(volume, 4, 4, "VALID")
        return volume[:, ::4, ::4, ::4]

    def real_slab(self, volume, crop):
        return depth_slab(volume, crop, self.config.slab_depth)

    def _apply(self, opt, tape, scaled_loss, variables, out):
        """Apply the gradient of `scaled_loss`, which was scaled inside the tape (mixed_float16
        loss scaling; a no-op otherwise), and which the optimizer unscales.

        Returns the logged values `out` made to wait for the backward pass: train_step starts
        the next update after them, so the executor cannot run the next forward pass alongside
        this backward pass and hold both sets of activations at once.
        """
        grads = tape.gradient(scaled_loss, variables)
        opt.apply_gradients(list(zip(grads, variables)))
        with tf.control_dependencies(grads):
            return {k: tf.identity(v) for k, v in out.items()}

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
        generator that ignores z cannot (a mode-regularised GAN, Che et al. 2017)."""
        cfg = self.config
        z_hat = None
        if real is not None and cfg.lambda_recon:
            z_hat = tf.stop_gradient(self.encoder(real[0]))
        with tf.GradientTape() as tape:
            fake_slab, fake_low = self.generator(z, labels=labels, crop=crop, training=True)
            fake_slab, fake_low = self._augmented(fake_slab, fake_low, aug_seed, 2)
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

    def make_train_function(self, force=False):
        """One tf.function for the whole iteration, where Keras nests the step's function in
        the iterator's: the nested pair held ~65 MB more and ran ~10% slower at 128^3.

        XLA (which must not compile the iterator), several steps per execution and eager runs
        keep Keras's own functions.
        """
        if self.train_function is not None and not force:
            return self.train_function
        if self.run_eagerly or self.jit_compile or self.steps_per_execution > 1:
            return super().make_train_function(force)
        strategy = self.distribute_strategy

        def step(data):  # the replicas' mean of each logged value, as Keras's "auto" reduction
            logs = strategy.run(self.train_step, args=(data,))
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), logs)

        step_on_iterator = tf.function(lambda it: step(it.get_next()), reduce_retracing=True)
        step_on_data = tf.function(step, reduce_retracing=True)

        def function(iterator):
            if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                return step_on_iterator(iterator)  # Keras's epoch iterator stops on OutOfRange
            for data in iterator:  # train_on_batch: one batch
                return step_on_data(data)

        self.train_function = function
        return function

    def train_step(self, data):
        """One iteration on a batch: a volume tensor, or a dict with "volume" (and "label").

        The dict may also carry the iteration's random draws, which are otherwise drawn from
        (config.seed, step): "crop" ([B] int, all equal: r), "z_d" and "z_g" ([B, latent]: the
        z of the D and of the G update; the E^G update draws none). Any reference, or an
        experiment, can then be replayed exactly: `gan.train_on_batch({"volume": x, "crop":
        [8, 8], "z_d": z1, "z_g": z2})`. An r that is not a multiple of 4 reproduces the
        reference's misalignment (real slab at r, fake slab at 4 * (r // 4)).
        """
        data = keras.utils.unpack_x_y_sample_weight(data)[0]  # train_on_batch packs (x, y, w)
        volume = data["volume"] if isinstance(data, dict) else data
        labels = data.get("label") if isinstance(data, dict) and self.config.num_classes else None
        draws = {k: data[k] for k in DRAWS if isinstance(data, dict) and k in data}
        # Nothing of the iteration may run before its batch exists: the G update reads no data,
        # and in one flat function it would otherwise run even when get_next() ends the epoch.
        with tf.control_dependencies([volume] + ([labels] if labels is not None else [])):
            return self._iteration(tf.cast(volume, self.compute_dtype), labels, draws)

    def _iteration(self, volume, labels, draws=None):
        draws = draws or {}
        step = self.step
        rid, replicas = _replica()
        local_b = tf.shape(volume)[0]
        precision = at_least_float32(self.compute_dtype)  # the losses' type (see dtypes)
        global_b = tf.cast(local_b * replicas, precision)
        crop = (tf.cast(tf.reshape(draws["crop"], [-1])[0], tf.int32) if "crop" in draws
                else self.draw_crop(step))
        z_d, z_g = (tf.cast(draws[k] if k in draws else self.draw_z(step, local_b, i), precision)
                    for i, k in enumerate(("z_d", "z_g")))
        real_slab = self.real_slab(volume, crop)
        real_low = self.real_low_res(volume)
        aug_seed = tf.stack([tf.cast(self.config.seed, tf.int32) * 7919 + tf.cast(rid, tf.int32),
                             tf.cast(step, tf.int32) * 64])  # DiffAugment's (config.augment)
        updates = (lambda: self.d_update(real_slab, real_low, labels, crop, z_d, global_b, aug_seed),
                   lambda: self.g_update(labels, crop, z_g, global_b, aug_seed,
                                         (volume, real_slab, real_low)),
                   lambda: self.eh_update(real_slab, global_b),
                   lambda: self.eg_update(volume, real_slab, real_low, labels, crop, global_b))
        logs = {}
        for update in updates:  # one after the other (see _apply)
            with tf.control_dependencies(list(logs.values())):
                logs.update(update())
        # Losses are this replica's share of the global-batch mean (so gradients add up across
        # replicas); report the replica's own mean instead, which fit() averages over replicas.
        scale = tf.cast(replicas, precision)
        return {k: v if k.endswith("accuracy") else v * scale for k, v in logs.items()}


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

    def generate(self, z, labels=None, tile_depth: int | None = None):
        """Full-resolution volumes [B, S, S, S, 1] for latent codes z [B, latent] (and class
        labels [B]): a NumPy array eagerly, decoded `tile_depth` slices at a time (default the
        config's) so that memory stays bounded (see Generator.volume); a tensor when traced."""
        if tf.executing_eagerly():  # a traced caller's labels are symbolic: nothing to look at
            labels = checked_labels(labels, self.config.num_classes, len(z))
        return self.generator.volume(z, labels=labels, tile_depth=tile_depth)

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
