"""Sample-quality metrics: Fréchet distance, MMD², 3D MS-SSIM diversity and Inception Score.

Feature metrics take arrays [n, features]; MS-SSIM takes volumes [n, D, H, W(, 1)] in [-1, 1].
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy import linalg, ndimage
from sklearn.metrics.pairwise import euclidean_distances, polynomial_kernel, rbf_kernel

from ..arrays import mean_pairwise_l1  # noqa: F401 (its home is hagan_tf.arrays: hagan-train uses it)

# Wang et al. 2003 scale weights, finest first; truncated and renormalised for small volumes.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _features(x, name="features") -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be [n >= 2, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians.

    When S1 S2 is singular (fewer samples than features) sqrtm is unstable: eps (relative to
    the covariances' scale) is added to both diagonals, as in the reference FID code; an
    imaginary part from round-off is dropped when it is small against the real one, a test
    that must not depend on the features' units.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("means and covariances must have matching shapes")

    def imaginary(root) -> float:  # the diagonal's imaginary part, relative to its real part
        if not np.iscomplexobj(root):
            return 0.0
        d = np.diagonal(root)
        return float(np.abs(d.imag).max() / max(np.abs(d.real).max(), 1e-30))

    with warnings.catch_warnings():  # a singular product is expected and handled here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if (not np.isfinite(covmean).all() or _rel_error(covmean, sigma1 @ sigma2) > 1e-3
                or imaginary(covmean) > 1e-3):
            scale = max(np.abs(np.diagonal(sigma1)).max(), np.abs(np.diagonal(sigma2)).max(), 1e-30)
            offset = np.eye(len(sigma1)) * eps * scale
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if imaginary(covmean) > 1e-3:
        raise ValueError(f"sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
    covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), 0.0))


def _rel_error(root, square) -> float:
    return float(np.linalg.norm(root @ root - square) / max(np.linalg.norm(square), 1e-30))


def fid(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps)


def median_bandwidth(x, y) -> float:
    """Median pairwise distance of the pooled samples (the usual Gaussian-kernel heuristic)."""
    z = np.concatenate([x, y])
    d = euclidean_distances(z)[np.triu_indices(len(z), 1)]
    med = float(np.median(d))
    return med if med > 0 else 1.0


def mmd2(x, y, kernel: str = "gaussian", bandwidth: float | None = None, degree: int = 3,
         gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD² (Gretton et al. 2012) between samples x [m, d] and y [n, d].

    kernel "gaussian": exp(-|a-b|² / (2 bandwidth²)), bandwidth defaulting to the median
    heuristic; "polynomial": (gamma a·b + coef0)^degree, gamma defaulting to 1/d (the KID kernel).
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature sizes {x.shape[1]} and {y.shape[1]}")
    if kernel == "gaussian":
        bw = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
        k = lambda a, b: rbf_kernel(a, b, gamma=1.0 / (2 * bw * bw))  # noqa: E731
    elif kernel == "polynomial":
        k = lambda a, b: polynomial_kernel(a, b, degree=degree, gamma=gamma, coef0=coef0)  # noqa: E731
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'polynomial', got {kernel!r}")
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def inception_score(probs, splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from class probabilities [n, classes]; (mean, std over splits)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"probs must be [n >= splits, classes], got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
        raise ValueError("probs must be non-negative rows summing to 1")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.maximum(part, 1e-30)) - np.log(np.maximum(py, 1e-30))), 0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _volume(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if v.ndim == 4 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.ndim != 3:
        raise ValueError(f"expected a [D, H, W(, 1)] volume, got shape {v.shape}")
    return v


def ms_ssim_scales(shape, min_size: int = 8) -> int:
    """Number of MS-SSIM scales: at most 5, keeping the coarsest edge >= min_size voxels."""
    return int(np.clip(1 + np.floor(np.log2(min(shape) / min_size)), 1, len(MS_SSIM_WEIGHTS)))


def _pool2(v: np.ndarray) -> np.ndarray:
    d, h, w = (s - s % 2 for s in v.shape)
    v = v[:d, :h, :w]
    return v.reshape(d // 2, 2, h // 2, 2, w // 2, 2).mean((1, 3, 5))


def ms_ssim_3d(a, b, data_range: float = 2.0, sigma: float = 1.5, scales: int | None = None,
               low: float = -1.0) -> float:
    """Multi-scale SSIM of two volumes with a 3D Gaussian window (sigma 1.5, 11 taps).

    Contrast-structure terms at every scale and, at the coarsest, the mean of the whole SSIM
    map (Wang et al. 2003, as tf.image.ssim_multiscale); 2x average pooling between scales,
    negative terms clipped to 0 as tf.image does. Values span [low, low + data_range] and are
    shifted to [0, data_range] first: the luminance term assumes non-negative intensities, and
    on [-1, 1] local means of opposite signs would make it negative.
    """
    a, b = _volume(a) - np.float32(low), _volume(b) - np.float32(low)
    if a.shape != b.shape:
        raise ValueError(f"volumes differ in shape: {a.shape} vs {b.shape}")
    scales = ms_ssim_scales(a.shape) if scales is None else scales
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda v: ndimage.gaussian_filter(v, sigma, truncate=3.5, mode="reflect")  # noqa: E731
    out = 1.0
    for s in range(scales):
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a ** 2
        var_b = blur(b * b) - mu_b ** 2
        cov = blur(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        if s == scales - 1:
            lum = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
            out *= max(float(np.mean(lum * cs)), 0.0) ** weights[s]
        else:
            out *= max(float(np.mean(cs)), 0.0) ** weights[s]
            a, b = _pool2(a), _pool2(b)
    return float(out)


def ms_ssim_diversity(volumes, max_pairs: int | None = None, seed: int = 0, **kw) -> float:
    """Mean MS-SSIM over distinct pairs of volumes (lower = more diverse).

    All pairs are used unless there are more than max_pairs, then a seeded random subset.
    """
    vols = list(volumes)
    if len(vols) < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 volumes")
    pairs = list(itertools.combinations(range(len(vols)), 2))
    if max_pairs is not None and len(pairs) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    return float(np.mean([ms_ssim_3d(vols[i], vols[j], **kw) for i, j in pairs]))
