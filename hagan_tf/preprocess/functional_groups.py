"""The functional groups of the enhanced DICOM image classes (Enhanced CT, Legacy Converted
Enhanced CT, Enhanced MR, ...): where such a file keeps each frame's geometry and rescale, per
frame (PerFrameFunctionalGroupsSequence, one item per frame) or shared by all
(SharedFunctionalGroupsSequence, one item), instead of the top-level tags of a classic slice:

- PlanePositionSequence > ImagePositionPatient: the frame's position (LPS, mm);
- PlaneOrientationSequence > ImageOrientationPatient;
- PixelMeasuresSequence > PixelSpacing;
- PixelValueTransformationSequence > RescaleSlope, RescaleIntercept (stored values -> HU for
  CT); where no group has it, the top-level RescaleSlope/RescaleIntercept, else none.

Read here, and decoded with pydicom, for both readers of such files: a multi-frame file's
frames (`multiframe`) and a series of single-frame enhanced files, one file per slice
(`dicom.load_dicom_series`). The readers check what they read (regular spacing, one
orientation, ...), each for its own stack.
"""

from __future__ import annotations

import numpy as np

from .itk import _itk_reason
from .scans import ScanError, _one_line

GROUPS = {  # what we read: (functional group sequence, attribute, values)
    "position": ("PlanePositionSequence", "ImagePositionPatient", 3),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
    "spacing": ("PixelMeasuresSequence", "PixelSpacing", 2),
}
# The top-level tags these files carry the groups in (read with a series' slice headers).
GROUP_TAGS = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
              "RescaleSlope", "RescaleIntercept"]
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


def has_groups(ds) -> bool:
    """Whether a header keeps its geometry in functional groups (an enhanced image class)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


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


def frame_geometry(ds, n: int, slice_name: str | None = None) -> tuple[dict, np.ndarray]:
    """{position: [n, 3], orientation: [n, 6], spacing: [n, 2]} and (slope, intercept) [n, 2],
    each frame's, or ScanError where a group is missing or malformed. `slice_name`: the file's
    name when it is one slice of a series (its one frame); messages then name the slice."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if per is None and not shared_seq:
        raise ScanError("missing functional groups: a multi-frame file without "
                        "PerFrameFunctionalGroupsSequence or SharedFunctionalGroupsSequence (the "
                        "frames' positions are not in the file)")
    if per is None and n == 1:  # one frame: the shared groups say it all
        per = [None]
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
        where = f"slice {slice_name}" if slice_name is not None else f"frame {f + 1}"
        for key, (sequence, tag, count) in GROUPS.items():
            value = _numbers(_macro(frame, shared, sequence), tag, count, where)
            if value is None:
                raise ScanError(f"missing functional groups: {where} has no {sequence} > "
                                f"{tag} (of {count} numbers) in its own or the shared groups")
            found[key].append(value)
        item = _macro(frame, shared, "PixelValueTransformationSequence")
        slope, intercept = top if item is None else (_numbers(item, "RescaleSlope", 1, where),
                                                     _numbers(item, "RescaleIntercept", 1, where))
        slope = 1.0 if slope is None else float(slope[0])
        intercept = 0.0 if intercept is None else float(intercept[0])
        if slope == 0:
            raise ScanError(f"{where}: RescaleSlope 0")
        rescale[f] = slope, intercept
    return {key: np.asarray(values) for key, values in found.items()}, rescale


def tilt(ds):
    """GantryDetectorTilt, where the file says it (CT Acquisition Details or top level)."""
    per = ds.get("PerFrameFunctionalGroupsSequence") or [None]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    item = _macro(per[0], shared, "CTAcquisitionDetailsSequence")
    tag = item.get("GantryDetectorTilt") if item is not None else None
    return tag if tag not in (None, "") else ds.get("GantryDetectorTilt")


def read_dataset(path: str):
    """The whole file, its pixel data read when used (after the header's checks); pydicom
    returns nothing at all when encapsulated pixel data is cut, so then the header alone."""
    import pydicom

    ds = pydicom.dcmread(path, defer_size=2 ** 20)
    if "PixelData" not in ds:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds


def decode_frames(path: str, ds, n: int, rows: int, cols: int, rescale: np.ndarray
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
            raise ScanError(f"truncated pixel data: {have} of the {need} bytes of {n} "
                            f"frame{'s' if n > 1 else ''} of {rows}x{cols} at {bits} bits")
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        available = False
    if available:
        try:
            frames = ds.pixel_array
        except Exception as e:  # pydicom's decoders raise many types on short or corrupt data
            raise ScanError(f"truncated or corrupt pixel data ({_one_line(e)})") from None
        if n == 1 and frames.ndim == 2:  # one frame: pydicom drops the frame axis
            frames = frames[None]
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


def rescaled_frame(frame: np.ndarray, slope: float, intercept: float, rescaled: bool
                   ) -> np.ndarray:
    """Stored values -> HU: in float64, then float32, as GDCM rescales a slice."""
    if rescaled or (slope, intercept) == (1.0, 0.0):
        return frame
    return frame * slope + intercept
