"""hagan-augment: do class-conditional samples help a classifier? (paper: GOLD 59.7% -> 62.9%)

Samples of a conditional model, in the training set's class proportions, are added to the real
training volumes; the same small 3D CNN (same seed, so the same initial weights, same epochs)
is trained on real-only and on real+synthetic and scored on a held-out real fold. Volumes are
average-pooled to --classifier-size so that the experiment fits in memory at 256^3.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np
from tqdm import tqdm

from ..arrays import downsample
from .common import (AppError, add_model_args, class_counts, iter_volumes, main_wrapper, markdown_table,
                     open_model_from_args, warn)


def to_size(volumes, size: int) -> np.ndarray:
    """[B, S, S, S, 1] -> float32 [B, size, size, size, 1], averaging (S / size)^3 blocks."""
    v = np.asarray(volumes, np.float32)
    return downsample(v, v.shape[1] // size)


def build_classifier(size: int, num_classes: int):
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((size, size, size, 1)),
        layers.Conv3D(8, 3, padding="same", activation="relu"), layers.MaxPooling3D(2),
        layers.Conv3D(16, 3, padding="same", activation="relu"), layers.MaxPooling3D(2),
        layers.Conv3D(32, 3, padding="same", activation="relu"),
        layers.GlobalAveragePooling3D(), layers.Dropout(0.2), layers.Dense(num_classes),
    ], name="classifier")


def train_and_score(x, y, x_test, y_test, num_classes: int, epochs: int, batch_size: int,
                    seed: int, lr: float, desc: str) -> dict:
    """Accuracy and balanced accuracy on the test set of the classifier trained on (x, y)."""
    import keras
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    keras.utils.set_random_seed(seed)
    model = build_classifier(x.shape[1], num_classes)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with tqdm(total=epochs, desc=desc, unit="epoch") as bar:
        step = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: (bar.set_postfix(loss=logs["loss"], refresh=False),
                                             bar.update(1)))
        model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
                  callbacks=[step])
    pred = np.argmax(model.predict(x_test, batch_size=batch_size, verbose=0), axis=-1)
    with warnings.catch_warnings():  # a class absent from a tiny test fold is not an error
        warnings.simplefilter("ignore")
        return {"accuracy": float(accuracy_score(y_test, pred)),
                "balanced_accuracy": float(balanced_accuracy_score(y_test, pred))}


def load_real(source, data_dir: str, size: int, batch_size: int):
    """(volumes at classifier size, labels, folds) of the labelled records."""
    vols, labels, folds = [], [], []
    for batch in iter_volumes(data_dir, batch_size, source.config.size):
        vols.append(to_size(batch["volume"], size))
        labels.append(batch["label"])
        folds.append(batch["fold"])
    if not vols:
        raise AppError(f"no records in {data_dir!r}")
    x, y, f = np.concatenate(vols), np.concatenate(labels), np.concatenate(folds)
    num_classes = source.config.num_classes
    if np.any(y >= num_classes):
        raise AppError(f"records carry labels up to {y.max()} but the model has "
                       f"{num_classes} classes")
    if np.any(y < 0):
        warn(f"{int(np.sum(y < 0))} unlabelled records (label -1) left out")
    keep = y >= 0
    return x[keep], y[keep].astype(np.int64), f[keep]


def generate(source, counts, size: int, batch_size: int, seed: int):
    """(synthetic volumes at classifier size, their labels, one full-size sample per class)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    z = np.random.default_rng(seed).standard_normal((len(labels), source.config.latent_dim))
    out, examples = [], {}
    with tqdm(total=len(labels), desc="generating", unit="volume") as bar:
        for i in range(0, len(labels), batch_size):
            vol = source.generate(z[i:i + batch_size].astype(np.float32), labels[i:i + batch_size])
            for v, c in zip(vol, labels[i:i + batch_size]):
                examples.setdefault(int(c), v)
            out.append(to_size(vol, size))
            bar.update(len(vol))
    return np.concatenate(out), labels, examples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-augment",
        description="Train the same small 3D CNN on real volumes and on real + class-conditional "
                    "synthetic volumes; compare their accuracy on a held-out real fold.")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="TFRECORD_DIR",
                   help="labelled records with folds (hagan-preprocess) at the model's resolution")
    p.add_argument("--fraction", type=float, default=0.2,
                   help="synthetic volumes as a fraction of the real training count (default: 0.2)")
    p.add_argument("--test-fold", type=int, help="held-out fold (default: the last fold in the data)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of each classifier (default: 20)")
    p.add_argument("--batch-size", type=int, default=4, help="classifier batch size (default: 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--classifier-size", type=int,
                   help="edge the volumes are average-pooled to for the classifier (default: min(64, S))")
    p.add_argument("--gen-batch-size", type=int, default=2, help="volumes generated at once (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the classifiers (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes results.json, results.md, samples.png")
    return p


