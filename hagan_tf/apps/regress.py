"""hagan-regress: how well the embeddings predict a measurement (paper, Table VI).

Ridge regression (alpha 1e-4 in the paper, on log targets) scored by K-fold cross-validated
R^2; the spread over folds says how much to trust the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from .common import AppError, join_target, main_wrapper


def cross_validate(x, y, alpha: float = 1e-4, folds: int = 5, seed: int = 0):
    """(R^2 of each fold, out-of-fold predictions)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict, cross_val_score

    cv = KFold(folds, shuffle=True, random_state=seed)
    model = Ridge(alpha=alpha)
    scores = cross_val_score(model, x, y, cv=cv, scoring="r2")
    return scores, cross_val_predict(model, x, y, cv=cv)


def scatter_png(y, pred, path: str, label: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y, pred, s=10, alpha=0.6)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label} (out of fold)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-regress",
        description="Cross-validated Ridge regression from embeddings (hagan-embed) to a measurement.")
    p.add_argument("--embeddings", required=True, metavar="CSV", help="subject_id, z0..z{latent-1}")
    p.add_argument("--targets", required=True, metavar="CSV", help="subject_id and measurement columns")
    p.add_argument("--target", required=True, metavar="COL", help="the measurement column to predict")
    p.add_argument("--log", action="store_true", help="regress log(target), as the paper does")
    p.add_argument("--alpha", type=float, default=1e-4, help="Ridge penalty (default: 1e-4, the paper's)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold split (default: 0)")
    p.add_argument("--out", default="regress", metavar="DIR",
                   help="writes regress_COL.json and regress_COL.png here (default: ./regress)")
    return p


def run(args) -> dict:
    if args.folds < 2:
        raise AppError("--folds must be at least 2")
    if args.alpha < 0:
        raise AppError("--alpha must be >= 0")
    _, x, y = join_target(args.embeddings, args.targets, args.target, args.log,
                         min_rows=2 * args.folds)
    if np.ptp(y) == 0:
        raise AppError(f"{args.target!r} has the same value for every subject: nothing to predict")
    scores, pred = cross_validate(x, y, args.alpha, args.folds, args.seed)
    label = f"log({args.target})" if args.log else args.target
    ss_res, ss_tot = np.sum((y - pred) ** 2), np.sum((y - y.mean()) ** 2)
    result = {
        "target": args.target, "log": args.log, "alpha": args.alpha, "folds": args.folds,
        "seed": args.seed, "n": int(len(y)), "latent_dim": int(x.shape[1]),
        "r2_mean": float(scores.mean()), "r2_std": float(scores.std()),
        "r2_folds": [float(s) for s in scores], "r2_pooled": float(1 - ss_res / ss_tot),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "regress_" + re.sub(r"[^\w.-]+", "_", args.target))
    summary = f"R^2 = {scores.mean():.3f} +- {scores.std():.3f} ({args.folds}-fold, n = {len(y)})"
    scatter_png(y, pred, stem + ".png", label, f"{label}: {summary}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"{label}: {summary}; pooled out-of-fold R^2 = {result['r2_pooled']:.3f}")
    print(f"wrote {stem}.json and {stem}.png")
    return result


def main(argv=None):
    return main_wrapper(build_parser(), run, argv)


if __name__ == "__main__":
    main()
