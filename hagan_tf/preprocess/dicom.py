"""DICOM series: found by content under the inputs, grouped by SeriesInstanceUID, checked and
read. pydicom reads the headers (fast, tag by tag, with a precise error per file) to find,
group, sort and check the slices; SimpleITK (GDCM) decodes the pixels, every transfer syntax
included, and applies RescaleSlope/RescaleIntercept (stored values -> HU for CT). `readers`
says how a series gets its subject id. A multi-frame file found here is a scan of its own,
read by `multiframe`, which shares the stack's geometry checks below. A series of single-frame
enhanced files (Enhanced CT/MR, NumberOfFrames 1, one file per slice) is a series like any
other, each slice's geometry and rescale read from its functional groups (`functional_groups`)
and its stored values decoded by pydicom, as a multi-frame file's frames are.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from .functional_groups import (GROUP_TAGS, decode_frames, frame_geometry, has_groups,
                                read_dataset, rescaled_frame, tilt)
from .itk import _canonical, _itk_reason
from .scans import MAX_VOXELS, ScanError, _one_line, subject_id

log = logging.getLogger("hagan_tf.preprocess")

# Tolerances of the DICOM series checks. A missing slice doubles one step (100%); scanners write
# positions rounded to ~0.01 mm, and a 5% uneven step moves a voxel by 1/20 of a slice.
SPACING_TOLERANCE = 0.05
TILT_TOLERANCE_DEG = 0.1
ORIENTATION_TOLERANCE = 1e-4
DICOM_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "PatientID", "Modality",
              "Rows", "Columns", "SamplesPerPixel", "NumberOfFrames", "ImagePositionPatient",
              "ImageOrientationPatient", "PixelSpacing", "GantryDetectorTilt", "InstanceNumber"]


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """One DICOM scan as found under the inputs: a series of single-frame files, in any order
    (`frames` 0), or one multi-frame file holding every slice (`frames`: how many; `files` is
    that one file; read by `multiframe`)."""

    uid: str
    files: tuple[str, ...]
    subject_id: str
    folder: str
    patient_id: str = ""
    frames: int = 0

    def __str__(self) -> str:  # the `source` reported in the manifest and dead letters
        return self.files[0] if self.frames else self.folder


def number_of_frames(ds) -> int:
    """NumberOfFrames (1 when absent, empty or malformed: read as a single frame)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


# -- DICOM: finding the series ---------------------------------------------------------------------

def _local_open(path: str):
    return open(path, "rb")


def _read_header(path: str, opener: Callable = _local_open, tags=DICOM_TAGS):
    """The tags we use, read without the pixel data (a few kB of each file)."""
    import pydicom

    with opener(path) as f:
        return pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)


def _classify(path: str, opener: Callable) -> tuple[str, object]:
    """('image', header) | ('other', sop class) | ('broken', reason) | ('not dicom', None)."""
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    try:
        ds = _read_header(path, opener)
    except (InvalidDicomError, OSError):  # no 'DICM' preamble (a README, an .mhd's .raw, ...)
        return "not dicom", None  # or not openable: named explicitly, it is reported when read
    except Exception as e:
        return "broken", f"unreadable DICOM file: {_one_line(e)}"
    sop = str(ds.get("SOPClassUID", "") or getattr(ds, "file_meta", {}).get(
        "MediaStorageSOPClassUID", ""))
    if "Rows" in ds and ds.get("SeriesInstanceUID"):
        return "image", ds
    if sop and "Image Storage" not in UID(sop).name and UID(sop).name != sop:
        return "other", UID(sop).name  # a DICOMDIR, structure set, report: not a scan
    missing = [t for t in ("SeriesInstanceUID", "Rows") if not ds.get(t)]
    return "broken", f"DICOM header without {' or '.join(missing)} (truncated or corrupt)"


def _basename(path: str) -> str:
    if "://" in path:
        return posixpath.basename(path.rstrip("/"))
    return os.path.basename(os.path.abspath(path))


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if "://" in path else os.path.dirname(path)


