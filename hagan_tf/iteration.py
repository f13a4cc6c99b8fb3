"""One training iteration as Keras runs it: HAGAN's compile(), train_step() and train function.

`_Iteration` is the mixin under `gan._Training`: it takes the four optimizers, draws the
iteration's r and z (or takes them from the batch, `DRAWS`), cuts the real slab and X^L, and
runs the four updates (`d_update`, `g_update`, `eh_update`, `eg_update`, in `gan`) one after
the other, each applied by `_apply` (docs/architecture.md, "One training iteration").
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ._compat import flatten_layers, private_override
from .dtypes import at_least_float32
from .lean_ops import depth_slab
from .optimizers import Adam, LossScaleOptimizer

DRAWS = ("crop", "z_d", "z_g")  # an iteration's random draws a batch may carry (train_step)


def _replica():
    ctx = tf.distribute.get_replica_context()
    return (ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync) if ctx else (0, 1)


class _Iteration:
    """Mixin holding HAGAN's compile() and train_step(); the updates are `gan._Training`'s."""

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
        """Iterations done: the D optimizer steps exactly config.d_steps times per iteration
        (a loss-scaled step it skips still counts, optimizers.LossScaleOptimizer)."""
        if self.config.d_steps == 1:
            return self.d_optimizer.iterations
        return self.d_optimizer.iterations // self.config.d_steps

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

    def _d_on_batch(self, volume, labels, crop, z, global_b, aug_seed):
        """A D update of its own batch (config.d_steps > 1), as the next update's thunk."""
        return lambda: self.d_update(self.real_slab(volume, crop), self.real_low_res(volume),
                                     labels, crop, z, global_b, aug_seed)

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
        reference's misalignment (real slab at r, fake slab at 4 * (r // 4)). With
        config.d_steps = k the batch holds k batches (and "z_d" k times the rows), one per D
        update; "z_g" has the rows of one.
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
        aug_seed = tf.stack([tf.cast(self.config.seed, tf.int32) * 7919 + tf.cast(rid, tf.int32),
                             tf.cast(step, tf.int32) * 64])  # DiffAugment's (config.augment)
        k = self.config.d_steps
        if k > 1:  # the batch holds k batches: one for each D update, the last also for G and E
            split = lambda x: tf.split(x, k) if x is not None else [None] * k  # noqa: E731
            volumes, label_sets, z_ds = split(volume), split(labels), split(z_d)
            local_b, global_b = local_b // k, global_b / k
            d_updates = [self._d_on_batch(volumes[j], label_sets[j], crop, z_ds[j], global_b,
                                          aug_seed + tf.constant([104729 * j, 0], tf.int32))
                         for j in range(k - 1)]
            volume, labels, z_d = volumes[-1], label_sets[-1], z_ds[-1]
            z_g = z_g[:local_b] if "z_g" not in draws else z_g
        else:
            d_updates = []
        real_slab = self.real_slab(volume, crop)
        real_low = self.real_low_res(volume)
        updates = d_updates + [
                   lambda: self.d_update(real_slab, real_low, labels, crop, z_d, global_b, aug_seed),
                   lambda: self.g_update(labels, crop, z_g, global_b, aug_seed,
                                         (volume, real_slab, real_low)),
                   lambda: self.eh_update(real_slab, global_b),
                   lambda: self.eg_update(volume, real_slab, real_low, labels, crop, global_b)]
        logs = {}
        for update in updates:  # one after the other (see _apply)
            with tf.control_dependencies(list(logs.values())):
                logs.update(update())
        # Losses are this replica's share of the global-batch mean (so gradients add up across
        # replicas); report the replica's own mean instead, which fit() averages over replicas.
        scale = tf.cast(replicas, precision)
        return {k: v if k.endswith("accuracy") else v * scale for k, v in logs.items()}
