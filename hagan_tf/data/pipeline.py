"""tf.data input pipeline over the shards of `records.py`."""

from __future__ import annotations

import tensorflow as tf

from .records import parse_example, shard_paths


def make_dataset(data_dir: str, batch_size: int, size: int | None = None,
                 folds: list[int] | None = None, exclude_folds: list[int] | None = None,
                 shuffle: int = 64, repeat: bool = True, seed: int = 0,
                 drop_remainder: bool = True) -> tf.data.Dataset:
    """Batches of {'volume' [B, S, S, S, 1], 'label', 'subject_id', 'fold'}.

    `folds` keeps only those folds (evaluation), `exclude_folds` drops them (training with
    cross-validation). `size` checks that the records were written at the model's resolution.
    """
    files = tf.data.Dataset.from_tensor_slices(shard_paths(data_dir))
    if shuffle:
        files = files.shuffle(len(shard_paths(data_dir)), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=shuffle == 0)
    ds = ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE)
    if folds is not None:
        keep = tf.constant(list(folds), tf.int64)
        ds = ds.filter(lambda r: tf.reduce_any(tf.equal(r["fold"], keep)))
    if exclude_folds:
        drop = tf.constant(list(exclude_folds), tf.int64)
        ds = ds.filter(lambda r: tf.logical_not(tf.reduce_any(tf.equal(r["fold"], drop))))
    if size is not None:
        def check(r):
            tf.debugging.assert_equal(tf.shape(r["volume"])[:3], [size, size, size],
                                      message=f"records are not {size}^3 volumes")
            return {**r, "volume": tf.ensure_shape(r["volume"], [size, size, size, 1])}
        ds = ds.map(check)
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
