"""What the transform and every reader share: the error, the size limit, the scan suffixes,
subject ids and the file checks. The bottom of hagan_tf.preprocess: it imports none of it.
"""

from __future__ import annotations

import os

MAX_VOXELS = 1024 ** 3  # 4 GiB as float32: larger inputs are refused instead of exhausting memory
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # NRRD and MetaImage, read with SimpleITK
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


class ScanError(ValueError):
    """A scan that cannot be preprocessed; the message is a one-line reason."""


def subject_id(path: str) -> str:
    """The file name without directory and scan suffix (.nii.gz, .nrrd, ...): the key for labels
    and folds. A DICOM series' id: `readers` module docstring."""
    name = os.path.basename(str(path).rstrip("/"))
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text[:300]}"


def _check_file(path: str):
    """ScanError unless `path` is a non-empty file (every reader starts here)."""
    if not os.path.exists(path):
        raise ScanError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ScanError(f"is a directory, not a scan: {path}")
    if os.path.getsize(path) == 0:
        raise ScanError("empty file (0 bytes)")
