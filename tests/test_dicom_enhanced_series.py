"""A series of single-frame enhanced files (Enhanced CT / Enhanced MR, NumberOfFrames 1, one
file per slice) against the NIfTI route: each slice's position, orientation, pixel spacing and
rescale live only in its functional groups, none at the top level.

The writer places each slice by DICOM's own definition of space (LPS), independently of the
reader, from the same asymmetric phantom as the series tests; files get random names and are
written in shuffled order, int16 with a rescale intercept that differs from file to file.
"""

import os
import random
import uuid

import numpy as np
import pytest
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage, generate_uid
from test_dicom_multiframe import _item, drop_group, geometry_cases
from test_readers import (SHAPE, SPACING, assert_markers_land, dicom_dataset,
                          lps_layout, phantom, preprocess_like_nifti, write_dicom_series,
                          write_nifti)

from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import DicomSeries, ScanError, expand_inputs, load_volume, preprocess_file

S = 32


def intercept_of(k: int) -> float:
    """The rescale intercept of slice k's file: one per file (-1024, -1034, -1044, ...)."""
    return -1024.0 - 10 * (k % 3)


def write_enhanced_series(folder, vol, patient="PAT-ES", series_uid=None, shuffle_seed=0,
                          positions=None, sop_class=EnhancedCTImageStorage, modality="CT"):
    """One single-frame enhanced file per slice, by DICOM's rules: ImageOrientationPatient
    1,0,0,0,1,0 (columns run to the patient's left, +x LPS, rows posterior, +y LPS) in the shared
    groups, the slice's ImagePositionPatient (LPS position of its first pixel) in the per-frame
    groups, PixelSpacing in the shared groups; stored int16 = HU - RescaleIntercept, the rescale
    in the shared groups of even slices and the per-frame groups of odd ones. No geometry or
    rescale at the top level. Returns (series uid, paths by slice)."""
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    sd, sh, sw = SPACING
    h, w = vol.shape[1:]
    lps, x0, y0, order = lps_layout(vol, shuffle_seed)
    paths = {}
    for k in order:
        ds = dicom_dataset(sop_class, series_uid, patient, modality)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        rescale = Sequence([_item(RescaleIntercept=intercept_of(k), RescaleSlope=1,
                                  RescaleType="HU")])
        shared = _item(
            PixelMeasuresSequence=Sequence([_item(PixelSpacing=[sh, sw], SliceThickness=sd)]),
            PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]))
        frame = _item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=(
                list(positions[k]) if positions is not None else [x0, y0, -100.0 + k * sd]))]),
            FrameContentSequence=Sequence([_item(InStackPositionNumber=k + 1)]))
        (frame if k % 2 else shared).PixelValueTransformationSequence = rescale
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
        ds.PixelData = (lps[k] - intercept_of(k)).astype("<i2").tobytes()
        path = os.path.join(str(folder), uuid.UUID(int=random.Random(f"{series_uid}{k}")
                                                   .getrandbits(128)).hex)
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return series_uid, paths


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhanced_series")
    vol = phantom()
    out = {"vol": vol, "nifti": write_nifti(root / "ref.nii.gz", vol), "root": root}
    out["ct_uid"], out["ct_paths"] = write_enhanced_series(root / "ct", vol)
    out["mr_uid"], _ = write_enhanced_series(root / "mr", vol, shuffle_seed=4,
                                             sop_class=EnhancedMRImageStorage, modality="MR")
    return out


def test_the_writer_keeps_geometry_and_rescale_in_the_functional_groups_only(enhanced):
    import pydicom

    ds = pydicom.dcmread(enhanced["ct_paths"][3])
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "RescaleSlope", "RescaleIntercept"):
        assert tag not in ds, tag
    assert ds.NumberOfFrames == 1 and ds.SOPClassUID == EnhancedCTImageStorage
    names = [os.path.basename(enhanced["ct_paths"][k]) for k in range(SHAPE[0])]
    assert names != sorted(names)  # the names say nothing of the order


def test_enhanced_series_load_to_the_nifti_volume(enhanced):
    ref, ref_meta = load_volume(enhanced["nifti"])
    for kind, sop in (("ct", "Enhanced CT Image Storage"), ("mr", "Enhanced MR Image Storage")):
        (sid, scan), = expand_inputs([str(enhanced["root"] / kind)])
        assert isinstance(scan, DicomSeries) and scan.frames == 0 and sid == kind
        assert len(scan.files) == SHAPE[0] and str(scan) == str(enhanced["root"] / kind)
        for source in (scan, str(enhanced["root"] / kind)):
            vol, meta = load_volume(source)
            np.testing.assert_array_equal(vol, ref, err_msg=kind)  # HU after the rescale, exactly
            assert meta["spacing"] == ref_meta["spacing"] == list(SPACING), kind
            assert meta["orientation"] == "LPS" and meta["slices"] == SHAPE[0]
            assert meta["series_uid"] == enhanced[f"{kind}_uid"]
            assert meta["dicom_sop_class"] == sop


