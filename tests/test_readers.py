"""DICOM series, NRRD and MetaImage against the NIfTI route, on phantoms these tests write.

Each writer places the voxels by its own format's definition of space (DICOM and ITK: LPS;
NRRD here: an explicit RAS header), independently of the reader under test. The phantom is
asymmetric (a marker near each of the six faces), so a flipped or swapped axis shows.
"""

import json
import os
import random
import uuid

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import (DicomSeries, ScanError, expand_inputs, load_volume,
                                 preprocess_file)
from hagan_tf.preprocess.readers import load_dicom_series

S = 32
SPACING = (2.0, 0.9, 0.8)  # mm along D (S-I), H (A-P), W (R-L)
SHAPE = (40, 36, 44)  # D, H, W: three different extents, so a swapped axis shows
MARKERS = {"superior": 100.0, "inferior": 200.0, "anterior": 300.0, "posterior": 400.0,
           "right": 500.0, "left": 600.0}


def phantom(seed=0):
    """[D, H, W] HU in RAS+ (D superior, H anterior, W to the patient's right), with markers."""
    vol = phantom_hu(SHAPE, 0.75, np.random.default_rng(seed))
    vol = np.round(vol)
    d, h, w = SHAPE
    cd, ch, cw = (slice(n // 3, n - n // 3) for n in SHAPE)
    vol[d - 5:, ch, cw] = MARKERS["superior"]
    vol[:5, ch, cw] = MARKERS["inferior"]
    vol[cd, h - 5:, cw] = MARKERS["anterior"]
    vol[cd, :5, cw] = MARKERS["posterior"]
    vol[cd, ch, w - 5:] = MARKERS["right"]
    vol[cd, ch, :5] = MARKERS["left"]
    return vol


def write_nifti(path, vol):
    sd, sh, sw = SPACING
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.int16), np.diag([sw, sh, sd, 1.0])),
             str(path))
    return str(path)


def lps_layout(vol, shuffle_seed):
    """The phantom as DICOM stores it: pixel (row j, column i) of slice k is RAS voxel
    (k, h-1-j, w-1-i) (+x L is -x R, +y P is -y A); the first pixel's x, y (any origin: the
    position is not used); the slices in a shuffled order. Returns (lps, x0, y0, order)."""
    sd, sh, sw = SPACING
    d, h, w = vol.shape
    order = list(range(d))
    random.Random(shuffle_seed).shuffle(order)
    return vol[:, ::-1, ::-1], -(w - 1) * sw + 12.5, -(h - 1) * sh - 30.0, order


