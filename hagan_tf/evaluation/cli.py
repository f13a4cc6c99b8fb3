"""hagan-evaluate: score a model against held-out real volumes and write a report folder.

  metrics.json   every metric with its extractor, n, seed and resolution
  features.npz   the extracted features (real/generated, per resolution), for re-analysis
  mds.png        MDS embedding of real vs generated features with 2-sigma covariance ellipses
  montage.png    mid slices of generated volumes next to real ones
  report.md      the same numbers as a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

import numpy as np

from ..arrays import class_counts, downsample
from ..data.records import read_manifest
from ..io import montage_png
from ..layout import DEFAULT_MODEL_NAME
from .features import EXTRACTORS, make_extractor
from .inception import SliceInceptionScorer, load_inception
from .metrics import fid, mmd2, ms_ssim_diversity

FEATURE_METRICS = ("fid", "mmd2_gaussian", "mmd2_polynomial")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-evaluate",
        description="FID, MMD², MS-SSIM diversity and IS of a HA-GAN against real volumes, "
                    "at the model's resolution and a downsampled one, with MDS and montage plots.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by hagan-train")
    src.add_argument("--model-base", help="export base directory (DIR/NAME/VERSION)")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name under --model-base")
    p.add_argument("--version", type=int, help="export version (default: newest)")
    p.add_argument("--step", type=int, help="checkpoint step of --run (default: latest)")
    p.add_argument("--real", required=True, help="TFRecord directory of preprocessed real volumes")
    p.add_argument("--fold", type=int, help="use only this fold of --real (the held-out one)")
    p.add_argument("--n", type=int, default=512, help="generated samples (and at most this many real)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes")
    p.add_argument("--features", choices=EXTRACTORS, default="medicalnet",
                   help="feature extractor for FID/MMD/MDS")
    p.add_argument("--weights", help="MedicalNet resnet_50_23dataset.pth (for --features medicalnet)")
    p.add_argument("--resnet-width", type=float, default=1.0,
                   help="channel width of --features random-resnet")
    p.add_argument("--resnet-seed", type=int, default=0, help="weight seed of --features random-resnet")
    p.add_argument("--inception-weights",
                   help="keras.applications InceptionV3 weights file (with top); IS is skipped without")
    low = p.add_mutually_exclusive_group()
    low.add_argument("--lowres", type=int, help="edge of the downsampled evaluation, e.g. 128")
    low.add_argument("--lowres-factor", type=int, default=2,
                     help="downsampling factor of the second evaluation (1 = none; default 2)")
    p.add_argument("--ms-ssim-samples", type=int, default=8,
                   help="volumes per set for MS-SSIM diversity, all pairs among them "
                        "(about 5 s per pair at 256^3 on one CPU core)")
    p.add_argument("--out", required=True, help="report directory")
    return p


class _Set:
    """Features, kept volumes and IS probabilities of one set (real or generated) per resolution."""

    def __init__(self, factors, keep, extractor, scorers):
        self.factors, self.keep, self.extractor = factors, keep, extractor
        self.features = {f: [] for f in factors}
        self.volumes = {f: [] for f in factors}
        self.scorers = scorers
        self.n = 0

    def add(self, volumes: np.ndarray) -> None:
        self.n += len(volumes)
        for f in self.factors:
            v = downsample(volumes, f)
            if self.extractor.accepts(v.shape[1]):
                self.features[f].append(self.extractor(v))
            room = self.keep - sum(len(x) for x in self.volumes[f])
            if room > 0:
                self.volumes[f].append(v[:room])
            if self.scorers:
                self.scorers[f].update(v)

    def feats(self, f) -> np.ndarray | None:
        return np.concatenate(self.features[f]) if self.features[f] else None

    def vols(self, f) -> np.ndarray:
        return np.concatenate(self.volumes[f])


def _need_two(n, args):
    if n < 2:
        where = f"{args.real!r}" + (f" fold {args.fold}" if args.fold is not None else "")
        raise ValueError(f"found {n} real volume(s) in {where}; need >= 2")


def count_real(args, size) -> int | None:
    """Real volumes the manifest promises for this fold (None without a manifest); fails early."""
    from ..data.pipeline import check_records

    check_records(args.real, size)  # and FileNotFoundError for a directory without shards
    rows = read_manifest(args.real)
    if not rows:
        return None
    rows = [r for r in rows if args.fold is None or r.get("fold") == args.fold]
    _need_two(len(rows), args)
    return min(len(rows), args.n)


def _real_batches(args, size):
    import tensorflow as tf

    from ..data.pipeline import make_dataset

    ds = make_dataset(args.real, args.batch_size, size=size,
                      folds=None if args.fold is None else [args.fold],
                      shuffle=0, repeat=False, drop_remainder=False)
    seen = 0
    try:
        for batch in ds:
            vol = batch["volume"].numpy()[: args.n - seen]
            seen += len(vol)
            yield vol, batch["label"].numpy()[: len(vol)]
            if seen >= args.n:
                return
    except tf.errors.OpError as e:  # wrong shape, corrupt or unreadable records
        raise ValueError(f"could not read {args.real!r}: {e.message.splitlines()[0]}") from e


def generated_labels(real_labels, num_classes: int, n: int, seed: int):
    """Classes for a conditional model's samples, in the real volumes' proportions: balanced
    classes against an imbalanced real set would add a shift to FID/MMD that the model did
    not make. Balanced when the real labels are not the model's classes (unlabelled records)."""
    if not num_classes:
        return None
    real_labels = np.asarray(real_labels, np.int64)
    if len(real_labels) and real_labels.min() >= 0 and real_labels.max() < num_classes:
        counts = class_counts(real_labels, num_classes, n)
    else:
        counts = class_counts(np.arange(num_classes), num_classes, n)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), counts))


