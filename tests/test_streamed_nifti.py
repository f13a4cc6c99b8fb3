"""Volumes written to NIfTI slab by slab as they are decoded (HAGAN.generate(out=...),
io.NiftiWriter / NiftiVolumes) are the files the in-memory path writes, value for value and
byte for byte; save_nifti writes what it wrote before (nib.save of the transposed array)."""

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.io import NiftiVolumes, NiftiWriter, mid_slices, save_nifti


def _nib_save(volume, path, spacing):
    """save_nifti as it was: the [D, H, W] array transposed to (x, y, z) = (W, H, D), nib.save."""
    sp_d, sp_h, sp_w = (spacing,) * 3 if np.isscalar(spacing) else spacing
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(volume, np.float32).transpose(2, 1, 0)),
                          np.diag([sp_w, sp_h, sp_d, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("ext", ["nii", "nii.gz"])
@pytest.mark.parametrize("shape,spacing", [((32, 32, 32), 1.5), ((20, 24, 28), (1.0, 2.0, 3.0))])
def test_save_nifti_writes_the_bytes_nib_save_wrote(tmp_path, ext, shape, spacing):
    v = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    _nib_save(v, tmp_path / f"old.{ext}", spacing)
    save_nifti(v[..., None], str(tmp_path / f"new.{ext}"), spacing)
    assert _bytes(tmp_path / f"new.{ext}") == _bytes(tmp_path / f"old.{ext}")
    with NiftiWriter(str(tmp_path / f"slabs.{ext}"), shape, spacing) as w:  # in uneven slabs
        for start in range(0, shape[0], 7):
            w.write(start, v[start:start + 7])
    assert _bytes(tmp_path / f"slabs.{ext}") == _bytes(tmp_path / f"old.{ext}")


def test_a_nii_takes_slabs_in_any_order_a_gzipped_one_in_order(tmp_path):
    v = np.random.default_rng(1).uniform(-1, 1, (16, 8, 8)).astype(np.float32)
    save_nifti(v, str(tmp_path / "whole.nii"))
    with NiftiWriter(str(tmp_path / "reversed.nii"), v.shape) as w:
        for start in (12, 8, 4, 0):
            w.write(start, v[start:start + 4])
    assert _bytes(tmp_path / "reversed.nii") == _bytes(tmp_path / "whole.nii")
    with NiftiWriter(str(tmp_path / "x.nii.gz"), v.shape) as w:
        w.write(0, v[:4])
        with pytest.raises(ValueError, match="in order"):
            w.write(8, v[8:12])
        with pytest.raises(ValueError, match="do not fit"):
            w.write(14, v[:4])


def _generator(size):
    """A small-width model whose GroupNorm scales and offsets are off their initial values."""
    tf.random.set_seed(0)
    gan = HAGAN(HAGANConfig(size=size, width=0.125, latent_dim=16))
    rng = np.random.default_rng(0)
    for v in gan.generator.variables:
        if v.path.endswith(("gamma", "beta")):
            v.assign(v.numpy() + rng.normal(0, 0.2, v.shape).astype(np.float32))
    return gan


@pytest.mark.parametrize("tile_depth", [4, 24, None, 0])  # None: auto (the whole 64^3); 0: whole
def test_a_streamed_decode_is_the_in_memory_volume_and_file(tmp_path, tile_depth):
    gan = _generator(64)
    z = tf.constant(gan.sample_z(2, seed=1))
    volume = gan.generate(z, tile_depth=tile_depth)
    np.testing.assert_allclose(volume, gan.generator(z).numpy(), atol=1e-5)
    paths = [str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]
    files = NiftiVolumes(paths, 64, (2.0, 1.0, 1.5), keep_mid=True)
    with files:
        assert gan.generate(z, tile_depth=tile_depth, out=files) is files
    for i, path in enumerate(paths):
        img = nib.load(path)
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32),
                                      volume[i, ..., 0].transpose(2, 1, 0))  # the same decode
        np.testing.assert_array_equal(img.affine, np.diag([1.5, 1.0, 2.0, 1.0]))
        ext = path.split(".", 1)[1]
        save_nifti(volume[i], str(tmp_path / f"memory{i}.{ext}"), (2.0, 1.0, 1.5))
        assert _bytes(path) == _bytes(tmp_path / f"memory{i}.{ext}")
        for kept, mid in zip(files.mid_slices(i), mid_slices(volume[i])):
            np.testing.assert_array_equal(kept, mid)


def test_a_numpy_out_is_filled_and_a_traced_decode_takes_none():
    gan = _generator(64)
    z = tf.constant(gan.sample_z(1, seed=2))
    out = np.full((1, 64, 64, 64, 1), np.nan, np.float32)
    assert gan.generate(z, tile_depth=16, out=out) is out
    np.testing.assert_array_equal(out, gan.generate(z, tile_depth=16))
    with pytest.raises(ValueError, match="out must be None"):
        tf.function(lambda z: gan.generator.volume(z, tile_depth=16, out=out))(z)
