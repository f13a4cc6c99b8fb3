"""Issue 2: the networks — parameter counts, shapes, slab alignment, SN semantics, serialisation."""

import os

import numpy as np
import pytest
import tensorflow as tf

import keras
from keras import ops
from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.layers import SNConv3D, SNDense

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# Reference parameter counts (the authors' networks, docs/architecture.md), trainable only.
REFERENCE = {
    128: {"G^A": 52_392_256, "G^H": 56_257, "G^L": 69_697, "G": 52_518_210,
          "D^H": 4_599_073, "D^L": 2_642_369, "D": 7_241_442,
          "E^H": 161_152, "E^G": 19_663_168, "all": 79_583_972},
    256: {"G^A": 52_392_256, "G^H": 56_257, "G^L": 69_697, "G": 52_518_210,
          "D^H": 4_630_833, "D^L": 2_771_425, "D": 7_402_258,
          "E^H": 161_152, "E^G": 19_663_264, "all": 79_744_884},
}


@pytest.mark.parametrize("size", [128, 256])
def test_parameter_counts_match_reference(size):
    counts = HAGAN(HAGANConfig(size=size)).parameter_counts()
    assert {k: counts[k] for k in REFERENCE[size]} == REFERENCE[size]


def test_512_parameter_counts_and_shapes():
    """paper_512: the same G (the reference's 52.5M), one more stride-2 layer in D^H, D^L and E^G;
    shapes traced, not run: A and X^L at 128^3, slabs of 64 slices, a 512^3 volume."""
    cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, "paper_512.yaml"))
    gan = HAGAN(cfg)
    assert gan.parameter_counts() == {
        "G^A": 52_392_256, "G^L": 69_697, "G^H": 56_257, "G": 52_518_210,
        "D^H": 4_638_521, "D^L": 2_803_185, "D": 7_441_706,
        "E^H": 161_152, "E^G": 19_630_544, "all": 79_751_612}
    g = gan.generator
    z = tf.TensorSpec([1, cfg.latent_dim], tf.float32)
    assert g.common.compute_output_shape((1, cfg.latent_dim)) == (1, 128, 128, 128, 64)
    slab, low = tf.function(lambda z: g(z, crop=tf.constant(448))).get_concrete_function(z).outputs
    assert (slab.shape, low.shape) == ((1, 64, 512, 512, 1), (1, 128, 128, 128, 1))
    volume = tf.function(lambda z: g.volume(z)).get_concrete_function(z).outputs[0]
    assert volume.shape == (1, 512, 512, 512, 1)
    logit = tf.function(lambda s, l: gan.discriminator(s, l, tf.constant(448))).get_concrete_function(
        tf.TensorSpec(slab.shape), tf.TensorSpec(low.shape)).outputs[0]
    assert logit.shape == (1, 1)
    code = tf.function(lambda v: gan.encoder(v)).get_concrete_function(
        tf.TensorSpec([1, 512, 512, 512, 1])).outputs[0]
    assert code.shape == (1, 1024)


def test_first_dense_layer_size():
    gan = HAGAN(HAGANConfig(size=128))
    fc = gan.generator.common.get_layer("fc")
    assert sum(int(np.prod(w.shape)) for w in fc.trainable_weights) == 33_587_200


