"""Every private TensorFlow and Keras API hagan_tf relies on, in one place.

setup.py pins TensorFlow and Keras exactly because of these. tests/test_compat.py probes each
one against the installed versions, so an upgrade that moves or changes one fails there, by
name, and not as a slower, larger or wrong training step far from the cause.

TensorFlow:
  onednn_enabled           tensorflow.python.util._pywrap_util_port.IsMklEnabled
  in_xla_context           tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext
  xla_dynamic_slice,       tensorflow.compiler.tf2xla.python.xla.dynamic_slice /
  xla_dynamic_update_slice   .dynamic_update_slice
  report_error_to_cluster  tensorflow.python.eager.context.context().report_error_to_cluster
  xplane_pb2               tensorflow.tsl.profiler.protobuf.xplane_pb2
Keras:
  kernel_variable          Conv/Dense `_kernel`, the variable behind the `kernel` property
  variable_index           Optimizer._get_variable_index
  flatten_layers           Layer._flatten_layers
  private_override         marks a method that overrides a private Keras method (the
                           optimizers' and the trainer's hooks); PRIVATE_OVERRIDES lists them
"""

from __future__ import annotations

import functools
import inspect
import warnings

# --- TensorFlow ----------------------------------------------------------------------------------


def mkl_enabled_function():
    """TF's own answer to "are the CPU ops oneDNN's?" (raises if TF moved it)."""
    from tensorflow.python.util import _pywrap_util_port

    return _pywrap_util_port.IsMklEnabled


@functools.cache  # fixed for the process; asked by every convolution when a step is traced
def onednn_enabled() -> bool:
    """Whether TF runs its CPU ops with oneDNN (by default on CPUs with AVX-512 VNNI/BF16/AMX,
    or with TF_ENABLE_ONEDNN_OPTS=1). If the private function moved, assume Eigen's kernels."""
    try:
        return bool(mkl_enabled_function()())
    except (ImportError, AttributeError):
        return False


def in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (a `jit_compile` tf.function)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def xla_dynamic_slice(x, begin, size):
    """XLA's DynamicSlice: `begin` is data, not a compile-time constant."""
    from tensorflow.compiler.tf2xla.python import xla

    return xla.dynamic_slice(x, begin, size)


def xla_dynamic_update_slice(x, update, begin):
    from tensorflow.compiler.tf2xla.python import xla

    return xla.dynamic_update_slice(x, update, begin)


def report_error_to_cluster(error_code, message: str) -> None:
    """Tell the cluster's coordination service (MultiWorkerMirroredStrategy) why this worker
    stops; it aborts the other workers' collectives with the message."""
    from tensorflow.python.eager import context

    context.context().report_error_to_cluster(error_code, message)


def xplane_pb2():
    """The protobuf module of the TensorBoard profiler's trace files (*.xplane.pb)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2 as module

    return module


# --- Keras ---------------------------------------------------------------------------------------


def kernel_variable(layer):
    """The stored kernel variable of a Keras Conv or Dense layer. Its `kernel` property is this
    variable only while LoRA is off; spectral norm and the weight import need the variable."""
    return layer._kernel


def variable_index(optimizer, variable) -> int:
    """Index of `variable` in the optimizer's slot lists (`_velocities`, ...)."""
    return optimizer._get_variable_index(variable)


def flatten_layers(layer):
    """`layer` and every layer nested in it, at any depth."""
    return layer._flatten_layers()


PRIVATE_OVERRIDES: list[tuple[type, str, object]] = []


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def override_problem(base: type, name: str, fn) -> str | None:
    """Why `fn` no longer overrides `base.name` as written, or None."""
    theirs = getattr(base, name, None)
    where = f"{base.__module__}.{base.__qualname__}.{name}"
    if not callable(theirs):
        return f"{where} is gone: the override of it is never called"
    if _parameters(theirs) != _parameters(fn):
        return f"{where} now takes {_parameters(theirs)}, the override {_parameters(fn)}"
    return None


def private_override(base: type):
    """Decorator for a method that overrides a private method of the Keras class `base`. It is
    recorded in PRIVATE_OVERRIDES (tests/test_compat.py checks them all) and warns on import
    when `base` no longer has the method with the same parameters."""
    def mark(fn):
        PRIVATE_OVERRIDES.append((base, fn.__name__, fn))
        problem = override_problem(base, fn.__name__, fn)
        if problem:
            warnings.warn(f"hagan_tf: {problem} (see hagan_tf/_compat.py)", RuntimeWarning,
                          stacklevel=2)
        return fn
    return mark
