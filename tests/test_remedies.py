"""Issue 20: the remedies against mode collapse (EMA of G, DiffAugment, R1, hinge, minibatch
std) and the collapse detector of hagan-train."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf import diffaugment
from hagan_tf.data.synthetic import write_synthetic_dataset
from hagan_tf.evaluation.metrics import mean_pairwise_l1
from hagan_tf.rundir import load_hagan
from hagan_tf.serving import export
from hagan_tf.training.callbacks import CollapseDetector
from hagan_tf.training.cli import train


def tiny(**kw):
    base = dict(size=32, width=0.125, latent_dim=16, batch_size=2, checkpoint_every=2,
                log_every=1, image_every=100, diversity_every=0)
    return HAGANConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data")), n=8, size=32, num_classes=2)


def _batch(n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 32, 1)).astype("float32")


# -- the switches ------------------------------------------------------------------------

def test_config_checks_the_remedies():
    for bad in (dict(loss="wgan"), dict(ema_decay=1.0), dict(r1_gamma=-1), dict(augment="flip"),
                dict(collapse_threshold=-0.1), dict(lambda_hist=-1)):
        with pytest.raises(ValueError):
            tiny(**bad)
    assert diffaugment.parse_ops(" translation, cutout ") == ("translation", "cutout")


@pytest.mark.parametrize("classes", [0, 2])
def test_every_switch_trains_finite_and_logs_its_terms(classes):
    cfg = tiny(num_classes=classes, loss="hinge", r1_gamma=1.0, augment="translation,cutout,intensity",
               ema_decay=0.9, minibatch_std=True, lambda_hist=1.0)
    gan = HAGAN(cfg)
    gan.compile()
    batch = {"volume": _batch()}
    if classes:
        batch["label"] = np.array([0, 1], np.int32)
    logs = gan.train_on_batch(batch, return_dict=True)
    assert {"d_real", "d_fake", "d_r1", "g_hist", "g_loss", "eh_loss", "eg_loss"} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["d_r1"] > 0 and logs["g_hist"] > 0
    assert all(np.all(np.isfinite(w.numpy())) for w in gan.weights)


def test_hinge_loss_is_the_hinge():
    gan = HAGAN(tiny(loss="hinge"))
    logits = tf.constant([[-2.0], [0.5], [3.0]])
    assert float(gan._d_loss_sum(logits, real=True)) == pytest.approx(3 + 0.5 + 0)
    assert float(gan._d_loss_sum(logits, real=False)) == pytest.approx(0 + 1.5 + 4)


def test_intensity_term_is_the_w1_of_the_pooled_voxel_values():
    """g_hist: 0 for any rearrangement of the real voxels (across positions and examples), the
    mean |shift| for a uniformly shifted batch, and a gradient that moves G's voxels."""
    from hagan_tf.gan import _intensity_w1_sum

    real = tf.constant(_batch(2, 1))
    shuffled = tf.reshape(tf.random.shuffle(tf.reshape(real, [-1]), seed=3), real.shape)
    assert float(_intensity_w1_sum(shuffled, real)) == pytest.approx(0.0, abs=1e-7)
    assert float(_intensity_w1_sum(real - 0.25, real)) == pytest.approx(2 * 0.25, rel=1e-5)
    gan = HAGAN(tiny(lambda_hist=1.0))
    gan.compile()
    before = [w.numpy() for w in gan.generator.trainable_weights]
    z = tf.constant(gan.sample_z(2, 0))
    crop = tf.constant(8)
    vol = tf.constant(_batch())
    logs = gan.g_update(None, crop, z, tf.constant(2.0), None, (vol, gan.real_slab(vol, crop), gan.real_low_res(vol)))
    assert float(logs["g_hist"]) > 0
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, gan.generator.trainable_weights))


