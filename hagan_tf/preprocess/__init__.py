"""Scans to training records: the readers, the per-scan transform and the Beam job around them."""

from .readers import DicomSeries, expand_inputs, load_volume
from .transform import ScanError, load_scan, preprocess_array, preprocess_file, subject_id

__all__ = ["DicomSeries", "ScanError", "expand_inputs", "load_scan", "load_volume",
           "preprocess_array", "preprocess_file", "subject_id"]