def _series_id(patient: str, uid: str) -> str:
    patient = re.sub(r"[^A-Za-z0-9._-]+", "_", patient).strip("_")
    return f"{patient}_{uid}" if patient else uid


def group_dicom(paths: Iterable[str], opener: Callable = _local_open,
                threads: int = 8) -> tuple[list[DicomSeries], list[str]]:
    """Candidate files -> (image scans, files that look like DICOM but cannot be read).

    Single-frame files are grouped into series by SeriesInstanceUID; a multi-frame file (more
    than one frame) is a scan of its own. Files that are not DICOM, and DICOM objects without
    pixels (DICOMDIR, structure sets, reports), are left out: they are not scans. Subject ids:
    `readers` module docstring.
    """
    paths = sorted(set(paths))
    with ThreadPoolExecutor(max(1, threads)) as pool:  # remote files: one request per header
        found = list(pool.map(lambda p: _classify(p, opener), paths))
    series: dict[str, list[str]] = {}
    patients: dict[str, str] = {}
    multi: list[tuple[str, str, int, str, str]] = []  # path, uid, frames, patient, SOP instance
    broken = []
    for path, (kind, what) in zip(paths, found):
        if kind == "image":
            uid = str(what.SeriesInstanceUID).strip()
            patient = str(what.get("PatientID", "") or "").strip()
            frames = number_of_frames(what)
            if frames > 1:
                multi.append((path, uid, frames, patient,
                              str(what.get("SOPInstanceUID", "") or "").strip()))
                continue
            series.setdefault(uid, []).append(path)
            patients.setdefault(uid, patient)
        elif kind == "broken":
            broken.append(path)
        elif kind == "other":
            log.info("skipping %s: %s, not an image", path, what)
    in_dir: dict[str, set] = {}  # folder -> the scans with files in it
    for uid, files in series.items():
        for f in files:
            in_dir.setdefault(_dirname(f), set()).add(uid)
    uses = {uid: 1 for uid in series}  # scans per SeriesInstanceUID
    for path, uid, *_ in multi:
        in_dir.setdefault(_dirname(path), set()).add(("file", path))
        uses[uid] = uses.get(uid, 0) + 1
    out = []
    for uid, files in series.items():
        dirs = sorted({_dirname(f) for f in files})
        if len(dirs) == 1:
            folder = dirs[0]
        else:
            folder = (posixpath.commonpath(dirs) if "://" in dirs[0] else os.path.commonpath(dirs))
        alone = len(dirs) == 1 and in_dir[folder] == {uid}
        sid = subject_id(_basename(folder)) if alone else _series_id(patients[uid], uid)
        out.append(DicomSeries(uid, tuple(sorted(files)), sid, folder, patients[uid]))
    for path, uid, frames, patient, instance in multi:
        folder = _dirname(path)
        if in_dir[folder] == {("file", path)}:
            sid = subject_id(_basename(folder))
        elif uses[uid] == 1:
            sid = _series_id(patient, uid)
        else:  # several scans of one SeriesInstanceUID (e.g. one file per stack)
            sid = f"{_series_id(patient, uid)}_{instance or subject_id(_basename(path))}"
        out.append(DicomSeries(uid, (path,), sid, folder, patient, frames))
    return sorted(out, key=lambda s: (s.folder, s.uid, s.files)), broken


# -- DICOM: the geometry of a stack of slices (a series' files or a multi-frame file's frames) -----

