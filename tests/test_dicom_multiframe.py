"""Multi-frame DICOM (Enhanced CT): one file holding every slice, against the NIfTI route.

The writer places each frame by DICOM's own definition of space (LPS; PlanePositionSequence,
PlaneOrientationSequence and PixelMeasuresSequence in the functional groups), independently of
the reader, from the same asymmetric phantom as the series tests; frames are stored in shuffled
order, int16 with a rescale intercept, shared or one per frame.
"""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage,
                         RLELossless, generate_uid)
from test_readers import (SHAPE, SPACING, assert_markers_land, dicom_dataset,
                          lps_layout, phantom, preprocess_like_nifti, write_dicom_series,
                          write_nifti)

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import DicomSeries, ScanError, expand_inputs, load_volume, preprocess_file

S = 32


def _item(**values) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def write_enhanced_ct(path, vol, patient="PAT-MF", series_uid=None, shuffle_seed=0,
                      per_frame_rescale=False, positions=None, sop_class=EnhancedCTImageStorage,
                      rle=False, groups=True):
    """An Enhanced CT file by DICOM's rules: ImageOrientationPatient 1,0,0,0,1,0 (columns run to
    the patient's left, +x LPS, rows posterior, +y LPS), each frame's ImagePositionPatient the
    LPS position of its first pixel; stored int16 = HU - RescaleIntercept, the intercept shared
    (-1024) or one per frame (-1024, -1034, -1044, ...). Frames are stored in shuffled order.
    Returns (series uid, the slice index of each stored frame)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    series_uid = series_uid or generate_uid()
    sd, sh, sw = SPACING
    d, h, w = vol.shape
    lps, x0, y0, order = lps_layout(vol, shuffle_seed)
    ds = dicom_dataset(sop_class, series_uid, patient)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, d
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[sh, sw], SliceThickness=sd)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        CTAcquisitionDetailsSequence=Sequence([_item(GantryDetectorTilt=0)]))
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = Sequence([_item(
            RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")])
    frames, stored = [], []
    for f, k in enumerate(order):
        intercept = -1024 - 10 * (f % 3) if per_frame_rescale else -1024
        frame = _item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=(
                list(positions[k]) if positions is not None else [x0, y0, -100.0 + k * sd]))]),
            FrameContentSequence=Sequence([_item(StackID="1", InStackPositionNumber=k + 1,
                                                 DimensionIndexValues=[1, k + 1])]))
        if per_frame_rescale:
            frame.PixelValueTransformationSequence = Sequence([_item(
                RescaleIntercept=intercept, RescaleSlope=1, RescaleType="HU")])
        frames.append(frame)
        stored.append((lps[k] - intercept).astype("<i2"))
    if groups:
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    else:  # an older multi-frame object: one top-level position for all frames
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [x0, y0, -100.0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SpacingBetweenSlices = [sh, sw], sd
    stored = np.stack(stored)
    if rle:
        ds.compress(RLELossless, stored)
    else:
        ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return series_uid, order


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiframe")
    vol = phantom()
    out = {"vol": vol, "nifti": write_nifti(root / "ref.nii.gz", vol), "root": root}
    for name, kw in {"shared": {}, "per_frame": {"per_frame_rescale": True, "shuffle_seed": 3},
                     "legacy": {"sop_class": LegacyConvertedEnhancedCTImageStorage},
                     "rle": {"rle": True, "per_frame_rescale": True}}.items():
        out[name] = str(root / name / "ct.dcm")
        out[f"{name}_uid"], out[f"{name}_order"] = write_enhanced_ct(out[name], vol, **kw)
    return out


def test_enhanced_ct_loads_to_the_nifti_volume_whatever_the_frame_order_and_rescale(enhanced):
    assert enhanced["shared_order"] != sorted(enhanced["shared_order"])  # stored shuffled
    ref, ref_meta = load_volume(enhanced["nifti"])
    for kind in ("shared", "per_frame", "legacy", "rle"):
        (sid, scan), = expand_inputs([str(enhanced["root"] / kind)])
        assert isinstance(scan, DicomSeries) and scan.frames == SHAPE[0] and sid == kind
        assert str(scan) == enhanced[kind]  # reported under the file
        for source in (scan, enhanced[kind], str(enhanced["root"] / kind)):
            vol, meta = load_volume(source)
            np.testing.assert_array_equal(vol, ref, err_msg=kind)  # HU after the rescale, exactly
            assert meta["spacing"] == ref_meta["spacing"] == list(SPACING), kind
            assert meta["orientation"] == "LPS" and meta["slices"] == SHAPE[0]
            assert meta["series_uid"] == enhanced[f"{kind}_uid"]
    assert load_volume(enhanced["legacy"])[1]["dicom_sop_class"] == \
        "Legacy Converted Enhanced CT Image Storage"


@pytest.mark.parametrize("kind", ["shared", "per_frame"])
def test_records_match_the_nifti_route_and_the_markers_land_where_it_puts_them(enhanced, kind):
    ref, _ = preprocess_file(enhanced["nifti"], S)
    out, meta = preprocess_file(enhanced[kind], S)
    assert np.abs(out - ref).max() <= 2e-3
    assert meta["subject_id"] == kind  # as expand_inputs names it: its folder's
    assert_markers_land(out, kind)


def test_simpleitk_alone_keeps_the_stored_frame_order_and_one_rescale(enhanced, monkeypatch):
    """Why the frames are read with pydicom: GDCM returns them in stored order and applies the
    first frame's rescale to all. It still decodes what pydicom cannot (forced here), when every
    frame shares one rescale; with a rescale per frame the file is refused, with the reason."""
    import pydicom.pixels

    lps = enhanced["vol"][:, ::-1, ::-1]
    order = enhanced["per_frame_order"]
    raw = sitk.GetArrayFromImage(sitk.ReadImage(enhanced["per_frame"], imageIO="GDCMImageIO"))
    np.testing.assert_array_equal(raw[1::3], lps[order][1::3] + 10)  # its own: -1034
    np.testing.assert_array_equal(raw[::3], lps[order][::3])  # the first frame's: -1024

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    ref, _ = load_volume(enhanced["nifti"])
    np.testing.assert_array_equal(load_volume(enhanced["shared"])[0], ref)
    with pytest.raises(ScanError, match="rescale per frame: no pydicom decoder"):
        load_volume(enhanced["per_frame"])


def _small(tmp_path, name, positions=None, d=6, **kw):
    vol = phantom_hu((d, 16, 12), 0.7, np.random.default_rng(1)).round()
    path = tmp_path / name / "mf.dcm"
    write_enhanced_ct(path, vol, positions=positions, **kw)
    return str(path)


def drop_group(path, sequence, frame=0):
    """Deletes a functional group sequence from frame `frame`'s and the shared groups."""
    import pydicom

    ds = pydicom.dcmread(path)
    for group in (ds.PerFrameFunctionalGroupsSequence[frame], ds.SharedFunctionalGroupsSequence[0]):
        if sequence in group:
            delattr(group, sequence)
    ds.save_as(path)