def run(args) -> dict:
    from ..io import montage_png

    if args.fraction <= 0 or args.epochs < 1 or args.batch_size < 1 or args.gen_batch_size < 1:
        raise AppError("--fraction must be > 0; --epochs, --batch-size, --gen-batch-size >= 1")
    source = open_model_from_args(args)
    cfg = source.config
    if cfg.num_classes == 0:
        raise AppError("hagan-augment needs a conditional model (num_classes > 0); "
                       "this one was trained with num_classes = 0")
    size = args.classifier_size or min(64, cfg.size)
    if not (8 <= size <= cfg.size and cfg.size % size == 0 and size & (size - 1) == 0):
        raise AppError(f"--classifier-size must be a power of two from 8 to {cfg.size}")

    x, y, folds = load_real(source, args.data, size, args.gen_batch_size)
    if np.all(folds < 0):
        raise AppError(f"the records in {args.data!r} carry no fold: write them with folds")
    test_fold = int(folds.max()) if args.test_fold is None else args.test_fold
    test = folds == test_fold
    if not test.any() or test.all():
        raise AppError(f"fold {test_fold} must hold some but not all labelled records "
                       f"(folds present: {sorted(set(folds.tolist()))})")
    x_train, y_train, x_test, y_test = x[~test], y[~test], x[test], y[test]
    counts = class_counts(y_train, cfg.num_classes, int(round(args.fraction * len(y_train))))
    if counts.sum() == 0:
        raise AppError(f"--fraction {args.fraction} of {len(y_train)} training volumes is no volume")

    x_syn, y_syn, examples = generate(source, counts, size, args.gen_batch_size, args.seed)
    common = dict(x_test=x_test, y_test=y_test, num_classes=cfg.num_classes, epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, lr=args.lr)
    real = train_and_score(x_train, y_train, desc="real only", **common)
    both = train_and_score(np.concatenate([x_train, x_syn]), np.concatenate([y_train, y_syn]),
                           desc="real + synthetic", **common)

    result = {
        "real_only": real, "real_plus_synthetic": both,
        "accuracy_gain": both["accuracy"] - real["accuracy"],
        "test_fold": test_fold, "n_test": int(len(y_test)), "n_train_real": int(len(y_train)),
        "n_synthetic": int(counts.sum()), "fraction": args.fraction,
        "train_class_counts": np.bincount(y_train, minlength=cfg.num_classes).tolist(),
        "synthetic_class_counts": counts.tolist(), "classifier_size": size,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown_table(["training set", "n train", "accuracy", "balanced accuracy"], [
        ["real only", len(y_train), real["accuracy"], real["balanced_accuracy"]],
        ["real + synthetic", len(y_train) + len(y_syn), both["accuracy"], both["balanced_accuracy"]]])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# GAN augmentation, test fold {test_fold} ({len(y_test)} real volumes)\n\n{table}")
    montage_png([examples[c] for c in sorted(examples)], os.path.join(args.out, "samples.png"),
                titles=[f"class {c}" for c in sorted(examples)])
    print(table)
    print(f"wrote results.json, results.md and samples.png to {args.out}")
    return result


def main(argv=None):
    return main_wrapper(build_parser(), run, argv)


if __name__ == "__main__":
    main()
