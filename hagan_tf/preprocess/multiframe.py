"""Multi-frame DICOM: one file holding every slice of a scan, as Enhanced CT Image Storage
(1.2.840.10008.5.1.4.1.1.2.1), Legacy Converted Enhanced CT (…1.2.2) and the other enhanced
image classes (MR, PET) store it. Each frame's geometry and rescale are in the functional
groups, per frame (PerFrameFunctionalGroupsSequence, one item per frame) or shared by all
(SharedFunctionalGroupsSequence, one item):

- PlanePositionSequence > ImagePositionPatient: the frame's position (LPS, mm);
- PlaneOrientationSequence > ImageOrientationPatient;
- PixelMeasuresSequence > PixelSpacing;
- PixelValueTransformationSequence > RescaleSlope, RescaleIntercept (stored values -> HU for
  CT); where no group has it, the top-level RescaleSlope/RescaleIntercept, else none.

pydicom reads the groups and decodes the stored values. The frames are then sorted and checked
exactly as a series' slices are (`dicom.stack_positions`: position along the normal, regular
spacing, no gantry tilt), each frame gets its own rescale, and the volume goes to RAS+ by the
step every reader shares (`itk._canonical`).

SimpleITK (GDCM) reads such a file too, but not correctly for us: it returns the frames in
stored order and applies the first frame's rescale to every frame (SimpleITK 2.5.7, measured by
tests/test_readers.py). It is used only to decode transfer syntaxes pydicom has no decoder for
in this environment (JPEG Lossless, JPEG-LS; pydicom decodes the uncompressed, deflated and RLE
syntaxes itself, and JPEG baseline and JPEG 2000 through Pillow), and only when every frame has
the same rescale.

A multi-frame file without functional groups (older multi-frame objects with one top-level
ImagePositionPatient for all frames) is refused: its frames' positions are a convention of the
writer, not data in the file.
"""

from __future__ import annotations

import numpy as np

from .dicom import (ORIENTATION_TOLERANCE, DicomSeries, _basename, number_of_frames, plane_axes,
                    stack_affine, stack_positions)
from .itk import _canonical, _itk_reason
from .scans import MAX_VOXELS, ScanError, _one_line

GROUPS = {  # what we read: (functional group sequence, attribute, values)
    "position": ("PlanePositionSequence", "ImagePositionPatient", 3),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
    "spacing": ("PixelMeasuresSequence", "PixelSpacing", 2),
}
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


def _macro(frame, shared, sequence: str):
    """The first item of a functional group sequence: the frame's own, else the shared one."""
    for group in (frame, shared):
        if group is not None:
            value = group.get(sequence)
            if value is not None and len(value) > 0:
                return value[0]
    return None


def _numbers(item, tag: str, n: int, where: str) -> np.ndarray | None:
    """`n` finite numbers, None where the tag is absent; ScanError where it is malformed."""
    value = item.get(tag) if item is not None else None
    if value is None or value == "":
        return None
    try:
        out = np.asarray([float(v) for v in (value if n > 1 else [value])], float)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ScanError(f"{where}: malformed {tag} ({value!r})")
    return out