def geometry_cases(unit: str) -> dict:
    """Positions of 6 frames (or slices, `unit`) that make no volume, each with the words of
    its error: one missing, irregular spacing, a gantry tilt, two at one position."""
    sd = SPACING[0]
    z = np.arange(6) * sd
    return {
        "gap": ([[0.0, 0.0, v] for v in np.r_[z[:3], z[3:] + sd]], rf"1 {unit}\(s\) missing"),
        "uneven": ([[0.0, 0.0, v] for v in z * np.r_[1, 1, 1, 1.2, 1.2, 1.2]],
                   f"irregular {unit} spacing"),
        "tilt": ([[0.0, v * np.tan(np.radians(15)), v] for v in z], "gantry tilt"),
        "same": ([[0.0, 0.0, v] for v in np.r_[z[:3], z[2:5]]], f"{unit}s share a position"),
    }


def test_multiframe_problems_are_scan_errors_with_their_reason(tmp_path):
    z = np.arange(6) * SPACING[0]
    cases = geometry_cases("frame")
    for name, (positions, words) in cases.items():
        with pytest.raises(ScanError, match=words):
            load_volume(_small(tmp_path, name, positions))
    assert load_volume(_small(tmp_path, "ok", [[0.0, 0.0, v] for v in z]))[0].shape == (6, 16, 12)
    with pytest.raises(ScanError, match="missing functional groups: a multi-frame file without"):
        load_volume(_small(tmp_path, "nogroups", groups=False))
    path = _small(tmp_path, "noposition")
    drop_group(path, "PlanePositionSequence", frame=4)
    with pytest.raises(ScanError, match="frame 5 has no PlanePositionSequence"):
        load_volume(path)
    path = _small(tmp_path, "nospacing")
    drop_group(path, "PixelMeasuresSequence")
    with pytest.raises(ScanError, match="frame 1 has no PixelMeasuresSequence > PixelSpacing"):
        load_volume(path)
    path = _small(tmp_path, "cut")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-100])
    with pytest.raises(ScanError, match="truncated pixel data: 2204 of the 2304 bytes"):
        load_volume(path)
    head = raw[:raw.index(b"\xe0\x7f\x10\x00") - 200]  # cut inside the per-frame groups
    open(path, "wb").write(head)
    with pytest.raises(ScanError, match="PerFrameFunctionalGroupsSequence has [0-5] items for 6"):
        load_volume(path)
    rle = _small(tmp_path, "rle", rle=True)
    raw = open(rle, "rb").read()
    open(rle, "wb").write(raw[:-300])  # inside the encapsulated frames
    with pytest.raises(ScanError, match="truncated pixel data: no complete Pixel Data element"):
        load_volume(rle)