def test_r1_penalty_is_half_gamma_times_the_squared_input_gradient():
    """d_r1 = gamma / 2 * mean over examples of |grad_x D(x)|^2, checked against a tape."""
    cfg = tiny(r1_gamma=4.0)
    gan = HAGAN(cfg)
    gan.compile()
    vol = tf.constant(_batch())
    crop = tf.constant(8)
    slab, low = gan.real_slab(vol, crop), gan.real_low_res(vol)
    u_before = [w.numpy() for w in gan.discriminator.non_trainable_weights]
    with tf.GradientTape() as tape:
        tape.watch([slab, low])
        total = tf.reduce_sum(gan.discriminator(slab, low, crop, training=False))
    expected = 0.5 * 4.0 * sum(float(tf.reduce_sum(g ** 2)) for g in tape.gradient(total, [slab, low])) / 2
    for w, u in zip(gan.discriminator.non_trainable_weights, u_before):  # the same sigma below
        w.assign(u)
    out = gan.d_update(slab, low, None, crop, gan.draw_z(0, 2, 0), 2.0)
    # d_update's power iteration moves u before its D call: allow that estimate's change
    assert float(out["d_r1"]) == pytest.approx(expected, rel=0.05)


def test_diffaugment_keeps_shapes_passes_gradients_and_draws_per_example():
    x = tf.constant(_batch(4))
    for op in diffaugment.OPS:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = diffaugment.augment(x, (op,), tf.constant([1, 2]))
            total = tf.reduce_sum(y * tf.random.stateless_uniform(y.shape, [0, 1]))
        assert y.shape == x.shape
        g = tape.gradient(total, x)
        assert g is not None and float(tf.reduce_sum(tf.abs(g))) > 0, op
        changed = [not np.allclose(y[i], x[i]) for i in range(4)]
        assert sum(changed) >= 3, op  # fresh parameters per example
    same = diffaugment.augment(x, diffaugment.OPS, tf.constant([1, 2]))
    np.testing.assert_array_equal(same, diffaugment.augment(x, diffaugment.OPS, tf.constant([1, 2])))
    # translation fills with air, cutout with 0
    moved = diffaugment.translation(tf.zeros((8, 4, 32, 32, 1)), tf.constant([3, 4]))
    assert float(tf.reduce_min(moved)) == -1.0
    cut = diffaugment.cutout(tf.ones((2, 4, 32, 32, 1)), tf.constant([3, 4]))
    assert 0.74 <= float(tf.reduce_mean(cut)) < 0.99  # a quarter, less where the box leaves the volume


def test_minibatch_std_lets_d_tell_a_repeated_batch_from_a_varied_one():
    gan = HAGAN(tiny(minibatch_std=True))
    layer = gan.discriminator.low_res.convs.get_layer("minibatch_std")
    x = tf.constant(_batch(4)[:, :4, :4, :4])
    assert float(tf.reduce_max(layer(tf.repeat(x[:1], 4, axis=0))[..., -1])) < 1e-3
    assert float(tf.reduce_min(layer(x)[..., -1])) > 0.3
    assert "minibatch_std" in [l.name for l in gan.discriminator.high_res.convs.layers]


# -- EMA ----------------------------------------------------------------------------------

def test_ema_follows_the_generator_and_sampling_uses_it(data, tmp_path):
    cfg = tiny(ema_decay=0.5, max_steps=3)
    run = str(tmp_path / "run")
    result = train(cfg, data, run, tf.distribute.get_strategy(), progress=False)
    gan = result["model"]
    raw = [w.numpy() for w in gan.generator.weights]
    ema = [w.numpy() for w in gan.ema.weights]
    assert not all(np.array_equal(a, b) for a, b in zip(raw, ema))
    sampler, _ = load_hagan(run)
    for w, e in zip(sampler.generator.weights, ema):
        np.testing.assert_array_equal(w.numpy(), e)
    plain, _ = load_hagan(run, ema=False)
    for w, r in zip(plain.generator.weights, raw):
        np.testing.assert_array_equal(w.numpy(), r)
    # hagan-export exports the moving average
    base = str(tmp_path / "models")
    assert export.main(["--run", run, "--model-base", base]) == 0
    loaded = tf.saved_model.load(f"{base}/hagan/3")
    z = sampler.sample_z(2, seed=0)
    served = loaded.signatures["generate"](z=tf.constant(z))["volume"].numpy()
    np.testing.assert_allclose(served, np.asarray(sampler.generate(z)), atol=1e-5)
    assert np.abs(served - np.asarray(plain.generate(z))).max() > 1e-4


