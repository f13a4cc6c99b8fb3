"""`hagan-encode`: scans preprocessed as the training data, encoded by a served HA-GAN, as CSV."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from . import ServingError
from .client import add_connection_args, chunks, connect, request_batch


def encode_transform(args) -> dict:
    """preprocess_file's settings: the options given, else the training data's summary.json
    (`--like`), else hagan-preprocess's defaults. A scan encoded with other settings than its
    model was trained on gets a wrong embedding without any error."""
    import inspect

    from ..data.records import SUMMARY
    from ..preprocess.transform import preprocess_file

    saved = {}
    if args.like:
        path = os.path.join(args.like, SUMMARY)
        if not os.path.isfile(path):
            raise ValueError(f"--like {args.like!r}: no {SUMMARY} (hagan-preprocess writes one)")
        with open(path) as f:
            saved = json.load(f)
    defaults = inspect.signature(preprocess_file).parameters  # hagan-preprocess's own defaults
    settings = {k: defaults[k].default for k in ("modality", "window", "percentile", "isotropic",
                                                 "min_extent")}
    for key in settings:
        if saved.get(key) is not None:
            settings[key] = saved[key]
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["window"] = tuple(float(x) for x in settings["window"])
    if settings["window"][0] >= settings["window"][1]:
        raise ValueError("--window LOW must be below HIGH")
    return settings


def find_scans(inputs: list[str]) -> list[tuple[str, object]]:
    """(label, source) per scan in files, folders and globs, found as hagan-preprocess finds
    them (NIfTI, NRRD, MetaImage, DICOM series by SeriesInstanceUID, multi-frame DICOM files).
    The label is the path (a series: its folder; a multi-frame file: the file); a folder holding
    several series labels each `FOLDER:SUBJECT_ID`."""
    from ..preprocess import expand_inputs

    items = expand_inputs(inputs)
    paths = [str(source) for _, source in items]
    return [(path if paths.count(path) == 1 else f"{path}:{sid}", source)
            for path, (sid, source) in zip(paths, items)]


def load_scan(source, size: int, transform: dict) -> np.ndarray:
    """One scan as the model's input [S, S, S, 1], transformed as its training data was."""
    from ..preprocess.transform import preprocess_file

    volume, _ = preprocess_file(source, size, **transform)
    return volume[..., None]


def encode_main(argv=None) -> int:
    """hagan-encode: one CSV row of latent values per scan, preprocessed as the training data."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(
        prog="hagan-encode",
        description="Preprocess NIfTI scans exactly as hagan-preprocess does and encode them "
                    "with a served HA-GAN: one CSV row (scan, z0..z{latent-1}) per scan. A scan "
                    "that cannot be read is reported and skipped; the others are still written.")
    add_connection_args(p)
    p.add_argument("scans", nargs="+", help="scans: NIfTI, NRRD, MetaImage or multi-frame DICOM "
                   "files, folders (searched recursively; DICOM series found by "
                   "SeriesInstanceUID, multi-frame DICOM files by content) or globs")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--like", metavar="DATA_DIR",
                   help="the training data's directory: take the transform settings (modality, "
                        "window, percentile, isotropic, min extent) from its summary.json; the "
                        "options below override them")
    p.add_argument("--modality", choices=("ct", "mri"), help="intensity normalisation (default: ct)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT window in HU (default: -1024 600)")
    p.add_argument("--percentile", type=float, help="MRI: clip at this percentile (default: 99.9)")
    p.add_argument("--isotropic", type=float, metavar="MM",
                   help="resample to isotropic voxels first, as hagan-preprocess --isotropic")
    p.add_argument("--min-extent", type=int, metavar="VOXELS",
                   help="as hagan-preprocess --min-extent (default: S/4)")
    args = p.parse_args(argv)
    try:
        transform = encode_transform(args)
    except (OSError, ValueError) as e:
        p.error(str(e))
    client = connect(p, args)
    failed = []
    written = 0
    try:
        cfg = client.config()
        size, latent = int(cfg["size"]), int(cfg["latent_dim"])
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            f = open(args.out, "w", newline="")
        except OSError as e:
            p.error(f"cannot write --out {args.out!r}: {e.strerror}")
        scans = find_scans(args.scans)
        with f, \
                tqdm(total=len(scans), unit="scan", desc="encoding") as bar:
            out = csv.writer(f)
            out.writerow(["scan"] + [f"z{i}" for i in range(latent)])
            for chunk in chunks(scans, request_batch(args.batch, int(cfg["size"]))):
                names, volumes = [], []
                for path, source in chunk:
                    try:
                        volume = load_scan(source, size, transform)
                    except Exception as e:  # noqa: BLE001 - one bad scan must not stop the rest
                        failed.append((path, f"{type(e).__name__}: {e}"))
                        continue
                    names.append(path)
                    volumes.append(volume)
                if volumes:
                    try:
                        z = client.encode(np.stack(volumes))
                    except ServingError as e:
                        if e.code == "UNAVAILABLE":
                            raise
                        failed.extend((path, str(e)) for path in names)
                    else:
                        out.writerows([n] + [f"{x:.9g}" for x in row] for n, row in zip(names, z))
                        written += len(names)
                        f.flush()  # rows already encoded survive a later failure
                bar.update(len(chunk))
    except ServingError as e:
        kept = f" ({written} rows kept in {args.out})" if written else ""
        print(f"hagan-encode: error: {e}{kept}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for path, reason in failed:
        print(f"hagan-encode: skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {written} embeddings to {args.out}"
          + (f"; {len(failed)} of {len(scans)} scans failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(encode_main())