def test_subject_ids_of_multiframe_files(tmp_path):
    """Alone in its folder: the folder's name; beside other scans: PatientID_SeriesInstanceUID;
    sharing that UID with another scan: PatientID_SeriesInstanceUID_SOPInstanceUID."""
    import pydicom

    vol = phantom_hu((6, 16, 12), 0.7, np.random.default_rng(1)).round()
    write_enhanced_ct(tmp_path / "p1" / "enh" / "IM0001", vol, "P 1")
    uid2, _ = write_enhanced_ct(tmp_path / "p2" / "IM0001", vol, "P2")
    uid3, _ = write_dicom_series(tmp_path / "p2", vol, "P2")  # a series beside it
    uid4, _ = write_enhanced_ct(tmp_path / "p3" / "a.dcm", vol, "P3")
    write_enhanced_ct(tmp_path / "p3" / "b.dcm", vol, "P3", series_uid=uid4)  # one file a stack
    sops = {n: str(pydicom.dcmread(tmp_path / "p3" / n, stop_before_pixels=True).SOPInstanceUID)
            for n in ("a.dcm", "b.dcm")}
    items = dict(expand_inputs([str(tmp_path)]))
    assert sorted(items) == sorted(["enh", f"P2_{uid2}", f"P2_{uid3}", f"P3_{uid4}_{sops['a.dcm']}",
                                    f"P3_{uid4}_{sops['b.dcm']}"])
    assert items["enh"].files == (str(tmp_path / "p1" / "enh" / "IM0001"),)
    assert items[f"P2_{uid3}"].frames == 0 and len(items[f"P2_{uid3}"].files) == 6
    # named on its own, a file gets the id hagan-preprocess gives it, whatever the entry point
    path = str(tmp_path / "p2" / "IM0001")
    assert expand_inputs([path])[0][0] == preprocess_file(path, 8, min_extent=1)[1]["subject_id"]


def test_hagan_preprocess_reads_multiframe_files_beside_series_and_one_truncated_file(
        tmp_path, capsys):
    """A folder mixing a single-frame series and two Enhanced CT files, one elsewhere alone,
    and one truncated Enhanced CT file: one dead letter, the rest equal to the NIfTI route."""
    scans, refs = tmp_path / "scans", tmp_path / "refs"
    refs.mkdir()
    vols = {name: phantom(seed) for seed, name in enumerate(["series", "mf_a", "mf_b", "solo"])}
    uid_s, _ = write_dicom_series(scans / "mixed", vols["series"], "PAT S")
    uid_a, _ = write_enhanced_ct(scans / "mixed" / "enh_a.dcm", vols["mf_a"], "PAT A")
    uid_b, _ = write_enhanced_ct(scans / "mixed" / "enh_b", vols["mf_b"], "PAT B",
                                 per_frame_rescale=True, shuffle_seed=5)
    write_enhanced_ct(scans / "solo" / "1.dcm", vols["solo"], "PAT C", shuffle_seed=7)
    cut = scans / "cut" / "1.dcm"
    write_enhanced_ct(cut, phantom(9), "PAT D")
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) - 5000])  # a copy cut short, inside the pixels

    ids = {"series": f"PAT_S_{uid_s}", "mf_a": f"PAT_A_{uid_a}", "mf_b": f"PAT_B_{uid_b}",
           "solo": "solo"}
    rows, dead = preprocess_like_nifti(scans, tmp_path / "out", refs, vols, ids, capsys, failed=1)
    assert rows[ids["mf_b"]]["source"] == str(scans / "mixed" / "enh_b")
    assert rows[ids["mf_b"]]["series_uid"] == uid_b and rows[ids["mf_b"]]["slices"] == SHAPE[0]
    assert rows[ids["mf_a"]]["dicom_sop_class"] == "Enhanced CT Image Storage"
    assert len(dead) == 1 and dead[0]["source"] == str(cut) and dead[0]["subject_id"] == "cut"
    assert "truncated pixel data" in dead[0]["reason"]


def test_a_remote_multiframe_file_is_copied_then_removed(tmp_path):
    """file:// stands for gs://: the one file comes along, and goes after."""
    from hagan_tf.preprocess.plan import plan
    from hagan_tf.preprocess.workers import WriteShard

    vol = phantom_hu((12, 16, 14), 0.7, np.random.default_rng(0)).round()
    uid, _ = write_enhanced_ct(tmp_path / "mf" / "ct.dcm", vol)
    (sid, local), = expand_inputs([str(tmp_path / "mf")])
    remote = DicomSeries(uid, (f"file://{local.files[0]}",), sid, f"file://{local.folder}",
                         frames=local.frames)
    out = tmp_path / "out"
    out.mkdir()
    results = list(WriteShard(str(out), 1, size=8, min_extent=1).process((0, plan([remote]))))
    rows = [r for r in results if isinstance(r, dict)]
    assert len(rows) == 1 and rows[0]["subject_id"] == "mf", results
    assert rows[0]["source"] == remote.files[0] and rows[0]["series_uid"] == uid
