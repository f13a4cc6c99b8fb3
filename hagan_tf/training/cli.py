"""`hagan-train`: train HA-GAN on TFRecords, resuming from the run directory if it has a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from . import import_tensorflow_lean, keep_channels_last_on_gpu, limit_heap_growth

limit_heap_growth()  # before TensorFlow starts its threads
import_tensorflow_lean()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .. import rundir  # noqa: E402
from .._compat import report_error_to_cluster  # noqa: E402
from ..config import HAGANConfig  # noqa: E402
from ..data.pipeline import check_records, count_examples, count_rows, make_dataset  # noqa: E402
from ..data.records import first_record, read_manifest, unreadable_shards  # noqa: E402
from .callbacks import (Checkpointer, CollapseDetector, Monitor, Profiler,  # noqa: E402
                        StopOnSignal)

# Settings that may change when a run is resumed; anything else must match the saved config.
RESUMABLE = {"tile_depth", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "image_every",
             "diversity_every", "collapse_threshold"}
# ... and the remedies for a run that diverged (a NaN stop), which change how it goes on.
TUNABLE = {"lr_g", "lr_d", "lr_eh", "lr_eg", "beta_2", "lambda_class", "seed", "r1_gamma", "augment",
           "lambda_recon", "lambda_ms", "lambda_hist"}


def make_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG names a cluster, else Mirrored over local GPUs (or CPU)."""
    if kind == "auto":
        kind = "multiworker" if os.environ.get("TF_CONFIG") else "mirrored"
    if kind == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"unknown strategy {kind!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The worker that writes the run directory: the chief, else worker 0 (TF's convention)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


class WorkerFailed(RuntimeError):
    """Another worker of a multi-worker run failed; this one cannot go on without it."""


def _kept_by_chief(run_dir: str) -> str:
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, rundir.CHECKPOINTS))
    return f"The last checkpoint is {latest}" if latest else "No step is checkpointed yet"


RELAYED = "hagan-train: "


def _peer_failure(strategy, step: int, run_dir: str, message: str) -> WorkerFailed:
    me = f"worker {strategy.cluster_resolver.task_id} stopped at step {step}"
    if RELAYED in message:  # the other worker's own words, relayed by _tell_the_other_workers
        return WorkerFailed(f"{me} because {message.split(RELAYED, 1)[1].splitlines()[0]}")
    reason = re.sub(r"\{\{function_node [^}]*\}\}|Collective ops is aborted by:", "", message)
    reason = reason.strip().splitlines()[0].strip().rstrip(":") if reason.strip() else "?"
    return WorkerFailed(f"{me}: another worker failed or was killed ({reason}). "
                        f"{_kept_by_chief(run_dir)}: see that worker's log, then re-run the same "
                        "command on every worker to resume")


def _tell_the_other_workers(strategy, error: Exception) -> None:
    """Reports this worker's reason to the cluster's coordination service, which aborts the
    other workers' collectives with it at once, instead of after its heartbeat timeout
    (about a minute) with only 'task 1 stopped sending heartbeats'."""
    task = strategy.cluster_resolver.task_id
    try:
        report_error_to_cluster(tf.errors.ABORTED, f"{RELAYED}worker {task} failed: {error}")
    except Exception:  # noqa: BLE001 - best effort: the heartbeat timeout still stops them
        pass


def load_config(path_or_preset: str) -> HAGANConfig:
    """A YAML path, or the name of a preset shipped in hagan_tf/configs (e.g. `tiny_32`)."""
    if tf.io.gfile.exists(path_or_preset):
        return HAGANConfig.from_yaml(path_or_preset)
    preset = os.path.join(os.path.dirname(__file__), "..", "configs", f"{path_or_preset}.yaml")
    if os.path.exists(preset):
        return HAGANConfig.from_yaml(preset)
    raise FileNotFoundError(f"no config file or preset named {path_or_preset!r}")