def test_ema_decay_warms_up_from_the_first_step():
    """The average forgets the initial weights early: decay min(d, (1+t)/(10+t))."""
    gan = HAGAN(tiny(ema_decay=0.999))
    gan.compile()
    before = [w.numpy() for w in gan.ema.weights]
    gan.train_on_batch({"volume": _batch()})
    g = [w.numpy() for w in gan.generator.weights]
    e = [w.numpy() for w in gan.ema.weights]
    # t = 1 after the first G step: decay (1 + 1) / (10 + 1)
    d = 2 / 11
    for b, gi, ei in zip(before, g, e):
        np.testing.assert_allclose(ei, d * b + (1 - d) * gi, rtol=1e-5, atol=1e-6)


def test_resumed_ema_equals_uninterrupted_ema(data, tmp_path):
    cfg = tiny(ema_decay=0.9, max_steps=4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    strategy = tf.distribute.get_strategy()
    ema_a = train(cfg, data, a, strategy, progress=False)["model"].ema
    train(cfg.replace(max_steps=2), data, b, strategy, progress=False)
    ema_b = train(cfg, data, b, strategy, progress=False)["model"].ema
    for x, y in zip(ema_a.weights, ema_b.weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ema_a.weights[0].numpy(), HAGAN(cfg).ema.weights[0].numpy())


def test_d_steps_runs_k_d_updates_on_their_own_batches_then_one_g_update():
    """d_steps=2 (n_critic): one iteration = D on the first half of the batch, then the paper's
    iteration on the second half; the same as doing those by hand with d_steps=1."""
    rng = np.random.default_rng(1)
    x = _batch(4, seed=3)
    z_d = rng.standard_normal((4, 16)).astype("float32")
    z_g = rng.standard_normal((2, 16)).astype("float32")
    crop = np.array([8, 8, 8, 8], np.int32)
    two, one = HAGAN(tiny(d_steps=2, loss="hinge", ema_decay=0.9)), HAGAN(tiny(loss="hinge", ema_decay=0.9))
    one.set_weights(two.get_weights())
    two.compile()
    one.compile()
    two.train_on_batch({"volume": x, "crop": crop, "z_d": z_d, "z_g": z_g})
    r = tf.constant(8)
    one.d_update(one.real_slab(x[:2], r), one.real_low_res(x[:2]), None, r, z_d[:2],
                 tf.constant(2.0))
    one.train_on_batch({"volume": x[2:], "crop": crop[:2], "z_d": z_d[2:], "z_g": z_g})
    assert int(two.step) == 1 and int(two.d_optimizer.iterations) == 2
    assert int(two.g_optimizer.iterations) == int(two.eh_optimizer.iterations) == 1
    assert int(one.d_optimizer.iterations) == 2
    # A conv bias feeding a GroupNorm with one channel to a group has a zero gradient in exact
    # arithmetic, so Adam turns rounding noise (which differs between the two orders of work)
    # into steps far below lr: those must only stay that small. Elsewhere the same rounding
    # noise, through Adam's normalised step, moves a few weights by ~1e-6 under oneDNN
    # (AVX-512); a wrong order of updates would move them by ~lr (1e-4).
    per_channel = {f"{b}/conv/bias" for b in ("common/block5", "low_res_head/block1",
                                              "low_res_head/block2", "high_res_head/block1")}
    noise = 0
    for a, b in zip(two.weights, one.weights):
        if a.path in per_channel:
            assert a.shape[-1] == two.config.g_norm_groups, a.path
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
            noise += 1
        else:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=5e-6, err_msg=a.path)
    assert noise == 8  # in G and in its EMA copy
    with pytest.raises(ValueError, match="d_steps"):
        tiny(d_steps=0)