def small(size, classes=0, latent=16):
    return HAGANConfig(size=size, width=0.125, latent_dim=latent, num_classes=classes)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_every_mode(size, classes, batch):
    cfg = small(size, classes)
    gan = HAGAN(cfg)
    g, d, e = gan.generator, gan.discriminator, gan.encoder
    z = gan.sample_z(batch, seed=0)
    labels = np.arange(batch) % classes if classes else None
    s, a = size, size // 4

    full = gan.generate(z, labels)
    assert full.shape == (batch, s, s, s, 1)
    assert float(tf.reduce_max(tf.abs(full))) <= 1.0

    crop = tf.constant(cfg.max_crop)  # the last slab: the edge case of the slicing
    slab, low = g(z, labels=labels, crop=crop)
    assert slab.shape == (batch, s // 8, s, s, 1)
    assert low.shape == (batch, a, a, a, 1)

    feats = g.features(z, labels)
    assert feats.shape == (batch, a, a, a, g.feature_channels)
    assert g.decode(feats).shape == (batch, s, s, s, 1)
    assert g.preview(z, labels).shape == (batch, a, a, a, 1)

    out = d(slab, low, crop)
    if classes:
        assert out[0].shape == (batch, 1) and out[1].shape == (batch, classes)
    else:
        assert out.shape == (batch, 1)
    assert e.high_res(slab).shape == (batch, s // 32, a, a, g.feature_channels)
    assert e.features(full).shape == (batch, a, a, a, g.feature_channels)
    assert gan.encode(full).shape == (batch, cfg.latent_dim)


def test_generate_refuses_labels_that_one_hot_would_quietly_zero_or_ignore():
    gan = HAGAN(small(32, classes=2))
    z = gan.sample_z(2)
    with pytest.raises(ValueError, match="class-conditional: pass 2 labels in 0..1"):
        gan.generate(z)
    for bad, message in (([0, 2], r"in 0..1, got \[2\]"), ([-1, 0], r"got \[-1\]"),
                         ([0], "2 integers"), ([0.5, 1.0], "integers")):
        with pytest.raises(ValueError, match=message):
            gan.generate(z, labels=bad)
    assert gan.generate(z, labels=[1, 0]).shape == (2, 32, 32, 32, 1)
    plain = HAGAN(small(32))
    with pytest.raises(ValueError, match="unconditional"):
        plain.generate(plain.sample_z(1), labels=[0])


@pytest.mark.parametrize("crop", [0, 12, 28])
def test_training_slab_is_high_res_head_on_matching_feature_slab(crop):
    cfg = small(32)
    g = HAGAN(cfg).generator
    z = HAGAN.sample_z(HAGAN(cfg), 2, seed=1)
    slab, low = g(z, crop=tf.constant(crop))
    a = g.features(z)
    start, depth = crop // 4, cfg.size // 32
    np.testing.assert_allclose(slab, g.decode(a[:, start:start + depth]), atol=1e-6)
    np.testing.assert_allclose(low, g.low_res_head(a), atol=1e-6)
    # the slab covers voxels [crop, crop + S/8) of the volume: 4 output slices per A slice
    assert slab.shape[1] == 4 * depth == cfg.slab_depth


def test_low_res_head_sees_whole_feature_map_and_slab_sees_only_its_slab():
    cfg = small(64)
    g = HAGAN(cfg).generator
    a = g.features(HAGAN(cfg).sample_z(1, seed=2)).numpy()
    crop, depth = 8, cfg.size // 32
    b = a.copy()
    b[:, -1] += 5.0  # perturb A far from the slab at crop 8 (A slices 2..3)
    slab_a = g.decode(a[:, crop // 4:crop // 4 + depth])
    slab_b = g.decode(b[:, crop // 4:crop // 4 + depth])
    np.testing.assert_array_equal(slab_a, slab_b)
    assert np.abs(g.low_res_head(a) - g.low_res_head(b)).max() > 1e-3


def _power_iteration(w_mat, u):
    v = u @ w_mat.T
    v /= np.linalg.norm(v)
    u2 = v @ w_mat
    u2 /= np.linalg.norm(u2)
    return float(((v @ w_mat) @ u2.T)[0, 0]), u2


def test_spectral_norm_matches_reference_semantics():
    layer = SNConv3D(6, 3, padding="same")
    x = tf.random.stateless_normal((2, 5, 5, 5, 4), [1, 2])
    layer.build(x.shape)
    w = layer._kernel.numpy()
    u0 = layer.u.numpy()
    sigma, u1 = _power_iteration(w.reshape(-1, 6), u0)

    # inference: divides by sigma from stored u, does not touch u
    y = layer(x, training=False)
    expect = tf.nn.conv3d(x, w / sigma, [1] * 5, "SAME") + layer.bias
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    np.testing.assert_array_equal(layer._kernel.numpy(), w)  # stored kernel is never rescaled

    # training: same output, u advances by one power iteration
    layer(x, training=True)
    np.testing.assert_allclose(layer.u.numpy(), u1, rtol=1e-5, atol=1e-6)

    # repeated training passes: sigma converges to the largest singular value
    for _ in range(500):
        layer.sigma(training=True)
    top = np.linalg.svd(w.reshape(-1, 6), compute_uv=False)[0]
    np.testing.assert_allclose(float(layer.sigma()), top, rtol=1e-4)


def test_spectral_norm_passes_gradient_through_sigma():
    layer = SNDense(3)
    layer.build((None, 4))
    x = tf.random.stateless_normal((5, 4), [3, 4])
    u = tf.constant(layer.u.numpy())

    def reference(k):  # W / sigma(W), u and v held constant (no_grad), as in the reference
        v = tf.stop_gradient(tf.math.l2_normalize(u @ tf.transpose(k)))
        u2 = tf.stop_gradient(tf.math.l2_normalize(v @ k))
        return tf.reduce_sum(tf.square(x @ (k / tf.reduce_sum((v @ k) * u2))))

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x)))
    ours = tape.gradient(loss, layer._kernel)
    k = tf.constant(layer._kernel.numpy())
    with tf.GradientTape() as tape:
        tape.watch(k)
        ref = reference(k)
    np.testing.assert_allclose(ours, tape.gradient(ref, k), rtol=1e-4, atol=1e-6)
    # ... and differs from treating sigma as a constant (what keras.layers.SpectralNormalization does)
    sigma = float(layer.sigma())
    with tf.GradientTape() as tape:
        tape.watch(k)
        const = tf.reduce_sum(tf.square(x @ (k / sigma)))
    assert np.abs(ours - tape.gradient(const, k)).max() > 1e-4


def test_keras_save_load_round_trip(tmp_path):
    cfg = small(32, classes=2)
    gan = HAGAN(cfg)
    z = gan.sample_z(2, seed=3)
    labels = np.array([0, 1])
    vol = np.asarray(gan.generate(z, labels))
    crop = tf.constant(8)
    slab, low = gan.generator(z, labels=labels, crop=crop)
    gan.discriminator(slab, low, crop, training=True)  # move u away from its initial value
    path = str(tmp_path / "hagan.keras")
    gan.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.config == cfg
    np.testing.assert_array_equal(loaded.generate(z, labels), vol)
    np.testing.assert_array_equal(loaded.encode(vol), gan.encode(vol))
    for a, b in zip(loaded.discriminator(slab, low, crop), gan.discriminator(slab, low, crop)):
        np.testing.assert_array_equal(a, b)
    for layer in (gan.generator, gan.discriminator, gan.encoder):
        assert layer.get_config()["config"] == cfg.to_dict()


def test_larger_sizes_extend_the_same_layer_lists():
    # 512: one more stride-2 conv in D^H's stem, D^L and E^G, every G^A stage upsamples
    cfg = HAGANConfig(size=512, width=0.125, latent_dim=16)
    gan = HAGAN(cfg)
    assert len(gan.discriminator.high_res.convs.layers) == 4 + 4 + 1  # stem, tail, flatten
    assert len(gan.discriminator.low_res.convs.layers) == 5 + 1 + 1
    assert gan.generator.common.output_shape == (None, 128, 128, 128, 8)
    assert gan.encoder.ground.output_shape == (None, 16)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(16, 8), (8, 1), (16, 3)])  # parity convs; one conv
def test_fused_upsample_conv_equals_upsample_then_conv(c_in, c_out, graph):
    from hagan_tf.conv_rewrites import upsample_conv3d

    x = tf.random.stateless_normal((2, 3, 4, 5, c_in), [5, 6])
    k = tf.random.stateless_normal((3, 3, 3, c_in, c_out), [7, 8])

    def naive(x, k):
        up = tf.repeat(tf.repeat(tf.repeat(x, 2, 1), 2, 2), 2, 3)
        return tf.nn.conv3d(up, k, [1] * 5, "SAME")

    def values_and_grads(x, k):
        out = []
        for f in (naive, upsample_conv3d):
            with tf.GradientTape() as tape:
                tape.watch([x, k])
                y = f(x, k)
                loss = tf.reduce_sum(tf.sin(y))
            out.append([y, *tape.gradient(loss, [x, k])])
        return out

    (a, *ga), (b, *gb) = (tf.function(values_and_grads) if graph else values_and_grads)(x, k)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    for g_ref, g in zip(ga, gb):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(tf.reduce_max(tf.abs(g_ref))))


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 8, 6, 10, 3), 3, 1, "SAME"),     # ConvBlock
    ((2, 8, 6, 10, 7), 3, 1, "SAME"),     # fewer output channels: the kernel gradient pads dy
    ((1, 4, 5, 4, 7), 2, 1, "SAME"),
    ((2, 5, 7, 6, 3), 2, 1, "VALID"),     # the parity convolutions of upsample_conv3d
    ((1, 4, 4, 4, 2), 2, 1, "SAME"),      # even kernel, uneven SAME padding
    ((2, 5, 7, 6, 2), 4, 1, "VALID"),
    ((2, 4, 4, 4, 3), 4, 1, "VALID"),     # D^L's and E^G's last layers: a matmul
    ((3, 2, 3, 4, 3), (2, 3, 4), 2, "VALID"),
    ((2, 8, 6, 10, 3), 4, 2, "SAME"),     # D, E^H, E^G: stride 2 via space-to-depth
    ((1, 8, 8, 8, 3), 4, 2, "VALID"),
    ((2, 9, 9, 9, 2), 4, 2, "SAME"),      # odd input: TF's own strided convolution
])
def test_conv3d_values_and_gradients_equal_tf(shape, kernel, strides, padding):
    from hagan_tf.conv_rewrites import rewritten_conv3d as conv3d  # the rewrite, whatever the CPU

    x = tf.random.stateless_normal(shape, [1, 2])
    kernel = kernel if isinstance(kernel, tuple) else (kernel,) * 3
    k = tf.random.stateless_normal(kernel + (shape[-1], 5), [3, 4])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, k])
        ref = tf.nn.conv3d(x, k, [1, strides, strides, strides, 1], padding)
        out = conv3d(x, k, strides, padding)
        l_ref, l_out = tf.reduce_sum(tf.sin(ref)), tf.reduce_sum(tf.sin(out))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for var in (x, k):
        g_ref, g_out = tape.gradient(l_ref, var), tape.gradient(l_out, var)
        np.testing.assert_allclose(g_out, g_ref, rtol=1e-5, atol=1e-5 * float(tf.reduce_max(tf.abs(g_ref))))


