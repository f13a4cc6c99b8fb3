"""tf.data input pipeline over the shards of `records.py`."""

from __future__ import annotations

import tensorflow as tf

from .records import FEATURES, first_record, parse_example, read_manifest, shard_paths, shard_problems


def _fold_only(serialized):
    """A record's fold, without decoding its volume."""
    return tf.io.parse_single_example(serialized, {"fold": FEATURES["fold"]})


def _fold_filter(folds, exclude_folds):
    keep = tf.constant(list(folds), tf.int64) if folds is not None else None
    drop = tf.constant(list(exclude_folds), tf.int64) if exclude_folds else None

    def ok(r):
        good = tf.constant(True)
        if keep is not None:
            good = tf.logical_and(good, tf.reduce_any(tf.equal(r["fold"], keep)))
        if drop is not None:
            good = tf.logical_and(good, tf.logical_not(tf.reduce_any(tf.equal(r["fold"], drop))))
        return good
    return ok


def count_rows(rows: list[dict], folds=None, exclude_folds=None) -> int:
    """Manifest rows that pass the fold selection."""
    return sum(1 for r in rows
               if (folds is None or r.get("fold", -1) in folds)
               and not (exclude_folds and r.get("fold", -1) in exclude_folds))


def count_examples(data_dir: str, folds=None, exclude_folds=None) -> int:
    """Records that pass the fold selection (from the manifest when there is one)."""
    rows = read_manifest(data_dir)
    if rows:
        return count_rows(rows, folds, exclude_folds)
    ds = tf.data.TFRecordDataset(shard_paths(data_dir)).map(_fold_only)
    return int(ds.filter(_fold_filter(folds, exclude_folds)).reduce(0, lambda n, _: n + 1))


def check_records(data_dir: str, size: int) -> None:
    """Fail before any work when records are not `size`^3 or a shard is damaged, naming the
    subjects or files: the manifest lists every shape; without one, the first record stands
    for all."""
    problems = shard_problems(data_dir)
    if problems:
        raise ValueError(f"damaged records in {data_dir!r} (re-copy or re-run hagan-preprocess): "
                         + "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    rows = read_manifest(data_dir)
    counted = bool(rows)
    if not rows:
        r = first_record(data_dir)
        rows = [{"subject_id": r["subject_id"].decode(), "shape": tuple(int(n) for n in r["shape"])}]
    bad = [r for r in rows if "shape" in r and tuple(r["shape"]) != (size,) * 3]
    if bad:
        which = f"{len(bad)} of {len(rows)} volume(s)" if counted else "the volumes"
        raise ValueError(f"{which} in {data_dir!r} are not {size}^3 "
                         f"(e.g. {bad[0]['subject_id']}: {tuple(bad[0]['shape'])}): preprocess "
                         f"them with hagan-preprocess --size {size}")


def make_dataset(data_dir: str, batch_size: int, size: int | None = None,
                 folds: list[int] | None = None, exclude_folds: list[int] | None = None,
                 shuffle: int = 64, repeat: bool = True, seed: int = 0,
                 drop_remainder: bool = True, start_step: int = 0,
                 dtype=tf.float32, shard: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """Batches of {'volume' [B, S, S, S, 1], 'label', 'subject_id', 'fold'}.

    `folds` keeps only those folds (evaluation), `exclude_folds` drops them (training with
    cross-validation). `size` checks that the records are at the model's resolution.
    `dtype` is the volumes' type: training asks for float16 when the records store it, and
    casts on the device, which halves every copy on the way there.
    The order is a pure function of `seed` (files and blocks of `shuffle` records permuted per
    epoch by stateless shuffles), and `start_step` resumes it exactly where step `start_step` of
    a run left off, reading at most one epoch to get there: a resumed run sees the same batches
    as an uninterrupted one. Blocks are shuffled still serialised, before parsing, so a block
    holds the stored float16 bytes, not float32 volumes (2 GB instead of 4 at 256^3 and 64).
    `shard=(i, k)` is the input of the i-th of k workers: it reads epochs i, i+k, i+2k, ...,
    so the workers read disjoint epochs, each of every record once, and `start_step` counts
    this worker's batches.
    """
    paths = shard_paths(data_dir)
    keep = _fold_filter(folds, exclude_folds)

    def check(r):
        if size is None:
            return r
        tf.debugging.assert_equal(tf.shape(r["volume"])[:3], [size, size, size],
                                  message=f"records are not {size}^3 volumes")
        return {**r, "volume": tf.ensure_shape(r["volume"], [size, size, size, 1])}

    def permute(seed_pair):
        def apply(block):
            order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(block)[0]), seed_pair)
            return tf.data.Dataset.from_tensor_slices(order).map(lambda i: block[i])  # no copy of the block
        return apply

    def epoch(e):
        # Stateless shuffles keyed on (seed, epoch): no dependence on TF's global seed state.
        seed_pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(e, tf.int64)])
        files = tf.constant(paths)
        if shuffle:
            files = tf.random.experimental.stateless_shuffle(files, seed_pair)
        files = tf.data.Dataset.from_tensor_slices(files)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(paths), 8),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle:  # blocks of `shuffle` serialised records, each put in a stateless order
            ds = ds.batch(shuffle).flat_map(permute(seed_pair + [0, 1 << 40]))
        if folds is not None or exclude_folds:  # read the fold alone: held-out volumes stay unparsed
            ds = ds.filter(lambda x: keep(_fold_only(x)))
        return ds.map(lambda x: check(parse_example(x, dtype)), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)

    if repeat:
        skip = start_step * batch_size
        selected = folds is not None or exclude_folds  # a selection of none would loop forever
        n = count_examples(data_dir, folds, exclude_folds) if skip or selected else 1
        if n == 0:
            raise ValueError(f"no records in {data_dir!r} pass the fold selection")
        index, count = shard
        epochs = tf.data.Dataset.range(skip // n, 2 ** 62 // count).map(lambda j: j * count + index)
        ds = epochs.flat_map(epoch).skip(skip % n)
    else:
        ds = epoch(tf.constant(0, tf.int64))
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
