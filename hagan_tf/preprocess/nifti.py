"""NIfTI scans through nibabel (`load_scan`): the route the other formats' readers end like."""

from __future__ import annotations

import zlib

import numpy as np

from .scans import MAX_VOXELS, ScanError, _check_file, _one_line


def _inflated(img, path: str):
    """A .nii.gz decoded in one zlib call instead of nibabel's stream of small reads: the same
    bytes, ~30% faster, and the GIL is free all along (threads read in parallel). Decoding stops
    at the size the header announces. On any doubt (a multi-member gzip, a short or odd file),
    the image as nibabel loaded it, whose errors the caller reports."""
    import nibabel as nib

    if not path.lower().endswith(".gz") or not isinstance(img, nib.Nifti1Image):
        return img
    try:
        need = int(img.dataobj.offset) + int(np.prod(img.shape, dtype=np.int64)) * \
            img.get_data_dtype().itemsize
        with open(path, "rb") as f:
            raw = zlib.decompressobj(31).decompress(f.read(), need)
        if len(raw) != need:
            return img
        inflated = type(img).from_bytes(raw)
        if inflated.shape != img.shape or inflated.get_data_dtype() != img.get_data_dtype():
            return img
        return inflated
    except Exception:
        return img


def load_scan(path: str) -> tuple[np.ndarray, dict]:
    """Reads a 3D NIfTI as float32 [D, H, W] in RAS+ (D = superior axis) and its metadata."""
    import nibabel as nib
    from nibabel.affines import voxel_sizes

    _check_file(path)
    try:
        img = nib.load(path)
    except PermissionError as e:
        raise ScanError(f"unreadable path: {_one_line(e)}") from None
    except Exception as e:  # nibabel raises many types for foreign or corrupt bytes
        raise ScanError(f"not a readable NIfTI file: {_one_line(e)}") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise ScanError(f"not a volume image: {type(img).__name__}")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise ScanError(f"{len(shape)}D image of shape {shape}, expected a 3D volume")
    if any(s != 1 for s in shape[3:]):
        raise ScanError(f"{len(shape)}D image of shape {shape}, expected a single 3D volume")
    if min(shape) < 1:
        raise ScanError(f"empty image of shape {shape}")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(f"image of shape {shape} exceeds the {MAX_VOXELS}-voxel limit")
    img = _inflated(img, path)
    try:
        orientation = "".join(nib.aff2axcodes(img.affine))
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32)).reshape(canon.shape[:3])
        spacing = voxel_sizes(canon.affine)[:3]
    except Exception as e:
        raise ScanError(f"corrupt or truncated image data: {_one_line(e)}") from None
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))
    meta = {"original_shape": list(shape), "orientation": orientation,
            "spacing": [round(float(s), 6) for s in spacing[::-1]]}
    return volume, meta