def test_with_a_gpu_visible_conv_blocks_use_tf_own_convolutions(monkeypatch):
    # The CPU rewrites are slower than cuDNN's kernels: with a GPU, TF's ops and gradients.
    import hagan_tf.conv_rewrites as C
    import hagan_tf.layers as L

    block = L.ConvBlock(8, upsample=True, post="none")  # 8 outputs: parity convolutions on CPU
    block.build((None, 8, 8, 8, 3))
    x = tf.random.stateless_normal((2, 8, 8, 8, 3), [4, 2])

    def run(rewrite):
        monkeypatch.setattr(C, "rewrites_on", lambda dtype=None: rewrite)

        @tf.function
        def f(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.sin(block(x, training=True)))  # (inference always fuses)
            return loss, tape.gradient(loss, [x, block.conv.kernel])
        graph = f.get_concrete_function(x).graph.as_graph_def()
        ops_used = [n.op for n in graph.node] + [n.op for g in graph.library.function for n in g.node_def]
        return f(x), ops_used

    (loss_cpu, grads_cpu), ops_cpu = run(True)
    (loss_gpu, grads_gpu), ops_gpu = run(False)
    backprops = {"Conv3DBackpropInputV2", "Conv3DBackpropFilterV2"}
    assert backprops <= set(ops_gpu) and not backprops & set(ops_cpu)
    assert ops_gpu.count("Conv3D") == 1  # upsample, then one convolution (not 8 parity ones)
    np.testing.assert_allclose(loss_gpu, loss_cpu, rtol=1e-4)
    for g_cpu, g_gpu in zip(grads_cpu, grads_gpu):
        np.testing.assert_allclose(g_gpu, g_cpu, rtol=1e-4, atol=1e-4 * float(tf.reduce_max(tf.abs(g_cpu))))


