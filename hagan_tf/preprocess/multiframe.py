"""Multi-frame DICOM: one file holding every slice of a scan, as Enhanced CT Image Storage
(1.2.840.10008.5.1.4.1.1.2.1), Legacy Converted Enhanced CT (…1.2.2) and the other enhanced
image classes (MR, PET) store it. Each frame's geometry (position, orientation, pixel spacing)
and rescale are in the functional groups, per frame or shared by all; `functional_groups` reads
them, as it does for a series of single-frame enhanced files.

pydicom reads the groups and decodes the stored values. The frames are then sorted and checked
exactly as a series' slices are (`dicom.stack_positions`: position along the normal, regular
spacing, no gantry tilt), each frame gets its own rescale, and the volume goes to RAS+ by the
step every reader shares (`itk._canonical`).

SimpleITK (GDCM) reads such a file too, but not correctly for us: it returns the frames in
stored order and applies the first frame's rescale to every frame (SimpleITK 2.5.7, measured by
tests/test_dicom_multiframe.py). It is used only to decode transfer syntaxes pydicom has no
decoder for in this environment (JPEG Lossless, JPEG-LS; pydicom decodes the uncompressed,
deflated and RLE syntaxes itself, and JPEG baseline and JPEG 2000 through Pillow), and only when
every frame has the same rescale.

A multi-frame file without functional groups (older multi-frame objects with one top-level
ImagePositionPatient for all frames) is refused: its frames' positions are a convention of the
writer, not data in the file.
"""

from __future__ import annotations

import numpy as np

from .dicom import (ORIENTATION_TOLERANCE, DicomSeries, _basename, number_of_frames, plane_axes,
                    stack_affine, stack_positions)
from .functional_groups import (decode_frames, frame_geometry, read_dataset, rescaled_frame,
                                tilt)
from .itk import _canonical
from .scans import MAX_VOXELS, ScanError, _one_line


def _one_plane(geometry: dict) -> dict:
    """The frames' positions [n, 3], and their one orientation [6] and pixel spacing [2], or
    ScanError where the frames differ in either."""
    out = {"position": geometry["position"]}
    for key in ("orientation", "spacing"):
        values = geometry[key]
        tolerance = ORIENTATION_TOLERANCE if key == "orientation" else 1e-4 * values[0].max()
        worst = np.abs(values - values[0]).max(axis=1)
        if (worst > tolerance).any():
            raise ScanError(f"frames of different {key}s (frame {int(np.argmax(worst)) + 1} and "
                            "frame 1)")
        out[key] = values[0]
    return out


def load_dicom_multiframe(scan: DicomSeries) -> tuple[np.ndarray, dict]:
    """A multi-frame DICOM file as float32 [D, H, W] in RAS+ (HU for CT), or ScanError saying
    what is wrong: missing functional groups, irregular frame spacing, a gantry tilt, truncated
    pixel data."""
    from pydicom.uid import UID

    path = scan.files[0]
    name = _basename(path)
    try:  # the pixel data is read when used, after the header's checks
        ds = read_dataset(path)
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
    geometry, rescale = frame_geometry(ds, n)
    geometry = _one_plane(geometry)
    iop, pixel = geometry["orientation"], geometry["spacing"]
    _, _, normal = plane_axes(iop, pixel)
    order, ipp, step = stack_positions(geometry["position"], normal, tilt(ds), unit="frame",
                                       whole="file")
    frames, rescaled = decode_frames(path, ds, n, rows, cols, rescale)
    volume = np.empty((n, rows, cols), np.float32)
    for k, f in enumerate(order):
        volume[k] = rescaled_frame(frames[f], *rescale[f], rescaled)
    del frames
    extra = {"series_uid": scan.uid or str(ds.get("SeriesInstanceUID", "")), "slices": n}
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop:
        extra["dicom_sop_class"] = UID(sop).name
    if ds.get("Modality"):
        extra["dicom_modality"] = str(ds.Modality)
    return _canonical(volume.transpose(2, 1, 0), stack_affine(iop, pixel, step, ipp[0]), extra)
