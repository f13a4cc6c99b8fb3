"""Tiled decoding equals the whole-volume decode (hagan_tf.tiled, Generator.volume)."""

import numpy as np
import pytest
import tensorflow as tf

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.tiled import Chain


def _generator(size, num_classes=0, seed=0):
    """A small-width generator whose GroupNorm scales and offsets are not their initial 1 and 0,
    so that a tiled decode which normalised with the wrong statistics could not agree."""
    tf.random.set_seed(seed)
    gan = HAGAN(HAGANConfig(size=size, width=0.125, latent_dim=16, num_classes=num_classes))
    rng = np.random.default_rng(seed)
    for v in gan.generator.variables:
        if v.path.endswith(("gamma", "beta")):
            v.assign(v.numpy() + rng.normal(0, 0.2, v.shape).astype(np.float32))
    return gan


@pytest.mark.parametrize("size,depths", [(64, (1, 8, 24)), (128, (16, 40))])
def test_tiled_decode_equals_the_whole_volume(size, depths):
    gan = _generator(size)
    z = tf.constant(gan.sample_z(2, seed=1))
    whole = gan.generator(z).numpy()
    for depth in depths:
        tiled = gan.generate(z, tile_depth=depth)
        assert isinstance(tiled, np.ndarray) and tiled.shape == whole.shape
        assert np.abs(tiled - whole).max() <= 1e-5, depth
    traced = tf.function(lambda z: gan.generator.volume(z, tile_depth=depths[-1]))(z)
    assert np.abs(traced.numpy() - whole).max() <= 1e-5


def test_tiled_decode_of_the_conditional_model():
    gan = _generator(64, num_classes=3)
    z = gan.sample_z(3, seed=2)
    labels = np.array([2, 0, 1])
    whole = gan.generator(z, labels=labels).numpy()
    np.testing.assert_allclose(gan.generate(z, labels, tile_depth=16), whole, atol=1e-5)


def test_one_slab_or_none_takes_the_whole_volume_path():
    gan = _generator(64)
    z = gan.sample_z(1, seed=3)
    whole = gan.generator(z).numpy()
    for depth in (0, 64, 100):  # no slabs to cut: the plain decode, bit for bit
        np.testing.assert_array_equal(gan.generate(z, tile_depth=depth), whole)


def test_the_plan_reads_one_halo_row_per_convolution_and_covers_every_row():
    gan = _generator(64)
    blocks = gan.generator.common.layers[-1:] + gan.generator.high_res_head.layers
    chain = Chain(blocks, 16)  # A: 16 rows at 64^3, G^A's last block keeps them, G^H doubles twice
    assert chain.depths == [16, 16, 32, 64]
    plan = chain.plan(2, 16)
    assert [tuple(p[-1]) for p in plan] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    # output rows 16..32 read rows 7..17 after G^H's first block (x2 upsample, one halo row),
    # 3..9 of A and 2..10 of G^A's input: a slab depends on nothing beyond its halo
    assert [tuple(r) for r in plan[1]] == [(2, 10), (3, 9), (7, 17), (16, 32)]
    assert tuple(plan[0][0]) == (0, 6) and tuple(plan[-1][0]) == (10, 16)  # clipped at the faces


def test_only_same_3x3x3_blocks_decode_by_slabs():
    gan = HAGAN(HAGANConfig(size=32, width=0.125, latent_dim=16))
    with pytest.raises(ValueError, match="3\\^3 stride-1 'same'"):
        Chain(gan.encoder.high_res.layers[:1], 4)


def test_tile_depth_is_checked():
    with pytest.raises(ValueError, match="tile_depth must be >= 0"):
        HAGANConfig(tile_depth=-1)


def test_the_served_signatures_decode_by_slabs_in_graph_control_flow():
    """generate, generate_from_seed and reconstruct run the slabs in a tf.while_loop (which TF
    Serving runs as it is), and return what HAGAN.generate returns."""
    from hagan_tf.serving.export import ServingModule, seed_latents

    gan = _generator(64)
    gan.config_.tile_depth = 16  # as a config with tile_depth: 16 would export
    signatures = ServingModule(gan).signatures()
    for name in ("generate", "generate_from_seed", "reconstruct"):
        ops = {op.type for f in [signatures[name].graph] + [
            g.graph for g in signatures[name].graph._functions.values()] for op in f.get_operations()}
        assert ops & {"While", "StatelessWhile"}, name
    served = signatures["generate_from_seed"](seed=tf.constant([5], tf.int64))["volume"]
    expected = gan.generate(seed_latents([5], 16))
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)