def test_d_window_adds_the_stretched_dark_range_as_a_second_channel():
    """d_window "-1,-0.6": D^H and D^L see the volume and, beside it, [-1, -0.6] stretched to
    [-1, 1], so air (-0.97) and lung (-0.8) are 0.85 apart instead of 0.17."""
    from hagan_tf.layers import IntensityWindow

    x = tf.constant([-1.0, -0.97, -0.8, -0.6, 0.3, 1.0])[None, :, None]
    out = IntensityWindow(-1.0, -0.6)(x).numpy()[0]
    np.testing.assert_allclose(out[:, 0], x.numpy()[0, :, 0])
    np.testing.assert_allclose(out[:, 1], [-1.0, -0.85, 0.0, 1.0, 1.0, 1.0], atol=1e-6)
    gan = HAGAN(tiny(d_window="-1,-0.6", minibatch_std=True))
    for net in (gan.discriminator.high_res, gan.discriminator.low_res):
        first = [l for l in net.convs.layers if hasattr(l, "conv")][0]
        assert first.conv.kernel.shape[-2] == 2  # the volume and its window
    gan.compile()
    logs = gan.train_on_batch({"volume": _batch()}, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    assert HAGAN(tiny()).discriminator.high_res.convs.layers[0].conv.kernel.shape[-2] == 1
    # several windows: one channel each, every one from the volume itself
    two = HAGAN(tiny(d_window="-1,-0.6;0.1,0.9")).discriminator.high_res
    windows = [l for l in two.convs.layers if isinstance(l, IntensityWindow)]
    assert [(w.low, w.high) for w in windows] == [(-1.0, -0.6), (0.1, 0.9)]
    out = x
    for w in windows:
        out = w(out)
    np.testing.assert_allclose(out.numpy()[0, :, 2], [-1, -1, -1, -1, -0.5, 1], atol=1e-6)
    assert [l for l in two.convs.layers if hasattr(l, "conv")][0].conv.kernel.shape[-2] == 3
    for bad in ("-0.6,-1", "1", "a,b", "-1,-0.6;", "-1,-0.6;1,0"):
        with pytest.raises(ValueError, match="d_window"):
            tiny(d_window=bad)


def test_intensity_map_g_works_in_f_and_d_optionally_sees_it_in_every_path():
    """intensity_map "-1,-1;-0.6,0;1,1": G's tanh outputs go through f^-1 (air -0.97 -> -0.93,
    lung -0.8 -> -0.5 to the tanh); with intensity_map_d D's first layer maps volumes through
    f, so D sees G's tanh itself. Whole, tiled and saved models give the same volumes in the
    usual units."""
    from hagan_tf.layers import IntensityMap

    knots = "-1,-1;-0.6,0;1,1"
    f = IntensityMap([(-1, -1), (-0.6, 0), (1, 1)])
    x = tf.constant([-1.2, -1.0, -0.97, -0.8, -0.6, 0.2, 1.0, 1.1])
    np.testing.assert_allclose(f(x).numpy(), [-1.5, -1, -0.925, -0.5, 0, 0.5, 1, 1.0625], atol=1e-6)
    back = IntensityMap(f.knots, inverse=True)
    np.testing.assert_allclose(back(f(x)).numpy(), x.numpy(), atol=1e-6)
    g_only, gan = HAGAN(tiny(intensity_map=knots)), HAGAN(tiny(intensity_map=knots, intensity_map_d=True))
    for net in (gan.discriminator.high_res, gan.discriminator.low_res):
        assert isinstance(net.convs.layers[0], IntensityMap) and not net.convs.layers[0].inverse
    assert not any(isinstance(layer, IntensityMap) for layer in g_only.discriminator.low_res.convs.layers)
    assert g_only.generator.high_res_head.layers[-1].out_map is not None
    z, crop = gan.sample_z(2, 0), tf.constant(8)
    slab, low = gan.generator(z, crop=crop)
    whole = gan.generate(z, tile_depth=0)
    np.testing.assert_allclose(gan.generate(z, tile_depth=4), whole, atol=1e-5)
    assert whole.min() >= -1.0 - 1e-6 and whole.max() <= 1.0 + 1e-6
    # the same weights without the map: G's raw tanh, which f of each of our outputs equals,
    # and a D that, given f(x), scores what ours scores given x
    plain = HAGAN(tiny())
    plain.generator.set_weights(gan.generator.get_weights())
    plain.discriminator.set_weights(gan.discriminator.get_weights())
    g_only.generator.set_weights(gan.generator.get_weights())
    plain_slab, plain_low = plain.generator(z, crop=crop)
    np.testing.assert_allclose(f(whole).numpy(), plain.generate(z, tile_depth=0), atol=1e-5)
    np.testing.assert_allclose(f(slab).numpy(), plain_slab.numpy(), atol=1e-5)
    np.testing.assert_allclose(f(low).numpy(), plain_low.numpy(), atol=1e-5)
    np.testing.assert_allclose(g_only.generate(z, tile_depth=0), whole, atol=1e-6)
    ours = gan.discriminator(slab, low, crop)
    theirs = plain.discriminator(f(slab), f(low), crop)
    for a, b in zip(tf.nest.flatten(ours), tf.nest.flatten(theirs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    for model in (gan, g_only):
        model.compile()
        logs = model.train_on_batch({"volume": _batch()}, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values())
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gan))
    again.generator.set_weights(gan.generator.get_weights())
    np.testing.assert_allclose(again.generate(z), gan.generate(z), atol=1e-6)
    assert HAGAN(tiny()).generator.high_res_head.layers[-1].out_map is None
    # an f wider than [-1, 1] (D more sensitive): G's f is scaled back to f(-1) = -1, f(1) = 1,
    # so its tanh still spans the volume's range
    wide = HAGAN(tiny(intensity_map="-1,-1;-0.6,0;1,1.6", intensity_map_d=True))
    g_f = wide.generator.high_res_head.layers[-1].out_map
    np.testing.assert_allclose(g_f(tf.constant([-1.0, 1.0])).numpy(), [-1, 1], atol=1e-6)
    np.testing.assert_allclose(wide.discriminator.low_res.convs.layers[0](tf.constant([1.0])), [1.6])
    assert wide.generate(z).max() <= 1.0 + 1e-6
    for bad in ("-1,-1", "-1,-1;-1,0", "-1,0;0,-1", "a,b;1,1", "-1,-1;0"):
        with pytest.raises(ValueError, match="intensity_map"):
            tiny(intensity_map=bad)
    with pytest.raises(ValueError, match="intensity_map_d"):
        tiny(intensity_map_d=True)
    with pytest.raises(ValueError, match="d_window"):
        tiny(intensity_map=knots, intensity_map_d=True, d_window="-1,-0.6")


# -- collapse detection ---------------------------------------------------------------------

class _Stub(keras.Model):
    """A HAGAN stand-in whose X^L is `fn(z)`."""

    def __init__(self, fn):
        super().__init__()
        self.config = tiny()
        self.ema = None
        self.generator = type("G", (), {"preview": staticmethod(lambda z, labels=None: fn(z))})()


def _real_low(n=8):
    """Varied 'real' X^L: blobs of different sizes and places."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 8)] * 3, indexing="ij"), -1)
    out = []
    for _ in range(n):
        c, r = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.3, 0.8)
        out.append(np.where(np.sum((grid - c) ** 2, -1) < r * r, 0.5, -1.0)[..., None])
    return np.stack(out).astype("float32")


def test_collapse_detector_fires_on_a_generator_that_ignores_z(capsys):
    real = _real_low()
    collapsed = _Stub(lambda z: tf.repeat(tf.constant(real[:1]), tf.shape(z)[0], 0)
                      + 0.001 * tf.reshape(z[:, :1], (-1, 1, 1, 1, 1)))
    det = CollapseDetector(real, every=5, threshold=0.5)
    det.set_model(collapsed)
    out = det.check(5)  # one check below the threshold is not yet a collapse
    assert out["ratio"] < 0.05 and det.warned_at is None
    det.check(10)
    err = capsys.readouterr().err
    assert det.warned_at == 10 and "step 10: the samples are collapsing" in err
    assert "--set minibatch_std=true" in err and "--set loss=hinge" in err
    det.check(15)  # warns once
    assert det.warned_at == 10 and "collapsing" not in capsys.readouterr().err


def test_collapse_detector_is_quiet_on_a_healthy_generator(capsys):
    real = _real_low(16)
    bank = tf.constant(real)

    def healthy(z):  # a varied, real-like output chosen by z
        idx = tf.math.floormod(tf.cast(tf.abs(z[:, 0]) * 1000, tf.int32), 16)
        return tf.gather(bank, idx)

    det = CollapseDetector(real[:8], every=5, threshold=0.5)
    det.set_model(_Stub(healthy))
    for step in (5, 10, 15):
        out = det.check(step)
        assert out["ratio"] > 0.5 and det.warned_at is None
    assert "collapsing" not in capsys.readouterr().err


def test_hagan_train_logs_diversity_to_tensorboard(data, tmp_path):
    run = str(tmp_path / "run")
    train(tiny(max_steps=2, diversity_every=1), data, run, tf.distribute.get_strategy(),
          progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run}/tensorboard", size_guidance={"tensors": 0})
    acc.Reload()
    assert {"diversity/samples", "diversity/real", "diversity/ratio"} <= set(acc.Tags()["tensors"])
    assert [e.step for e in acc.Tensors("diversity/ratio")] == [1, 2]


def test_mean_pairwise_l1():
    v = np.zeros((3, 2, 2, 2, 1), np.float32)
    v[1] += 1
    v[2] += 3
    assert mean_pairwise_l1(v) == pytest.approx((1 + 3 + 2) / 3)
    assert mean_pairwise_l1(np.repeat(v[:1], 4, 0)) == 0


_TWO_REPLICAS = """
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from hagan_tf import HAGAN, HAGANConfig
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")][:2])
cfg = HAGANConfig(size=32, width=0.125, latent_dim=16, batch_size=4, ema_decay=0.5, minibatch_std=True,
                  loss="hinge", augment="translation", r1_gamma=1.0)
with strategy.scope():
    gan = HAGAN(cfg)
    gan.compile()
x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 32, 1)).astype("float32")
before = [w.numpy() for w in gan.ema.weights]
gan.fit(tf.data.Dataset.from_tensors({"volume": x}).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
ema = [strategy.experimental_local_results(w.value) for w in gan.ema.weights]
print("RESULT", not all(np.array_equal(a, b.numpy()) for a, (b, _) in zip(before, ema)),
      all(np.array_equal(a.numpy(), b.numpy()) and np.isfinite(a.numpy()).all() for a, b in ema))
"""


def test_remedies_train_under_two_replicas_and_the_replicas_keep_one_ema():
    """The EMA update runs in a cross-replica merge: both replicas' copies move, and equally.
    Its own process: MirroredStrategy instances in one process share collective keys."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True, text=True,
                         timeout=600)
    assert "RESULT True True" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
