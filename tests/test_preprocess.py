"""The per-scan transform against independent expectations, and every kind of bad input."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import aff2axcodes, axcodes2ornt, ornt_transform
from scipy import ndimage

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import ScanError, preprocess_array, preprocess_file, subject_id


def save_scan(path, volume_dhw, spacing=(1.2, 0.8, 0.8), dtype=np.int16, affine=None):
    """Writes a [D, H, W] volume as NIfTI (x, y, z) = (W, H, D) in RAS, like a scanner export."""
    sd, sh, sw = spacing
    affine = np.diag([sw, sh, sd, 1.0]) if affine is None else affine
    data = np.asarray(volume_dhw).transpose(2, 1, 0).astype(dtype)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def expected_resize(x, size, anti_alias):
    """Independent resize: Gaussian prefilter as skimage does, then PyTorch's trilinear."""
    factors = np.array(x.shape) / size
    if anti_alias:
        x = ndimage.gaussian_filter(x, np.maximum(0, (factors - 1) / 2), mode="nearest")
    t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None, None],
                                        size=(size,) * 3, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


@pytest.fixture
def ct_hu():
    vol = phantom_hu((40, 48, 36), 0.8, np.random.default_rng(0))
    vol[:3] = -2048.0          # outside the scanner's field of view
    vol[-2:] = -1024.0         # exactly at the lower bound: blank as well
    vol[10, 5, 5] = np.nan     # NaN becomes the lower bound
    vol[20, 30, 10] = 3000.0   # metal: clipped to the window's top
    return vol


@pytest.mark.parametrize("size", [64, 32])
def test_ct_transform_matches_independent_expectation(ct_hu, size):
    out, meta = preprocess_array(ct_hu, size)
    unit = np.interp(np.nan_to_num(ct_hu, nan=-1024.0), [-1024, 600], [-1, 1])  # reference script
    expected = expected_resize(unit[3:38].astype(np.float32), size, anti_alias=size < 48)
    assert meta["kept_slices"] == [3, 38]
    assert out.shape == (size,) * 3 and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_file_roundtrip_and_orientations(tmp_path, ct_hu):
    """Flipped / permuted storage orders of one image, and an oblique affine, all give D = S."""
    ct = np.round(np.nan_to_num(ct_hu, nan=-1024.0))
    canonical = nib.load(save_scan(tmp_path / "ras.nii.gz", ct))
    ref, meta = preprocess_file(str(tmp_path / "ras.nii.gz"), 32)
    np.testing.assert_allclose(ref, preprocess_array(ct, 32)[0], atol=1e-6)
    assert meta["spacing"] == [1.2, 0.8, 0.8] and meta["original_shape"] == [36, 48, 40]
    assert meta["subject_id"] == "ras" and meta["orientation"] == "RAS"

    flipped = canonical.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("SLP")))
    assert aff2axcodes(flipped.affine) == ("S", "L", "P")
    nib.save(flipped, str(tmp_path / "slp.nii.gz"))
    out, meta = preprocess_file(str(tmp_path / "slp.nii.gz"), 32)
    assert meta["orientation"] == "SLP" and meta["original_shape"] == [40, 36, 48]
    np.testing.assert_allclose(out, ref, atol=1e-6)

    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0, 0], [np.sin(theta), np.cos(theta), 0, 0],
                    [0, 0, 1, 0], [0, 0, 0, 1]])
    save_scan(tmp_path / "oblique.nii", ct, affine=rot @ canonical.affine)
    out, meta = preprocess_file(str(tmp_path / "oblique.nii"), 32)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert meta["spacing"] == pytest.approx([1.2, 0.8, 0.8])


def test_mri_percentile_window():
    rng = np.random.default_rng(1)
    vol = np.zeros((36, 40, 40), np.float32)
    vol[4:32, 5:35, 6:34] = rng.gamma(4.0, 100.0, size=(28, 30, 28))
    vol[10, 10, 10] = 1e6  # one hot voxel must not squash the contrast
    out, meta = preprocess_array(vol, 32, modality="mri")
    high = np.percentile(vol, 99.9)
    unit = np.interp(vol, [0.0, high], [-1, 1]).astype(np.float32)
    assert meta["intensity_range"] == pytest.approx([0.0, high])
    assert meta["kept_slices"] == [4, 32]
    np.testing.assert_allclose(out, expected_resize(unit[4:32], 32, anti_alias=True), atol=2e-5)


def test_isotropic_resampling_changes_the_grid_first():
    vol = phantom_hu((20, 40, 40), 0.8, np.random.default_rng(2))
    out, meta = preprocess_array(vol, 32, spacing=(2.0, 1.0, 1.0), isotropic=1.0)
    assert meta["resampled_shape"] == [40, 40, 40] and out.shape == (32, 32, 32)


