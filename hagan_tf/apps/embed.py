"""hagan-embed: the encoder's embedding (E^H on the 8 slabs, then E^G) of every real volume.

The paper feeds these embeddings to a linear model to predict clinical measurements
(hagan-regress) and to find anatomy-changing directions (hagan-directions).
"""

from __future__ import annotations

import argparse

import numpy as np

from .common import (SUBJECT, AppError, add_model_args, iter_volumes, main_wrapper, open_model_from_args, warn,
                     write_csv)


def embed(source, data_dir: str, batch_size: int = 2) -> tuple[list[str], np.ndarray]:
    """(subject ids, [n, latent]); a subject with several records gets their mean embedding."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in iter_volumes(data_dir, batch_size, source.config.size):
        for sid, z in zip(batch["subject_id"], source.encode(batch["volume"])):
            sums[sid] = sums.get(sid, 0.0) + z.astype(np.float64)
            counts[sid] = counts.get(sid, 0) + 1
    if not sums:
        raise AppError(f"no records in {data_dir!r}")
    repeated = sum(c > 1 for c in counts.values())
    if repeated:
        warn(f"{repeated} subjects have several records: their embeddings are averaged")
    ids = list(sums)
    return ids, np.stack([sums[s] / counts[s] for s in ids])


def write_embeddings(path: str, ids: list[str], z: np.ndarray) -> str:
    header = [SUBJECT] + [f"z{i}" for i in range(z.shape[1])]
    return write_csv(path, header, ([sid] + [f"{v:.8g}" for v in row] for sid, row in zip(ids, z)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-embed",
        description="Write the encoder embedding of every real volume: one row per subject id "
                    "(columns subject_id, z0..z{latent-1}).")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="TFRECORD_DIR",
                   help="preprocessed records (hagan-preprocess) at the model's resolution")
    p.add_argument("--out", required=True, metavar="CSV", help="embeddings.csv to write")
    p.add_argument("--batch-size", type=int, default=2, help="volumes encoded at once (default: 2)")
    return p


def run(args) -> str:
    if args.batch_size < 1:
        raise AppError("--batch-size must be at least 1")
    source = open_model_from_args(args)
    ids, z = embed(source, args.data, args.batch_size)
    write_embeddings(args.out, ids, z)
    print(f"wrote {len(ids)} embeddings of dimension {z.shape[1]} to {args.out}")
    return args.out


def main(argv=None):
    return main_wrapper(build_parser(), run, argv)


if __name__ == "__main__":
    main()
