"""Callbacks for `HAGAN.fit`: checkpoints, TensorBoard summaries, progress, NaN guard."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .._compat import xplane_pb2


class NonFiniteLoss(RuntimeError):
    pass


class Checkpointer(keras.callbacks.Callback):
    """Every `every` steps (and at the end) saves model, the four optimizers and the step.

    The RNG state is the step itself: crops and latents are stateless functions of
    (config.seed, step), and the input order is resumed from the step too.
    """

    def __init__(self, manager: tf.train.CheckpointManager, step_var: tf.Variable, every: int,
                 guard: "Monitor | None" = None, scratch: str | None = None):
        super().__init__()
        self.manager, self.step_var, self.every, self.guard = manager, step_var, every, guard
        self.scratch = scratch  # a non-chief worker's directory: it saves (all workers must) there
        self.last_saved = None

    def save(self):
        step = int(self.model.step.numpy())
        if self.last_saved == step or (self.guard is not None and self.guard.error):
            return
        if not bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.weights])):
            # The losses were finite, but they are computed before the step's last update (E^G)
            self.model.stop_training = True
            if self.guard is not None:
                self.guard.error = (f"weights became non-finite at step {step}; "
                                    f"{self.guard.REMEDY}")
            return
        self.step_var.assign(step)
        self.manager.save(checkpoint_number=step)
        self.last_saved = step
        self.remove_scratch()

    def remove_scratch(self):
        if self.scratch and tf.io.gfile.exists(self.scratch):
            tf.io.gfile.rmtree(self.scratch)

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step.numpy()) % self.every == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


class Monitor(keras.callbacks.Callback):
    """Progress bar (it/s, ETA), TensorBoard scalars and images, and the NaN/Inf stop.

    Without a log_dir (a non-chief worker) it only watches for NaN/Inf: the logged values are
    the replicas' mean, so every worker stops at the same step.
    """

    REMEDY = ("training stopped, the last good checkpoint is kept. The same command would "
              "repeat the same steps from it (r, z and the input order follow the seed and the "
              "step): resume with e.g. --set lr_d=0.0001 or --set seed=1 (lr_*, beta_2, "
              "lambda_class and seed may change on resume)")

    def __init__(self, log_dir: str | None, total_steps: int, log_every: int, image_every: int,
                 sample_batch=None, progress: bool = True):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
        self.total, self.log_every, self.image_every = total_steps, log_every, image_every
        self.sample_batch, self.progress = sample_batch, progress
        self.error: str | None = None
        self.bar = None

    def on_train_begin(self, logs=None):
        start = int(self.model.step.numpy())
        self.bar = tqdm(total=self.total, initial=start, unit="it", disable=not self.progress,
                        dynamic_ncols=True, desc="train")
        self.step_times = []  # since the last log: their mean is logged, not one noisy sample

    def on_train_batch_begin(self, batch, logs=None):
        self.t_begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = int(self.model.step.numpy())
        values = {k: float(np.asarray(v)) for k, v in logs.items()}  # waits for the step
        self.step_times.append(time.perf_counter() - self.t_begin)  # not images or checkpoints
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self.error = f"loss {bad[0]} became {values[bad[0]]} at step {step}; {self.REMEDY}"
            self.model.stop_training = True
            if self.writer is not None:  # the curves end on the step that failed, not before it
                self.write_scalars(step, values)
            return
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k.endswith("loss")})
        if self.writer is None:
            return
        if step % self.log_every == 0 or step == 1:
            self.write_scalars(step, values, float(np.mean(self.step_times)))
            self.step_times = []
        if self.sample_batch is not None and (step % self.image_every == 0 or step == 1):
            self.write_images(step)

    def write_scalars(self, step, values, step_time=None):
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(f"loss/{k}" if "loss" in k else f"metric/{k}", v)
            if step_time is None:
                return
            for name in ("g", "d", "eh", "eg"):
                opt = getattr(self.model, f"{name}_optimizer")
                tf.summary.scalar(f"learning_rate/{name}", float(np.asarray(keras.ops.convert_to_numpy(opt.learning_rate))))
            tf.summary.scalar("time/step_seconds", step_time)

    def write_images(self, step):
        """Mid axial/coronal/sagittal slices of real, fake slab, fake volume, reconstruction."""
        from ..io import mid_slices

        gan, cfg = self.model, self.model.config
        real = self.sample_batch["volume"][:1]
        labels = self.sample_batch.get("label")
        labels = labels[:1] if labels is not None and cfg.num_classes else None
        z = tf.random.stateless_normal((1, cfg.latent_dim), [cfg.seed, 7])
        images = {"real": real}
        slab, _ = gan.generator(z, labels=labels, crop=tf.constant(cfg.max_crop // 2 // 4 * 4))
        images["fake_slab"] = slab
        if cfg.size <= 128:
            images["fake_volume"] = gan.generator(z, labels=labels)
            images["reconstruction"] = gan.generator(gan.encoder(real), labels=labels)
        else:  # a whole volume costs a full generate; E^H's slab reconstruction costs a slab
            crop = cfg.max_crop // 2 // 4 * 4
            images["real_slab"] = gan.real_slab(real, tf.constant(crop))
            images["reconstruction_slab"] = gan.generator.decode(
                gan.encoder.high_res(images["real_slab"]))
        with self.writer.as_default(step=step):
            for name, vol in images.items():
                sl = mid_slices(np.asarray(vol[0]))
                for view, img in zip(("axial", "coronal", "sagittal"), sl):
                    img = (np.clip(img[::-1], -1, 1) + 1) / 2  # anterior / superior up, as in montages
                    tf.summary.image(f"{name}/{view}", img[None, :, :, None], step=step)

    def on_train_end(self, logs=None):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()


def _remedies(cfg) -> str:
    """The collapse remedies this run does not use yet, as --set options."""
    off = [(not cfg.minibatch_std, "minibatch_std=true"), (cfg.loss != "hinge", "loss=hinge"),
           (not cfg.ema_decay, "ema_decay=0.995"), (not cfg.augment, "augment=translation,cutout"),
           (not cfg.r1_gamma, "r1_gamma=1"), (not cfg.lambda_recon, "lambda_recon=1"),
           (cfg.batch_size < 8, "batch_size=8")]
    names = [f"--set {o}" for cond, o in off if cond]
    return ("Remedies: " + ", ".join(names) + " (README, 'Training that learns')" if names else
            "See README, 'Training that learns'")


class CollapseDetector(keras.callbacks.Callback):
    """Mode-collapse check: every `every` steps, the diversity (mean pairwise L1) of X^L for a
    fixed set of latents, against that of the real volumes' X^L, to TensorBoard as
    diversity/samples, diversity/real and diversity/ratio. Warns once, with the step, when
    the ratio stays below `threshold` for `patience` checks in a row (early in training one
    check below it is common and passes).

    X^L (G^L on G^A's features, S/4 per side) is what z shapes: G^H only decodes A locally,
    so a G whose A ignores z has a collapsed X^L, and it costs a fraction of a full volume
    at any S. The moving average of G (config.ema_decay) is checked when there is one: it is
    what sampling and export use.
    """

    def __init__(self, real_low_res, every: int, threshold: float, writer=None, n: int = 8,
                 seed: int = 0, labels=None, patience: int = 2):
        super().__init__()
        from ..arrays import mean_pairwise_l1

        self.diversity = mean_pairwise_l1
        self.real = float(mean_pairwise_l1(np.asarray(real_low_res)))
        self.every, self.threshold, self.writer = every, threshold, writer
        self.n, self.seed, self.labels = n, seed, labels
        self.patience, self.below = patience, 0  # checks in a row below the threshold
        self.warned_at: int | None = None
        self.last: dict | None = None

    def check(self, step: int) -> dict:
        """Measure now; returns {'samples', 'real', 'ratio'} and warns on the first collapse."""
        gan = self.model
        cfg = gan.config
        z = tf.random.stateless_normal((self.n, cfg.latent_dim), [self.seed, 11])
        labels = None
        if cfg.num_classes:
            labels = self.labels if self.labels is not None else np.arange(self.n) % cfg.num_classes
        generator = gan.ema if getattr(gan, "ema", None) is not None else gan.generator
        samples = np.asarray(generator.preview(z, labels), np.float32)
        d = self.diversity(samples)
        self.last = {"samples": d, "real": self.real, "ratio": d / max(self.real, 1e-12)}
        if self.writer is not None:
            with self.writer.as_default(step=step):
                for k, v in self.last.items():
                    tf.summary.scalar(f"diversity/{k}", v)
        self.below = self.below + 1 if self.last["ratio"] < self.threshold else 0
        if self.below >= self.patience and self.warned_at is None:
            self.warned_at = step
            print(f"hagan-train: warning: step {step}: the samples are collapsing: their "
                  f"diversity (mean pairwise L1 of X^L) is {d:.4f}, {self.last['ratio']:.2f}x "
                  f"the real volumes' {self.real:.4f} (below {self.threshold} at "
                  f"{self.patience} checks in a row). {_remedies(cfg)}", file=sys.stderr,
                  flush=True)
        return self.last

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.step.numpy())
        if self.every and step % self.every == 0:
            self.check(step)


class StopOnSignal(keras.callbacks.Callback):
    """Ctrl-C or SIGTERM (preemption, `scancel`, `docker stop`) ends fit() after the running
    step, so that the Checkpointer saves it on the way out instead of losing up to
    `checkpoint_every` steps; a second signal quits at once. Use as a context manager around fit().

    With several workers (pass the MultiWorkerMirroredStrategy) a worker that stopped alone
    would leave the others waiting in a collective, so after every step the workers add up
    what they received (one all-reduce of two numbers) and all stop after the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, strategy: tf.distribute.Strategy | None = None):
        super().__init__()
        self.received: signal.Signals | None = None  # by this process
        self.stopped_by: signal.Signals | None = None  # by any worker: why fit() stopped
        self.strategy, self._count = strategy, None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        if self.strategy is None and self.model is not None:
            self.model.stop_training = True
        who = " every worker" if self.strategy is not None else ""
        print(f"\n{self.received.name}: stopping{who} after this step and saving a checkpoint "
              "(send it again to quit without saving)", file=sys.stderr, flush=True)

    def _any_worker(self) -> signal.Signals | None:
        """The signal some worker received, SIGTERM before SIGINT; the same on every worker."""
        if self._count is None:
            strategy = self.strategy

            @tf.function
            def count(mine):
                return strategy.reduce("SUM", strategy.run(tf.identity, args=(mine,)), axis=None)

            self._count = count
        counts = self._count(tf.constant([float(self.received == s) for s in self.SIGNALS]))
        return next((s for s, n in reversed(list(zip(self.SIGNALS, counts.numpy()))) if n > 0), None)

    def on_train_batch_end(self, batch, logs=None):
        self.stopped_by = self._any_worker() if self.strategy is not None else self.received
        if self.stopped_by is not None:  # fit() clears stop_training when it starts
            self.model.stop_training = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


