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
