"""hagan-tf: HA-GAN (Hierarchical Amortized GAN) for 3D medical volumes in TensorFlow/Keras."""

import os
import sys


def _quiet_tensorflow_in_commands() -> None:
    """The hagan-* commands quiet TensorFlow's C++ info logs; a program that imports hagan_tf
    keeps its own logging settings. It must happen before TensorFlow loads, and a command's
    module imports TensorFlow at its top, after this package: hence here, keyed on the
    console script's name."""
    if os.path.basename(sys.argv[0] if sys.argv else "").startswith("hagan-"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_quiet_tensorflow_in_commands()

from .config import HAGANConfig  # noqa: E402

__all__ = ["HAGANConfig", "HAGAN"]


def __getattr__(name):
    # HAGAN pulls in TensorFlow and Keras: import it on first use, so that TF-free tools
    # (hagan-regress) and Beam workers that only need the transform start light.
    if name == "HAGAN":
        from .gan import HAGAN

        return HAGAN
    raise AttributeError(f"module 'hagan_tf' has no attribute {name!r}")
__version__ = "0.1.0"