def test_conv_rewrites_follow_the_device_unless_forced(monkeypatch):
    import hagan_tf._compat as compat
    from hagan_tf.conv_rewrites import CONV_REWRITES_ENV
    from hagan_tf.conv_rewrites import rewrites_on as _rewrite_convs

    monkeypatch.delenv(CONV_REWRITES_ENV, raising=False)
    monkeypatch.setattr(compat, "onednn_enabled", lambda: False)
    assert _rewrite_convs() is True  # Eigen's CPU kernels: the tests see no GPU
    monkeypatch.setattr(compat, "onednn_enabled", lambda: True)
    assert _rewrite_convs() is False  # oneDNN's kernels and gradients
    assert _rewrite_convs(tf.bfloat16) is True  # oneDNN's bfloat16 filter gradient gave NaN
    monkeypatch.setenv(CONV_REWRITES_ENV, "0")
    assert _rewrite_convs() is False
    monkeypatch.setenv(CONV_REWRITES_ENV, "1")
    assert _rewrite_convs() is True


def test_a_float64_model_stays_float64_in_the_lean_ops_and_the_rewrites():
    # The step-parity test trains in float64: every upcast is "at least float32", and the ops
    # with hand-written gradients and the CPU rewrites compute in their input's type.
    from hagan_tf.conv_rewrites import rewritten_conv3d, upsample_conv3d
    from hagan_tf.dtypes import at_least_float32
    from hagan_tf.lean_ops import group_norm_op, leaky_relu

    assert [at_least_float32(t) for t in ("float16", "bfloat16", "float32", "float64")] == [
        tf.float32, tf.float32, tf.float32, tf.float64]
    x = tf.random.stateless_normal((2, 4, 6, 4, 8), [1, 2], dtype=tf.float64)
    k3 = tf.random.stateless_normal((3, 3, 3, 8, 8), [3, 4], dtype=tf.float64)
    k4 = tf.random.stateless_normal((4, 4, 4, 8, 3), [5, 6], dtype=tf.float64)
    cases = {  # ours -> TF's own ops
        "leaky_relu": (lambda x: leaky_relu(x, 0.2), lambda x: tf.where(x > 0, x, 0.2 * x)),
        "group_norm": (lambda x: group_norm_op(x, tf.ones([8], x.dtype), tf.zeros([8], x.dtype), 4, 1e-5),
                       lambda x: tf.reshape(tf.nn.batch_normalization(
                           tf.reshape(x, (2, -1, 4, 2)), *tf.nn.moments(tf.reshape(x, (2, -1, 4, 2)),
                                                                       [1, 3], keepdims=True),
                           None, None, 1e-5), x.shape)),
        "conv 3^3": (lambda x: rewritten_conv3d(x, k3), lambda x: tf.nn.conv3d(x, k3, [1] * 5, "SAME")),
        "conv 4^3 stride 2": (lambda x: rewritten_conv3d(x, k4, 2),
                              lambda x: tf.nn.conv3d(x, k4, [1, 2, 2, 2, 1], "SAME")),
    }
    up = lambda x: tf.repeat(tf.repeat(tf.repeat(x, 2, 1), 2, 2), 2, 3)  # noqa: E731
    for c_out in (8, 1):  # parity convolutions; one convolution
        k = k3[..., :c_out]
        cases[f"upsample conv {c_out}"] = (lambda x, k=k: upsample_conv3d(x, k),
                                           lambda x, k=k: tf.nn.conv3d(up(x), k, [1] * 5, "SAME"))
    for name, (ours, ref) in cases.items():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y, y_ref = ours(x), ref(x)
            loss, loss_ref = tf.reduce_sum(tf.sin(y)), tf.reduce_sum(tf.sin(y_ref))
        g, g_ref = tape.gradient(loss, x), tape.gradient(loss_ref, x)
        assert y.dtype == g.dtype == tf.float64, name
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12, err_msg=name)


