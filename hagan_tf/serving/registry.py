"""The model registry of `hagan-serve`: the newest loadable version of each model under a model
base, loaded and warmed up aside, then swapped in, so a request never meets a half-loaded one."""

from __future__ import annotations

import logging
import os
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from ..layout import versions
from . import ServingError, shown
from .warmup import replay_warmup

log = logging.getLogger("hagan_tf.serving")


class Servable:
    """One loaded version: its signature functions, their input specs and signature defs."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.loaded = tf.saved_model.load(path)  # keeps the variables alive
        self.functions = dict(self.loaded.signatures)
        self.inputs = {k: dict(f.structured_input_signature[1]) for k, f in self.functions.items()}
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signature_defs = get_model_metadata_pb2.SignatureDefMap()
        for k, v in proto.meta_graphs[0].signature_def.items():
            self.signature_defs.signature_def[k].CopyFrom(v)
        self.sample_voxels = {k: _sample_voxels(f) for k, f in self.functions.items()}


def _sample_voxels(function) -> int | None:
    """The largest input or output of one sample (its elements), which sizes an execution;
    None when an output has no batch dimension, so that a batch cannot run in groups."""
    outputs = tf.nest.flatten(function.structured_outputs)
    if not all(s.shape.rank for s in outputs):
        return None
    specs = list(function.structured_input_signature[1].values()) + outputs
    return max(int(np.prod([d or 1 for d in s.shape[1:]])) for s in specs if s.shape.rank)


def _stamp(path: str) -> tuple:
    """Changes when a version directory is rewritten, so a failed load is retried then."""
    return tuple(os.path.getmtime(p) if os.path.exists(p) else None
                 for p in (path, os.path.join(path, "saved_model.pb"),
                           os.path.join(path, "variables")))


class ModelRegistry:
    """The newest loadable version of each model under the model base, refreshed on demand."""

    def __init__(self, model_base: str, warmup: bool = True):
        self.model_base, self.warmup = model_base, warmup
        self._models: dict[str, Servable] = {}
        self._failed: dict[tuple[str, int], tuple[tuple, str]] = {}  # (name, v) -> (stamp, error)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    def refresh(self) -> None:
        with self._refresh_lock:
            names = sorted(n for n in os.listdir(self.model_base) if not n.startswith(".")
                           and os.path.isdir(os.path.join(self.model_base, n)))
            present = set()
            for name in names:
                model_dir = os.path.join(self.model_base, name)
                try:
                    listed = versions(model_dir)
                except Exception as e:  # noqa: BLE001 - e.g. a directory that cannot be read
                    log.error("cannot list the versions of %s: %s", model_dir, e)
                    if name in self._models:
                        present.add(name)  # keep serving what was loaded
                    continue
                loadable = [v for v in listed if not self._known_bad(name, v)]
                if not loadable:
                    continue
                present.add(name)
                current = self._models.get(name)
                for version in reversed(loadable):  # the newest that loads; a broken one falls back
                    if current is not None and current.version >= version:
                        break
                    if self._load(name, version):
                        break
            with self._lock:
                for name in set(self._models) - present:
                    log.info("model %s is gone from %s: unloaded", name, self.model_base)
                    del self._models[name]

    def _known_bad(self, name: str, version: int) -> bool:
        failed = self._failed.get((name, version))
        path = os.path.join(self.model_base, name, str(version))
        return failed is not None and failed[0] == _stamp(path)

    def _load(self, name: str, version: int) -> bool:
        path = os.path.join(self.model_base, name, str(version))
        log.info("loading %s version %d from %s", name, version, path)
        try:
            servable = Servable(name, version, path)
            # As TF Serving: the export's warmup requests run before the version is served
            # (the first real request then pays no tracing or kernel setup), and a failing
            # one fails the load.
            warmed = replay_warmup(servable) if self.warmup else 0
        except Exception as e:  # a broken export must not stop the others being served
            log.error("could not load %s version %d: %s", name, version, e)
            with self._lock:
                self._failed[(name, version)] = (_stamp(path), f"{type(e).__name__}: {e}")
            return False
        with self._lock:
            self._models[name] = servable
            self._failed.pop((name, version), None)
        log.info("serving %s version %d (%d warmup requests run)", name, version, warmed)
        return True

    def get(self, name: str, version: int | None = None) -> Servable:
        with self._lock:
            servable = self._models.get(name)
        if servable is None or (version is not None and servable.version != version):
            what = (f"Latest({shown(name)})" if version is None
                    else f"Specific({shown(name)}, {version})")
            raise ServingError("NOT_FOUND", f"Servable not found for request: {what}")
        return servable

    def status(self, name: str,
               version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        with self._lock:
            servable = self._models.get(name)
            failed = list(self._failed.items())
        response = get_model_status_pb2.GetModelStatusResponse()
        rows = {}
        for (n, v), (_, error) in failed:
            if n == name:
                rows[v] = (get_model_status_pb2.ModelVersionStatus.END, "UNKNOWN", error)
        if servable is not None:
            rows[servable.version] = (get_model_status_pb2.ModelVersionStatus.AVAILABLE, "OK", "")
        if version is not None:
            rows = {v: r for v, r in rows.items() if v == version}
        if not rows:
            if version is None:
                raise ServingError("NOT_FOUND",
                                   f"Could not find any versions of model {shown(name)}")
            raise ServingError("NOT_FOUND",
                               f"Could not find version {version} of model {shown(name)}")
        for v in sorted(rows, reverse=True):
            state, code, message = rows[v]
            status = response.model_version_status.add(version=v, state=state)
            status.status.error_code = getattr(grpc.StatusCode, code).value[0]
            status.status.error_message = message
        return response

    def names(self) -> list[str]:
        with self._lock:
            return [f"{n} v{s.version}" for n, s in sorted(self._models.items())]
