"""The run directory: what `hagan-train` writes and every later command reads.

  RUN_DIR/config.yaml          the resolved HAGANConfig
  RUN_DIR/checkpoints/ckpt-N*  tf.train.Checkpoint: model (+ optimizers, step, RNG in training)
  RUN_DIR/tensorboard/         TensorBoard event files

The names are in `layout` (re-exported here); this module reads and writes the files.

RUN_DIR may be a URL (gs://...): every access goes through tf.io.gfile, so workers on several
machines can share one run directory.
"""

from __future__ import annotations

import tensorflow as tf

from .config import HAGANConfig
from .layout import CHECKPOINT_PREFIX, CHECKPOINTS, CONFIG, TENSORBOARD, checkpoints_dir, config_path

__all__ = ["CHECKPOINTS", "CONFIG", "TENSORBOARD", "config_path", "read_config", "write_config",
           "checkpoint_manager", "checkpoint_path", "save_model", "load_hagan"]


def read_config(run_dir: str) -> HAGANConfig:
    path = config_path(run_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{run_dir!r} is not a run directory: {CONFIG} is missing")
    return HAGANConfig.from_yaml(path)


def write_config(run_dir: str, config: HAGANConfig) -> None:
    tf.io.gfile.makedirs(run_dir)
    tmp = config_path(run_dir) + ".tmp"
    config.to_yaml(tmp)
    tf.io.gfile.rename(tmp, config_path(run_dir), overwrite=True)


def checkpoint_manager(run_dir: str, checkpoint: tf.train.Checkpoint, keep: int = 3):
    return tf.train.CheckpointManager(checkpoint, checkpoints_dir(run_dir),
                                      max_to_keep=keep, checkpoint_name=CHECKPOINT_PREFIX)


def checkpoint_path(run_dir: str, step: int | None = None) -> str:
    """Path of the checkpoint at `step` (default: the latest)."""
    ckpt_dir = checkpoints_dir(run_dir)
    if step is None:
        path = tf.train.latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir!r}")
        return path
    state = tf.train.get_checkpoint_state(ckpt_dir)
    for path in (state.all_model_checkpoint_paths if state else []):
        if path.endswith(f"{CHECKPOINT_PREFIX}-{step}"):
            return path
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir!r}")


def save_model(run_dir: str, model, step: int = 0) -> str:
    """Write a model-only checkpoint that training can resume from (used by imports)."""
    ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(step, dtype=tf.int64))
    return checkpoint_manager(run_dir, ckpt, keep=3).save(checkpoint_number=step)


def load_hagan(run_dir: str, step: int | None = None, ema: bool = True):
    """(HAGAN with the weights of `step` or the latest checkpoint, its step). With `ema` (the
    default) a run that keeps a moving average of G (config.ema_decay) generates with it."""
    from .gan import HAGAN

    config = read_config(run_dir)
    model = HAGAN(config)
    step_var = tf.Variable(0, dtype=tf.int64)
    path = checkpoint_path(run_dir, step)
    try:
        tf.train.Checkpoint(model=model, step=step_var).restore(path).expect_partial()
    except (IndexError, tf.errors.OpError) as e:  # a data file cut short raises IndexError
        raise ValueError(f"checkpoint {path} is unreadable (a partial copy of the run "
                         f"directory?): {getattr(e, 'message', None) or e}") from None
    if ema:
        model.use_ema()
    return model, int(step_var.numpy())
