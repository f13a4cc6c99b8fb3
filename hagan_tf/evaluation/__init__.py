"""Evaluation of generated volumes: FID/MMD on 3D features, MS-SSIM diversity, slice IS."""

from .features import EXTRACTORS, Extractor, make_extractor
from .metrics import fid, frechet_distance, inception_score, mmd2, ms_ssim_3d, ms_ssim_diversity

__all__ = ["EXTRACTORS", "Extractor", "make_extractor", "fid", "frechet_distance",
           "inception_score", "mmd2", "ms_ssim_3d", "ms_ssim_diversity"]
