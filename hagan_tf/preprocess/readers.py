"""One loader for every scan format the field exchanges, each ending as a [D, H, W] RAS+ array.

- NIfTI (`.nii`, `.nii.gz`): nibabel, exactly as before (`transform.load_scan`).
- NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`): SimpleITK.
- DICOM series: pydicom reads the headers (fast, tag by tag, with a precise error per file) to
  find, group, sort and check the slices; SimpleITK (GDCM) decodes the pixels, every transfer
  syntax included, and applies RescaleSlope/RescaleIntercept (stored values -> HU for CT).

SimpleITK and DICOM describe space in LPS (x to the patient's left, y posterior, z superior);
NIfTI in RAS. Both are converted by flipping x and y of the voxel-to-world affine and then taking
nibabel's closest canonical (RAS+) orientation, the very step the NIfTI route takes, so a scan
lands with left, right, anterior, posterior, superior and inferior in the same voxels whatever
format it came in.

A DICOM series is identified by its SeriesInstanceUID, wherever its files lie under the inputs
and whatever their names. Its subject id (the key for labels, folds and duplicates) is:
- the name of its folder, when that folder holds this series and no other (the usual export
  layout, one folder per series; as a NIfTI scan's id is its file name);
- otherwise `<PatientID>_<SeriesInstanceUID>` (PatientID reduced to letters, digits, `.`, `_`
  and `-`; the UID alone when there is no PatientID): stable, and unique across a collection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Union

import numpy as np

from .transform import (ITK_SUFFIXES, MAX_VOXELS, NIFTI_SUFFIXES, SCAN_SUFFIXES, ScanError,
                        _check_file, _one_line, load_scan, subject_id)

ITK_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO",
          ".mhd": "MetaImageIO"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Tolerances of the DICOM series checks. A missing slice doubles one step (100%); scanners write
# positions rounded to ~0.01 mm, and a 5% uneven step moves a voxel by 1/20 of a slice.
SPACING_TOLERANCE = 0.05
TILT_TOLERANCE_DEG = 0.1
ORIENTATION_TOLERANCE = 1e-4
DICOM_TAGS = ["SOPClassUID", "SeriesInstanceUID", "PatientID", "Modality", "Rows", "Columns",
              "SamplesPerPixel", "NumberOfFrames", "ImagePositionPatient",
              "ImageOrientationPatient", "PixelSpacing", "GantryDetectorTilt", "InstanceNumber"]
log = logging.getLogger("hagan_tf.preprocess")


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """One DICOM series as found under the inputs: its files, in any order."""

    uid: str
    files: tuple[str, ...]
    subject_id: str
    folder: str
    patient_id: str = ""

    def __str__(self) -> str:  # the `source` reported in the manifest and dead letters
        return self.folder


Source = Union[str, DicomSeries]


# -- NRRD and MetaImage ---------------------------------------------------------------------------

def _itk_reason(err: BaseException) -> str:
    """ITK's messages name its own C++ source lines first: keep what it says about the file."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    said = [ln.split("ERROR:", 1)[1] for ln in lines if "ERROR:" in ln]
    return " ".join((said or lines or ["no details"])[-1].split())[:300]


def _canonical(data_xyz: np.ndarray, affine_lps: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """LPS voxel-to-world -> RAS, then exactly `load_scan`'s reorientation and [D, H, W] layout."""
    import nibabel as nib
    from nibabel.affines import voxel_sizes

    affine = LPS_TO_RAS @ affine_lps
    try:
        img = nib.Nifti1Image(np.asarray(data_xyz, np.float32), affine)
        orientation = "".join(nib.aff2axcodes(affine))
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32)).reshape(canon.shape[:3])
        spacing = voxel_sizes(canon.affine)[:3]
    except Exception as e:  # a degenerate direction matrix, for one
        raise ScanError(f"unusable orientation or spacing: {_one_line(e)}") from None
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))
    meta = {"original_shape": [int(s) for s in data_xyz.shape], "orientation": orientation,
            "spacing": [round(float(s), 6) for s in spacing[::-1]], **meta}
    return volume, meta