def plane_axes(iop: np.ndarray, pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageOrientationPatient -> (along a row, down a column, their normal), in LPS; ScanError
    unless the two are orthogonal unit vectors and PixelSpacing is positive."""
    row_dir, col_dir = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(row_dir @ col_dir) > 1e-3):
        raise ScanError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    if min(pixel) <= 0:
        raise ScanError(f"PixelSpacing {list(pixel)} is not positive")
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def stack_positions(positions, normal: np.ndarray, tilt_tag=None, unit: str = "slice",
                    whole: str = "series") -> tuple[np.ndarray, np.ndarray, float]:
    """ImagePositionPatient of each slice (or frame) -> (their order along the normal, the sorted
    positions, the step in mm), or ScanError: two at one position, irregular spacing (a missing
    one), or positions drifting off the normal (a gantry tilt: the stack is sheared)."""
    ipp = np.asarray(positions, float)
    n = len(ipp)
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    steps = np.diff(along)
    same = int((steps < 1e-3).sum())
    if same:
        several = ("acquisitions or copies of a slice in one series" if unit == "slice" else
                   f"stacks, phases or copies of a {unit} in one {whole}")
        raise ScanError(f"{same + 1} {unit}s share a position along the {unit} normal (several "
                        f"{several})")
    step = (along[-1] - along[0]) / (n - 1)
    off = np.abs(steps - step) > SPACING_TOLERANCE * step + 1e-3
    if off.any():
        worst = int(np.argmax(np.abs(steps - step)))
        gap = steps[worst] / np.median(steps)
        missing = gap > 1.5 and abs(gap - round(gap)) < 0.1
        hint = f" ({round(gap) - 1} {unit}(s) missing?)" if missing else ""
        raise ScanError(f"irregular {unit} spacing: steps from {steps.min():.4g} to "
                        f"{steps.max():.4g} mm along the normal, {steps[worst]:.4g} mm after "
                        f"{along[worst]:.4g} mm{hint}")
    shift = ipp - ipp[0]
    drift = np.linalg.norm(shift - np.outer(shift @ normal, normal), axis=1)[1:]
    angles = np.degrees(np.arctan2(drift, along[1:] - along[0]))
    if angles.max() > TILT_TOLERANCE_DEG:
        said = f", GantryDetectorTilt {float(tilt_tag):g}" if tilt_tag not in (None, "") else ""
        raise ScanError(f"gantry tilt: {unit} positions drift off the {unit} normal by up to "
                        f"{angles.max():.2f} degrees{said} (the {unit}s are sheared; resample the "
                        f"{whole} onto a rectangular grid first)")
    return order, ipp, float(step)


def stack_affine(iop: np.ndarray, pixel: np.ndarray, step: float, origin: np.ndarray
                 ) -> np.ndarray:
    """The LPS voxel-to-world affine of a sorted stack; columns: along a row (i), down a column
    (j), across slices (k)."""
    row_dir, col_dir, normal = plane_axes(iop, pixel)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel[1]  # PixelSpacing: [between rows, between columns]
    affine[:3, 1] = col_dir * pixel[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = origin
    return affine


# -- DICOM: reading one series ---------------------------------------------------------------------

def _floats(ds, tag: str, n: int, name: str) -> np.ndarray:
    value = ds.get(tag)
    try:
        out = np.asarray([float(v) for v in value], float)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ScanError(f"slice {name}: missing or malformed {tag} ({value!r})")
    return out


def _slice_plane(name: str, ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """A slice's ImageOrientationPatient [6], PixelSpacing [2], ImagePositionPatient [3] and
    rescale: top-level tags (rescale None: GDCM applies it), or, for a single-frame enhanced
    file, its functional groups ((slope, intercept), applied by the reader)."""
    if not has_groups(ds):
        return (_floats(ds, "ImageOrientationPatient", 6, name),
                _floats(ds, "PixelSpacing", 2, name),
                _floats(ds, "ImagePositionPatient", 3, name), None)
    geometry, rescale = frame_geometry(ds, 1, slice_name=name)
    return (geometry["orientation"][0], geometry["spacing"][0], geometry["position"][0],
            tuple(float(v) for v in rescale[0]))


def _enhanced_slice(path: str, name: str, rows: int, cols: int, rescale) -> np.ndarray:
    """A single-frame enhanced file's pixels, [rows, cols] in HU (pydicom, as a multi-frame
    file's frames; GDCM for the syntaxes pydicom cannot decode here)."""
    try:
        ds = read_dataset(path)
        frames, rescaled = decode_frames(path, ds, 1, rows, cols, np.asarray([rescale]))
    except ScanError as e:
        raise ScanError(f"unreadable slice {name}: {e}") from None
    except Exception as e:
        raise ScanError(f"unreadable slice {name}: {_one_line(e)}") from None
    return rescaled_frame(frames[0], *rescale, rescaled)


def load_dicom_series(series: DicomSeries) -> tuple[np.ndarray, dict]:
    """A DICOM series as float32 [D, H, W] in RAS+ (HU for CT), or ScanError saying what is wrong:
    a missing or unreadable slice, irregular slice spacing, a gantry tilt, mixed slice shapes.
    Each slice's geometry and rescale come from its top-level tags or, in a single-frame
    enhanced file, from its functional groups."""
    import SimpleITK as sitk

    files = list(series.files)
    if len(files) < 2:
        raise ScanError(f"a single DICOM slice ({_basename(files[0]) if files else 'none'}), not a "
                        "volume")
    heads = []
    for path in files:
        name = _basename(path)
        try:
            ds = _read_header(path, tags=DICOM_TAGS + GROUP_TAGS)
        except Exception as e:
            raise ScanError(f"unreadable slice {name}: {_one_line(e)}") from None
        if str(ds.get("SeriesInstanceUID", "")).strip() != series.uid:
            raise ScanError(f"slice {name} is not of series {series.uid}")
        frames = number_of_frames(ds)
        if frames > 1:
            raise ScanError(f"slice {name} is a multi-frame file ({frames} frames): a scan of "
                            "its own, not a slice of a series")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise ScanError(f"slice {name}: {ds.SamplesPerPixel} samples per pixel (colour), "
                            "expected one")
        heads.append((name, ds))
    name0, ds0 = heads[0]
    rows, cols = int(ds0.get("Rows", 0) or 0), int(ds0.get("Columns", 0) or 0)
    planes = [_slice_plane(name, ds) for name, ds in heads]
    iop, pixel = planes[0][:2]  # PixelSpacing: [between rows, between columns]
    _, _, normal = plane_axes(iop, pixel)
    positions, rescales = [], []
    for (name, ds), (orientation, spacing, position, rescale) in zip(heads, planes):
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols):
            raise ScanError(f"slices of different sizes: {name} is {ds.get('Rows')}x"
                            f"{ds.get('Columns')}, {name0} {rows}x{cols}")
        if np.abs(orientation - iop).max() > ORIENTATION_TOLERANCE:
            raise ScanError(f"slices of different orientations ({name} and {name0})")
        if np.abs(spacing - pixel).max() > 1e-4 * max(pixel):
            raise ScanError(f"slices of different pixel spacings ({name} and {name0})")
        positions.append(position)
        rescales.append(rescale)
    n = len(heads)
    if int(np.prod([rows, cols, n], dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(f"series of {n} slices of {rows}x{cols} exceeds the {MAX_VOXELS}-voxel "
                        "limit")
    order, ipp, step = stack_positions(positions, normal, tilt(ds0))
    volume = np.empty((n, rows, cols), np.float32)
    for k, i in enumerate(order):
        path, name = files[i], heads[i][0]
        if rescales[i] is not None:  # a single-frame enhanced file
            volume[k] = _enhanced_slice(path, name, rows, cols, rescales[i])
            continue
        try:  # GDCM applies RescaleSlope/RescaleIntercept: HU for CT
            img = sitk.ReadImage(path, imageIO="GDCMImageIO")
            arr = sitk.GetArrayViewFromImage(img)
        except RuntimeError as e:
            raise ScanError(f"unreadable slice {name}: truncated or corrupt pixel data "
                            f"({_itk_reason(e)})") from None
        if arr.shape != (1, rows, cols):
            raise ScanError(f"slice {name}: pixel data of shape {arr.shape[1:]}, header says "
                            f"{rows}x{cols}")
        volume[k] = arr[0]
    affine = stack_affine(iop, pixel, step, ipp[0])
    extra = {"series_uid": series.uid, "slices": n}
    if ds0.get("Modality"):
        extra["dicom_modality"] = str(ds0.Modality)
    if any(r is not None for r in rescales) and ds0.get("SOPClassUID"):
        from pydicom.uid import UID

        extra["dicom_sop_class"] = UID(str(ds0.SOPClassUID)).name
    return _canonical(volume.transpose(2, 1, 0), affine, extra)