def check_resume(run_dir: str, config: HAGANConfig) -> None:
    """A run resumes with the settings it has, bar RESUMABLE and TUNABLE ones. A directory
    without a checkpoint (a run that failed before its first) takes any config."""
    if not tf.io.gfile.exists(rundir.config_path(run_dir)) or not tf.train.latest_checkpoint(
            os.path.join(run_dir, rundir.CHECKPOINTS)):
        return
    saved = rundir.read_config(run_dir).to_dict()
    changed = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
    diff = {k: d for k, d in changed.items() if k not in RESUMABLE | TUNABLE}
    if diff:
        lines = ", ".join(f"{k}: {a!r} in the run vs {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds a run with a different config ({lines}); "
                         "use another --out, or the same settings to resume")
    tuned = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in TUNABLE]
    if tuned:
        print(f"hagan-train: resuming with {', '.join(tuned)}", file=sys.stderr)


def describe_training_set(data_dir: str, config: HAGANConfig) -> str:
    """Counts the training volumes from the manifest (without one, counting would read every
    byte), refusing a fold selection that leaves none: the endless epochs would never yield."""
    rows = read_manifest(data_dir)
    if not rows:
        if config.fold is not None and count_examples(data_dir, exclude_folds=[config.fold]) == 0:
            raise ValueError(f"no records in {data_dir!r} are outside the held-out fold {config.fold}")
        return f"the records in {data_dir} (no manifest to count them)"
    volumes = count_rows(rows, exclude_folds=[config.fold] if config.fold is not None else None)
    if config.num_classes:  # one_hot makes a zero class of -1 (unlabelled) and of K or more
        bad = [r for r in rows if not 0 <= r.get("label", -1) < config.num_classes
               and (config.fold is None or r.get("fold", -1) != config.fold)]
        if bad:
            raise ValueError(
                f"num_classes is {config.num_classes} but {len(bad)} training record(s) in "
                f"{data_dir!r} have no label in 0..{config.num_classes - 1} (e.g. "
                f"{bad[0].get('subject_id')!r}: {bad[0].get('label', -1)}; -1 = unlabelled): "
                "re-run hagan-preprocess with --labels, or --set num_classes=0")
    if volumes == 0:
        raise ValueError(f"no records in {data_dir!r} are outside the held-out fold {config.fold}")
    if len({r.get("shard") for r in rows}) == 1 and len(rows) > config.shuffle_buffer:
        print(f"hagan-train: warning: all {len(rows)} records are in one shard, so each epoch is "
              f"shuffled only within blocks of {config.shuffle_buffer} consecutive records; "
              "write several shards (hagan-preprocess does) or raise shuffle_buffer",
              file=sys.stderr)
    if volumes == len(rows) and config.fold is not None:
        print(f"hagan-train: warning: no record is in fold {config.fold}, so none is held out "
              "(hagan-preprocess --folds K assigns folds 0..K-1)", file=sys.stderr)
    held = f", fold {config.fold} held out" if volumes < len(rows) else ""
    return f"{volumes} volumes of {config.size}^3 from {data_dir}{held}"


def training_input(strategy: tf.distribute.Strategy, data_dir: str, config: HAGANConfig,
                   start_step: int = 0):
    """The distributed input of fit(): global batch after global batch of {'volume', 'label'}.

    Each worker builds its own pipeline of per-replica batches, which its replicas take in
    turn; on one machine that is make_dataset's order, whatever the number of replicas. With
    several workers, worker i reads epochs i, i+k, ... (make_dataset's `shard`), and a resumed
    run reads on from where each worker was. (TF's automatic sharding split the endless stream
    by epoch without telling make_dataset, so a resumed run skipped the wrong records.)
    """
    dtype = first_record(data_dir)["dtype"].decode()  # train_step casts on the device
    excluded = [config.fold] if config.fold is not None else None

    def inputs(ctx: tf.distribute.InputContext):
        local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        ds = make_dataset(data_dir, ctx.get_per_replica_batch_size(config.batch_size)
                          * config.d_steps,  # one batch for each D update (train_step splits)
                          size=config.size, exclude_folds=excluded, shuffle=config.shuffle_buffer,
                          seed=config.seed, start_step=start_step * local_replicas, dtype=dtype,
                          shard=(ctx.input_pipeline_id, ctx.num_input_pipelines))
        return ds.map(lambda r: {"volume": r["volume"], "label": r["label"]})

    return strategy.distribute_datasets_from_function(inputs)


def _first_volumes(data_dir: str, size: int, n: int) -> list:
    """Up to n records for images and the collapse check, in file order. A record that fails
    its checksum ends the list: training meets it too, and names the shard then."""
    reals = []
    try:
        for r in make_dataset(data_dir, 1, size=size, repeat=False, shuffle=0).take(n):
            reals.append(r)
    except tf.errors.DataLossError:
        pass
    return reals


