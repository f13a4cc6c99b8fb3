"""Sample fidelity measured on anatomy: one estimator for real and generated volumes.

`anatomy_factors` reads four anatomy fractions off a volume in [-1, 1] (the CT window
[-1024, 600] HU mapped linearly, as hagan-preprocess writes and the generator produces), at any
size, by HU thresholds (see THRESHOLDS_HU):

  body       fraction of the volume inside the body: in each axial slice, the voxels above
             -500 HU with their enclosed holes filled (so the lungs count as body; the air
             around the patient does not)
  lung       fraction of the volume that is inside the body and below -500 HU (aerated lung,
             emphysema included)
  bone       fraction of the volume above +250 HU (anywhere). Phantom bone is 900 HU, clipped
             to +600 by the window; soft tissue is at most ~100 HU, so a rib blurred to a
             third of a voxel at 32^3 still counts
  emphysema  fraction of the LUNG voxels below -950 HU (the clinical %LAA-950; 0 without lung)

Why these thresholds: at 32^3 the resize from ~96 voxels smooths by ~3 voxels, mixing each
structure with its neighbours. Lung parenchyma (-860 HU) and soft tissue (~40 HU) are 900 HU
apart, so -500 splits their partial-volume edge near the middle; emphysema (-990 HU) is 130 HU
below parenchyma with -950 between (clusters smaller than a voxel at 32^3 are lost, so the
measured extent is below the generating one, but monotone in it); outside-body air (-1000 HU)
is also below -950, which is why emphysema and lung require the body mask.

Distances (same estimator on both sides): each factor's 1-Wasserstein distance divided by the
real factor's standard deviation; the pooled voxel-intensity histograms' W1 (in HU) and L1;
diversity as the mean pairwise L1 and MS-SSIM within a set; ridge R^2 of each factor from an
embedding (cross-validated).
"""

from __future__ import annotations

import csv
import itertools
import os

import numpy as np
from scipy import ndimage

from .metrics import _volume

WINDOW = (-1024.0, 600.0)
THRESHOLDS_HU = {"body": -500.0, "emphysema": -950.0, "bone": 250.0}
FACTORS = ("body", "lung", "bone", "emphysema")
HIST_EDGES_HU = np.linspace(WINDOW[0], WINDOW[1], 203 + 1)  # 8 HU bins over the window


def hu_to_unit(hu, window=WINDOW):
    """HU -> [-1, 1] (no clipping: thresholds outside the window map outside [-1, 1])."""
    low, high = window
    return (np.asarray(hu, np.float64) - low) / (high - low) * 2.0 - 1.0


def unit_to_hu(v, window=WINDOW):
    low, high = window
    return (np.asarray(v, np.float32) + 1.0) * np.float32((high - low) / 2.0) + np.float32(low)


def body_mask(volume) -> np.ndarray:
    """Per axial slice ([D, H, W], D axial): voxels above the body threshold, holes filled."""
    v = _volume(volume)
    dense = v > hu_to_unit(THRESHOLDS_HU["body"])
    out = np.empty_like(dense)
    for k in range(len(dense)):
        out[k] = ndimage.binary_fill_holes(dense[k])
    return out


def anatomy_factors(volume) -> dict[str, float]:
    """{body, lung, bone, emphysema} of one volume in [-1, 1] (see the module docstring)."""
    v = _volume(volume)
    body = body_mask(v)
    lung = body & (v < hu_to_unit(THRESHOLDS_HU["body"]))
    emph = lung & (v < hu_to_unit(THRESHOLDS_HU["emphysema"]))
    n_lung = int(lung.sum())
    return {"body": float(body.mean()), "lung": float(lung.mean()),
            "bone": float((v > hu_to_unit(THRESHOLDS_HU["bone"])).mean()),
            "emphysema": float(emph.sum() / n_lung) if n_lung else 0.0}


def factor_table(volumes) -> dict[str, np.ndarray]:
    """anatomy_factors of each volume, as {factor: array [n]}."""
    rows = [anatomy_factors(v) for v in volumes]
    return {k: np.array([r[k] for r in rows], np.float64) for k in FACTORS}


# -- distances -------------------------------------------------------------------------------------

def normalized_w1(real, generated) -> float:
    """W1(real, generated) / sd(real): 0 for identical distributions, ~1 when the generated
    values are off by one real standard deviation. inf when the real values are constant and
    the generated ones differ."""
    from scipy.stats import wasserstein_distance

    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    w1 = float(wasserstein_distance(real, generated))
    sd = float(np.std(real, ddof=1)) if len(real) > 1 else 0.0
    if sd == 0:
        return 0.0 if w1 == 0 else float("inf")
    return w1 / sd