def dicom_dataset(sop_class, series_uid, patient, modality="CT") -> Dataset:
    """A new instance of `sop_class` (explicit VR little endian) in the series and study."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.1", series_uid
    return ds


def write_dicom_series(folder, vol, patient="PAT-1", series_uid=None, shuffle_seed=0,
                       positions=None):
    """A CT series by DICOM's own rules: ImageOrientationPatient 1,0,0,0,1,0 means columns run
    to the patient's left (+x LPS) and rows posterior (+y LPS); ImagePositionPatient is the
    LPS position of the first pixel; stored int16 = HU + 1024 with RescaleIntercept -1024.
    Files get random names and are written in random order. Returns (uid, paths by slice)."""
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    sd, sh, sw = SPACING
    lps, x0, y0, order = lps_layout(vol, shuffle_seed)
    h, w = vol.shape[1:]
    paths = {}
    for k in order:
        ds = dicom_dataset(CTImageStorage, series_uid, patient)
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = (list(positions[k]) if positions is not None
                                   else [x0, y0, -100.0 + k * sd])
        ds.PixelSpacing = [sh, sw]  # between rows, between columns
        ds.SliceThickness = sd
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (lps[k] + 1024).astype("<i2").tobytes()
        path = os.path.join(folder, uuid.UUID(int=random.Random(f"{series_uid}{k}")
                                              .getrandbits(128)).hex)
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return series_uid, paths


def write_nrrd_ras(path, vol, encoding="raw"):
    """NRRD written by hand in RAS space: x (fastest) = W to the right, y = H, z = D."""
    import gzip

    sd, sh, sw = SPACING
    d, h, w = vol.shape
    data = vol.astype("<i2").tobytes()
    header = (f"NRRD0004\ntype: int16\ndimension: 3\nspace: right-anterior-superior\n"
              f"sizes: {w} {h} {d}\nspace directions: ({sw},0,0) (0,{sh},0) (0,0,{sd})\n"
              f"kinds: domain domain domain\nendian: little\nencoding: {encoding}\n"
              f"space origin: (3,-7,11)\n\n")
    with open(path, "wb") as f:
        f.write(header.encode() + (gzip.compress(data) if encoding == "gzip" else data))
    return str(path)


def write_itk(path, array_zyx, direction_lps, spacing_xyz):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx).astype(np.int16))
    img.SetDirection([float(v) for v in np.asarray(direction_lps, float).ravel()])
    img.SetSpacing([float(s) for s in spacing_xyz])
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(path), useCompression=True)
    return str(path)


def write_mha_flipped(path, vol):
    """Stored inferior-first and left-first: index x runs to the patient's left (+x LPS),
    y anterior (-y LPS), z inferior (-z LPS)."""
    sd, sh, sw = SPACING
    return write_itk(path, vol[::-1, :, ::-1], np.diag([1.0, -1.0, -1.0]), (sw, sh, sd))


def write_mhd_permuted(path, vol):
    """Axes permuted: index x runs superior (+z LPS), y anterior (-y LPS), z right (-x LPS)."""
    sd, sh, sw = SPACING
    direction = np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], float)  # columns: x, y, z
    return write_itk(path, vol.transpose(2, 1, 0), direction, (sd, sh, sw))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    vol = phantom()
    out = {"vol": vol, "nifti": write_nifti(root / "ref.nii.gz", vol),
           "nrrd": write_nrrd_ras(root / "ct.nrrd", vol),
           "nrrd_gz": write_nrrd_ras(root / "ctgz.nrrd", vol, "gzip"),
           "mha": write_mha_flipped(root / "ct.mha", vol),
           "mhd": write_mhd_permuted(root / "ct.mhd", vol)}
    uid, _ = write_dicom_series(root / "dicom" / "series_a", vol)
    out["dicom"] = str(root / "dicom" / "series_a")
    out["dicom_uid"] = uid
    return out


def test_every_format_loads_to_the_nifti_volume(scans):
    ref, ref_meta = load_volume(scans["nifti"])
    np.testing.assert_array_equal(ref, scans["vol"])
    for kind in ("nrrd", "nrrd_gz", "mha", "mhd", "dicom"):
        vol, meta = load_volume(scans[kind])
        np.testing.assert_array_equal(vol, ref, err_msg=kind)  # HU after the rescale, exactly
        assert meta["spacing"] == ref_meta["spacing"] == list(SPACING), kind
    assert load_volume(scans["dicom"])[1]["orientation"] == "LPS"
    assert load_volume(scans["mha"])[1]["orientation"] == "LAI"
    assert load_volume(scans["mhd"])[1]["orientation"] == "SAR"


def assert_markers_land(out, kind):
    """Independently of the NIfTI route: in a preprocessed [D, H, W] volume, D grows superior,
    H anterior, W right, so each face's marker is where the phantom put it."""
    unit = {k: (min(v, 600.0) + 1024) / 1624 * 2 - 1 for k, v in MARKERS.items()}
    c = S // 2
    where = {"superior": out[-1, c, c], "inferior": out[0, c, c], "anterior": out[c, -1, c],
             "posterior": out[c, 0, c], "right": out[c, c, -1], "left": out[c, c, 0]}
    for side, value in where.items():
        assert abs(value - unit[side]) < 0.02, (kind, side, value, unit[side])


@pytest.mark.parametrize("kind", ["nrrd", "mha", "mhd", "dicom"])
def test_records_match_the_nifti_route_and_the_markers_land_where_it_puts_them(scans, kind):
    ref, _ = preprocess_file(scans["nifti"], S)
    out, meta = preprocess_file(scans[kind], S)
    assert np.abs(out - ref).max() <= 2e-3
    assert_markers_land(out, kind)


def preprocess_like_nifti(scans, out, refs, vols, ids, capsys, failed):
    """hagan-preprocess of the folder `scans` into `out` (size S, 2 shards): `failed` scans fail,
    the records are exactly `ids` ({name: subject id}), and each equals the NIfTI route of
    vols[name] (max |diff| <= 2e-3). Returns (manifest rows by subject id, dead letters)."""
    from test_preprocess_pipeline import _records

    from hagan_tf.data.records import read_manifest
    from hagan_tf.preprocess.beam import main

    assert main(["--input", str(scans), "--output", str(out), "--size", str(S),
                 "--shards", "2"]) == 0
    n = len(ids) + failed
    assert f"scans in: {n}, written: {len(ids)}, failed: {failed}" in capsys.readouterr().out
    records = {r["subject_id"].decode(): r["volume"][..., 0] for _, r in _records(str(out))}
    assert sorted(records) == sorted(ids.values())
    for name, sid in ids.items():
        expected, _ = preprocess_file(write_nifti(refs / f"{name}.nii.gz", vols[name]), S)
        assert np.abs(records[sid] - expected).max() <= 2e-3, name
    rows = {r["subject_id"]: r for r in read_manifest(str(out))}
    return rows, [json.loads(line) for line in open(out / "dead_letter.jsonl")]