class Profiler(keras.callbacks.Callback):
    """Traces steps `first`..`last` with the TensorBoard profiler into `log_dir` (its Profile
    tab, with tensorboard-plugin-profile) and prints the op types (on a GPU: the kernels) that
    took the most time, which is where a slow step goes."""

    def __init__(self, log_dir: str, first: int, last: int, top: int = 15):
        super().__init__()
        if not 1 <= first <= last:
            raise ValueError(f"profile steps must be 1 <= FIRST <= LAST, got {first} {last}")
        self.log_dir, self.first, self.last, self.top = log_dir, first, last, top
        self.started, self.done, self.earlier = None, False, set()

    def _step(self) -> int:
        return int(self.model.step.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self.started is None and not self.done and self.first <= self._step() + 1 <= self.last:
            self.earlier = profile_traces(self.log_dir)  # a resumed run's earlier traces
            tf.profiler.experimental.start(self.log_dir)
            self.started = self._step() + 1

    def on_train_batch_end(self, batch, logs=None):
        if self.started is not None and self._step() >= self.last:
            self.stop()

    def on_train_end(self, logs=None):
        if self.started is not None:
            self.stop()
        elif not self.done:
            print(f"profile steps {self.first}-{self.last}: none of them ran (this run stopped "
                  f"at step {self._step()})", file=sys.stderr, flush=True)

    def stop(self):
        tf.profiler.experimental.stop()
        started, self.started, self.done = self.started, None, True
        rows = top_ops(profile_traces(self.log_dir) - self.earlier, self.top)
        width = max([len(name) for name, _, _ in rows] + [2])
        lines = [f"profiled steps {started}-{self._step()}: op types by time (trace in "
                 f"{self.log_dir}, TensorBoard's Profile tab)", f"{'op':<{width}}  {'ms':>10}  count"]
        lines += [f"{name:<{width}}  {ms:>10.1f}  {count}" for name, ms, count in rows]
        print("\n".join(lines), file=sys.stderr, flush=True)


def profile_traces(log_dir: str) -> set[str]:
    """The TensorBoard profiler's trace files under log_dir (local or any TF file system)."""
    return set(tf.io.gfile.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb")))


def top_ops(traces, n: int) -> list[tuple[str, float, int]]:
    """The n op types (GPU: kernels) that took the most time in TensorBoard-profiler traces
    (xplane.pb files): [(name, total ms, count)], summed over threads and streams."""
    spaces = []
    for path in traces:
        spaces.append(xplane_pb2().XSpace())
        with tf.io.gfile.GFile(path, "rb") as f:
            spaces[-1].ParseFromString(f.read())
    planes = [p for space in spaces for p in space.planes]
    gpus = [p for p in planes if p.name.startswith("/device:GPU")]
    totals = defaultdict(lambda: [0.0, 0])
    for plane in gpus or [p for p in planes if p.name == "/host:CPU"]:  # GPU kernels, else CPU ops
        names = {k: m.name for k, m in plane.event_metadata.items()}
        host = plane.name == "/host:CPU"
        for line in plane.lines:
            for ev in line.events:
                name = names.get(ev.metadata_id, "?")
                kind = name.split(":")[-1] if host else name[:60]  # GPU: kernel names
                # host ops are "name:Type"; skip the spans around them (ExecutorState::Process,
                # Iterator::..., "EagerLocalExecute: __inference_...")
                if host and (":" not in name or "::" in name or " " in kind):
                    continue
                totals[kind][0] += ev.duration_ps / 1e9
                totals[kind][1] += 1
    return sorted(((k, round(v[0], 1), v[1]) for k, v in totals.items()), key=lambda r: -r[1])[:n]