def intensity_histogram(volumes, edges=HIST_EDGES_HU) -> np.ndarray:
    """Voxel counts of volumes in [-1, 1] over HU bins `edges` (values clipped into the range)."""
    counts = np.zeros(len(edges) - 1, np.int64)
    for v in volumes:
        hu = np.clip(unit_to_hu(_volume(v)), edges[0], edges[-1])
        counts += np.histogram(hu, edges)[0]
    return counts


def histogram_distances(counts_a, counts_b, edges=HIST_EDGES_HU) -> dict[str, float]:
    """Between two pooled intensity histograms: `w1_hu`, the 1-Wasserstein distance in HU
    (integral of |CDF_a - CDF_b|, exact up to the bin width), and `l1`, the L1 distance of the
    normalised histograms (0 = identical, 2 = disjoint)."""
    pa = np.asarray(counts_a, np.float64) / max(np.sum(counts_a), 1)
    pb = np.asarray(counts_b, np.float64) / max(np.sum(counts_b), 1)
    widths = np.diff(edges)
    return {"w1_hu": float(np.sum(np.abs(np.cumsum(pa) - np.cumsum(pb))[:-1] * widths[:-1])),
            "l1": float(np.abs(pa - pb).sum())}


def diversity(volumes, max_pairs: int | None = 300, seed: int = 0) -> dict[str, float]:
    """{l1: mean pairwise L1, ms_ssim: mean pairwise 3D MS-SSIM (seeded subset of at most
    max_pairs pairs; metrics.ms_ssim_scales picks the scales, 3 at 32^3)}. Higher L1 and lower
    MS-SSIM = more diverse."""
    from .metrics import mean_pairwise_l1, ms_ssim_diversity, ms_ssim_scales

    vols = [_volume(v) for v in volumes]
    return {"l1": mean_pairwise_l1(vols),
            "ms_ssim": ms_ssim_diversity(vols, max_pairs=max_pairs, seed=seed),
            "ms_ssim_scales": ms_ssim_scales(vols[0].shape),
            "n": len(vols)}