def test_subject_id():
    assert subject_id("/a/b/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert subject_id("x.NII") == "x" and subject_id("scan.mgz") == "scan.mgz"


def _bad_files(d):
    """Every kind of bad input the issue lists: name -> expected words of the reason."""
    good = save_scan(d / "good.nii.gz", phantom_hu((40, 48, 36), 0.7, np.random.default_rng(3)))
    raw = open(good, "rb").read()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    save_scan(d / "plain.nii", phantom_hu((40, 48, 36), 0.7, np.random.default_rng(3)))
    raw = (d / "plain.nii").read_bytes()
    (d / "cut.nii").write_bytes(raw[: len(raw) - 5000])
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "junk.nii.gz").write_bytes(os.urandom(2048))
    (d / "text.nii").write_bytes(b"this is not a NIfTI header at all\n" * 20)
    nib.save(nib.Nifti1Image(np.zeros((40, 48), np.float32), np.eye(4)), str(d / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 3), np.float32), np.eye(4)),
             str(d / "series4d.nii.gz"))
    save_scan(d / "allnan.nii.gz", np.full((20, 20, 20), np.nan), dtype=np.float32)
    save_scan(d / "allzero.nii.gz", np.zeros((20, 20, 20)))
    save_scan(d / "air.nii.gz", np.full((20, 20, 20), -3024) + np.arange(20)[:, None, None])
    save_scan(d / "tiny.nii.gz", phantom_hu((6, 6, 6), 0.7, np.random.default_rng(4)))
    os.symlink(d / "gone.nii.gz", d / "broken.nii.gz")
    os.mkdir(d / "folder.nii.gz")
    return {"truncated.nii.gz": "truncated", "cut.nii": "truncated", "empty.nii.gz": "empty",
            "junk.nii.gz": "not a readable NIfTI", "text.nii": "not a readable NIfTI",
            "flat2d.nii.gz": "2D image", "series4d.nii.gz": "4D image",
            "allnan.nii.gz": "all voxels are NaN", "allzero.nii.gz": "blank volume",
            "air.nii.gz": "blank", "tiny.nii.gz": "too small", "broken.nii.gz": "no such file",
            "folder.nii.gz": "directory", "missing.nii.gz": "no such file"}


def test_every_bad_input_raises_a_one_line_scan_error(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(ScanError) as err:
            preprocess_file(str(tmp_path / name), 32)
        reason = str(err.value)
        assert words in reason and "\n" not in reason and len(reason) < 500, (name, reason)


def test_a_trailing_singleton_axis_is_a_3d_volume(tmp_path):
    vol = phantom_hu((40, 48, 36), 0.7, np.random.default_rng(5))
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0)[..., None].astype(np.int16), np.eye(4)),
             str(tmp_path / "x.nii.gz"))
    out, _ = preprocess_file(str(tmp_path / "x.nii.gz"), 32)
    np.testing.assert_allclose(out, preprocess_array(vol.astype(np.int16), 32)[0], atol=1e-6)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="modality"):
        preprocess_array(np.zeros((8, 8, 8)), 32, modality="pet")
    with pytest.raises(ValueError, match="window"):
        preprocess_array(np.ones((8, 8, 8)), 32, window=(600, -1024))


def test_montages_show_anterior_and_superior_up_and_the_phantom_spine_is_posterior(tmp_path):
    """Records are [D, H, W] = [z, y, x] in RAS+: D grows superior, H anterior. The montage
    (every command's PNG) must draw them up, as a radiologist reads a chest CT."""
    import matplotlib.image

    from hagan_tf.io import montage_png

    s = 32
    anterior = np.full((s, s, s), -1.0, np.float32)
    anterior[:, s // 2:, :] = 0.5  # the anterior half grey, the posterior black
    superior = np.full((s, s, s), -1.0, np.float32)
    superior[s // 2:] = 0.5
    png = matplotlib.image.imread(montage_png([anterior, superior], str(tmp_path / "m.png")))
    png = png[..., :3].mean(-1)
    half, third = png.shape[0] // 2, png.shape[1] // 3
    for row, panel in ((0, 0), (1, 1), (1, 2)):  # axial of the first; coronal, sagittal of the second
        band = png[row * half:(row + 1) * half, panel * third:(panel + 1) * third]
        grey = np.nonzero((np.abs(band - 0.75) < 0.05).sum(1) > 5)[0]
        black = np.nonzero((band < 0.05).sum(1) > 5)[0]
        assert grey.size and black.size, (row, panel)
        assert grey.mean() < black.mean(), (row, panel)  # anterior / superior on top
    # The phantom's spine (bone) lies posterior, in the low-H half.
    hu = phantom_hu((32, 48, 40), 0.8, np.random.default_rng(0))
    bone = np.argwhere(hu >= 500)
    assert bone.size and bone[:, 1].mean() < 48 / 2
