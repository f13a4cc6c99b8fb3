"""One loader for every scan format the field exchanges, each ending as a [D, H, W] RAS+ array.

- NIfTI (`.nii`, `.nii.gz`): nibabel, exactly as before (`nifti.load_scan`).
- NRRD (`.nrrd`, `.nhdr`) and MetaImage (`.mha`, `.mhd`): SimpleITK.
- DICOM series: pydicom reads the headers (fast, tag by tag, with a precise error per file) to
  find, group, sort and check the slices; SimpleITK (GDCM) decodes the pixels, every transfer
  syntax included, and applies RescaleSlope/RescaleIntercept (stored values -> HU for CT).
- Multi-frame DICOM (Enhanced CT and the other enhanced classes: every slice in one file):
  pydicom reads the functional groups and the pixels; the frames are sorted and checked as a
  series' slices are, each with its own rescale (`multiframe`).
- A series of single-frame enhanced files (Enhanced CT/MR, one file per slice): a DICOM series,
  each slice's geometry and rescale read from its functional groups (`functional_groups`).

This module lists the inputs and holds the one loader; the formats' own code is in `nifti`,
`itk` (NRRD, MetaImage, and the LPS -> RAS+ step), `dicom` (finding DICOM scans, series),
`multiframe` (multi-frame files) and `functional_groups` (what enhanced files keep there).

SimpleITK and DICOM describe space in LPS (x to the patient's left, y posterior, z superior);
NIfTI in RAS. Both are converted by flipping x and y of the voxel-to-world affine and then taking
nibabel's closest canonical (RAS+) orientation, the very step the NIfTI route takes, so a scan
lands with left, right, anterior, posterior, superior and inferior in the same voxels whatever
format it came in.

A DICOM series is identified by its SeriesInstanceUID, wherever its files lie under the inputs
and whatever their names. A multi-frame file (NumberOfFrames > 1) is a scan of its own, never
part of a series, even beside single-frame files of its SeriesInstanceUID. The subject id of
either (the key for labels, folds and duplicates) is:
- the name of its folder, when that folder holds this scan and no other (the usual export
  layout, one folder per series; as a NIfTI scan's id is its file name);
- otherwise `<PatientID>_<SeriesInstanceUID>` (PatientID reduced to letters, digits, `.`, `_`
  and `-`; the UID alone when there is no PatientID): stable, and unique across a collection;
- for a multi-frame file whose SeriesInstanceUID another scan under the inputs shares (one file
  per stack, or a series beside it), `<PatientID>_<SeriesInstanceUID>_<SOPInstanceUID>`.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Callable, Iterable, Union

import numpy as np

from .dicom import (DicomSeries, _basename, _classify, _dirname, _local_open,  # noqa: F401
                    group_dicom, load_dicom_series, number_of_frames)
from .itk import load_itk
from .multiframe import load_dicom_multiframe
from .nifti import load_scan
from .scans import ITK_SUFFIXES, NIFTI_SUFFIXES, SCAN_SUFFIXES, ScanError, _check_file, subject_id

log = logging.getLogger("hagan_tf.preprocess")
Source = Union[str, DicomSeries]


# -- listing the inputs ----------------------------------------------------------------------------

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
    content (any name), grouped into series by SeriesInstanceUID across all the inputs (a
    multi-frame file: a scan of its own). A file
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
    """The path a source is reported under (a DICOM series: its folder; a multi-frame file:
    the file)."""
    return str(source)


def find_series(folder: str) -> DicomSeries:
    """The one DICOM series (or multi-frame file) under a local folder (for
    `preprocess_file(folder)`)."""
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


# -- the one loader ------------------------------------------------------------------------------

def load_volume(source: Source) -> tuple[np.ndarray, dict]:
    """Any supported scan -> (float32 [D, H, W] in RAS+, meta). Raises ScanError on bad input.

    `source`: a NIfTI, NRRD, MetaImage or multi-frame DICOM file, a folder holding one DICOM
    series (or one multi-frame file), or a `DicomSeries` from `expand_inputs`.
    """
    if isinstance(source, DicomSeries):
        return (load_dicom_multiframe if source.frames else load_dicom_series)(source)
    path = str(source)
    lower = path.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return load_scan(path)  # unchanged: bit-for-bit the NIfTI route
    if lower.endswith(ITK_SUFFIXES):
        return load_itk(path)
    if os.path.isdir(path):
        return load_volume(find_series(path))
    _check_file(path)
    kind, what = _classify(path, _local_open)
    if kind == "not dicom":
        raise ScanError("not a supported scan: neither NIfTI (.nii, .nii.gz), NRRD (.nrrd, "
                        ".nhdr), MetaImage (.mha, .mhd) nor DICOM")
    if kind == "broken":
        raise ScanError(what)
    if kind == "other":
        raise ScanError(f"a DICOM {what} object, not an image")
    uid, frames = str(what.SeriesInstanceUID).strip(), number_of_frames(what)
    return load_volume(DicomSeries(uid, (path,), subject_id(path), _dirname(path),
                                   frames=frames if frames > 1 else 0))


def source_subject_id(source: Source) -> str:
    """The subject id of a source: a file's name without its suffix, a series' as documented."""
    if isinstance(source, DicomSeries):
        return source.subject_id
    path = str(source)
    if os.path.isdir(path):
        return subject_id(_basename(path))
    if not _is_scan_name(path) and os.path.isfile(path):  # a multi-frame DICOM file, say
        items = expand_inputs([path], warn=lambda _: None)
        if len(items) == 1 and isinstance(items[0][1], DicomSeries):
            return items[0][0]  # as hagan-preprocess names it
    return subject_id(path)