def test_hagan_preprocess_reads_every_format_and_keeps_good_scans_beside_a_truncated_slice(
        tmp_path, capsys):
    """Two series in one folder, one alone in its folder, NRRD, MHA, and a series with one
    truncated slice: one dead letter, everything else written and equal to the NIfTI route."""
    from hagan_tf.data.records import shard_paths

    scans, refs = tmp_path / "scans", tmp_path / "refs"
    refs.mkdir()
    vols = {name: phantom(seed) for seed, name in enumerate(["a", "b", "solo", "nrrd", "mha"])}
    uid_a, _ = write_dicom_series(scans / "two" / "mixed", vols["a"], "PAT A", shuffle_seed=1)
    uid_b, _ = write_dicom_series(scans / "two" / "mixed", vols["b"], "PAT B", shuffle_seed=2)
    write_dicom_series(scans / "pat3" / "solo", vols["solo"], "PAT3")
    write_nrrd_ras(scans / "nrrd.nrrd", vols["nrrd"])
    write_mha_flipped(scans / "mha.mha", vols["mha"])
    _, broken = write_dicom_series(scans / "pat4" / "broken", phantom(9), "PAT4")
    raw = open(broken[17], "rb").read()
    open(broken[17], "wb").write(raw[: len(raw) - 500])  # a copy cut short, inside the pixels
    (scans / "pat3" / "solo" / "README.txt").write_text("not a scan")  # ignored, not DICOM

    out = tmp_path / "out"
    ids = {"a": f"PAT_A_{uid_a}", "b": f"PAT_B_{uid_b}", "solo": "solo", "nrrd": "nrrd",
           "mha": "mha"}
    rows, dead = preprocess_like_nifti(scans, out, refs, vols, ids, capsys, failed=1)
    assert rows[ids["a"]]["series_uid"] == uid_a and rows[ids["a"]]["slices"] == SHAPE[0]
    assert rows[ids["a"]]["source"] == str(scans / "two" / "mixed")
    assert len(dead) == 1 and dead[0]["source"] == str(scans / "pat4" / "broken")
    assert dead[0]["subject_id"] == "broken"
    assert "unreadable slice" in dead[0]["reason"]
    assert os.path.basename(broken[17]) in dead[0]["reason"]
    assert len(shard_paths(str(out))) == 2


def _small_series(tmp_path, name, positions=None, d=6):
    vol = phantom_hu((d, 16, 12), 0.7, np.random.default_rng(1)).round()
    return write_dicom_series(tmp_path / name, vol, positions=positions)


def _series(folder):
    (sid, series), = expand_inputs([str(folder)])
    assert isinstance(series, DicomSeries)
    return series


def test_series_problems_are_scan_errors_with_their_reason(tmp_path):
    sd = SPACING[0]
    z = np.arange(6) * sd
    straight = [[0.0, 0.0, v] for v in z]
    cases = {
        "gap": ([[0.0, 0.0, v] for v in np.r_[z[:3], z[3:] + sd]], "irregular slice spacing"),
        "uneven": ([[0.0, 0.0, v] for v in z * np.r_[1, 1, 1, 1.2, 1.2, 1.2]],
                   "irregular slice spacing"),
        "tilt": ([[0.0, v * np.tan(np.radians(15)), v] for v in z], "gantry tilt"),
        "same": ([[0.0, 0.0, v] for v in np.r_[z[:3], z[2:5]]], "share a position"),
    }
    for name, (positions, words) in cases.items():
        _small_series(tmp_path, name, positions)
        with pytest.raises(ScanError, match=words):
            load_volume(_series(tmp_path / name))
    _, paths = _small_series(tmp_path, "ok", straight)
    assert load_volume(_series(tmp_path / "ok"))[0].shape == (6, 16, 12)
    gap = _series(tmp_path / "gap")
    with pytest.raises(ScanError, match=r"1 slice\(s\) missing"):
        load_dicom_series(gap)
    # a slice removed from the list (not from the disk) is a gap as well
    series = _series(tmp_path / "ok")
    short = DicomSeries(series.uid, tuple(f for f in series.files if f != paths[2]),
                        series.subject_id, series.folder)
    with pytest.raises(ScanError, match="missing"):
        load_dicom_series(short)
    with pytest.raises(ScanError, match="single DICOM slice"):
        load_volume(paths[0])