def _entry(name, res, value, ext, real, gen, seed, **extra):
    return {"name": name, "resolution": res, "value": value, "extractor": ext.name,
            "extractor_description": ext.description, "n_generated": gen.n, "n_real": real.n,
            "seed": seed, **extra}


def compute_metrics(real: _Set, gen: _Set, size: int, factors, ext, args) -> list[dict]:
    out = []
    for f in factors:
        res = size // f
        fr, fg = real.feats(f), gen.feats(f)
        for name in FEATURE_METRICS:
            if fr is None:
                out.append(_entry(name, res, None, ext, real, gen, args.seed, available=False,
                                  reason=f"the {ext.name} extractor only takes {ext.size}^3 volumes"))
                continue
            try:  # one metric that cannot be computed must not cost the report the others
                value = (fid(fr, fg) if name == "fid" else
                         mmd2(fr, fg, kernel=name.split("_")[1]))
            except (ValueError, np.linalg.LinAlgError) as e:
                out.append(_entry(name, res, None, ext, real, gen, args.seed, available=False,
                                  reason=str(e)))
                continue
            out.append(_entry(name, res, value, ext, real, gen, args.seed))
        for which, s in (("generated", gen), ("real", real)):
            vols = s.vols(f)[: args.ms_ssim_samples]
            out.append({**_entry(f"ms_ssim_{which}", res, ms_ssim_diversity(vols), ext, real, gen,
                                 args.seed, pairs=len(vols) * (len(vols) - 1) // 2),
                        "extractor": None, "extractor_description": "none (computed on voxels)"})
        for which, s in (("generated", gen), ("real", real)):
            entry = {**_entry(f"inception_score_{which}", res, None, ext, real, gen, args.seed),
                     "extractor": "inceptionv3-2d-mid-slices",
                     "extractor_description": "2D InceptionV3 on mid axial/coronal/sagittal slices"}
            if s.scorers:
                r = s.scorers[f].result()
                entry.update(value=r["value"], per_view=r["per_view"],
                             weights=os.path.abspath(args.inception_weights))
            else:
                entry.update(available=False, reason="no --inception-weights given")
            out.append(entry)
    return out


def mds_plot(real_feats, gen_feats, path, title, seed=0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse
    from sklearn.manifold import MDS

    emb = MDS(n_components=2, init="classical_mds", random_state=seed).fit_transform(
        np.concatenate([real_feats, gen_feats]))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for pts, label, color in ((emb[:len(real_feats)], f"real (n={len(real_feats)})", "tab:blue"),
                              (emb[len(real_feats):], f"generated (n={len(gen_feats)})", "tab:orange")):
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.6, color=color, label=label)
        vals, vecs = np.linalg.eigh(np.cov(pts, rowvar=False))
        angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
        w, h = 2 * 2 * np.sqrt(np.maximum(vals[::-1], 0))  # 2-sigma ellipse
        ax.add_patch(Ellipse(pts.mean(0), w, h, angle=angle, fill=False, color=color, lw=2))
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.set_aspect("equal", "datalim")  # MDS distances are isotropic
    ax.legend(fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(m) -> str:
    if m["value"] is None:
        return "n/a"
    v = m["value"]
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def write_report(path, metrics, info, resolutions) -> str:
    rows = sorted({m["name"] for m in metrics}, key=[m["name"] for m in metrics].index)
    by = {(m["name"], m["resolution"]): m for m in metrics}
    ext = info["extractor"]
    lines = [
        "# HA-GAN evaluation", "",
        f"- model: `{info['model']['path']}` ({info['model']['size']}^3"
        + (f", step {info['model']['step']})" if info["model"]["step"] is not None else ")"),
        f"- real: `{info['real']['dir']}` ({'all folds' if info['real']['fold'] is None else 'fold ' + str(info['real']['fold'])}), n = {info['real']['n']}",
        f"- generated: n = {info['n']}, seed {info['seed']}",
        f"- FID/MMD/MDS features: **{ext['name']}**: {ext['description']}", "",
        "| metric | " + " | ".join(f"{r}^3" for r in resolutions) + " | better |",
        "|---|" + "---|" * len(resolutions) + "---|",
    ]
    for name in rows:
        base = name.replace("_generated", "").replace("_real", "")
        better = {"fid": "lower", "mmd2_gaussian": "lower", "mmd2_polynomial": "lower",
                  "inception_score": "higher", "ms_ssim": "close to real"}[base]
        lines.append(f"| {name} | " + " | ".join(_fmt(by[name, r]) for r in resolutions) + f" | {better} |")
    reasons = sorted({f"{m['name']}: {m['reason']}" for m in metrics if m.get("reason")})
    if reasons:
        lines += ["", "Not available: " + "; ".join(reasons) + "."]
    lines += ["", "MS-SSIM rows are the mean over pairs within one set (lower = more diverse); "
              "a generated value far above the real one means mode collapse.", "",
              "![MDS of features](mds.png)", "", "![samples and real volumes](montage.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _fail(parser, msg):
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 2 or args.batch_size < 1 or args.ms_ssim_samples < 2:
        parser.error("--n and --ms-ssim-samples must be >= 2 and --batch-size >= 1")
    if args.features == "medicalnet" and not args.weights:
        parser.error("--features medicalnet needs --weights resnet_50_23dataset.pth "
                     "(or use --features random-resnet / encoder)")
    if args.weights and args.features != "medicalnet":
        parser.error("--weights is only used with --features medicalnet")
    where = {"weights": "MedicalNet's release (github.com/Tencent/MedicalNet, pretrain/)",
             "inception_weights": "keras.applications (inception_v3_weights_tf_dim_ordering_tf_"
                                  "kernels.h5, downloaded once by InceptionV3(weights='imagenet'))"}
    for opt in ("weights", "inception_weights"):
        if getattr(args, opt) and not os.path.isfile(getattr(args, opt)):
            parser.error(f"--{opt.replace('_', '-')} {getattr(args, opt)!r} does not exist; "
                         f"it comes from {where[opt]}")
    if args.resnet_width <= 0:
        parser.error("--resnet-width must be > 0")

    from tqdm import tqdm

    from ..trained import open_model

    try:
        model = open_model(run=args.run, model_base=args.model_base, name=args.name,
                           step=args.step, version=args.version)
    except (FileNotFoundError, ValueError, OSError) as e:
        _fail(parser, f"cannot open the model: {e}")
    size = model.config.size
    if args.lowres is not None:
        if args.lowres <= 0 or args.lowres >= size or size % args.lowres:
            parser.error(f"--lowres must divide the model size {size} and be smaller")
        factor = size // args.lowres
    else:
        factor = args.lowres_factor
        if factor < 1 or size % factor:
            parser.error(f"--lowres-factor must be >= 1 and divide the model size {size}")
    factors = [1] + ([factor] if factor > 1 else [])
    resolutions = [size // f for f in factors]

    try:
        n_real = count_real(args, size)
        ext = make_extractor(args.features, weights=args.weights, source=model,
                             seed=args.resnet_seed, width=args.resnet_width, batch_size=args.batch_size)

        classify = load_inception(args.inception_weights) if args.inception_weights else None

        def scorers():
            return {f: SliceInceptionScorer(classify) for f in factors} if classify else None

        keep = max(args.ms_ssim_samples, 4)
        real, gen = _Set(factors, keep, ext, scorers()), _Set(factors, keep, ext, scorers())
        real_labels = []
        with tqdm(total=n_real or args.n, desc="real volumes", unit="vol") as bar:
            for vol, lab in _real_batches(args, size):
                real.add(vol)
                real_labels.append(lab)
                bar.update(len(vol))
        _need_two(real.n, args)
        rng = np.random.default_rng(args.seed)
        z = rng.standard_normal((args.n, model.config.latent_dim)).astype(np.float32)
        labels = generated_labels(np.concatenate(real_labels), model.config.num_classes, args.n,
                                  args.seed)
        with tqdm(total=args.n, desc="generated volumes", unit="vol") as bar:
            for i in range(0, args.n, args.batch_size):
                lab = None if labels is None else labels[i:i + args.batch_size]
                gen.add(model.generate(z[i:i + args.batch_size], lab))
                bar.update(len(z[i:i + args.batch_size]))
        metrics = compute_metrics(real, gen, size, factors, ext, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(parser, str(e))

    os.makedirs(args.out, exist_ok=True)
    info = {
        "model": {"path": os.path.abspath(args.run or args.model_base), "step": model.step, "size": size},
        "real": {"dir": os.path.abspath(args.real), "fold": args.fold, "n": real.n},
        "n": gen.n, "seed": args.seed,
        "extractor": {"name": ext.name, "description": ext.description,
                      "independent_of_model": ext.independent,
                      "weights": os.path.abspath(args.weights) if args.weights else None},
    }
    tmp = os.path.join(args.out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "metrics": metrics}, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    arrays = {f"{which}_{size // f}": s.feats(f) for f in factors for which, s in
              (("real", real), ("generated", gen)) if s.feats(f) is not None}
    np.savez(os.path.join(args.out, "features.npz"), **arrays)
    if real.feats(1) is not None:
        mds_plot(real.feats(1), gen.feats(1), os.path.join(args.out, "mds.png"),
                 f"MDS of {ext.name} features at {size}^3: {ext.description}", args.seed)
    n_show = min(4, len(gen.vols(1)), len(real.vols(1)))
    pairs = [v for i in range(n_show) for v in (gen.vols(1)[i], real.vols(1)[i])]
    titles = [t for i in range(n_show) for t in (f"generated {i}", f"real {i}")]
    montage_png(pairs, os.path.join(args.out, "montage.png"), titles)
    write_report(os.path.join(args.out, "report.md"), metrics, info, resolutions)
    for m in metrics:
        print(f"{m['name']:>26} @ {m['resolution']}^3: {_fmt(m)}", file=sys.stderr)
    print(os.path.join(args.out, "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
