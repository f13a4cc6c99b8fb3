"""Tiled decoding equals the whole-volume decode (hagan_tf.tiled, Generator.volume)."""

import numpy as np
import pytest
import tensorflow as tf

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.tiled import Chain, _needed, auto_tile_depth


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


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_the_plan_computes_each_row_once_from_the_rows_held(rows):
    gan = _generator(64)
    blocks = gan.generator.common.layers[-1:] + gan.generator.high_res_head.layers
    chain = Chain(blocks, 16)  # A: 16 rows at 64^3, G^A's last block keeps them, G^H doubles twice
    assert chain.depths == [16, 16, 32, 64]
    plan = chain.plan(2, rows)
    for level in (1, 2, 3):  # each level's rows computed once, in order, some in every step
        spans = [tuple(step[level][:2]) for step in plan]
        assert spans[0][0] == 0 and spans[-1][1] == chain.depths[level]
        assert all(a[1] == b[0] and b[1] > b[0] for a, b in zip(spans, spans[1:]))
    # what a level holds in a step (the rows kept from the step before, then its new rows) is
    # exactly what the next block reads for its new rows: one halo row per 3^3 convolution
    for t, step in enumerate(plan):
        assert tuple(step[0][:2]) == _needed(blocks[0], *step[1][:2], 16)
        for level in (1, 2):
            kept = plan[t - 1][level][2] if t else 0
            held = (step[level][0] - kept, step[level][1])
            assert held == _needed(blocks[level], *step[level + 1][:2], chain.depths[level])
    if rows == 4:  # 4 rows of G^A's last block a step: 16 output slices (10 in the first)
        assert [tuple(s[3][:2]) for s in plan] == [(0, 10), (10, 26), (26, 42), (42, 64)]
        # output rows 10..26 read rows 4..14 of G^H's first block (two kept), 2..8 of G^A's
        # last (two kept) and 3..9 of its input
        assert [tuple(r) for r in plan[1]] == [(3, 9, 0), (4, 8, 2), (6, 14, 2), (10, 26, 0)]


def test_the_default_slab_is_bounded_by_voxels():
    assert [auto_tile_depth(s) for s in (64, 128, 256, 512)] == [512, 128, 32, 8]
    assert HAGANConfig().tile_depth is None and HAGANConfig(tile_depth=None).tile_depth is None
    gan = _generator(64)  # auto at 64^3: 512 slices >= S, the plain whole-volume decode
    z = gan.sample_z(1, seed=4)
    np.testing.assert_array_equal(gan.generate(z), gan.generator(z).numpy())


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
