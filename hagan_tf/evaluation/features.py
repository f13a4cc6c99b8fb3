"""Feature extractors for 3D volumes, chosen by name.

  medicalnet     MedicalNet's 3D ResNet-50 with the user's `resnet_50_23dataset.pth`: the
                 network the paper used, so its numbers are the comparable ones.
  encoder        the evaluated model's own encoder E: needs no download, but it was trained
                 with the generator, so its features are NOT independent of the model.
  random-resnet  the same ResNet with fixed, seeded random weights: no download, only useful
                 to compare models with each other under the same seed and width.

Volumes go in as the model produces them ([-1, 1], no further normalisation), as in the
reference evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

EXTRACTORS = ("medicalnet", "encoder", "random-resnet")


@dataclasses.dataclass
class Extractor:
    name: str
    description: str  # printed next to every number computed with it
    independent: bool  # False when the features come from the model under evaluation
    fn: Callable[[np.ndarray], np.ndarray]
    size: int | None = None  # the only input edge it accepts, None for any
    model: object = None  # the Keras network, for the ResNet extractors

    def accepts(self, edge: int) -> bool:
        return self.size is None or edge == self.size

    def __call__(self, volumes) -> np.ndarray:
        v = np.asarray(volumes, np.float32)
        if v.ndim == 4:
            v = v[..., None]
        if not self.accepts(v.shape[1]):
            raise ValueError(f"the {self.name} extractor only takes {self.size}^3 volumes")
        return np.asarray(self.fn(v), np.float64).reshape(len(v), -1)


def _resnet_fn(model, batch_size):
    import tensorflow as tf

    # one trace for every batch size and resolution
    call = tf.function(lambda x: model(x, training=False),
                       input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)])
    return lambda v: np.concatenate([call(tf.constant(v[i:i + batch_size])).numpy()
                                     for i in range(0, len(v), batch_size)])


def make_extractor(name: str, weights: str | None = None, source=None, seed: int = 0,
                   width: float = 1.0, batch_size: int = 4) -> Extractor:
    """`weights` for medicalnet; `source` (hagan_tf.trained.open_model) for encoder;
    `seed` and `width` for random-resnet."""
    from .resnet3d import load_torch_weights, medicalnet_resnet

    if name == "medicalnet":
        if not weights:
            raise ValueError("the medicalnet extractor needs --weights resnet_50_23dataset.pth "
                             "(download it from the MedicalNet project)")
        model = medicalnet_resnet(seed=None)
        unused = [k for k in load_torch_weights(model, weights) if not k.startswith("conv_seg.")]
        if unused:
            raise ValueError(f"{weights!r} has keys the ResNet-50 does not use, e.g. {unused[:3]}: "
                             "is it the ResNet-50 file?")
        return Extractor(name, "MedicalNet ResNet-50 (pretrained, 23 datasets)", True,
                         _resnet_fn(model, batch_size), model=model)
    if name == "encoder":
        if source is None:
            raise ValueError("the encoder extractor needs the model")
        return Extractor(name, "the model's own encoder E (not independent of the model)", False,
                         source.encode, size=source.config.size)
    if name == "random-resnet":
        model = medicalnet_resnet(width=width, seed=seed)
        return Extractor(name, f"RANDOM-weight 3D ResNet-50 (seed {seed}, width {width}); "
                         "not comparable with published MedicalNet numbers", True,
                         _resnet_fn(model, batch_size), model=model)
    raise ValueError(f"unknown feature extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