def test_a_cut_header_is_its_own_dead_letter_and_foreign_files_are_reported(tmp_path):
    _, paths = _small_series(tmp_path, "s", [[0.0, 0.0, v * 2.0] for v in range(6)])
    raw = open(paths[5], "rb").read()
    open(paths[5], "wb").write(raw[:300])  # the header itself is cut: the series is unknown
    (tmp_path / "s" / "notes").write_text("hello")
    (tmp_path / "other.bin").write_bytes(os.urandom(600))
    items = expand_inputs([str(tmp_path / "s"), str(tmp_path / "other.bin")])
    sources = [s for _, s in items]
    assert paths[5] in sources and str(tmp_path / "other.bin") in sources
    assert str(tmp_path / "s" / "notes") not in sources  # found by search, not named: ignored
    with pytest.raises(ScanError, match="truncated or corrupt"):
        preprocess_file(paths[5], S)
    with pytest.raises(ScanError, match="not a supported scan"):
        preprocess_file(str(tmp_path / "other.bin"), S)
    series = [s for s in sources if isinstance(s, DicomSeries)]
    assert len(series) == 1 and len(series[0].files) == 5  # the last slice: shorter, still regular


def test_bad_nrrd_and_mha_files_raise_one_line_scan_errors(tmp_path):
    (tmp_path / "junk.nrrd").write_bytes(os.urandom(500))
    (tmp_path / "empty.mha").write_bytes(b"")
    good = write_nrrd_ras(tmp_path / "cut.nrrd", phantom_hu((20, 16, 12), 0.7,
                                                            np.random.default_rng(0)))
    raw = open(good, "rb").read()
    open(good, "wb").write(raw[: len(raw) - 800])
    img = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(img, str(tmp_path / "vector.mha"))
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "flat.mha"))
    expected = {"junk.nrrd": "not a readable NRRD", "empty.mha": "empty file",
                "cut.nrrd": "corrupt or truncated", "vector.mha": "values per voxel",
                "flat.mha": "2D image", "missing.mhd": "no such file"}
    for name, words in expected.items():
        with pytest.raises(ScanError) as err:
            preprocess_file(str(tmp_path / name), S)
        assert words in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_expand_inputs_subject_ids_and_globs(tmp_path):
    vol = phantom_hu((6, 16, 12), 0.7, np.random.default_rng(1)).round()
    uid1, _ = write_dicom_series(tmp_path / "p1" / "ct", vol, "P 1")
    uid2, _ = write_dicom_series(tmp_path / "p1" / "ct", vol, "P 1")
    uid3, files = write_dicom_series(tmp_path / "p2" / "axial", vol, "")
    write_nrrd_ras(tmp_path / "x.nrrd", vol)
    write_nifti(tmp_path / "y.nii.gz", vol)
    items = dict(expand_inputs([str(tmp_path)]))
    assert sorted(items) == sorted([f"P_1_{uid1}", f"P_1_{uid2}", "axial", "x", "y"])
    assert items["axial"].uid == uid3 and len(items["axial"].files) == 6
    assert items["x"] == str(tmp_path / "x.nrrd")
    # the files of one series, named one by one or by a glob: the same series
    by_glob = expand_inputs([str(tmp_path / "p2" / "axial" / "*")])
    by_name = expand_inputs(sorted(files.values()))
    assert by_glob == by_name == [("axial", items["axial"])]
    # a folder of several series is not one scan
    with pytest.raises(ScanError, match="2 DICOM series"):
        preprocess_file(str(tmp_path / "p1" / "ct"), S)
    out, meta = preprocess_file(str(tmp_path / "p2" / "axial"), 8, min_extent=1)
    assert meta["subject_id"] == "axial" and meta["series_uid"] == uid3 and out.shape == (8,) * 3


def test_nifti_gz_is_read_in_one_inflate_with_nibabels_values(tmp_path):
    """The one-call gzip decode gives nibabel's own voxels; a file it cannot vouch for (two
    gzip members, as `cat a.gz b.gz` makes) goes the streaming way and still reads right."""
    import gzip

    from hagan_tf.preprocess.nifti import _inflated, load_scan

    vol = phantom()
    path = write_nifti(tmp_path / "one.nii.gz", vol)
    img = nib.load(path)
    fast = _inflated(img, path)
    assert fast is not img
    np.testing.assert_array_equal(fast.get_fdata(dtype=np.float32),
                                  img.get_fdata(dtype=np.float32))
    raw = gzip.decompress(open(path, "rb").read())
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    img2 = nib.load(str(two))
    assert _inflated(img2, str(two)) is img2
    np.testing.assert_array_equal(load_scan(str(two))[0], load_scan(path)[0])
    np.testing.assert_array_equal(load_scan(path)[0], vol)