def test_upsample_nearest_equals_repeat_in_values_and_gradients():
    from hagan_tf.lean_ops import upsample_nearest

    x = tf.random.stateless_normal((2, 3, 4, 5, 6), [5, 6])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, ref = upsample_nearest(x), ops.repeat(ops.repeat(ops.repeat(x, 2, 1), 2, 2), 2, 3)
        l_ours, l_ref = tf.reduce_sum(tf.sin(ours) * ours), tf.reduce_sum(tf.sin(ref) * ref)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(tape.gradient(l_ours, x), tape.gradient(l_ref, x), rtol=1e-6)


def test_depth_slab_keeps_a_changing_start_out_of_xla_constants():
    """Under XLA the slab's start is data (one compilation for every r), and values and
    gradients equal tf.slice's, compiled or not."""
    from hagan_tf.lean_ops import depth_slab

    x = tf.random.stateless_normal((2, 16, 3, 4, 5), [1, 2])
    start = tf.Variable(0)

    def slab_and_grad(cut):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = cut(x, start * 4, 4)
            loss = tf.reduce_sum(tf.sin(y) * y)
        return y, tape.gradient(loss, x)

    def ref(x, s, d):
        return tf.slice(x, [0, s, 0, 0, 0], [-1, d, -1, -1, -1])

    xla = tf.function(lambda: slab_and_grad(depth_slab), jit_compile=True)
    graph = tf.function(lambda: slab_and_grad(depth_slab))
    xla_ref = tf.function(lambda: slab_and_grad(ref), jit_compile=True)
    hlo, hlo_ref = [], []
    for s in (1, 3):
        start.assign(s)
        hlo.append(xla.experimental_get_compiler_ir()(stage="hlo"))
        hlo_ref.append(xla_ref.experimental_get_compiler_ir()(stage="hlo"))
        y_ref, g_ref = slab_and_grad(ref)
        assert y_ref.shape == (2, 4, 3, 4, 5) and np.count_nonzero(g_ref) == y_ref.numpy().size
        for y, g in (xla(), graph()):
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)  # XLA's sin and cos
    assert hlo[0] == hlo[1]
    assert hlo_ref[0] != hlo_ref[1]  # what tf.slice does: the start is baked in


