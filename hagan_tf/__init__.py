"""hagan-tf: HA-GAN (Hierarchical Amortized GAN) for 3D medical volumes in TensorFlow/Keras."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .config import HAGANConfig  # noqa: E402
from .gan import HAGAN  # noqa: E402

__all__ = ["HAGANConfig", "HAGAN"]
__version__ = "0.1.0"