def load_itk(path: str) -> tuple[np.ndarray, dict]:
    """An NRRD or MetaImage file as float32 [D, H, W] in RAS+, like `load_scan`."""
    import SimpleITK as sitk

    suffix = os.path.splitext(path.lower())[1]
    kind = "NRRD" if ITK_IO[suffix] == "NrrdImageIO" else "MetaImage"
    _check_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO(ITK_IO[suffix])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ScanError(f"not a readable {kind} file: {_itk_reason(e)}") from None
    shape = tuple(int(s) for s in reader.GetSize())
    if len(shape) < 3:
        raise ScanError(f"{len(shape)}D image of shape {shape}, expected a 3D volume")
    if any(s != 1 for s in shape[3:]):
        raise ScanError(f"{len(shape)}D image of shape {shape}, expected a single 3D volume")
    if reader.GetNumberOfComponents() != 1:
        raise ScanError(f"{reader.GetNumberOfComponents()} values per voxel (a vector or colour "
                        "image), expected one")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(f"image of shape {shape} exceeds the {MAX_VOXELS}-voxel limit")
    try:
        img = reader.Execute()
        if img.GetDimension() > 3:
            img = img[(slice(None),) * 3 + (0,) * (img.GetDimension() - 3)]
        data = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)  # [z, y, x]
    except RuntimeError as e:
        raise ScanError(f"corrupt or truncated image data: {_itk_reason(e)}") from None
    affine = np.eye(4)
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    affine[:3, :3] = direction * np.asarray(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return _canonical(data.transpose(2, 1, 0), affine, {})


# -- DICOM: finding the series ---------------------------------------------------------------------

def _local_open(path: str):
    return open(path, "rb")


def _read_header(path: str, opener: Callable = _local_open):
    """The tags we use, read without the pixel data (a few kB of each file)."""
    import pydicom

    with opener(path) as f:
        return pydicom.dcmread(f, stop_before_pixels=True, specific_tags=DICOM_TAGS)


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
    """Candidate files -> (image series, files that look like DICOM but cannot be read).

    Files that are not DICOM, and DICOM objects without pixels (DICOMDIR, structure sets,
    reports), are left out: they are not scans.
    """
    paths = sorted(set(paths))
    with ThreadPoolExecutor(max(1, threads)) as pool:  # remote files: one request per header
        found = list(pool.map(lambda p: _classify(p, opener), paths))
    series: dict[str, list[str]] = {}
    patients: dict[str, str] = {}
    broken = []
    for path, (kind, what) in zip(paths, found):
        if kind == "image":
            uid = str(what.SeriesInstanceUID).strip()
            series.setdefault(uid, []).append(path)
            patients.setdefault(uid, str(what.get("PatientID", "") or "").strip())
        elif kind == "broken":
            broken.append(path)
        elif kind == "other":
            log.info("skipping %s: %s, not an image", path, what)
    in_dir: dict[str, set] = {}
    for uid, files in series.items():
        for f in files:
            in_dir.setdefault(_dirname(f), set()).add(uid)
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
    return sorted(out, key=lambda s: (s.folder, s.uid)), broken


class _LocalFS:
    """The file-system calls `expand_inputs` makes; the Beam launcher passes tf.io.gfile's."""

    isdir = staticmethod(os.path.isdir)
    exists = staticmethod(os.path.lexists)  # a broken link is an input to report, not to drop
    open = staticmethod(_local_open)

    @staticmethod
    def walk(top):
        return os.walk(top)

    @staticmethod
    def glob(pattern):
        import glob

        return glob.glob(pattern)

    @staticmethod
    def join(*parts):
        return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def _is_scan_name(name: str) -> bool:
    return name.lower().endswith(SCAN_SUFFIXES)


def expand_inputs(inputs: Iterable[str], fs=_LocalFS, warn: Callable[[str], None] = log.warning
                  ) -> list[tuple[str, Source]]:
    """User inputs (files, folders, globs) -> sorted (subject id, source) items, one per scan.

    Folders are searched recursively: NIfTI/NRRD/MetaImage files by name, DICOM files by
    content (any name), grouped into series by SeriesInstanceUID across all the inputs. A file
    named explicitly is kept even when missing or unreadable, so that reading it reports why;
    so is a DICOM file whose header cannot be read. Pass each source to `preprocess_file`.
    """
    scans, candidates, explicit_files = set(), set(), set()

    def add(pattern: str, explicit: bool):
        if fs.isdir(pattern):
            for root, _, files in fs.walk(pattern):
                for f in files:
                    (scans if _is_scan_name(f) else candidates).add(fs.join(root, f))
        elif any(c in pattern for c in "*?[") and not fs.exists(pattern):  # scan[1].nii is a name
            matches = fs.glob(pattern)
            if not matches:
                warn(f"--input {pattern!r} matches nothing")
            for m in matches:
                add(m, False)
        elif _is_scan_name(pattern) or (explicit and not fs.exists(pattern)):
            scans.add(pattern)
        else:
            candidates.add(pattern)
            if explicit:
                explicit_files.add(pattern)

    for pattern in inputs:
        add(pattern, True)
    series, broken = group_dicom(candidates, fs.open)
    grouped = {f for s in series for f in s.files}
    # Explicit files that are neither a scan format nor DICOM are kept, to be reported.
    scans.update(broken)
    scans.update(p for p in explicit_files if p not in grouped)
    items = [(subject_id(p), p) for p in scans] + [(s.subject_id, s) for s in series]
    return sorted(items, key=lambda it: (source_name(it[1]), it[0]))


def source_name(source: Source) -> str:
    """The path a source is reported under (a DICOM series: its folder)."""
    return str(source)


# -- DICOM: reading one series ---------------------------------------------------------------------

def find_series(folder: str) -> DicomSeries:
    """The one DICOM series under a local folder (for `preprocess_file(folder)`)."""
    if not os.path.isdir(folder):
        raise ScanError(f"no such directory: {folder}")
    found = [s for _, s in expand_inputs([folder], warn=lambda _: None)
             if isinstance(s, DicomSeries)]
    if not found:
        raise ScanError(f"no DICOM image series under {folder}")
    if len(found) > 1:
        raise ScanError(f"{len(found)} DICOM series under {folder} ("
                        + ", ".join(s.subject_id for s in found[:4])
                        + (", ..." if len(found) > 4 else "")
                        + "): list them with hagan_tf.preprocess.expand_inputs")
    return found[0]


def _floats(ds, tag: str, n: int, name: str) -> np.ndarray:
    value = ds.get(tag)
    try:
        out = np.asarray([float(v) for v in value], float)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ScanError(f"slice {name}: missing or malformed {tag} ({value!r})")
    return out


def load_dicom_series(series: DicomSeries) -> tuple[np.ndarray, dict]:
    """A DICOM series as float32 [D, H, W] in RAS+ (HU for CT), or ScanError saying what is wrong:
    a missing or unreadable slice, irregular slice spacing, a gantry tilt, mixed slice shapes."""
    import SimpleITK as sitk

    files = list(series.files)
    if len(files) < 2:
        raise ScanError(f"a single DICOM slice ({_basename(files[0]) if files else 'none'}), not a "
                        "volume")
    heads = []
    for path in files:
        name = _basename(path)
        try:
            ds = _read_header(path)
        except Exception as e:
            raise ScanError(f"unreadable slice {name}: {_one_line(e)}") from None
        if str(ds.get("SeriesInstanceUID", "")).strip() != series.uid:
            raise ScanError(f"slice {name} is not of series {series.uid}")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ScanError(f"slice {name}: multi-frame DICOM ({frames} frames in one file) is "
                            "not supported")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise ScanError(f"slice {name}: {ds.SamplesPerPixel} samples per pixel (colour), "
                            "expected one")
        heads.append((name, ds))
    name0, ds0 = heads[0]
    rows, cols = int(ds0.get("Rows", 0) or 0), int(ds0.get("Columns", 0) or 0)
    iop = _floats(ds0, "ImageOrientationPatient", 6, name0)
    pixel = _floats(ds0, "PixelSpacing", 2, name0)  # [between rows, between columns]
    row_dir, col_dir = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(row_dir @ col_dir) > 1e-3):
        raise ScanError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    if min(pixel) <= 0:
        raise ScanError(f"PixelSpacing {list(pixel)} is not positive")
    normal = np.cross(row_dir, col_dir)
    positions = []
    for name, ds in heads:
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols):
            raise ScanError(f"slices of different sizes: {name} is {ds.get('Rows')}x"
                            f"{ds.get('Columns')}, {name0} {rows}x{cols}")
        if (np.abs(_floats(ds, "ImageOrientationPatient", 6, name) - iop).max()
                > ORIENTATION_TOLERANCE):
            raise ScanError(f"slices of different orientations ({name} and {name0})")
        if np.abs(_floats(ds, "PixelSpacing", 2, name) - pixel).max() > 1e-4 * max(pixel):
            raise ScanError(f"slices of different pixel spacings ({name} and {name0})")
        positions.append(_floats(ds, "ImagePositionPatient", 3, name))
    n = len(heads)
    if int(np.prod([rows, cols, n], dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(f"series of {n} slices of {rows}x{cols} exceeds the {MAX_VOXELS}-voxel "
                        "limit")
    ipp = np.asarray(positions)
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    steps = np.diff(along)
    same = int((steps < 1e-3).sum())
    if same:
        raise ScanError(f"{same + 1} slices share a position along the slice normal (several "
                        "acquisitions or copies of a slice in one series)")
    step = (along[-1] - along[0]) / (n - 1)
    off = np.abs(steps - step) > SPACING_TOLERANCE * step + 1e-3
    if off.any():
        worst = int(np.argmax(np.abs(steps - step)))
        gap = steps[worst] / np.median(steps)
        missing = gap > 1.5 and abs(gap - round(gap)) < 0.1
        hint = f" ({round(gap) - 1} slice(s) missing?)" if missing else ""
        raise ScanError(f"irregular slice spacing: steps from {steps.min():.4g} to "
                        f"{steps.max():.4g} mm along the normal, {steps[worst]:.4g} mm after "
                        f"{along[worst]:.4g} mm{hint}")
    shift = ipp - ipp[0]
    drift = np.linalg.norm(shift - np.outer(shift @ normal, normal), axis=1)[1:]
    angles = np.degrees(np.arctan2(drift, along[1:] - along[0]))
    if angles.max() > TILT_TOLERANCE_DEG:
        tag = ds0.get("GantryDetectorTilt")
        said = f", GantryDetectorTilt {float(tag):g}" if tag not in (None, "") else ""
        raise ScanError(f"gantry tilt: slice positions drift off the slice normal by up to "
                        f"{angles.max():.2f} degrees{said} (the slices are sheared; resample the "
                        "series onto a rectangular grid first)")
    volume = np.empty((n, rows, cols), np.float32)
    for k, i in enumerate(order):
        path, name = files[i], heads[i][0]
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
    affine = np.eye(4)  # columns: along a row (i), down a column (j), across slices (k)
    affine[:3, 0] = row_dir * pixel[1]
    affine[:3, 1] = col_dir * pixel[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = ipp[0]
    extra = {"series_uid": series.uid, "slices": n}
    if ds0.get("Modality"):
        extra["dicom_modality"] = str(ds0.Modality)
    return _canonical(volume.transpose(2, 1, 0), affine, extra)


# -- the one loader ------------------------------------------------------------------------------

def load_volume(source: Source) -> tuple[np.ndarray, dict]:
    """Any supported scan -> (float32 [D, H, W] in RAS+, meta). Raises ScanError on bad input.

    `source`: a NIfTI, NRRD or MetaImage file, a folder holding one DICOM series, or a
    `DicomSeries` from `expand_inputs`.
    """
    if isinstance(source, DicomSeries):
        return load_dicom_series(source)
    path = str(source)
    lower = path.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return load_scan(path)  # unchanged: bit-for-bit the NIfTI route
    if lower.endswith(ITK_SUFFIXES):
        return load_itk(path)
    if os.path.isdir(path):
        return load_dicom_series(find_series(path))
    _check_file(path)
    kind, what = _classify(path, _local_open)
    if kind == "not dicom":
        raise ScanError("not a supported scan: neither NIfTI (.nii, .nii.gz), NRRD (.nrrd, "
                        ".nhdr), MetaImage (.mha, .mhd) nor DICOM")
    if kind == "broken":
        raise ScanError(what)
    if kind == "other":
        raise ScanError(f"a DICOM {what} object, not an image")
    uid = str(what.SeriesInstanceUID).strip()
    return load_dicom_series(DicomSeries(uid, (path,), subject_id(path), _dirname(path)))


def source_subject_id(source: Source) -> str:
    """The subject id of a source: a file's name without its suffix, a series' as documented."""
    if isinstance(source, DicomSeries):
        return source.subject_id
    if os.path.isdir(str(source)):
        return subject_id(_basename(str(source)))
    return subject_id(str(source))
