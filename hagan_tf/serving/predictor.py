"""Protocol-independent request handling of `hagan-serve`: look up, validate, run, map errors.

The gRPC and REST APIs both end here, so a request is refused for the same reason, with the
same status, whichever way it came.
"""

from __future__ import annotations

import re
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2

from . import ServingError, shown, shown_list
from .registry import ModelRegistry, Servable

RUN_VOXELS = 2 * 256**3  # samples per execution: 2 at 256^3 (~2 GB each on CPU), 16 at 128^3
DEFAULT_SIGNATURE = "serving_default"
_GRPC_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
_TF_TRACE_LINE = re.compile(r"^(Graph execution error:|Detected at node|<stack traces|\s*\[\[)")


def _tf_message(e: tf.errors.OpError) -> str:
    """The useful lines of a TF runtime error (the assertion text), without node traces."""
    lines = [ln.strip() for ln in str(e.message).splitlines()]
    kept = [ln for ln in lines if ln and not _TF_TRACE_LINE.match(ln)]
    return " ".join(kept) or str(e.message)


class Predictor:
    """Checks a request against its signature, runs it in bounded groups, maps TF errors."""

    def __init__(self, registry: ModelRegistry, max_batch: int = 16, max_concurrent: int = 4,
                 run_voxels: int = RUN_VOXELS):
        self.registry = registry
        self.max_batch, self.run_voxels = max_batch, run_voxels
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def signature(self, servable: Servable, name: str) -> str:
        name = name or DEFAULT_SIGNATURE
        if name not in servable.functions:  # TF Serving's code and words
            raise ServingError("FAILED_PRECONDITION",
                               f'Serving signature key "{shown(name)[1:-1]}" not found. '
                               f"Available: {', '.join(sorted(servable.functions))}")
        return name

    def check(self, servable: Servable, signature: str, tensors: dict[str, tuple]) -> None:
        """Inputs {name: (numpy dtype, shape)} against the signature, before any is built."""
        specs = servable.inputs[signature]
        missing = sorted(set(specs) - set(tensors))
        extra = sorted(set(tensors) - set(specs))
        if missing or extra:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"signature {signature!r} takes inputs {sorted(specs)}; "
                + (f"missing {missing}" if missing else "") + (" and " if missing and extra else "")
                + (f"unknown {shown_list(extra)}" if extra else ""))
        for key, spec in specs.items():
            dtype, shape = np.dtype(tensors[key][0]), tuple(tensors[key][1])
            if dtype != spec.dtype.as_numpy_dtype and not (
                    spec.dtype == tf.string and dtype.kind in "OS"):
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} must be {spec.dtype.name}, got {dtype}")
            if not spec.shape.is_compatible_with(shape):
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} has shape {list(shape)}, signature "
                                   f"{signature!r} expects {spec.shape.as_list()} (None = any)")
            if spec.shape.rank and shape[0] > self.max_batch:
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} has a batch of {shape[0]}; this server "
                                   f"takes at most {self.max_batch} (--max-batch)")

    @staticmethod
    def check_values(inputs: dict[str, np.ndarray]) -> None:
        """Refuse NaN and Inf: the model would answer an all-NaN volume, which REST could only
        write as non-standard JSON (TF Serving runs them; hagan-serve says what is wrong)."""
        for key, value in inputs.items():
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} holds NaN or Inf; hagan-serve takes finite "
                                   "values only")

    def predict(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                output_filter=()) -> dict[str, np.ndarray]:
        specs = servable.inputs[signature]
        self.check(servable, signature, {k: (v.dtype, v.shape) for k, v in inputs.items()})
        self.check_values(inputs)
        outputs = servable.functions[signature].structured_outputs
        unknown = sorted(set(output_filter) - set(outputs))
        if unknown:
            raise ServingError("INVALID_ARGUMENT",
                               f"output_filter names unknown outputs {shown_list(unknown)}")
        keep = set(output_filter) or set(outputs)
        # A batch runs in groups of at most run_voxels: 16 volumes at 256^3 in one execution
        # would need ~16x the memory of one, for the same answer.
        batches = {len(v) for k, v in inputs.items() if specs[k].shape.rank}
        n = max(batches, default=0)
        voxels = servable.sample_voxels[signature]  # None: an output without a batch dimension
        group = (max(1, self.run_voxels // voxels) if voxels and len(batches) == 1
                 else max(n, 1))  # unequal batches run whole: the signature says what is wrong
        if n == 0 and batches:  # an empty batch runs as one zero sample, cut to none: oneDNN's
            # CPU convolutions mis-shape empty batches ("Incompatible shapes: [0,8,8,8,64] vs.")
            inputs = {k: np.zeros((1,) + v.shape[1:], v.dtype) if specs[k].shape.rank else v
                      for k, v in inputs.items()}
        runs = []
        with self._slots:
            for i in range(0, max(n, 1), group):
                try:
                    result = servable.functions[signature](**{
                        k: tf.constant(v[i:i + group] if specs[k].shape.rank else v,
                                       dtype=specs[k].dtype) for k, v in inputs.items()})
                except tf.errors.OpError as e:
                    raise ServingError(_GRPC_CODE_NAMES.get(e.error_code, "UNKNOWN"),
                                       _tf_message(e)) from None
                except UnicodeDecodeError:  # TF could not decode the error of a bytes input
                    raise ServingError("INVALID_ARGUMENT",
                                       f"signature {signature!r} refused the request (its "
                                       "error message held bytes that are not UTF-8)") from None
                runs.append({k: np.asarray(v.numpy()) for k, v in result.items() if k in keep})
        if n == 0 and batches:
            return {k: v[:0] if v.ndim else v for k, v in runs[0].items()}
        if len(runs) == 1:
            return runs[0]
        return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}

    def metadata(self, servable: Servable,
                 fields) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(fields)
        if fields != ["signature_def"]:
            raise ServingError("INVALID_ARGUMENT", "metadata_field must be ['signature_def'], "
                                                   f"got {shown_list(fields)}")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signature_defs)
        return response