def _frame_geometry(ds, n: int) -> tuple[dict, np.ndarray]:
    """{position: [n, 3], orientation: [6], spacing: [2]} and (slope, intercept) [n, 2]."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if per is None and not shared_seq:
        raise ScanError("missing functional groups: a multi-frame file without "
                        "PerFrameFunctionalGroupsSequence or SharedFunctionalGroupsSequence (the "
                        "frames' positions are not in the file)")
    if per is None or len(per) != n:
        raise ScanError(f"missing functional groups: PerFrameFunctionalGroupsSequence has "
                        f"{0 if per is None else len(per)} items for {n} frames (a truncated or "
                        "incomplete header)")
    shared = shared_seq[0] if shared_seq else None
    found = {key: [] for key in GROUPS}
    rescale = np.empty((n, 2))
    top = (_numbers(ds, "RescaleSlope", 1, "top level"),
           _numbers(ds, "RescaleIntercept", 1, "top level"))
    for f, frame in enumerate(per):
        where = f"frame {f + 1}"
        for key, (sequence, tag, count) in GROUPS.items():
            value = _numbers(_macro(frame, shared, sequence), tag, count, where)
            if value is None:
                raise ScanError(f"missing functional groups: frame {f + 1} has no {sequence} > "
                                f"{tag} (of {count} numbers) in its own or the shared groups")
            found[key].append(value)
        item = _macro(frame, shared, "PixelValueTransformationSequence")
        slope, intercept = top if item is None else (_numbers(item, "RescaleSlope", 1, where),
                                                     _numbers(item, "RescaleIntercept", 1, where))
        slope = 1.0 if slope is None else float(slope[0])
        intercept = 0.0 if intercept is None else float(intercept[0])
        if slope == 0:
            raise ScanError(f"frame {f + 1}: RescaleSlope 0")
        rescale[f] = slope, intercept
    geometry = {"position": np.asarray(found["position"])}
    for key in ("orientation", "spacing"):
        values = np.asarray(found[key])
        tolerance = ORIENTATION_TOLERANCE if key == "orientation" else 1e-4 * values[0].max()
        worst = np.abs(values - values[0]).max(axis=1)
        if (worst > tolerance).any():
            raise ScanError(f"frames of different {key}s (frame {int(np.argmax(worst)) + 1} and "
                            "frame 1)")
        geometry[key] = values[0]
    return geometry, rescale


def _tilt(ds):
    """GantryDetectorTilt, where the file says it (CT Acquisition Details or top level)."""
    per = ds.get("PerFrameFunctionalGroupsSequence") or [None]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    item = _macro(per[0], shared, "CTAcquisitionDetailsSequence")
    tag = item.get("GantryDetectorTilt") if item is not None else None
    return tag if tag not in (None, "") else ds.get("GantryDetectorTilt")


def _frames(path: str, ds, n: int, rows: int, cols: int, rescale: np.ndarray
            ) -> tuple[np.ndarray, bool]:
    """The frames in stored order, [n, rows, cols], and whether they are rescaled already."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if "PixelData" not in ds:
        raise ScanError("truncated pixel data: no complete Pixel Data element (the file ends "
                        "before it or inside it)")
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax.is_encapsulated:
        bits = int(ds.get("BitsAllocated", 0) or 0)
        need, have = (n * rows * cols * bits + 7) // 8, len(ds.PixelData)
        if have < need:
            raise ScanError(f"truncated pixel data: {have} of the {need} bytes of {n} frames of "
                            f"{rows}x{cols} at {bits} bits")
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        available = False
    if available:
        try:
            frames = ds.pixel_array
        except Exception as e:  # pydicom's decoders raise many types on short or corrupt data
            raise ScanError(f"truncated or corrupt pixel data ({_one_line(e)})") from None
        rescaled = False
    else:
        if (rescale != rescale[0]).any():
            raise ScanError(f"{syntax.name or syntax} pixel data with a rescale per frame: no "
                            f"pydicom decoder for it here ({DECODER_HINT}), and GDCM would "
                            "apply the first frame's rescale to every frame")
        import SimpleITK as sitk

        try:  # GDCM decodes and applies the (one) rescale
            frames = sitk.GetArrayFromImage(sitk.ReadImage(path, imageIO="GDCMImageIO"))
        except RuntimeError as e:
            raise ScanError(f"truncated or corrupt pixel data ({_itk_reason(e)})") from None
        rescaled = True
    if frames.shape != (n, rows, cols):
        raise ScanError(f"pixel data of shape {frames.shape}, header says {n} frames of "
                        f"{rows}x{cols}")
    return frames, rescaled


def load_dicom_multiframe(scan: DicomSeries) -> tuple[np.ndarray, dict]:
    """A multi-frame DICOM file as float32 [D, H, W] in RAS+ (HU for CT), or ScanError saying
    what is wrong: missing functional groups, irregular frame spacing, a gantry tilt, truncated
    pixel data."""
    import pydicom
    from pydicom.uid import UID

    path = scan.files[0]
    name = _basename(path)
    try:  # the pixel data is read when used, after the header's checks
        ds = pydicom.dcmread(path, defer_size=2 ** 20)
        if "PixelData" not in ds:  # pydicom returns nothing at all when encapsulated pixel
            ds = pydicom.dcmread(path, stop_before_pixels=True)  # data is cut: the header alone
    except Exception as e:
        raise ScanError(f"unreadable multi-frame file {name}: {_one_line(e)}") from None
    n, rows, cols = (number_of_frames(ds), int(ds.get("Rows", 0) or 0),
                     int(ds.get("Columns", 0) or 0))
    if n < 2:
        raise ScanError(f"{name}: a single frame, not a volume")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ScanError(f"{name}: {ds.SamplesPerPixel} samples per pixel (colour), expected one")
    if min(rows, cols) < 1:
        raise ScanError(f"{name}: Rows {rows}, Columns {cols}")
    if int(np.prod([rows, cols, n], dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(f"{n} frames of {rows}x{cols} exceed the {MAX_VOXELS}-voxel limit")
    geometry, rescale = _frame_geometry(ds, n)
    iop, pixel = geometry["orientation"], geometry["spacing"]
    _, _, normal = plane_axes(iop, pixel)
    order, ipp, step = stack_positions(geometry["position"], normal, _tilt(ds), unit="frame",
                                       whole="file")
    frames, rescaled = _frames(path, ds, n, rows, cols, rescale)
    volume = np.empty((n, rows, cols), np.float32)
    for k, f in enumerate(order):
        slope, intercept = rescale[f]
        if rescaled or (slope, intercept) == (1.0, 0.0):
            volume[k] = frames[f]
        else:  # in float64, then float32: as GDCM rescales a slice
            volume[k] = frames[f] * slope + intercept
    del frames
    extra = {"series_uid": scan.uid or str(ds.get("SeriesInstanceUID", "")), "slices": n}
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop:
        extra["dicom_sop_class"] = UID(sop).name
    if ds.get("Modality"):
        extra["dicom_modality"] = str(ds.Modality)
    return _canonical(volume.transpose(2, 1, 0), stack_affine(iop, pixel, step, ipp[0]), extra)
