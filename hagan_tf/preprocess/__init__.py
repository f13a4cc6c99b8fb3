"""Scans to training records: the per-scan transform and the Beam job around it."""

from .transform import ScanError, load_scan, preprocess_array, preprocess_file, subject_id

__all__ = ["ScanError", "load_scan", "preprocess_array", "preprocess_file", "subject_id"]
