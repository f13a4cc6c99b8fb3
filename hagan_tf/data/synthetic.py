"""A tiny built-in dataset: chest-CT-like phantoms, so every command runs without real scans.

Each phantom is a torso ellipsoid (soft tissue) holding two lungs (air-like), a spine
(bone-like) and a few nodules. The lung size varies per subject: it is the measurement that
`targets.csv` records (a stand-in for a clinical variable) and, binned, the class label.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from .records import ShardWriter

HU_AIR, HU_LUNG, HU_TISSUE, HU_BONE = -1000.0, -850.0, 40.0, 500.0


def phantom_hu(shape, lung_scale: float, rng: np.random.Generator) -> np.ndarray:
    """A [D, H, W] = [z, y, x] (RAS+) volume in Hounsfield units, spine posterior;
    `lung_scale` in [0.5, 1] sets the lung size."""
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                             indexing="ij")
    vol = np.full(shape, HU_AIR, np.float32)
    torso = (zz / 0.95) ** 2 + (yy / 0.7) ** 2 + (xx / 0.9) ** 2 <= 1
    vol[torso] = HU_TISSUE + rng.normal(0, 15, size=int(torso.sum()))
    for side in (-1, 1):
        cx = side * 0.4 + rng.normal(0, 0.02)
        lung = (((zz - 0.05) / (0.75 * lung_scale)) ** 2 + (yy / (0.45 * lung_scale)) ** 2
                + ((xx - cx) / (0.3 * lung_scale)) ** 2) <= 1
        vol[lung] = HU_LUNG + rng.normal(0, 30, size=int(lung.sum()))
    spine = ((yy + 0.5) / 0.12) ** 2 + (xx / 0.12) ** 2 <= 1  # posterior: H grows anterior (RAS+)
    vol[spine & torso] = HU_BONE
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.04, 0.1)
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = HU_TISSUE
    return vol


def hu_to_unit(vol_hu: np.ndarray, low: float = -1024.0, high: float = 600.0) -> np.ndarray:
    """The paper's CT window mapped linearly to [-1, 1]."""
    return (np.clip(vol_hu, low, high) - low) / (high - low) * 2.0 - 1.0


