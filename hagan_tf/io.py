"""Files a person opens: NIfTI volumes and PNG montages of mid slices."""

from __future__ import annotations

import os

import numpy as np


def _nifti_header(shape, spacing):
    """The header save_nifti writes for a [D, H, W] float32 volume: voxel axes (x, y, z) =
    (W, H, D), a diagonal RAS affine of the spacing (one number or (D, H, W) mm), mm units."""
    import nibabel as nib

    sp_d, sp_h, sp_w = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    d, h, w = shape
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), (w, h, d)), np.diag([sp_w, sp_h, sp_d, 1.0]))
    img.header.set_xyzt_units("mm")
    img.update_header()
    img.get_data_dtype(finalize=True)
    header = img.header
    header.set_slope_inter(1.0, 0.0)  # what nib.save writes for float32 stored as float32
    return header


class NiftiWriter:
    """One [D, H, W] float32 volume written as NIfTI slab by slab along D (`write(start, rows)`),
    the same file as `save_nifti` writes, without the volume ever being whole in memory.

    NIfTI stores x = W fastest and z = D slowest, the byte order of a C-ordered [D, H, W]
    array, so rows of D are contiguous in the file: each slab is written at its own offset as
    it is. '.nii.gz' goes through nibabel's own gzip stream (level 1, mtime 0: the same bytes as
    nib.save), so its slabs must come in order; '.nii' takes them in any order.
    """

    def __init__(self, path: str, shape, spacing: float | tuple = 1.0):
        from nibabel.openers import Opener
        from nibabel.volumeutils import seek_tell

        self.path, self.shape = path, tuple(int(n) for n in shape)
        header = _nifti_header(self.shape, spacing)
        self._dtype = header.get_data_dtype()
        self._row_bytes = self.shape[1] * self.shape[2] * self._dtype.itemsize
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = Opener(path, "wb")
        self._sequential = self._file.name.lower().endswith((".gz", ".bz2", ".zst"))
        header.write_to(self._file)
        self._offset = int(header.get_data_offset())
        seek_tell(self._file, self._offset, write0=True)
        self._next = 0  # the row the file position is at

    def write(self, start: int, rows) -> None:
        """Write rows [start, start + len(rows)) of D; `rows` is [n, H, W] (or [n, H, W, 1])."""
        rows = np.asarray(rows)
        if rows.ndim == 4:
            rows = rows[..., 0]
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= self.shape[0] - len(rows):
            raise ValueError(f"rows {rows.shape} at {start} do not fit a {self.shape} volume")
        if start != self._next:
            if self._sequential:
                raise ValueError(f"{self.path}: a compressed file takes its rows in order "
                                 f"(row {start} given, {self._next} next)")
            self._file.seek(self._offset + start * self._row_bytes)
        self._file.write(np.ascontiguousarray(rows, self._dtype).data)
        self._next = start + len(rows)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close_if_mine()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NiftiVolumes:
    """A batch [B, D, H, W, 1] as B NIfTI files, for a decode to write into as it goes
    (`out[:, c:e] = rows`, the one assignment HAGAN.generate's `out` takes): one NiftiWriter per
    file. Keeps each volume's mid slices (`mid_slices`, as io.mid_slices) when `keep_mid`."""

    def __init__(self, paths, size, spacing: float | tuple = 1.0, keep_mid: bool = False):
        shape = (size,) * 3 if np.isscalar(size) else tuple(size)
        self.shape = (len(paths),) + shape + (1,)
        self._keep_mid = keep_mid
        self.mid = [[None, np.empty(shape[::2], np.float32), np.empty(shape[:2], np.float32)]
                    for _ in paths] if keep_mid else None
        self.writers = []
        try:
            for path in paths:
                self.writers.append(NiftiWriter(path, shape, spacing))
        except BaseException:
            self.close()
            raise

    def __setitem__(self, key, rows):
        batch, depth = key if isinstance(key, tuple) else (key, slice(None))
        if batch != slice(None) or depth.step not in (None, 1):
            raise IndexError("NiftiVolumes takes out[:, start:stop] = rows")
        start = depth.start or 0
        rows = np.asarray(rows)
        if rows.ndim == 5:
            rows = rows[..., 0]
        d, h, w = self.shape[1:4]
        for i, writer in enumerate(self.writers):
            v = rows[i]
            writer.write(start, v)
            if self._keep_mid:
                if start <= d // 2 < start + len(v):
                    self.mid[i][0] = v[d // 2 - start].copy()
                self.mid[i][1][start:start + len(v)] = v[:, h // 2, :]
                self.mid[i][2][start:start + len(v)] = v[:, :, w // 2]

    def mid_slices(self, i: int) -> list[np.ndarray]:
        return self.mid[i]

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_nifti(volume, path: str, spacing: float | tuple = 1.0) -> str:
    """Write a [D, H, W] (or [D, H, W, 1]) volume as NIfTI.

    Our arrays are [D, H, W] with D the axial axis; NIfTI's voxel axes are (x, y, z), so the
    volume is stored as [W, H, D] (x fastest) with a diagonal RAS affine of the voxel spacing.
    `spacing` is one number or a (D, H, W) triple in mm, in the arrays' own axis order. Written
    by NiftiWriter in slabs of D: no transposed copy of the volume is made.
    """
    v = np.asarray(volume)
    if v.ndim == 4:
        v = v[..., 0]
    step = max(1, (8 << 20) // max(1, v[0].size * 4))  # ~8 MiB a write
    with NiftiWriter(path, v.shape, spacing) as w:
        for start in range(0, len(v), step):
            w.write(start, v[start:start + step])
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