def test_leaky_relu_gradient_reads_the_output_and_equals_tf():
    from hagan_tf.lean_ops import leaky_relu

    x = tf.constant([-3.0, -0.5, 0.0, 0.25, 2.0])

    @tf.function
    def f(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            ours, ref = leaky_relu(x, 0.2), tf.nn.leaky_relu(x, 0.2)
            l_ours, l_ref = tf.reduce_sum(tf.sin(3 * ours)), tf.reduce_sum(tf.sin(3 * ref))
        return ours, ref, tape.gradient(l_ours, x), tape.gradient(l_ref, x)

    ours, ref, g_ours, g_ref = f(x)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(g_ours, g_ref)
    nodes = {n.name: n for n in f.get_concrete_function(x).graph.as_graph_def().node}
    grads = [n for n in nodes.values() if n.op == "LeakyReluGrad"]
    feature_ops = sorted(nodes[g.input[1].split(":")[0]].op for g in grads)
    assert feature_ops == ["LeakyRelu", "Placeholder"]  # ours reads y, TF's reads x


def test_conv_layers_use_the_lean_convolution_and_keep_their_weights():
    from hagan_tf.layers import Conv3D, ConvBlock, SNConv3D

    block = ConvBlock(8, 4, 2)
    block.build((None, 8, 8, 8, 2))
    assert isinstance(block.conv, Conv3D) and issubclass(SNConv3D, Conv3D)
    assert [w.shape for w in block.conv.weights] == [(4, 4, 4, 2, 8), (8,)]
    x = tf.random.stateless_normal((2, 8, 8, 8, 2), [9, 9])
    ref = keras.layers.Conv3D(8, 4, strides=2, padding="same")
    ref.build(x.shape)
    ref.set_weights(block.conv.get_weights())
    np.testing.assert_allclose(block.conv(x), ref(x), rtol=1e-5, atol=1e-5)


def test_group_norm_values_and_gradients_equal_autodiff():
    from hagan_tf.lean_ops import group_norm_op

    x = tf.random.stateless_normal((2, 3, 4, 5, 16), [1, 1]) * 3 + 1
    gamma = tf.random.stateless_normal((16,), [2, 2])
    beta = tf.random.stateless_normal((16,), [3, 3])

    def naive(x, gamma, beta):  # float64 autodiff of the definition
        xr = tf.reshape(x, (2, -1, 8, 2))
        mean, var = tf.nn.moments(xr, axes=[1, 3], keepdims=True)
        return tf.reshape((xr - mean) / tf.sqrt(var + 1e-5), x.shape) * gamma + beta

    args = (x, gamma, beta)
    args64 = [tf.cast(a, tf.float64) for a in args]
    w = tf.sin(tf.range(x.shape.num_elements(), dtype=tf.float32)) + 0.5
    w = tf.reshape(w, x.shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(args + tuple(args64))
        out = group_norm_op(*args, groups=8, epsilon=1e-5)
        ref = naive(*args64)
        l_out, l_ref = tf.reduce_sum(out * w), tf.reduce_sum(ref * tf.cast(w, tf.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for a, a64 in zip(args, args64):
        g, g_ref = tape.gradient(l_out, a), tape.gradient(l_ref, a64)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(tf.reduce_max(tf.abs(g_ref))))


def test_block_dense_is_one_dense_layer_held_in_column_blocks():
    from hagan_tf.layers import BlockDense

    layer = BlockDense(24, blocks=4, name="fc")
    layer.build((None, 5))
    assert [tuple(k.shape) for k in layer.kernels] == [(5, 6)] * 4 and layer.kernel.shape == (5, 24)
    full = np.random.default_rng(0).normal(size=(5, 24)).astype("float32")
    layer.assign_kernel(full)
    layer.bias.assign(np.arange(24, dtype="float32"))
    x = tf.random.stateless_normal((3, 5), [0, 1])
    np.testing.assert_allclose(layer(x), x.numpy() @ full + np.arange(24), rtol=1e-5, atol=1e-5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x)))
    grads = tape.gradient(loss, layer.kernels)
    dense_grad = x.numpy().T @ np.cos(x.numpy() @ full + np.arange(24))
    np.testing.assert_allclose(np.concatenate(grads, -1), dense_grad, rtol=1e-4, atol=1e-5)
    clone = BlockDense.from_config(layer.get_config())
    assert (clone.units, clone.blocks, clone.name) == (24, 4, "fc")
    with pytest.raises(ValueError, match="do not split"):
        BlockDense(10, blocks=4)


def test_checkpoint_holds_every_weight(tmp_path):
    """tf.train.Checkpoint only sees tracked attributes (a Python list of variables is skipped
    silently): a restored model must equal the saved one weight by weight."""
    saved, fresh = HAGAN(small(32)), HAGAN(small(32))
    path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=fresh).restore(path).assert_nontrivial_match()
    assert len(saved.weights) == len(fresh.weights)
    for a, b in zip(saved.weights, fresh.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)



