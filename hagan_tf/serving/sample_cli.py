"""`hagan-sample`: N reproducible samples from a served HA-GAN (or a run directory's checkpoint,
in this process) as NIfTI files and a montage.

Each NIfTI is written as it arrives, in slabs, with no copy of the volume: from a server, each
volume of a response; with --run, each slab as HAGAN.generate decodes it (io.NiftiVolumes), so
that a 512^3 volume (512 MiB) is never whole in memory."""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from . import ServingError
from .client import add_connection_args, chunks, connect, request_batch


def sample_main(argv=None) -> int:
    """hagan-sample: N reproducible samples as NIfTI files plus a PNG montage of mid slices."""
    from tqdm import tqdm

    from ..io import NiftiVolumes, mid_slices, montage_png, save_nifti

    p = argparse.ArgumentParser(
        prog="hagan-sample",
        description="Ask a served HA-GAN for samples (or, with --run, a run directory's "
                    "checkpoint in this process): one NIfTI per sample (voxel size from the "
                    "training config), montage.png of mid slices and samples.csv. Sample i uses "
                    "seed SEED+i, so the same command gives the same volumes.")
    add_connection_args(p, run=True)
    p.add_argument("-n", "--num", type=int, default=8, help="number of samples (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class of a class-conditional model")
    p.add_argument("--preview", action="store_true",
                   help="the fast low-resolution S/4 volumes (G^A + G^L) instead")
    p.add_argument("--montage-max", type=int, default=16,
                   help="samples shown in montage.png (default: %(default)s)")
    p.add_argument("--format", choices=["nii.gz", "nii"], default="nii.gz",
                   help="gzipped NIfTI (the default) or uncompressed, faster to write: 4 bytes "
                        "a voxel, 512 MiB at 512^3")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("-n must be >= 1")
    if args.montage_max < 0:
        p.error("--montage-max must be >= 0")
    if not 0 <= args.seed <= 2**63 - 1 - args.num:
        p.error("--seed must be a non-negative 64-bit integer")
    client = connect(p, args) if args.run is None else _RunClient(p, args)
    try:
        cfg = client.config()
        classes = int(cfg.get("num_classes", 0))
        if classes and args.label is None:
            p.error(f"this model is class-conditional ({classes} classes): "
                    f"pass --label 0..{classes - 1}")
        if not classes and args.label is not None:
            p.error("this model is not class-conditional: drop --label")
        if classes and not 0 <= args.label < classes:
            p.error(f"--label must be in 0..{classes - 1}")
        spacing = float(cfg.get("spacing", 1.0)) * (4 if args.preview else 1)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            p.error(f"cannot write --out {args.out!r}: {e.strerror}")
        seeds = np.arange(args.seed, args.seed + args.num, dtype=np.int64)
        rows, shown = [], []
        with tqdm(total=args.num, unit="volume", desc="sampling") as bar:
            for chunk in chunks(seeds, request_batch(args.batch, int(cfg["size"]))):
                labels = None if args.label is None else np.full(len(chunk), args.label, np.int32)
                names = [f"sample_{seed}.{args.format}" for seed in chunk]
                paths = [os.path.join(args.out, name) for name in names]
                keep = max(0, min(len(chunk), args.montage_max - len(shown)))
                if args.preview:
                    from .export import seed_latents

                    z = seed_latents(chunk, int(cfg["latent_dim"])).numpy()
                    volumes = client.preview(z, labels)
                elif args.run is not None:  # each slab into its file as it is decoded
                    files = NiftiVolumes(paths, int(cfg["size"]), spacing, keep_mid=keep > 0)
                    with files:
                        client.generate_from_seed(chunk, labels, out=files)
                    volumes = None
                else:
                    volumes = client.generate_from_seed(chunk, labels)
                for i, seed in enumerate(chunk):
                    if volumes is not None:
                        save_nifti(volumes[i], paths[i], spacing)
                    rows.append((names[i], int(seed), "" if args.label is None else args.label))
                    if i < keep:  # slices: 16 volumes of 256^3 are 1 GiB
                        slices = files.mid_slices(i) if volumes is None else mid_slices(volumes[i])
                        shown.append((slices, f"seed {seed}"))
                del volumes
                bar.update(len(chunk))
        with open(os.path.join(args.out, "samples.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("file", "seed", "label")] + rows)
        if shown:
            montage_png([v for v, _ in shown], os.path.join(args.out, "montage.png"),
                        titles=[t for _, t in shown])
    except ServingError as e:
        print(f"hagan-sample: error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    shown_note = " and montage.png" if shown else ""
    print(f"wrote {args.num} samples ({spacing:g} mm voxels){shown_note} to {args.out}")
    return 0


class _RunClient:
    """--run: the run directory's model (its moving average of G, as hagan-export exports)
    with the client's calls that hagan-sample makes, the same latents per seed as the
    exported generate_from_seed."""

    def __init__(self, parser, args):
        import tensorflow as tf

        from ..trained import RunModel

        if args.batch is not None and args.batch < 1:
            parser.error("--batch must be >= 1")
        try:
            self.model = RunModel(args.run, args.step)
        except (OSError, ValueError, tf.errors.OpError) as e:
            parser.error(f"cannot open --run {args.run!r}: {getattr(e, 'message', None) or e}")

    def config(self) -> dict:
        return self.model.config.to_dict()

    def _z(self, seeds):
        from .export import seed_latents

        return seed_latents(seeds, self.model.config.latent_dim).numpy()

    def generate_from_seed(self, seeds, labels=None, out=None):
        return self.model.generate(self._z(seeds), labels, out=out)

    def preview(self, z, labels=None):
        return self.model.preview(z, labels)

    def close(self):
        pass


if __name__ == "__main__":
    sys.exit(sample_main())
