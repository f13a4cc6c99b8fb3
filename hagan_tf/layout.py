"""Where things live on disk: the run directory and the model directory, by name only.

A leaf module: it imports nothing from hagan_tf, so `run`, `source`, `serving.export` and the
server can all share these names without importing one another. TensorFlow is imported inside
the functions that list directories, so importing this (and `hagan_tf.serving`) stays cheap.

Run directory (written by `hagan-train`, read by every later command):

  RUN_DIR/config.yaml          the resolved HAGANConfig   (CONFIG)
  RUN_DIR/checkpoints/ckpt-N*  tf.train.Checkpoint        (CHECKPOINTS, CHECKPOINT_PREFIX)
  RUN_DIR/tensorboard/         TensorBoard event files    (TENSORBOARD)

Model directory (written by `hagan-export`, read by `hagan-serve` and TF Serving):

  MODEL_BASE/NAME/V/                                 one SavedModel per integer version V
  MODEL_BASE/NAME/V/assets.extra/hagan_config.yaml   the run's config (CONFIG_ASSET)

Both may be URLs (gs://...): paths are joined with os.path.join and listed through tf.io.gfile.
"""

from __future__ import annotations

import os

# --- run directory -------------------------------------------------------------------------------
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"
TENSORBOARD = "tensorboard"


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG)


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TENSORBOARD)


# --- model directory (TF Serving's layout) -------------------------------------------------------
DEFAULT_MODEL_NAME = "hagan"
CONFIG_ASSET = os.path.join("assets.extra", "hagan_config.yaml")


def versions(model_dir: str) -> list[int]:
    """Numbered version directories under DIR/NAME, ascending."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(model_dir):
        return []
    names = (v.rstrip("/") for v in tf.io.gfile.listdir(model_dir))
    # isdigit alone takes "²" and "١", which int() refuses or reads as another number
    return sorted(int(v) for v in names if v.isascii() and v.isdigit()
                  and tf.io.gfile.isdir(os.path.join(model_dir, v)))


def default_version(model_dir: str, step: int) -> int:
    """The run's step when it is newer than every exported version, else the next integer
    (1 for an untrained run's first export: versions count from 1).

    TF Serving serves the highest number, so a new export must never get a lower one.
    """
    existing = versions(model_dir)
    newest = existing[-1] if existing else 0
    return step if step > newest else newest + 1


def newest_version(model_base: str, name: str = DEFAULT_MODEL_NAME) -> str:
    """Path of the highest numbered version of MODEL_BASE/NAME."""
    base = os.path.join(model_base, name)
    found = versions(base)
    if not found:
        raise FileNotFoundError(f"no numbered version directory under {base!r}")
    return os.path.join(base, str(found[-1]))