def test_straight_through_tanh_keeps_values_and_passes_saturated_gradients():
    """g_output "tanh_st": the paper's tanh in values, but in training a voxel in saturation
    still gets D's gradient (tanh's own is ~0 there); outside training it is the plain tanh."""
    from hagan_tf.layers import ConvBlock

    x = tf.constant(np.random.default_rng(0).normal(0, 4, (2, 4, 4, 4, 3)), tf.float32)
    paper, st = ConvBlock(1, post="tanh"), ConvBlock(1, post="tanh_st")
    paper.build(x.shape)
    st.build(x.shape)
    st.set_weights(paper.get_weights())
    for training in (False, True):
        np.testing.assert_allclose(st(x, training=training), paper(x, training=training), atol=1e-5)
    with tf.GradientTape(persistent=True) as tape:
        pre = paper.conv(x)
        y_paper, y_st = paper(x, training=True), st(x, training=True)
    assert float(tf.reduce_max(tf.abs(pre))) > 5  # some outputs are saturated
    g_paper = tape.gradient(y_paper, paper.conv.kernel)
    g_st = tape.gradient(y_st, st.conv.kernel)
    g_linear = tape.gradient(pre, paper.conv.kernel)  # the straight-through gradient
    np.testing.assert_allclose(g_st, g_linear, rtol=1e-5, atol=1e-5)
    assert not np.allclose(g_paper, g_st, rtol=0.05)
    gen = HAGAN(HAGANConfig(size=32, latent_dim=8, width=0.125, g_output="tanh_st")).generator
    assert gen.high_res_head.layers[-1].post == gen.low_res_head.layers[-1].post == "tanh_st"
    with pytest.raises(ValueError, match="g_output"):
        HAGANConfig(g_output="linear")


