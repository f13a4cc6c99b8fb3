"""Inception Score for 3D volumes as the paper computes it: a 2D ImageNet InceptionV3 on the
middle axial, coronal and sagittal slices, one score per view, averaged over the views.

The classifier's weights are the user's own keras.applications InceptionV3 file (with top);
nothing is downloaded, and without a file the score is reported as unavailable.
"""

from __future__ import annotations

import os

import numpy as np

from ..io import mid_slices
from .metrics import inception_score

VIEWS = ("axial", "coronal", "sagittal")
INPUT = 299


def slices_for_classifier(volumes) -> list[np.ndarray]:
    """Per view: the middle slices [n, 299, 299, 3], in [-1, 1] as InceptionV3 expects."""
    import tensorflow as tf

    per_view = [[], [], []]
    for vol in volumes:
        for j, sl in enumerate(mid_slices(vol)):
            per_view[j].append(sl)
    out = []
    for view in per_view:
        x = tf.image.resize(np.stack(view)[..., None].astype(np.float32), (INPUT, INPUT), "bilinear")
        out.append(np.clip(np.repeat(x.numpy(), 3, axis=-1), -1.0, 1.0))
    return out


def load_inception(weights: str):
    """A classifier [n, 299, 299, 3] -> ImageNet probabilities from a local weights file."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"InceptionV3 weights file {weights!r} does not exist")
    import keras
    import tensorflow as tf

    try:
        net = keras.applications.InceptionV3(weights=weights, include_top=True,
                                             classifier_activation="softmax")
    except Exception as e:  # noqa: BLE001 - h5py/keras raise many types for a wrong file
        raise ValueError(f"{weights!r} is not an InceptionV3 (with top) weights file: {e}") from e
    call = tf.function(lambda x: net(x, training=False), reduce_retracing=True)
    return lambda x: call(tf.constant(x)).numpy()


class SliceInceptionScorer:
    """Accumulates class probabilities of the three mid slices batch by batch."""

    def __init__(self, classify, batch_size: int = 16):
        self.classify = classify  # [n, 299, 299, 3] -> probabilities [n, classes]
        self.batch_size = batch_size
        self.probs = [[], [], []]

    def update(self, volumes) -> None:
        for j, x in enumerate(slices_for_classifier(volumes)):
            for i in range(0, len(x), self.batch_size):
                self.probs[j].append(np.asarray(self.classify(x[i:i + self.batch_size]), np.float64))

    def result(self, splits: int = 1) -> dict:
        per_view = {v: inception_score(np.concatenate(p), splits)[0] for v, p in zip(VIEWS, self.probs)}
        return {"value": float(np.mean(list(per_view.values()))), "per_view": per_view}
