"""Deprecated name of `hagan_tf.trained` (open_model: a run directory or an exported model)."""

import warnings

from .trained import *  # noqa: F401,F403
from .trained import __all__  # noqa: F401

warnings.warn("hagan_tf.source is deprecated: import hagan_tf.trained", DeprecationWarning, stacklevel=2)
