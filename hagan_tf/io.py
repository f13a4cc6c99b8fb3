"""Files a person opens: NIfTI volumes and PNG montages of mid slices."""

from __future__ import annotations

import os

import numpy as np


def save_nifti(volume, path: str, spacing: float | tuple = 1.0) -> str:
    """Write a [D, H, W] (or [D, H, W, 1]) volume as NIfTI.

    Our arrays are [D, H, W] with D the axial axis; NIfTI's voxel axes are (x, y, z), so the
    array is written transposed to [W, H, D] with a diagonal RAS affine of the voxel spacing.
    `spacing` is one number or a (D, H, W) triple in mm, in the arrays' own axis order.
    """
    import nibabel as nib

    v = np.asarray(volume, np.float32)
    if v.ndim == 4:
        v = v[..., 0]
    sp_d, sp_h, sp_w = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    affine = np.diag([sp_w, sp_h, sp_d, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(v.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(img, path)
    return path


def mid_slices(volume) -> list[np.ndarray]:
    """Middle axial, coronal and sagittal slices of [D, H, W(, 1)]."""
    v = np.asarray(volume)
    if v.ndim == 4:
        v = v[..., 0]
    d, h, w = v.shape
    return [v[d // 2], v[:, h // 2, :], v[:, :, w // 2]]


def montage_png(volumes, path: str, titles: list[str] | None = None, vmin=-1.0, vmax=1.0) -> str:
    """One row per volume: its mid axial, coronal and sagittal slices (or a volume's
    `mid_slices`, kept instead of the volume where many volumes of 256^3 would not fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = list(volumes)
    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for i, vol in enumerate(volumes):
        slices = vol if isinstance(vol, (list, tuple)) else mid_slices(vol)
        for j, (sl, view) in enumerate(zip(slices, ("axial", "coronal", "sagittal"))):
            ax = axes[i, j]
            # Rows are H (toward anterior) or D (toward superior) in RAS+: drawn from the
            # bottom, so anterior and superior are up. Columns keep the stored order: the
            # patient's right on the viewer's right (neurological convention).
            ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(view, fontsize=9)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
