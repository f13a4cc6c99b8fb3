"""TF Serving's gRPC API for `hagan-serve`: PredictionService and ModelService over a Predictor."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (model_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from . import ServingError, bounded, shown
from .predictor import Predictor
from .registry import ModelRegistry

log = logging.getLogger("hagan_tf.serving")

def _version_of(spec: model_pb2.ModelSpec) -> int | None:
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise ServingError("INVALID_ARGUMENT",
                           "version labels are not supported by hagan-serve; use a version number")
    return spec.version.value if choice == "version" else None


def _grpc(method):
    """Run a servicer method, turning ServingError (or anything else) into a gRPC status."""
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as e:
            context.abort(getattr(grpc.StatusCode, e.code), bounded(e.message))
        except Exception as e:  # noqa: BLE001 - the server must survive any request
            log.exception("gRPC %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, bounded(f"{type(e).__name__}: {e}"))
    wrapper.__name__ = method.__name__
    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService.Predict and GetModelMetadata; Classify/Regress stay UNIMPLEMENTED."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @_grpc
    def Predict(self, request, context):
        p = self.predictor
        servable = p.registry.get(request.model_spec.name, _version_of(request.model_spec))
        signature = p.signature(servable, request.model_spec.signature_name)
        declared = {}
        for key, proto in request.inputs.items():
            try:
                dtype = np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype)
            except Exception:  # noqa: BLE001 - DT_INVALID, resource and variant types
                raise ServingError("INVALID_ARGUMENT", f"input {shown(key)} has an unusable "
                                                       f"dtype ({proto.dtype})") from None
            shape = [d.size for d in proto.tensor_shape.dim]
            if any(n < 0 for n in shape) or proto.tensor_shape.unknown_rank:
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {shown(key)} must have a known shape")
            declared[key] = (dtype, shape)
        p.check(servable, signature, declared)  # before a declared shape can allocate anything
        inputs = {}
        for key, proto in request.inputs.items():
            try:
                inputs[key] = tf.make_ndarray(proto)
            except Exception as e:  # noqa: BLE001 - malformed TensorProto
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not a valid tensor: {e}")
        outputs = p.predict(servable, signature, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    @_grpc
    def GetModelMetadata(self, request, context):
        p = self.predictor
        servable = p.registry.get(request.model_spec.name, _version_of(request.model_spec))
        return p.metadata(servable, request.metadata_field)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """ModelService.GetModelStatus; HandleReloadConfigRequest stays UNIMPLEMENTED (we poll)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    @_grpc
    def GetModelStatus(self, request, context):
        return self.registry.status(request.model_spec.name, _version_of(request.model_spec))


def grpc_server(predictor: Predictor, max_receive_bytes: int, max_send_bytes: int,
                threads: int) -> grpc.Server:
    """A gRPC server with both services added, not yet bound or started."""
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", max_receive_bytes),
                 ("grpc.max_send_message_length", max_send_bytes),
                 # gRPC shares a port with SO_REUSEPORT by default: a second server on a
                 # taken port would split the clients with the first, without an error
                 ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(predictor), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(predictor.registry), server)
    return server
