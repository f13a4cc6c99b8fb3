"""NRRD and MetaImage scans through SimpleITK, and the LPS -> RAS+ step that DICOM shares.

SimpleITK and DICOM describe space in LPS (x to the patient's left, y posterior, z superior);
NIfTI in RAS. `_canonical` flips x and y of the voxel-to-world affine and then takes nibabel's
closest canonical (RAS+) orientation, the very step the NIfTI route takes.
"""

from __future__ import annotations

import os

import numpy as np

from .scans import MAX_VOXELS, ScanError, _check_file, _one_line

ITK_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO",
          ".mhd": "MetaImageIO"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
