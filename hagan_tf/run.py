"""Deprecated name of `hagan_tf.rundir` (the run directory), kept for scripts that import it."""

import warnings

from .rundir import *  # noqa: F401,F403
from .rundir import __all__  # noqa: F401

warnings.warn("hagan_tf.run is deprecated: import hagan_tf.rundir", DeprecationWarning, stacklevel=2)