def train(config: HAGANConfig, data_dir: str, run_dir: str, strategy=None,
          progress: bool = True, verbose: bool = True, handle_signals: bool = False,
          profile_steps: tuple[int, int] | None = None) -> dict:
    """Train (or resume) until config.max_steps; `profile_steps=(first, last)` traces those
    steps with the TensorBoard profiler (on the chief) and prints where their time went.

    Returns {'step', 'checkpoint', 'error', 'model', 'chief', 'signal'}; 'chief' is whether
    this process wrote the run directory (false on the other workers of a multi-worker run),
    'signal' the SIGINT/SIGTERM that stopped it early (with `handle_signals`; on every worker,
    whichever of them received it).
    """
    strategy = strategy or make_strategy()  # before any TF op: multi-worker collectives need it
    replicas = strategy.num_replicas_in_sync
    if config.jit_compile and replicas > 1:  # checked on 2 logical CPUs; Keras's "auto" says no too
        raise ValueError(f"jit_compile needs a single replica, not {replicas}: Keras 3 cannot "
                         "XLA-compile a step across replicas (it fails with 'Trying to access "
                         "resource ... located in device'; keras-team/keras#19005). Train on one "
                         "device or --set jit_compile=false")
    if config.batch_size % replicas:  # an uneven split would scale the replicas' losses wrongly
        raise ValueError(f"batch_size {config.batch_size} is the global batch and must be a "
                         f"multiple of the {replicas} replicas")
    profiler = (Profiler(os.path.join(run_dir, rundir.TENSORBOARD), *profile_steps)
                if profile_steps else None)  # checks the steps before any work
    check_resume(run_dir, config)
    check_records(data_dir, config.size)
    training_set = describe_training_set(data_dir, config)
    chief = is_chief(strategy)
    if chief:
        try:
            rundir.write_config(run_dir, config)
        except (OSError, tf.errors.OpError) as e:  # a path under a file, no permission, ...
            raise ValueError(f"cannot write the run directory {run_dir!r}: "
                             f"{getattr(e, 'message', None) or e}") from None
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    keras.utils.set_random_seed(config.seed)  # same initial weights on every (re)start
    from ..gan import HAGAN

    with strategy.scope():
        gan = HAGAN(config)
        gan.compile()
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        ckpt = tf.train.Checkpoint(model=gan, g_optimizer=gan.g_optimizer,
                                   d_optimizer=gan.d_optimizer, eh_optimizer=gan.eh_optimizer,
                                   eg_optimizer=gan.eg_optimizer, step=step_var)
        manager = rundir.checkpoint_manager(run_dir, ckpt, keep=config.keep_checkpoints)
        # Every worker saves (the variables' values are gathered with collectives) and restores
        # from the chief's directory; the others save to a scratch directory and delete it.
        scratch = None if chief else os.path.join(run_dir, f".worker-{strategy.cluster_resolver.task_id}")
        saver = rundir.checkpoint_manager(scratch, ckpt, keep=1) if scratch else manager
        if manager.latest_checkpoint:
            ckpt.restore(manager.latest_checkpoint).expect_partial()
            for name in ("g", "d", "eh", "eg"):  # the checkpoint holds the rates it ran with
                getattr(gan, f"{name}_optimizer").learning_rate = getattr(config, f"lr_{name}")
            if verbose and chief:
                print(f"resuming from {manager.latest_checkpoint} (step {int(gan.step.numpy())})")
    start = int(gan.step.numpy())
    if start >= config.max_steps:
        if verbose:
            print(f"run is at step {start} >= max_steps {config.max_steps}: nothing to do")
        return {"step": start, "checkpoint": manager.latest_checkpoint, "error": None}

    if verbose and chief:
        print(f"training on {training_set}; global batch {config.batch_size} over {replicas} "
              "replica(s)")

    ds = training_input(strategy, data_dir, config, start)
    reals = _first_volumes(data_dir, config.size, 8)
    monitor = Monitor(os.path.join(run_dir, rundir.TENSORBOARD) if chief else None,
                      config.max_steps, config.log_every, config.image_every,
                      sample_batch=reals[0] if reals else None,
                      progress=progress and chief)
    detector = None
    if chief and config.diversity_every and len(reals) > 1:  # X^L of up to 8 real volumes
        low = np.concatenate([gan.real_low_res(r["volume"]).numpy() for r in reals])
        detector = CollapseDetector(low, config.diversity_every, config.collapse_threshold,
                                    writer=monitor.writer, seed=config.seed)
    checkpointer = Checkpointer(saver, step_var, config.checkpoint_every, guard=monitor,
                                scratch=scratch)
    several_workers = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    stopper = StopOnSignal(strategy if several_workers else None) if handle_signals else None
    with stopper or contextlib.nullcontext():
        try:
            gan.fit(ds, epochs=1, steps_per_epoch=config.max_steps - start, shuffle=False,  # ds shuffles
                    callbacks=[c for c in (profiler if chief else None, monitor, detector, checkpointer,
                                          stopper) if c],
                    verbose=0)
        except tf.errors.DataLossError as e:  # a CRC failure: check_records reads headers only
            step = int(gan.step.numpy())
            if several_workers:  # saving needs every worker, and the others may be leaving too
                kept = _kept_by_chief(run_dir)
            else:
                monitor.on_train_end()
                checkpointer.on_train_end()  # no update of the failed step ran: its batch never came
                kept = (f"Step {step} is checkpointed" if checkpointer.last_saved == step
                        else _kept_by_chief(run_dir))
            print("a record failed its checksum; reading every shard to name it ...", file=sys.stderr)
            where = "; ".join(unreadable_shards(data_dir)) or e.message
            error = ValueError(f"damaged records in {data_dir!r} at step {step} (re-copy or re-run "
                               f"hagan-preprocess): {where}. {kept}: re-run the same command to "
                               "resume")
            if several_workers:
                _tell_the_other_workers(strategy, error)
            raise error from e
        except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as e:
            if not several_workers:
                raise
            # A worker that failed or was killed aborts every collective: say so, not a traceback.
            raise _peer_failure(strategy, int(gan.step.numpy()), run_dir, e.message) from e
    step = int(gan.step.numpy())
    if monitor.error and verbose:
        latest = manager.latest_checkpoint
        print(f"error: {monitor.error}\n" + (f"last good checkpoint: {latest}" if latest else
              "no checkpoint was written yet: re-run with other settings (a run directory "
              "without a checkpoint takes any config)"), file=sys.stderr)
    return {"step": step, "checkpoint": manager.latest_checkpoint, "error": monitor.error,
            "model": gan, "chief": chief, "signal": stopper and stopper.stopped_by}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hagan-train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file or preset name (tiny_32, paper_128, paper_256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set batch_size=2")
    p.add_argument("--data", required=True, help="directory of TFRecord shards (hagan-preprocess output)")
    p.add_argument("--out", required=True, help="run directory (re-run the same command to resume)")
    p.add_argument("--max-steps", type=int, help="stop at this step (overrides max_steps)")
    p.add_argument("--strategy", default="auto", choices=["auto", "mirrored", "multiworker", "default"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="trace these steps with the TensorBoard profiler (RUN/tensorboard, Profile "
                        "tab) and print the op types that took the most time, e.g. 10 12")
    args = p.parse_args(argv)
    keep_channels_last_on_gpu()
    try:
        config = load_config(args.config).with_overrides(args.set)
        if args.max_steps is not None:
            config = config.replace(max_steps=args.max_steps)
        result = train(config, args.data, args.out, make_strategy(args.strategy),
                       progress=not args.no_progress, handle_signals=True,
                       profile_steps=args.profile_steps)
    except (ValueError, FileNotFoundError) as e:
        print(f"hagan-train: error: {e}", file=sys.stderr)
        return 2
    except WorkerFailed as e:
        print(f"hagan-train: error: {e}", file=sys.stderr)
        return 1
    if result["error"]:
        return 1
    if result.get("chief", True):
        print(f"step {result['step']}: checkpoint {result['checkpoint']}; "
              f"TensorBoard: tensorboard --logdir {os.path.join(args.out, rundir.TENSORBOARD)}")
    else:
        print(f"step {result['step']}: done; worker 0 writes the checkpoints and TensorBoard "
              f"events under {args.out}")
    if result.get("signal") is not None:  # on every worker when one of them received it
        print(f"stopped by {result['signal'].name}: re-run the same command to resume")
        return 128 + int(result["signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