def write_synthetic_dataset(out_dir: str, n: int = 16, size: int = 32, shards: int = 2,
                            num_classes: int = 0, folds: int = 0, seed: int = 0,
                            dtype: str = "float16") -> str:
    """Writes n phantoms at size^3 as training records, plus `targets.csv` (lung_volume)."""
    rng = np.random.default_rng(seed)
    rows = []
    with ShardWriter(out_dir, shards) as writer:
        for i in range(n):
            scale = float(rng.uniform(0.5, 1.0))
            vol = hu_to_unit(phantom_hu((size, size, size), scale, rng)).astype(np.float32)
            label = min(int((scale - 0.5) / 0.5 * num_classes), num_classes - 1) if num_classes else -1
            fold = i % folds if folds else -1
            sid = f"phantom{i:04d}"
            lung_volume = float(np.mean(vol < -0.8))
            writer.write(vol, sid, label, fold, dtype, source="synthetic", lung_scale=scale)
            rows.append({"subject_id": sid, "lung_volume": lung_volume, "lung_scale": scale,
                         "label": label})
    with open(os.path.join(out_dir, "targets.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out_dir


# -- a richer thorax phantom with known anatomy factors (benchmarks/fidelity.py) ------------------

HU_FAT, HU_HEART, HU_LUNG_PARENCHYMA, HU_EMPHYSEMA, HU_CORTICAL = -100.0, 40.0, -860.0, -990.0, 900.0

# The subject-level factors thorax_hu draws, with their ranges (normalised coordinates: the
# volume spans [-1, 1] along each axis; x = patient's left -> right, y = posterior -> anterior,
# z = inferior -> superior, as RAS+ and phantom_hu).
THORAX_FACTORS = {
    "body_rx": (0.72, 0.94),           # torso half-width (left-right)
    "body_ry": (0.50, 0.72),           # torso half-depth (posterior-anterior)
    "fat": (0.02, 0.09),               # subcutaneous fat thickness
    "lung_scale": (0.65, 1.00),        # lung size, relative to the thoracic cavity
    "heart_scale": (0.85, 1.20),       # heart size
    "rib_thickness": (0.020, 0.034),   # rib half-thickness (radial; 1.5x that in z)
    "emphysema_extent": (0.0, 0.30),   # fraction of lung tissue replaced by low-attenuation clusters
}


def _grid(shape):
    d, h, w = shape
    zz = np.linspace(-1, 1, d, dtype=np.float32)[:, None, None]
    yy = np.linspace(-1, 1, h, dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, None, :]
    return zz, yy, xx


def draw_thorax_factors(rng: np.random.Generator) -> dict:
    """One subject's generating factors (THORAX_FACTORS). Emphysema is absent in about a
    quarter of the subjects and skewed toward mild extents in the others."""
    f = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in THORAX_FACTORS.items()
         if k != "emphysema_extent"}
    lo, hi = THORAX_FACTORS["emphysema_extent"]
    f["emphysema_extent"] = 0.0 if rng.random() < 0.25 else float(lo + (hi - lo) * rng.random() ** 1.5)
    return f


def thorax_hu(shape, rng: np.random.Generator, factors: dict | None = None,
              noise_hu: float = 18.0) -> tuple[np.ndarray, dict]:
    """A chest-CT-like [D, H, W] = [z, y, x] (RAS+) volume in HU and its known factors.

    Anatomy (normalised coordinates, see THORAX_FACTORS): a torso elliptic cylinder through
    every slice (muscle 40 HU under a subcutaneous fat layer of -100 HU); two lungs (-860 HU,
    dome-shaped bases, the left one notched by the heart) with nodules; a heart (40 HU)
    anterior, inferior and to the patient's left between the lungs; a descending aorta; bone
    of 900 HU (above the window, so it saturates at +1 after windowing): the vertebral body and
    spinous process posterior (low y index), ribs around the posterior and lateral chest wall
    sloping down anteriorly, a sternum anterior; emphysema as smooth clusters of -990 HU inside
    the lungs (upper-lobe predominant) covering `emphysema_extent` of the lung volume; CT noise
    of `noise_hu`. The HU values are chosen to be separable after the [-1024, 600] window and
    a resize to 32^3 by the thresholds of hagan_tf.evaluation.fidelity.anatomy_factors.

    `factors` overrides draw_thorax_factors(rng) (all keys of THORAX_FACTORS). Returns
    (float32 HU volume, factors + the true fractions of the masks at this resolution:
    true_body, true_lung, true_bone (fractions of the volume) and true_emphysema (of the lung)).
    """
    from scipy import ndimage

    shape = tuple(int(s) for s in shape)
    f = dict(draw_thorax_factors(rng) if factors is None else factors)
    zz, yy, xx = _grid(shape)
    d, h, w = shape

    # torso: slightly narrower toward the top; fat layer under the skin
    taper = 1.0 - 0.05 * zz
    rx, ry, fat = f["body_rx"] * taper, f["body_ry"] * taper, f["fat"]
    cy = -0.02
    e_body = (xx / rx) ** 2 + ((yy - cy) / ry) ** 2
    body = e_body <= 1.0
    muscle = (xx / (rx - fat)) ** 2 + ((yy - cy) / (ry - fat)) ** 2 <= 1.0
    vol = np.full(shape, HU_AIR, np.float32)
    vol[np.broadcast_to(body, shape)] = HU_FAT
    vol[np.broadcast_to(muscle, shape)] = HU_TISSUE

    # thoracic cavity: inside the chest wall (muscle + ribs)
    wall = 0.07
    crx, cry = rx - fat - wall, ry - fat - wall
    s = f["lung_scale"]
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):  # side -1: patient's left (x < 0 in RAS+), side +1: right
        lcx = side * 0.50 * crx
        lrx, lry = 0.49 * crx * s, 0.92 * cry * s
        lcy, lcz = cy - 0.04 * cry, 0.04
        lrz = 0.92 * s ** 0.5
        dz = (zz - lcz) / lrz
        vertical = np.where(dz > 0, dz ** 2, dz ** 4)  # rounded apex, flatter base
        lungs |= (((xx - lcx) / lrx) ** 2 + ((yy - lcy) / lry) ** 2 + vertical) <= 1.0
    # heart: anterior, inferior, to the left; carves the lungs (cardiac notch)
    hs = f["heart_scale"]
    heart = (((xx + 0.12 * crx) / (0.36 * crx * hs)) ** 2
             + ((yy - (cy + 0.28 * cry)) / (0.52 * cry * hs)) ** 2
             + ((zz + 0.38) / (0.36 * hs)) ** 2) <= 1.0
    aorta = np.broadcast_to(((xx + 0.12 * crx) / 0.07) ** 2 + ((yy - (cy - 0.55 * cry)) / 0.07) ** 2 <= 1.0,
                            shape) & (zz < 0.6)
    mediastinum = heart | aorta
    lungs &= ~mediastinum
    # emphysema: a smooth random field thresholded at the extent's quantile within the lungs,
    # biased to the upper lobes
    emph = np.zeros(shape, bool)
    if f["emphysema_extent"] > 0 and lungs.any():
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                        sigma=(0.045 * d, 0.045 * h, 0.045 * w))
        field = field / (field[lungs].std() + 1e-12) + 0.8 * zz
        cut = np.quantile(field[lungs], 1.0 - f["emphysema_extent"])
        emph = lungs & (field > cut)
    vol[lungs] = HU_LUNG_PARENCHYMA
    vol[emph] = HU_EMPHYSEMA
    vol[mediastinum] = HU_HEART
    # nodules inside the lungs
    for _ in range(int(rng.integers(0, 4))):
        inside = np.argwhere(lungs[::4, ::4, ::4])
        if not len(inside):
            break
        c = inside[rng.integers(len(inside))] * 4
        r = rng.uniform(0.03, 0.06)
        zc, yc, xc = (zz.ravel()[c[0]], yy.ravel()[c[1]], xx.ravel()[c[2]])
        nod = (zz - zc) ** 2 + (yy - yc) ** 2 + (xx - xc) ** 2 <= r * r
        vol[nod & lungs] = HU_TISSUE

    # bone: vertebral body + spinous process (posterior), ribs, sternum
    spine_y = cy - ry + fat + 0.21
    vert = (xx / 0.10) ** 2 + ((yy - spine_y) / 0.09) ** 2 <= 1.0
    process = (np.abs(xx) <= 0.025) & (yy < spine_y - 0.05) & (yy > cy - ry + fat + 0.03)
    bone = np.broadcast_to(vert | process, shape).copy()
    t = f["rib_thickness"]
    rib_rx, rib_ry = rx - fat - 0.5 * wall, ry - fat - 0.5 * wall
    e = np.sqrt((xx / rib_rx) ** 2 + ((yy - cy) / rib_ry) ** 2)
    ring = (np.abs(e - 1.0) * 0.5 * (rib_rx + rib_ry) <= t) & (yy - cy < 0.45 * rib_ry)
    pitch = 0.15
    zs = zz + 0.10 * ((yy - cy) / rib_ry + 1.0)  # ribs slope down toward the front
    phase = np.mod(zs + 1.0, pitch) - 0.5 * pitch
    ribs = ring & (np.abs(phase) <= 1.5 * t) & (zs > -0.78) & (zs < 0.95)
    bone |= ribs
    sternum = ((np.abs(xx) <= 0.06) & (np.abs(yy - (cy + ry - fat - 0.045)) <= 0.03)
               & (zz > -0.55) & (zz < 0.75))
    bone |= sternum
    bone &= np.broadcast_to(body, shape)
    vol[bone] = HU_CORTICAL

    if noise_hu:
        vol += np.float32(noise_hu) * rng.standard_normal(shape, dtype=np.float32)
    lung_all = lungs & ~bone
    f.update(true_body=float(np.broadcast_to(body, shape).mean()),
             true_lung=float(lung_all.mean()), true_bone=float(bone.mean()),
             true_emphysema=float((emph & ~bone).sum() / max(lung_all.sum(), 1)))
    return vol, f
