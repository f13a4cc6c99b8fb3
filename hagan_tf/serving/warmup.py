"""TF Serving's warmup file: one PredictRequest per signature, replayed before a version serves.

Without it the first request to each signature pays for graph optimisation and kernel setup
(seconds at 256^3). TF Serving reads `V/assets.extra/tf_serving_warmup_requests`, a TFRecord
file of PredictionLog protos, runs each request at load and fails the load if one fails;
`hagan-serve` does the same (`replay_warmup`). The requests are built from the SavedModel's own
signature defs, so a signature added to the export is warmed without a change here: batch 1,
zeros, and for a string input the value its signature accepts (`STRING_VALUES`). Each tensor is
stored as one value repeated over its shape, so the file stays a few hundred bytes at 256^3.
"""

from __future__ import annotations

import logging
import os
import time

from ..layout import CONFIG_ASSET

log = logging.getLogger("hagan_tf.serving")

WARMUP_ASSET = os.path.join(os.path.dirname(CONFIG_ASSET), "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses a longer file
STRING_VALUES = {"format": b"yaml"}  # the `config` signature's only accepted value


def warmup_requests(export_dir: str) -> list:
    """A PredictRequest (batch 1) for each signature of the SavedModel at `export_dir`."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import predict_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    requests = []
    for name, signature in sorted(proto.meta_graphs[0].signature_def.items()):
        if name.startswith("__"):  # __saved_model_init_op and other internal entries
            continue
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = name
        for key, info in signature.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            shape = ([] if info.tensor_shape.unknown_rank
                     else [max(d.size, 1) for d in info.tensor_shape.dim])  # None -> 1
            value = (STRING_VALUES.get(key, b"") if dtype == tf.string
                     else False if dtype == tf.bool else 0)
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=dtype, shape=shape))
        requests.append(request)
    return requests


def write_warmup(export_dir: str) -> str:
    """Write `export_dir`/assets.extra/tf_serving_warmup_requests; returns its path."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_ASSET)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for request in warmup_requests(export_dir):
            log_entry = prediction_log_pb2.PredictionLog()
            log_entry.predict_log.request.CopyFrom(request)
            writer.write(log_entry.SerializeToString())
    return path


def read_warmup(export_dir: str) -> list:
    """The PredictRequests of a version's warmup file; [] when it has none (older exports)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_ASSET)
    if not tf.io.gfile.exists(path):
        return []
    requests = []
    for record in tf.data.TFRecordDataset(path):
        if len(requests) == MAX_WARMUP_RECORDS:
            raise ValueError(f"{path} holds more than {MAX_WARMUP_RECORDS} requests "
                             "(TF Serving's limit)")
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if entry.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: hagan-serve replays only predict_log entries, "
                             f"got {entry.WhichOneof('log_type')}")
        requests.append(entry.predict_log.request)
    return requests


def replay_warmup(servable) -> int:
    """Run each warmup request of `servable` (a registry.Servable) once; the number run.
    Any failure raises, which fails the load as in TF Serving."""
    import tensorflow as tf

    start = time.perf_counter()
    requests = read_warmup(servable.path)
    for request in requests:
        signature = request.model_spec.signature_name or "serving_default"
        if signature not in servable.functions:
            raise ValueError(f"warmup request for unknown signature {signature!r}")
        specs = servable.inputs[signature]
        if set(request.inputs) != set(specs):
            raise ValueError(f"warmup request for {signature!r} has inputs "
                             f"{sorted(request.inputs)}, the signature takes {sorted(specs)}")
        servable.functions[signature](**{
            k: tf.constant(tf.make_ndarray(v), dtype=specs[k].dtype)
            for k, v in request.inputs.items()})
    if requests:
        log.info("%s version %d: %d warmup requests in %.1f s", servable.name, servable.version,
                 len(requests), time.perf_counter() - start)
    return len(requests)
