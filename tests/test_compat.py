"""hagan_tf._compat: one probe for each private TensorFlow/Keras API, so an upgrade fails here."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from hagan_tf import _compat


def test_onednn_is_detected_from_tensorflow():
    # onednn_enabled reads a private TF function: if it moved, every oneDNN CPU would fall back
    # to the rewrites (2x slower in bfloat16) without a word. A fresh process, as TF reads the
    # variable once.
    assert callable(_compat.mkl_enabled_function())  # raises if TF moved it
    code = "from hagan_tf._compat import onednn_enabled; print(onednn_enabled())"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "True"


def test_in_xla_context_tells_a_jit_compiled_trace():
    seen = {}

    def probe(key):
        seen[key] = _compat.in_xla_context()
        return tf.constant(0)

    probe("eager")
    tf.function(lambda: probe("graph"))()
    tf.function(lambda: probe("xla"), jit_compile=True)()
    assert seen == {"eager": False, "graph": False, "xla": True}


def test_xla_dynamic_slices_take_the_start_as_data():
    x = tf.reshape(tf.range(2 * 6 * 3, dtype=tf.float32), (2, 6, 3))
    start = tf.Variable(2)

    @tf.function(jit_compile=True)
    def cut():
        begin = tf.stack([0, start, 0])
        part = _compat.xla_dynamic_slice(x, begin, tf.constant([2, 3, 3]))
        return part, _compat.xla_dynamic_update_slice(tf.zeros_like(x), part, begin)

    part, placed = cut()
    np.testing.assert_array_equal(part, x[:, 2:5])
    expected = np.zeros(x.shape, np.float32)
    expected[:, 2:5] = x[:, 2:5]
    np.testing.assert_array_equal(placed, expected)


def test_report_error_to_cluster_reaches_the_coordination_service():
    # Outside a multi-worker cluster the service is off: TF's own refusal shows the call got there.
    with pytest.raises(tf.errors.FailedPreconditionError, match="[Cc]oordination service"):
        _compat.report_error_to_cluster(tf.errors.ABORTED, "probe")


def test_xplane_traces_parse_into_top_ops(tmp_path):
    from hagan_tf.training.callbacks import top_ops

    xplane = _compat.xplane_pb2()
    space = xplane.XSpace()
    plane = space.planes.add(name="/host:CPU")
    plane.event_metadata[1].name = "model/conv:Conv3D"
    plane.event_metadata[2].name = "ExecutorState::Process"
    line = plane.lines.add()
    line.events.add(metadata_id=1, duration_ps=3 * 10**9)
    line.events.add(metadata_id=1, duration_ps=10**9)
    line.events.add(metadata_id=2, duration_ps=10**12)
    path = tmp_path / "host.xplane.pb"
    path.write_bytes(space.SerializeToString())
    assert top_ops([str(path)], 5) == [("Conv3D", 4.0, 2)]


@pytest.mark.parametrize("kind,shape", [("Conv3D", (None, 5, 5, 5, 2)), ("Dense", (None, 2)),
                                         ("SNConv3D", (None, 5, 5, 5, 2)), ("SNDense", (None, 2))])
def test_kernel_variable_is_the_stored_kernel(kind, shape):
    from hagan_tf import layers

    cls = getattr(layers, kind, None) or getattr(keras.layers, kind)
    layer = cls(4, 3) if "Conv" in kind else cls(4)
    layer.build(shape)
    var = _compat.kernel_variable(layer)
    assert any(var is w for w in layer.trainable_weights)
    np.testing.assert_array_equal(np.asarray(layer.kernel), np.asarray(var))


@pytest.mark.parametrize("beta_1", [0.0, 0.9])  # hagan_tf's moment-free Adam, Keras's own
def test_variable_index_finds_each_variables_slot(beta_1):
    from hagan_tf.optimizers import Adam

    variables = [keras.Variable(np.zeros((3, 2), np.float32)), keras.Variable(np.zeros(5, np.float32))]
    opt = Adam(beta_1=beta_1)
    opt.build(variables)
    for v in variables:
        assert opt._velocities[_compat.variable_index(opt, v)].shape == v.shape


def test_flatten_layers_reaches_nested_layers():
    inner = keras.Sequential([keras.layers.Dense(3, name="deep")], name="inner")
    outer = keras.Sequential([keras.Input((2,)), inner], name="outer")
    names = [layer.name for layer in _compat.flatten_layers(outer)]
    assert names[0] == "outer" and {"inner", "deep"} <= set(names)


def test_every_private_override_still_overrides():
    import hagan_tf.gan  # noqa: F401  (registers its overrides)
    import hagan_tf.optimizers  # noqa: F401

    found = {(base.__name__, name) for base, name, _ in _compat.PRIVATE_OVERRIDES}
    assert found >= {("Model", "_maybe_symbolic_build"), ("Adam", "_distributed_tf_update_step"),
                     ("LossScaleOptimizer", "_stateful_handle_non_finite_grads")}
    for base, name, fn in _compat.PRIVATE_OVERRIDES:
        assert _compat.override_problem(base, name, fn) is None


def test_a_vanished_private_method_is_reported():
    class Base:
        def _hook(self, a):
            pass

    def _gone(self):
        pass

    def _hook(self, a, b):
        pass

    assert "is gone" in _compat.override_problem(Base, "_gone", _gone)
    assert "now takes ['self', 'a']" in _compat.override_problem(Base, "_hook", _hook)
    count = len(_compat.PRIVATE_OVERRIDES)
    with pytest.warns(RuntimeWarning, match="Base._gone is gone"):
        _compat.private_override(Base)(_gone)
    del _compat.PRIVATE_OVERRIDES[count:]


def test_keras_calls_the_adam_override(monkeypatch):
    from hagan_tf.optimizers import Adam

    calls = []
    original = Adam._distributed_tf_update_step

    def spy(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(Adam, "_distributed_tf_update_step", spy)
    var = keras.Variable(np.ones(4, np.float32))
    opt = Adam(learning_rate=0.1, beta_1=0.0)
    opt.apply([tf.ones(4)], [var])
    assert len(calls) == 1
    assert np.all(np.asarray(var) < 1)


def test_keras_calls_the_loss_scale_override():
    # A skipped (non-finite) step still counts: the inner optimizer's iterations move on.
    from hagan_tf.optimizers import Adam, LossScaleOptimizer

    var = keras.Variable(np.ones(4, np.float32))
    opt = LossScaleOptimizer(Adam(beta_1=0.0))
    opt.apply([tf.constant([np.inf, 0, 0, 0], tf.float32)], [var])
    assert int(opt.inner_optimizer.iterations) == 1
    np.testing.assert_array_equal(np.asarray(var), np.ones(4))