def test_inward_tanh_passes_only_the_gradient_that_leaves_saturation():
    """g_output "tanh_inward": tanh's values; a step that would pull a saturated output back
    toward 0 gets at least INWARD_SLOPE, one that would push it further out gets tanh's own
    ~0; inside the data's range the gradient is tanh's."""
    from hagan_tf.layers import INWARD_SLOPE, ConvBlock, tanh_inward

    x = tf.constant([-6.0, -6.0, 0.0, 0.0, 6.0, 6.0, 0.5, -1.0])
    g = tf.constant([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 2.0, -3.0])  # dLoss/dy; descent: y - g
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tanh_inward(x)
        loss = tf.reduce_sum(y * g)
    np.testing.assert_allclose(y, np.tanh(x.numpy()), rtol=1e-6)
    grad = tape.gradient(loss, x).numpy()
    slope = 1 - np.tanh(x.numpy()) ** 2
    # at -6: g=-1 raises y (inward) -> the floor; g=+1 lowers it (outward) -> tanh's ~0
    np.testing.assert_allclose(grad[:2], [-INWARD_SLOPE, slope[1]], rtol=1e-5)
    assert abs(grad[1]) < 1e-4 < INWARD_SLOPE
    np.testing.assert_allclose(grad[2:4], [-1.0, 1.0], rtol=1e-6)  # at 0 both slopes are 1
    np.testing.assert_allclose(grad[4:6], [-slope[4], INWARD_SLOPE], rtol=1e-5)
    np.testing.assert_allclose(grad[6:], g.numpy()[6:] * slope[6:], rtol=1e-5)  # in range: tanh's
    block = ConvBlock(1, post="tanh_inward")
    v = tf.constant(np.random.default_rng(0).normal(0, 4, (1, 4, 4, 4, 2)), tf.float32)
    np.testing.assert_allclose(block(v, training=True), block(v, training=False), atol=1e-6)
    gen = HAGAN(HAGANConfig(size=32, latent_dim=8, width=0.125, g_output="tanh_inward")).generator
    assert gen.high_res_head.layers[-1].post == "tanh_inward"