def ridge_r2(embeddings, targets: dict, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Cross-validated R^2 of each target from the embeddings: standardised embeddings, ridge
    with its penalty chosen inside each training fold (RidgeCV, efficient leave-one-out over
    10^-2..10^4), out-of-fold predictions (KFold, shuffled with `seed`) scored against the
    targets. 1 = the factor is linearly decodable; <= 0 = no better than its mean."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, np.float64)
    folds = min(folds, len(x))
    cv = KFold(folds, shuffle=True, random_state=seed)
    out = {}
    for name, y in targets.items():
        y = np.asarray(y, np.float64)
        if np.std(y) == 0:
            out[name] = float("nan")
            continue
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        out[name] = float(r2_score(y, cross_val_predict(model, x, y, cv=cv)))
    return out


# -- the real scans ----------------------------------------------------------------------------------

def write_csv(path: str, rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k != "subject_id":
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
    return rows


def write_phantom_scans(out_dir: str, n: int, shape=(72, 96, 96), spacing=(4.0, 3.6, 3.6),
                        seed: int = 0, prefix: str = "thorax") -> list[dict]:
    """n thorax phantoms (hagan_tf.data.synthetic.thorax_hu) as int16 HU NIfTI files in
    RAS+ ([D, H, W] stored as (x, y, z) with a diagonal affine of `spacing`, given in D, H, W
    order, mm), and OUT_DIR/factors.csv: per scan its subject id, file, generating factors
    (THORAX_FACTORS) and the true mask fractions at the written resolution (true_body,
    true_lung, true_bone: of the volume; true_emphysema: of the lung), which anatomy_factors
    reads back within ~0.005 at that resolution. Returns the rows."""
    import nibabel as nib

    from ..data.synthetic import thorax_hu

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    rows = []
    for i in range(n):
        hu, factors = thorax_hu(shape, rng)
        hu = np.round(np.clip(hu, -32768, 32767)).astype(np.int16)
        sid = f"{prefix}{i:04d}"
        path = os.path.join(out_dir, f"{sid}.nii.gz")
        img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, path)
        rows.append({"subject_id": sid, "file": os.path.basename(path),
                     **{k: round(v, 6) for k, v in factors.items()}})
    write_csv(os.path.join(out_dir, "factors.csv"), rows)
    return rows


def comparison_png(real, generated, path: str, title: str | None = None) -> str:
    """Mid slices (hagan_tf.io.mid_slices) of real volumes next to generated ones: one column
    per volume; rows real axial / coronal / sagittal, then generated. Same display as
    hagan_tf.io.montage_png: [-1, 1] in gray, anterior and superior up, the patient's right on
    the viewer's right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import mid_slices

    sets = [("real", list(real)), ("generated", list(generated))]
    cols = max(len(v) for _, v in sets)
    fig, axes = plt.subplots(6, cols, figsize=(1.3 * cols, 1.3 * 6 + (0.4 if title else 0.1)),
                             squeeze=False)
    for block, (name, vols) in enumerate(sets):
        for j in range(cols):
            slices = mid_slices(_volume(vols[j])) if j < len(vols) else [None] * 3
            for k, (sl, view) in enumerate(zip(slices, ("axial", "coronal", "sagittal"))):
                ax = axes[3 * block + k, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if sl is None:
                    ax.axis("off")
                    continue
                ax.imshow(sl, cmap="gray", vmin=-1.0, vmax=1.0, origin="lower")
                if j == 0:
                    ax.set_ylabel(f"{name}\n{view}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def diversity_ratios(generated: dict, real: dict) -> dict[str, float]:
    """generated / real of the `diversity` dicts: `l1` (mean pairwise L1), `ms_ssim` (mean
    pairwise MS-SSIM, as is) and `ms_ssim_dissimilarity` ((1 - MS-SSIM) generated over real).
    The targets use the dissimilarity: MS-SSIM itself is bounded by 1, so with real scans at
    0.84 a +25% band could never fail upward, not even for identical samples (1.0 / 0.84)."""
    def ratio(a, b):
        return a / b if b else float("nan")

    return {"l1": ratio(generated["l1"], real["l1"]),
            "ms_ssim": ratio(generated["ms_ssim"], real["ms_ssim"]),
            "ms_ssim_dissimilarity": ratio(1.0 - generated["ms_ssim"], 1.0 - real["ms_ssim"])}


def check_targets(result: dict, max_w1: float = 0.3, diversity_tol: float = 0.25,
                  min_lung_r2: float = 0.9) -> list[dict]:
    """The pass/fail targets of benchmarks/fidelity.py from its result dict: every factor's
    W1/sd <= max_w1; the samples' mean pairwise L1 and MS-SSIM dissimilarity (1 - MS-SSIM)
    within +-diversity_tol of the real scans' (see diversity_ratios); cross-validated ridge R^2
    of the lung fraction from E's embedding >= min_lung_r2. NaN values fail."""
    out = []
    for k in FACTORS:
        v = result["factors"][k]["w1_over_sd"]
        out.append({"target": f"{k} W1/sd <= {max_w1}", "value": v, "pass": bool(v <= max_w1)})
    for k, label in (("l1", "pairwise L1"), ("ms_ssim_dissimilarity", "1 - MS-SSIM")):
        r = result["diversity"]["ratio"][k]
        out.append({"target": f"diversity {label} gen/real in [{1 - diversity_tol:g}, "
                              f"{1 + diversity_tol:g}]", "value": r,
                    "pass": bool(abs(r - 1.0) <= diversity_tol)})
    r2 = result.get("ridge_r2", {}).get("lung")
    out.append({"target": f"ridge R2 of lung from E(x) >= {min_lung_r2}", "value": r2,
                "pass": bool(r2 is not None and r2 >= min_lung_r2)})
    return out


def sampling_floor(real, n: int, stat, repeats: int = 50, seed: int = 0) -> float:
    """Mean of stat(other real, random real subset of n) over `repeats` random splits of the
    real set (rows of `real`): what a perfect generator would score with n samples, i.e. the
    sampling noise of the statistic. NaN when the real set has fewer than n + 2 rows."""
    real = np.asarray(real)
    if len(real) < n + 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(repeats):
        perm = rng.permutation(len(real))
        vals.append(stat(real[perm[n:]], real[perm[:n]]))
    return float(np.mean(vals))


def feature_distances(real_features, generated_features, floor_repeats: int = 5,
                      seed: int = 0) -> dict:
    """FID, MMD^2 (Gaussian kernel, median bandwidth) and polynomial (KID-style) MMD^2 between
    feature sets [n, dim], each with its sampling floor (see sampling_floor); a metric that
    cannot be computed is None with its reason in `<name>_error`."""
    from .metrics import fid, mmd2

    er, eg = np.asarray(real_features, np.float64), np.asarray(generated_features, np.float64)
    out = {}
    for name, fn in (("fid", fid), ("mmd2_gaussian", lambda a, b: mmd2(a, b, "gaussian")),
                     ("mmd2_polynomial", lambda a, b: mmd2(a, b, "polynomial"))):
        try:
            out[name] = fn(er, eg)
            out[name + "_floor"] = sampling_floor(er, len(eg), fn, floor_repeats, seed)
        except (ValueError, np.linalg.LinAlgError) as e:
            out[name] = None
            out[name + "_error"] = str(e)
    return out