def test_records_match_the_nifti_route_and_the_markers_land_where_it_puts_them(enhanced):
    ref, _ = preprocess_file(enhanced["nifti"], S)
    out, meta = preprocess_file(str(enhanced["root"] / "ct"), S)
    assert np.abs(out - ref).max() <= 2e-3
    assert meta["subject_id"] == "ct"  # its folder's, as for a classic series
    assert_markers_land(out, "ct")


def _small(tmp_path, name, positions=None, d=6):
    vol = phantom_hu((d, 16, 12), 0.7, np.random.default_rng(1)).round()
    _, paths = write_enhanced_series(tmp_path / name, vol, positions=positions)
    (_, scan), = expand_inputs([str(tmp_path / name)])
    return scan, paths


def test_enhanced_series_problems_are_scan_errors_with_their_reason(tmp_path):
    z = np.arange(6) * SPACING[0]
    cases = geometry_cases("slice")
    for name, (positions, words) in cases.items():
        scan, _ = _small(tmp_path, name, positions)
        with pytest.raises(ScanError, match=words):
            load_volume(scan)
    scan, paths = _small(tmp_path, "ok", [[0.0, 0.0, v] for v in z])
    assert load_volume(scan)[0].shape == (6, 16, 12)
    short = DicomSeries(scan.uid, tuple(f for f in scan.files if f != paths[2]),
                        scan.subject_id, scan.folder)  # a slice missing from the list
    with pytest.raises(ScanError, match=r"1 slice\(s\) missing"):
        load_volume(short)
    scan, paths = _small(tmp_path, "noposition")
    drop_group(paths[4], "PlanePositionSequence")
    name = os.path.basename(paths[4])
    with pytest.raises(ScanError, match=f"missing functional groups: slice {name} has no "
                                        "PlanePositionSequence > ImagePositionPatient"):
        load_volume(scan)
    scan, paths = _small(tmp_path, "cut")
    raw = open(paths[1], "rb").read()
    open(paths[1], "wb").write(raw[:-100])  # inside the pixels
    name = os.path.basename(paths[1])
    with pytest.raises(ScanError, match=f"unreadable slice {name}: truncated pixel data: 284 of "
                                        "the 384 bytes of 1 frame of 16x12"):
        load_volume(scan)
    with pytest.raises(ScanError, match="single DICOM slice"):
        load_volume(paths[0])


def test_hagan_preprocess_reads_enhanced_series_beside_classic_ones_and_a_truncated_slice(
        tmp_path, capsys):
    """Two enhanced series in one folder, one alone in its folder, a classic series, and an
    enhanced series with one truncated slice: one dead letter, the rest equal to the NIfTI
    route, with the subject ids of the classic series rule."""
    scans, refs = tmp_path / "scans", tmp_path / "refs"
    refs.mkdir()
    vols = {name: phantom(seed) for seed, name in enumerate(["a", "b", "solo", "classic"])}
    uid_a, _ = write_enhanced_series(scans / "two" / "mixed", vols["a"], "PAT A", shuffle_seed=1)
    uid_b, _ = write_enhanced_series(scans / "two" / "mixed", vols["b"], "PAT B", shuffle_seed=2)
    write_enhanced_series(scans / "pat3" / "solo", vols["solo"], "PAT3", shuffle_seed=3)
    write_dicom_series(scans / "pat4" / "classic", vols["classic"], "PAT4")
    _, broken = write_enhanced_series(scans / "pat5" / "broken", phantom(9), "PAT5")
    raw = open(broken[17], "rb").read()
    open(broken[17], "wb").write(raw[: len(raw) - 500])  # a copy cut short, inside the pixels

    ids = {"a": f"PAT_A_{uid_a}", "b": f"PAT_B_{uid_b}", "solo": "solo", "classic": "classic"}
    rows, dead = preprocess_like_nifti(scans, tmp_path / "out", refs, vols, ids, capsys, failed=1)
    assert rows[ids["a"]]["series_uid"] == uid_a and rows[ids["a"]]["slices"] == SHAPE[0]
    assert rows[ids["a"]]["source"] == str(scans / "two" / "mixed")
    assert rows[ids["a"]]["dicom_sop_class"] == "Enhanced CT Image Storage"
    assert len(dead) == 1 and dead[0]["source"] == str(scans / "pat5" / "broken")
    assert dead[0]["subject_id"] == "broken"
    assert f"unreadable slice {os.path.basename(broken[17])}" in dead[0]["reason"]
    assert "truncated pixel data" in dead[0]["reason"]
