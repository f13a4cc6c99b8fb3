"""HAGAN: the whole model as one keras.Model (generator, discriminator, encoder)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .config import HAGANConfig
from .layers import SERIAL_PACKAGE
from .models import Discriminator, Encoder, Generator


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class HAGAN(keras.Model):
    """HA-GAN. `generate(z)` -> [B, S, S, S, 1] in [-1, 1]; `encode(volume)` -> [B, latent]."""

    def __init__(self, config: HAGANConfig | dict | None = None, **kwargs):
        super().__init__(name=kwargs.pop("name", "hagan"), **kwargs)
        if config is None:
            config = HAGANConfig()
        self.config_ = config if isinstance(config, HAGANConfig) else HAGANConfig.from_dict(config)
        self.generator = Generator(self.config_)
        self.discriminator = Discriminator(self.config_)
        self.encoder = Encoder(self.config_)
        self.built = True

    def get_config(self):
        return {"config": self.config_.to_dict(), "name": self.name}

    def build(self, input_shape=None):
        self.built = True

    def call(self, z, labels=None, training=False):
        return self.generator(z, labels=labels, training=training)

    def generate(self, z, labels=None):
        """Full-resolution volumes for latent codes z [B, latent] (and class labels [B])."""
        return self.generator(z, labels=labels)

    def encode(self, volume):
        """Latent codes [B, latent] of preprocessed volumes [B, S, S, S, 1] in [-1, 1]."""
        return self.encoder(volume)

    def sample_z(self, n: int, seed: int | None = None):
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, self.config_.latent_dim)).astype("float32")

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per network, named as in the architecture doc."""
        def count(m):
            return int(sum(np.prod(w.shape) for w in m.trainable_weights))

        g, d, e = self.generator, self.discriminator, self.encoder
        out = {
            "G^A": count(g.common), "G^L": count(g.low_res_head), "G^H": count(g.high_res_head),
            "D^H": count(d.high_res), "D^L": count(d.low_res),
            "E^H": count(e.high_res), "E^G": count(e.ground),
        }
        out["G"] = out["G^A"] + out["G^L"] + out["G^H"]
        out["D"] = out["D^H"] + out["D^L"]
        out["all"] = out["G"] + out["D"] + out["E^H"] + out["E^G"]
        return out
