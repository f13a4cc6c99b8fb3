"""A trained model, for the commands that use one: from a run directory or an exported SavedModel.

`open_model(run=...)` restores a checkpoint into a HAGAN; `open_model(model_base=...)` loads
the newest (or given) version of DIR/NAME/V written by `hagan-export` and calls its signatures.
Both give `.config`, `.generate(z, labels)`, `.preview(z, labels)` and `.encode(volume)` on
NumPy arrays.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from .config import HAGANConfig
from .layout import CONFIG_ASSET, DEFAULT_MODEL_NAME, newest_version
from .models import checked_labels

__all__ = ["CONFIG_ASSET", "newest_version", "RunModel", "ExportedModel", "SavedModelSource",
           "open_model"]


def _labels(num_classes: int, n: int, labels) -> np.ndarray | None:
    """Class 0 for every sample when a conditional model is given no labels."""
    if num_classes and labels is None:
        labels = np.zeros(n, np.int32)
    return checked_labels(labels, num_classes, n)


class RunModel:
    """A HAGAN restored from a run directory."""

    def __init__(self, run_dir: str, step: int | None = None):
        from .rundir import load_hagan

        self.model, self.step = load_hagan(run_dir, step)
        self.config: HAGANConfig = self.model.config

    def _labels(self, n, labels):
        labels = _labels(self.config.num_classes, n, labels)
        return None if labels is None else tf.constant(labels)

    def generate(self, z, labels=None, out=None) -> np.ndarray:
        """Volumes for z, or (with `out`, e.g. io.NiftiVolumes) written into `out` slab by slab
        as HAGAN.generate decodes them, and `out` returned."""
        z = np.asarray(z, np.float32)
        return self.model.generate(z, self._labels(len(z), labels), out=out)

    def preview(self, z, labels=None) -> np.ndarray:
        z = np.asarray(z, np.float32)
        return self.model.generator.preview(z, self._labels(len(z), labels)).numpy()

    def encode(self, volume) -> np.ndarray:
        return self.model.encoder(np.asarray(volume, np.float32)).numpy()


class ExportedModel:
    """An exported SavedModel (TF Serving layout), called through its signatures."""

    def __init__(self, model_base: str, name: str = DEFAULT_MODEL_NAME, version: int | None = None):
        path = (os.path.join(model_base, name, str(version)) if version is not None
                else newest_version(model_base, name))
        self.path = path
        self.config = HAGANConfig.from_yaml(os.path.join(path, CONFIG_ASSET))
        self.loaded = tf.saved_model.load(path)
        self.step = None

    def _call(self, signature, output, **inputs):
        fn = self.loaded.signatures[signature]
        return fn(**{k: tf.constant(v) for k, v in inputs.items()})[output].numpy()

    def _inputs(self, z, labels):
        z = np.asarray(z, np.float32)
        inputs = {"z": z}
        if self.config.num_classes:
            inputs["label"] = _labels(self.config.num_classes, len(z), labels)
        return inputs

    def generate(self, z, labels=None) -> np.ndarray:
        return self._call("generate", "volume", **self._inputs(z, labels))

    def preview(self, z, labels=None) -> np.ndarray:
        return self._call("generate_preview", "volume", **self._inputs(z, labels))

    def encode(self, volume) -> np.ndarray:
        return self._call("encode", "z", volume=np.asarray(volume, np.float32))


def open_model(run: str | None = None, model_base: str | None = None,
               name: str = DEFAULT_MODEL_NAME, step: int | None = None, version: int | None = None):
    if (run is None) == (model_base is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model-base DIR")
    if run is not None:
        return RunModel(run, step)
    return ExportedModel(model_base, name, version)


SavedModelSource = ExportedModel  # its earlier name
