"""hagan-directions: walk the latent direction that changes a measurement (paper, Fig. 5).

As in the paper the direction is the least-squares fit of the target on z (the embeddings
are z-hat, so an embeddings CSV or a CSV of sampled z both work): w = beta / |beta|. Along
z0 + t * w the linear prediction moves by t * |beta|, so each requested target value gives its
t in closed form. Each step is generated, saved, re-encoded and, optionally, measured, so the
table shows whether the anatomy really follows the prediction.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm import tqdm

from .common import (AppError, add_model_args, join_target, main_wrapper, markdown_table, monotonic,
                     open_model_from_args, read_embeddings, warn, write_csv)


def fit_direction(x, y, alpha: float = 0.0):
    """(fitted linear model, unit direction w, slope |beta| = change of prediction per unit t)."""
    from sklearn.linear_model import LinearRegression, Ridge

    model = (Ridge(alpha=alpha) if alpha > 0 else LinearRegression()).fit(x, y)
    slope = float(np.linalg.norm(model.coef_))
    if not np.isfinite(slope) or slope == 0:
        raise AppError("the target does not vary linearly with z: no direction to walk")
    return model, model.coef_ / slope, slope


def walk(model, w, slope: float, z0, targets):
    """(t of each step, the latent codes [steps, latent]) whose prediction equals `targets`."""
    t = (np.asarray(targets, np.float64) - model.predict(z0[None])[0]) / slope
    return t, z0[None] + t[:, None] * w[None]


def parse_measure(text: str | None):
    """'threshold:LOW,HIGH' -> (LOW, HIGH), or None."""
    if text is None:
        return None
    kind, _, band = text.partition(":")
    try:
        low, high = (float(v) for v in band.split(","))
    except ValueError:
        low = high = None
    if kind != "threshold" or low is None or not low <= high:
        raise AppError(f"--measure expects threshold:LOW,HIGH with LOW <= HIGH, got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-directions",
        description="Fit the latent direction of a measurement, walk along it, and generate, save "
                    "and measure a volume at each step.")
    add_model_args(p)
    p.add_argument("--embeddings", required=True, metavar="CSV",
                   help="subject_id, z0..z{latent-1}: hagan-embed output (or sampled z)")
    p.add_argument("--targets", required=True, metavar="CSV", help="subject_id and measurement columns")
    p.add_argument("--target", required=True, metavar="COL", help="the measurement to change")
    p.add_argument("--steps", type=int, default=7, help="volumes along the walk (default: 7)")
    p.add_argument("--targets-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="predicted target of the first and last step (default: mean -+ --sd std)")
    p.add_argument("--sd", type=float, default=2.0,
                   help="default range: this many standard deviations of the target (default: 2)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="Ridge penalty of the fit; 0 = ordinary least squares (default)")
    p.add_argument("--subject", help="start from this subject's embedding (default: a random z)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random start z (default: 0)")
    p.add_argument("--label", type=int, help="class of a conditional model (default: 0)")
    p.add_argument("--measure", metavar="threshold:LOW,HIGH",
                   help="also report the fraction of voxels with LOW <= value <= HIGH; values are the "
                        "model's [-1, 1] (paper CT window: HU h -> (h + 1024) / 812 - 1, so "
                        "lung -1000..-400 HU is -0.97,-0.23)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    return p


def run(args) -> dict:
    from ..io import mid_slices, montage_png, save_nifti

    if args.steps < 2:
        raise AppError("--steps must be at least 2")
    if args.alpha < 0 or args.sd <= 0:
        raise AppError("--alpha must be >= 0 and --sd > 0")
    band = parse_measure(args.measure)
    source = open_model_from_args(args)
    cfg = source.config
    _, x, y = join_target(args.embeddings, args.targets, args.target, min_rows=3)
    if x.shape[1] != cfg.latent_dim:
        raise AppError(f"{args.embeddings!r} has {x.shape[1]} z columns but the model's latent_dim "
                       f"is {cfg.latent_dim}")
    if cfg.num_classes == 0 and args.label is not None:
        raise AppError("--label needs a conditional model; this one has num_classes = 0")
    label = args.label or 0
    if cfg.num_classes and not 0 <= label < cfg.num_classes:
        raise AppError(f"--label must be in 0..{cfg.num_classes - 1}")
    labels = [label] if cfg.num_classes else None

    if len(y) <= cfg.latent_dim and args.alpha == 0:
        warn(f"{len(y)} subjects for {cfg.latent_dim} latent dimensions: least squares interpolates "
             "them; a small --alpha (e.g. 1e-4) gives a steadier direction")
    model, w, slope = fit_direction(x, y, args.alpha)
    if args.subject is not None:
        ids, all_z = read_embeddings(args.embeddings)
        if args.subject not in ids:
            raise AppError(f"subject {args.subject!r} is not in {args.embeddings!r}")
        z0 = all_z[ids.index(args.subject)]
    else:
        z0 = np.random.default_rng(args.seed).standard_normal(cfg.latent_dim)
    low, high = args.targets_range or (y.mean() - args.sd * y.std(), y.mean() + args.sd * y.std())
    t, zs = walk(model, w, slope, z0, np.linspace(low, high, args.steps))
    predicted = model.predict(zs)

    os.makedirs(args.out, exist_ok=True)
    volumes, from_volume, fractions = [], [], []
    for i, z in enumerate(tqdm(zs, desc="generating", unit="volume")):
        vol = source.generate(z[None].astype(np.float32), labels)[0]
        save_nifti(vol, os.path.join(args.out, f"step_{i:02d}.nii.gz"), cfg.spacing)
        from_volume.append(float(model.predict(source.encode(vol[None]).astype(np.float64))[0]))
        if band:
            fractions.append(float(np.mean((vol >= band[0]) & (vol <= band[1]))))
        volumes.append(mid_slices(vol))  # for strip.png: 7 volumes of 256^3 are 470 MB

    header = ["step", "t", f"predicted_{args.target}", f"predicted_{args.target}_from_volume"]
    columns = [range(args.steps), t, predicted, from_volume]
    if band:
        header.append(f"fraction_in_{band[0]:g}_{band[1]:g}")
        columns.append(fractions)
    rows = [[c[i] if j == 0 else float(c[i]) for j, c in enumerate(columns)] for i in range(args.steps)]
    write_csv(os.path.join(args.out, "walk.csv"), header, rows)
    table = markdown_table(header, rows)
    verdicts = {name: monotonic(col) for name, col in zip(header[2:], columns[2:])}
    with open(os.path.join(args.out, "walk.md"), "w") as f:
        f.write(f"# Walk along the {args.target} direction\n\n{table}\n")
        f.writelines(f"- {name}: monotonic = {v}\n" for name, v in verdicts.items())
    montage_png(volumes, os.path.join(args.out, "strip.png"),
                titles=[f"{args.target} {p:.3g}" for p in predicted])
    result = {
        "target": args.target, "steps": args.steps, "range": [float(low), float(high)],
        "slope": slope, "intercept": float(model.intercept_), "fit_r2": float(model.score(x, y)),
        "n": int(len(y)), "start": args.subject or f"random z (seed {args.seed})",
        "label": labels[0] if labels else None, "t": [float(v) for v in t],
        "monotonic": verdicts, "direction": [float(v) for v in w],
    }
    with open(os.path.join(args.out, "direction.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(table)
    for name, v in verdicts.items():
        print(f"{name}: monotonic = {v}")
    print(f"wrote {args.steps} volumes, strip.png, walk.csv, walk.md and direction.json to {args.out}")
    return result


def main(argv=None):
    return main_wrapper(build_parser(), run, argv)


if __name__ == "__main__":
    main()
