"""What the application commands share: model arguments, CSV tables, real volumes, errors."""

from __future__ import annotations

import csv
import math
import os
import re
import sys
import warnings
from collections import Counter

import numpy as np

from ..arrays import class_counts  # noqa: F401 (its home is arrays; the apps import it here)
from ..layout import DEFAULT_MODEL_NAME

SUBJECT = "subject_id"
Z_COLUMN = re.compile(r"^z(\d+)$")


class AppError(Exception):
    """Bad input from the user: the command prints it after its usage line and exits with 2."""


def add_model_args(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="run directory written by hagan-train")
    src.add_argument("--model-base", metavar="DIR",
                     help="exported models (DIR/NAME/VERSION) written by hagan-export")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME,
                        help="model name under --model-base (default: %(default)s)")
    parser.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")
    parser.add_argument("--version", type=int, help="version under --model-base (default: the newest)")


def open_model_from_args(args):
    """The model named by --run or --model-base; a missing or broken one is a usage error."""
    import tensorflow as tf

    from ..trained import open_model

    try:
        return open_model(run=args.run, model_base=args.model_base, name=args.name,
                          step=args.step, version=args.version)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise AppError(f"cannot open the model: {getattr(e, 'message', None) or e}") from e


def open_source(args):
    """Deprecated name of `open_model_from_args`."""
    warnings.warn("hagan_tf.apps.common.open_source is deprecated: use open_model_from_args",
                  DeprecationWarning, stacklevel=2)
    return open_model_from_args(args)


def main_wrapper(parser, run, argv=None):
    """Parse, run, and turn bad input into `prog: error: ...` with exit code 2.

    Returns None: console scripts pass the return value to sys.exit.
    """
    args = parser.parse_args(argv)
    try:
        run(args)
    except (AppError, FileNotFoundError) as e:
        parser.error(str(e))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---- tables -------------------------------------------------------------------------------

def read_rows(path: str) -> tuple[list[str], list[dict]]:
    if not os.path.isfile(path):
        raise AppError(f"no such file: {path!r}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM, as spreadsheets write it, is no column name
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if SUBJECT not in header:
        raise AppError(f"{path!r} has no {SUBJECT!r} column (columns: {', '.join(header) or 'none'})")
    return header, rows


def write_csv(path: str, header: list[str], rows) -> str:
    """Written to a temporary file first, so an interrupted job never leaves half a table."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def markdown_table(header: list[str], rows) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_embeddings(path: str) -> tuple[list[str], np.ndarray]:
    """(subject ids, [n, latent]) from a CSV with `subject_id` and z0..z{latent-1}."""
    header, rows = read_rows(path)
    cols = sorted((int(m.group(1)), c) for c in header if (m := Z_COLUMN.match(c)))
    if not cols or [i for i, _ in cols] != list(range(len(cols))):
        raise AppError(f"{path!r} needs columns z0..z{{latent-1}} next to {SUBJECT!r}")
    ids = _unique_ids(path, rows)
    x = np.array([[_number(r[c]) for _, c in cols] for r in rows], np.float64).reshape(len(rows), -1)
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(x).all(axis=1))]
    if bad:
        raise AppError(f"{path!r} has missing or non-numeric embedding values for {', '.join(bad[:5])}")
    return ids, x


def read_target(path: str, column: str) -> dict[str, float]:
    """{subject id: value}; empty or non-numeric cells become NaN."""
    header, rows = read_rows(path)
    if column not in header:
        raise AppError(f"{path!r} has no column {column!r} (columns: {', '.join(header)})")
    return dict(zip(_unique_ids(path, rows), (_number(r[column]) for r in rows)))


def _unique_ids(path: str, rows: list[dict]) -> list[str]:
    """The rows' subject ids, refusing repeats (two visits of one subject, say), which a join
    would otherwise settle silently by taking one of them."""
    ids = [r[SUBJECT] for r in rows]
    dup = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dup:
        raise AppError(f"{path!r} lists subject ids more than once: {', '.join(dup[:5])}")
    return ids


def join_target(embeddings: str, targets: str, column: str, log: bool = False,
                min_rows: int = 2) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings and target of the subjects found in both files with a usable value."""
    ids, x = read_embeddings(embeddings)
    target = read_target(targets, column)
    y = np.array([target.get(s, math.nan) for s in ids], np.float64)
    missing = sum(s not in target for s in ids)
    ok = np.isfinite(y)
    if log:
        ok &= np.where(ok, y, 1.0) > 0
    dropped = int(len(ids) - ok.sum())
    if dropped:
        warn(f"{dropped} of {len(ids)} subjects left out: {missing} not in {targets!r}, "
             f"{dropped - missing} with an empty, non-numeric{' or non-positive' if log else ''} "
             f"{column!r}")
    if ok.sum() < min_rows:
        raise AppError(f"only {int(ok.sum())} subjects have both an embedding and a usable "
                       f"{column!r}; at least {min_rows} are needed")
    y = np.log(y[ok]) if log else y[ok]
    return [s for s, k in zip(ids, ok) if k], x[ok], y


# ---- real volumes -------------------------------------------------------------------------

def iter_volumes(data_dir: str, batch_size: int, size: int):
    """NumPy batches {'volume', 'subject_id' (str), 'label', 'fold'} of every record, in order."""
    import tensorflow as tf
    from tqdm import tqdm

    from ..data.pipeline import check_records, make_dataset
    from ..data.records import read_manifest

    try:
        check_records(data_dir, size)
    except ValueError as e:
        raise AppError(str(e)) from e
    ds = make_dataset(data_dir, batch_size, size=size, shuffle=0, repeat=False,
                      drop_remainder=False)
    total = len(read_manifest(data_dir)) or None
    with tqdm(total=total, unit="volume", desc="reading") as bar:
        try:
            for batch in ds:
                out = {k: v.numpy() for k, v in batch.items()}
                out["subject_id"] = [s.decode() for s in out["subject_id"]]
                bar.update(len(out["label"]))
                yield out
        except tf.errors.OpError as e:
            raise AppError(f"cannot read the records in {data_dir!r}: {e.message}") from e


def monotonic(values) -> str:
    """'increasing', 'decreasing', 'constant' or 'no' (ties allowed within a direction)."""
    d = np.diff(np.asarray(values, np.float64))
    if not np.all(np.isfinite(d)):
        return "no"
    if np.all(d == 0):
        return "constant"
    if np.all(d >= 0):
        return "increasing"
    if np.all(d <= 0):
        return "decreasing"
    return "no"
