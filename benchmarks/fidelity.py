"""Sample fidelity: does training learn the anatomy of the scans it is given?

Writes thorax phantoms with known anatomy factors (hagan_tf.data.synthetic.thorax_hu: body
size, lung size, ribs + spine, heart, emphysema) as int16 NIfTI, preprocesses them with
`hagan-preprocess`, trains a preset with `hagan-train` (timed), then measures the generator
and encoder against the real (preprocessed) scans with one estimator for both sides
(hagan_tf.evaluation.fidelity):

  factors     W1(real, generated) / sd(real) of each anatomy fraction (body, lung, bone,
              emphysema), next to the same for a random real subset of the samples' size
              against the other real scans (the sampling-noise floor of the statistic)
  intensity   pooled HU histograms: W1 in HU and L1 of the normalised histograms
  diversity   mean pairwise L1 and MS-SSIM among the samples vs as many real scans, and ratio
  features    FID, MMD^2 (Gaussian, median bandwidth) and KID-style polynomial MMD^2 with a
              random-weight 3D ResNet (only comparable between runs with the same settings)
  encoder     cross-validated ridge R^2 of each factor from E(x) on the real scans (and from
              an untrained E, the baseline), and the reconstruction error mean |x - G(E(x))|

and checks the targets: every factor W1/sd <= 0.3, diversity (L1 and MS-SSIM) within +-25% of
the real scans' (MS-SSIM as its dissimilarity 1 - MS-SSIM, see
hagan_tf.evaluation.fidelity.diversity_ratios), ridge R^2 of the lung fraction >= 0.9. Prints a table, writes
OUT/fidelity.json, OUT/montage.png, OUT/real_factors.csv and copies the JSON and PNG to
benchmarks/results/fidelity-<preset>.{json,png}. Exits 0 whether or not targets pass.

    python benchmarks/fidelity.py --preset tiny_32
    python benchmarks/fidelity.py --preset tiny_32 --steps 2000 --set lr_g=2e-4
    python benchmarks/fidelity.py --preset tiny_32 --run runs/mine     # evaluate only

Scans and preprocessed records are kept in OUT and reused while --scans and the phantom
settings are the same; the run directory OUT/run is replaced by every training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

import numpy as np
from machine import describe, facts  # noqa: E402  (benchmarks/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))
SCAN_SHAPE = (72, 96, 96)  # [D, H, W]
SCAN_SPACING = (4.0, 3.6, 3.6)  # mm, D/H/W
TARGETS = {"max_w1": 0.3, "diversity_tol": 0.25, "min_lung_r2": 0.9}


def clean(x):
    """JSON-safe: NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class Stages:
    """Wall-clock time per stage, printed as it goes."""

    def __init__(self):
        self.times = {}

    def __call__(self, name):
        stages = self

        class _Timer:
            def __enter__(self):
                print(f"\n== {name}", flush=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stages.times[name] = round(time.perf_counter() - self.t, 2)
                print(f"   ({stages.times[name]:.1f} s)", flush=True)

        return _Timer()


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def phantom_version() -> str:
    """A hash of the phantom code: cached scans are rewritten when it changes."""
    import hashlib
    import inspect

    from hagan_tf.data import synthetic
    from hagan_tf.evaluation import fidelity

    code = "".join(inspect.getsource(f) for f in (synthetic.thorax_hu, synthetic.draw_thorax_factors,
                                                   fidelity.write_phantom_scans))
    values = repr((synthetic.THORAX_FACTORS, synthetic.HU_AIR, synthetic.HU_TISSUE, synthetic.HU_FAT,
                   synthetic.HU_HEART, synthetic.HU_LUNG_PARENCHYMA, synthetic.HU_EMPHYSEMA,
                   synthetic.HU_CORTICAL))
    return hashlib.sha256((code + values).encode()).hexdigest()[:12]


def prepare_scans(out: str, n: int, seed: int) -> tuple[str, list[dict], bool]:
    """OUT/scans with n phantoms and factors.csv, reused when written with the same settings."""
    from hagan_tf.evaluation.fidelity import read_csv, write_phantom_scans

    scans = os.path.join(out, "scans")
    stamp = {"n": n, "shape": list(SCAN_SHAPE), "spacing": list(SCAN_SPACING), "seed": seed,
             "phantom": phantom_version()}
    stamp_path = os.path.join(out, "scans.json")
    if _read_json(stamp_path) == stamp and os.path.exists(os.path.join(scans, "factors.csv")):
        return scans, read_csv(os.path.join(scans, "factors.csv")), True
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name == "scans" or name.startswith("data-"):  # records of other scans are stale
            shutil.rmtree(os.path.join(out, name))
    rows = write_phantom_scans(scans, n, SCAN_SHAPE, SCAN_SPACING, seed)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return scans, rows, False


def prepare_records(scans: str, out: str, size: int, n: int) -> tuple[str, bool]:
    from hagan_tf.preprocess.beam import main as preprocess

    data = os.path.join(out, f"data-{size}")
    summary = _read_json(os.path.join(data, "summary.json"))
    if summary and summary.get("written") == n and summary.get("size") == size:
        return data, True
    rc = preprocess(["--input", scans, "--output", data, "--size", str(size), "--modality", "ct",
                     "--overwrite"])
    if rc not in (0, None):
        raise SystemExit(f"fidelity: hagan-preprocess failed with exit code {rc}")
    summary = _read_json(os.path.join(data, "summary.json"))
    if not summary or summary.get("written") != n:
        raise SystemExit(f"fidelity: hagan-preprocess wrote {summary and summary.get('written')} "
                         f"of {n} scans: see {data}/dead_letter.jsonl")
    return data, False


def read_real(data: str, size: int, batch: int = 8):
    """(volumes float32 [n, S, S, S, 1], subject ids) of every record, in record order."""
    from hagan_tf.data.pipeline import make_dataset

    vols, ids = [], []
    for b in make_dataset(data, batch, size=size, repeat=False, shuffle=0, drop_remainder=False):
        vols.append(b["volume"].numpy().astype(np.float32))
        ids += [s.decode() for s in b["subject_id"].numpy()]
    return np.concatenate(vols), ids


def batched(fn, x, batch: int):
    return np.concatenate([np.asarray(fn(x[i:i + batch]), np.float32) for i in range(0, len(x), batch)])


def evaluate(run_dir: str, data: str, factors_rows: list[dict], args, stages: Stages) -> dict:
    from hagan_tf.evaluation import fidelity as fd
    from hagan_tf.rundir import load_hagan

    res = {}
    with stages("load model, read real scans, generate samples"):
        gan, step = load_hagan(run_dir)
        cfg = gan.config
        real, ids = read_real(data, cfg.size)
        z = gan.sample_z(args.samples, args.seed)
        labels = (np.arange(args.samples) % cfg.num_classes) if cfg.num_classes else None

        def gen(i):
            return gan.generate(z[i:i + args.batch], None if labels is None else labels[i:i + args.batch])

        fake = np.concatenate([np.asarray(gen(i), np.float32) for i in range(0, len(z), args.batch)])
        print(f"   step {step}; {len(real)} real scans, {len(fake)} samples of {cfg.size}^3")
        res.update(step=step, n_real=len(real), n_generated=len(fake), size=cfg.size,
                   config=cfg.to_dict())

    with stages("anatomy factors and intensity histograms"):
        fr, fg = fd.factor_table(real), fd.factor_table(fake)
        by_id = {r["subject_id"]: r for r in factors_rows}
        rows = [{"subject_id": sid, **{k: v for k, v in by_id.get(sid, {}).items()
                                       if k not in ("subject_id", "file")},
                 **{f"measured{cfg.size}_{k}": round(float(fr[k][i]), 6) for k in fd.FACTORS}}
                for i, sid in enumerate(ids)]
        fd.write_csv(os.path.join(args.out, "real_factors.csv"), rows)
        res["factors"] = {}
        for k in fd.FACTORS:
            res["factors"][k] = {
                "w1_over_sd": fd.normalized_w1(fr[k], fg[k]),
                "floor": fd.sampling_floor(fr[k], len(fake), fd.normalized_w1, seed=args.seed),
                "real_mean": float(fr[k].mean()), "real_sd": float(fr[k].std(ddof=1)),
                "generated_mean": float(fg[k].mean()), "generated_sd": float(fg[k].std(ddof=1)),
            }
        hr = np.stack([fd.intensity_histogram([v]) for v in real])
        hg = fd.intensity_histogram(fake)
        floor = fd.sampling_floor(
            hr, len(fake), lambda a, b: fd.histogram_distances(a.sum(0), b.sum(0))["w1_hu"],
            repeats=20, seed=args.seed)
        res["intensity"] = {**fd.histogram_distances(hr.sum(0), hg), "w1_hu_floor": floor,
                            "estimator": "pooled voxel histograms, 8 HU bins over [-1024, 600]: "
                                         "W1 in HU and L1 of the normalised histograms"}

    with stages("diversity (pairwise L1, MS-SSIM)"):
        pick = np.random.default_rng(args.seed).choice(len(real), min(len(fake), len(real)), replace=False)
        dg = fd.diversity(fake, max_pairs=args.ms_ssim_pairs, seed=args.seed)
        dr = fd.diversity(real[np.sort(pick)], max_pairs=args.ms_ssim_pairs, seed=args.seed)
        res["diversity"] = {"generated": dg, "real": dr, "ratio": fd.diversity_ratios(dg, dr)}

    if args.features != "none":
        with stages(f"features ({args.features}, width {args.resnet_width}): FID, MMD"):
            from hagan_tf.evaluation.features import make_extractor

            ext = make_extractor(args.features, seed=0, width=args.resnet_width, batch_size=args.batch)
            res["features"] = {"extractor": ext.name, "description": ext.description,
                               **fd.feature_distances(ext(real), ext(fake), seed=args.seed)}

    with stages("encoder: ridge R2 of the factors, reconstruction G(E(x))"):
        emb = batched(gan.encode, real, args.batch)
        targets = {k: fr[k] for k in fd.FACTORS}
        res["ridge_r2"] = fd.ridge_r2(emb, targets, folds=5, seed=args.seed)
        params = [k for k in ("lung_scale", "body_rx", "body_ry", "emphysema_extent", "rib_thickness",
                              "heart_scale") if all(k in by_id.get(s, {}) for s in ids)]
        res["ridge_r2_generating"] = fd.ridge_r2(
            emb, {k: np.array([float(by_id[s][k]) for s in ids]) for k in params}, folds=5, seed=args.seed)
        # the same estimator on an untrained encoder (initial weights of the config's seed):
        # what E's architecture alone decodes, the baseline a trained E has to beat
        import keras

        from hagan_tf.gan import HAGAN

        keras.utils.set_random_seed(cfg.seed)
        untrained = HAGAN(cfg)
        res["ridge_r2_untrained"] = fd.ridge_r2(batched(untrained.encode, real, args.batch), targets,
                                                folds=5, seed=args.seed)
        del untrained
        n = min(args.recon, len(real))
        x = real[:n]
        if cfg.num_classes:
            xr = None
        else:
            xr = batched(lambda v: gan.generate(gan.encode(v)), x, args.batch)
        if xr is not None:
            frec = fd.factor_table(xr)
            res["reconstruction"] = {
                "n": n, "l1": float(np.abs(x - xr).mean()),
                "real_pairwise_l1": dr["l1"],
                "factor_mae": {k: float(np.abs(frec[k] - fr[k][:n]).mean()) for k in fd.FACTORS},
            }
        else:
            res["reconstruction"] = {"n": 0, "note": "conditional model: G(E(x)) needs x's class"}

    with stages("montage"):
        k = min(8, len(real), len(fake))
        png = fd.comparison_png(real[np.sort(pick)][:k], fake[:k], os.path.join(args.out, "montage.png"),
                                title=f"{args.name} step {step}: real (top) vs generated (bottom)")
        res["montage"] = png
    return res


def print_table(res: dict, checks: list[dict]) -> None:
    f = res["factors"]
    print(f"\nfidelity of {res['name']} at step {res['step']} ({res['size']}^3, "
          f"{res['n_generated']} samples vs {res['n_real']} real scans; "
          f"training {res['train_seconds'] if res['train_seconds'] is not None else 'n/a'} s)")
    if res.get("cpu"):
        print(f"on {describe(res['cpu'])}")
    print(f"{'factor':<11}{'real mean':>11}{'real sd':>10}{'gen mean':>11}{'gen sd':>10}"
          f"{'W1/sd':>8}{'floor':>8}{'ridge R2':>10}{'untrained':>10}")
    nan = float("nan")
    for k, v in f.items():
        r2, r2u = res["ridge_r2"].get(k), res.get("ridge_r2_untrained", {}).get(k)
        print(f"{k:<11}{v['real_mean']:>11.4f}{v['real_sd']:>10.4f}{v['generated_mean']:>11.4f}"
              f"{v['generated_sd']:>10.4f}{v['w1_over_sd']:>8.3f}{v['floor']:>8.3f}"
              f"{nan if r2 is None else r2:>10.3f}{nan if r2u is None else r2u:>10.3f}")
    print("(floor: W1/sd of a random real subset of the samples' size against the other real "
          "scans; untrained: ridge R2 from E at its initial weights)")
    i = res["intensity"]
    print(f"HU histogram: W1 {i['w1_hu']:.1f} HU (floor {i['w1_hu_floor']:.1f}), L1 {i['l1']:.3f}")
    d = res["diversity"]
    print(f"diversity   : pairwise L1 gen {d['generated']['l1']:.4f} / real {d['real']['l1']:.4f}"
          f" = {d['ratio']['l1']:.3f};  MS-SSIM gen {d['generated']['ms_ssim']:.4f} / real "
          f"{d['real']['ms_ssim']:.4f} (1 - MS-SSIM ratio {d['ratio']['ms_ssim_dissimilarity']:.3f})"
          f"  [{d['generated']['n']} vs {d['real']['n']} volumes, {d['generated']['ms_ssim_scales']} scales]")
    if "features" in res:
        e = res["features"]

        def g(key):
            v = e.get(key)
            return "n/a" if v is None else f"{v:.4g}"
        print(f"features    : FID {g('fid')} (floor {g('fid_floor')}), MMD2 gauss {g('mmd2_gaussian')} "
              f"(floor {g('mmd2_gaussian_floor')}), MMD2 poly {g('mmd2_polynomial')} "
              f"(floor {g('mmd2_polynomial_floor')})  [{e['extractor']}]")
    rg = res.get("ridge_r2_generating", {})
    if rg:
        print("ridge R2 of generating factors: " + ", ".join(f"{k} {v:.3f}" for k, v in rg.items()))
    rec = res["reconstruction"]
    if rec.get("n"):
        print(f"reconstruct : mean |x - G(E(x))| {rec['l1']:.4f} over {rec['n']} real scans "
              f"(real pairwise L1 {rec['real_pairwise_l1']:.4f}); factor MAE "
              + ", ".join(f"{k} {v:.4f}" for k, v in rec["factor_mae"].items()))
    print("\ntargets:")
    for c in checks:
        v = c["value"]
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['target']:<44} "
              f"{'n/a' if v is None else f'{v:.3f}'}")
    n_pass = sum(c["pass"] for c in checks)
    print(f"  {n_pass}/{len(checks)} targets met")


SEED_FIGURES = {  # label -> path in a result dict, for --seeds
    **{f"{k} W1/sd": ("factors", k, "w1_over_sd") for k in ("body", "lung", "bone", "emphysema")},
    "L1 div. ratio": ("diversity", "ratio", "l1"),
    "1-MS-SSIM ratio": ("diversity", "ratio", "ms_ssim_dissimilarity"),
    "R^2 lung": ("ridge_r2", "lung"),
    "HU W1": ("intensity", "w1_hu"),
    "FID": ("features", "fid"),
    "train s": ("train_seconds",),
}


def run_seeds(args, argv: list[str], p) -> int:
    """--seeds: one run per training seed, then the spread of each figure across them."""
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seeds must be integers separated by ',', got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds) or args.run:
        p.error("--seeds needs distinct seeds and a training run (not --run)")
    if any(item.split("=", 1)[0].strip() == "seed" for item in args.set):
        p.error("--seeds sets the training seed itself: drop --set seed=...")
    rest, drop_next = [], False  # argv less --seeds and --results, which each run sets
    for a in argv:
        if not drop_next and a not in ("--seeds", "--results") and not a.startswith(
                ("--seeds=", "--results=")):
            rest.append(a)
        drop_next = a in ("--seeds", "--results")
    name = os.path.splitext(os.path.basename(args.preset))[0]
    runs = []
    for seed in seeds:
        out = os.path.join(args.results, f"seed-{seed}")
        print(f"\n=== training seed {seed} -> {out}", flush=True)
        rc = main(rest + ["--set", f"seed={seed}", "--results", out])
        path = os.path.join(out, f"fidelity-{name}.json")
        if rc != 0 or not os.path.exists(path):
            print(f"fidelity: seed {seed} failed (exit {rc}); its figures are left out", file=sys.stderr)
            continue
        runs.append((seed, _read_json(path)))
    if not runs:
        return 1
    summary = {"preset": args.preset, "overrides": args.set, "seeds": [s for s, _ in runs],
               "figures": {}, "targets_met": {}}
    print(f"\n{name} over training seeds {summary['seeds']} ({' '.join(args.set) or 'no overrides'})")
    print(f"{'figure':<18}{'mean':>9}{'min':>9}{'max':>9}   per seed")
    for label, keys in SEED_FIGURES.items():
        vals = []
        for _, res in runs:
            v = res
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(v)
        got = [v for v in vals if isinstance(v, (int, float))]
        if not got:
            continue
        summary["figures"][label] = {"mean": float(np.mean(got)), "min": min(got), "max": max(got),
                                     "values": vals}
        print(f"{label:<18}{np.mean(got):>9.3f}{min(got):>9.3f}{max(got):>9.3f}   "
              + " ".join("n/a" if v is None else f"{v:.3g}" for v in vals))
    for seed, res in runs:
        summary["targets_met"][str(seed)] = sum(c["pass"] for c in res["targets"])
    print("targets met per seed: " + ", ".join(f"seed {k}: {v}/{len(runs[0][1]['targets'])}"
                                              for k, v in summary["targets_met"].items()))
    path = os.path.join(args.results, f"fidelity-{name}-seeds.json")
    with open(path, "w") as f:
        json.dump(clean(summary), f, indent=2)
    print(f"wrote {path}")
    return 0 if len(runs) == len(seeds) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="preset name (tiny_32, ...) or YAML path")
    p.add_argument("--out", help="working directory (default runs/fidelity-<preset>)")
    p.add_argument("--scans", type=int, default=240, help="phantom scans (default 240)")
    p.add_argument("--samples", type=int, default=32, help="generated samples (default 32)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to hagan-train (repeatable)")
    p.add_argument("--run", help="evaluate this existing run directory instead of training")
    p.add_argument("--size", type=int, help="volume edge (default: the preset's size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms, latents and subsets")
    p.add_argument("--features", choices=("random-resnet", "none"), default="random-resnet")
    p.add_argument("--resnet-width", type=float, default=0.25)
    p.add_argument("--ms-ssim-pairs", type=int, default=300, help="most pairs per set for MS-SSIM")
    p.add_argument("--recon", type=int, default=64, help="real scans to reconstruct (default 64)")
    p.add_argument("--batch", type=int, default=4, help="batch of generate/encode/features")
    p.add_argument("--results", default=os.path.join(HERE, "results"),
                   help="where fidelity-<preset>.json/.png go (default benchmarks/results)")
    p.add_argument("--seeds", help="train once per training seed ('0,1,2': --set seed=S each, the "
                   "same phantoms), each into <results>/seed-S/, then print each figure's mean, "
                   "min and max: one run's row moves with the seed more than with most switches")
    args = p.parse_args(argv)
    if args.seeds:
        return run_seeds(args, sys.argv[1:] if argv is None else list(argv), p)
    if args.scans < 8 or args.samples < 2:
        p.error("--scans must be >= 8 and --samples >= 2")
    command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from hagan_tf.training import cli as train_cli  # first: it imports TensorFlow lean

    args.name = os.path.splitext(os.path.basename(args.preset))[0]
    args.out = args.out or os.path.join("runs", f"fidelity-{args.name}")
    os.makedirs(args.out, exist_ok=True)
    stages = Stages()
    if args.run:
        from hagan_tf.rundir import read_config

        config = read_config(args.run)
    else:
        try:
            config = train_cli.load_config(args.preset).with_overrides(args.set)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    size = args.size or config.size
    if args.run and size != config.size:
        p.error(f"--size {size} differs from the run's size {config.size}")

    with stages(f"phantom scans ({args.scans} x {SCAN_SHAPE} int16 NIfTI)"):
        scans, factor_rows, cached = prepare_scans(args.out, args.scans, args.seed)
        print(f"   {'reused' if cached else 'wrote'} {scans} (+ factors.csv)")
    with stages(f"hagan-preprocess to {size}^3"):
        data, cached = prepare_records(scans, args.out, size, args.scans)
        print(f"   {'reused' if cached else 'wrote'} {data}")

    train_seconds, train_rc = None, None
    run_dir = args.run
    if not run_dir:
        run_dir = os.path.join(args.out, "run")
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        train_args = ["--config", args.preset, "--data", data, "--out", run_dir, "--no-progress"]
        for item in args.set + ([f"size={size}"] if size != config.size else []):
            train_args += ["--set", item]
        if args.steps is not None:
            train_args += ["--max-steps", str(args.steps)]
        with stages(f"hagan-train ({args.steps or config.max_steps} steps)"):
            print("$ hagan-train " + " ".join(train_args), flush=True)
            t = time.perf_counter()
            train_rc = train_cli.main(train_args)
            train_seconds = round(time.perf_counter() - t, 2)
        if train_rc not in (0, None):
            print(f"fidelity: hagan-train exited with {train_rc}; evaluating its last checkpoint",
                  file=sys.stderr)

    try:
        res = evaluate(run_dir, data, factor_rows, args, stages)
    except FileNotFoundError as e:
        print(f"fidelity: {e}", file=sys.stderr)
        return 1
    import keras
    import tensorflow as tf

    res.update(name=args.name, preset=args.preset, run_dir=os.path.abspath(run_dir),
               data=os.path.abspath(data), scans=args.scans, scan_shape=list(SCAN_SHAPE),
               scan_spacing_mm=list(SCAN_SPACING), train_seconds=train_seconds, train_rc=train_rc,
               steps_requested=args.steps, overrides=args.set, seconds=stages.times,
               command=command, cpu=facts(),
               gpus=[d.name for d in tf.config.list_physical_devices("GPU")],
               versions={"tensorflow": tf.__version__, "keras": keras.__version__,
                         "python": platform.python_version()},
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    res["train_steps_per_second"] = (round(res["step"] / train_seconds, 3)
                                     if train_seconds and res["step"] else None)
    from hagan_tf.evaluation.fidelity import check_targets

    res["targets"] = check_targets(res, **TARGETS)
    print_table(res, res["targets"])
    payload = json.dumps(clean(res), indent=2)
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        f.write(payload)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"fidelity-{args.name}.json"), "w") as f:
        f.write(payload)
    shutil.copyfile(res["montage"], os.path.join(args.results, f"fidelity-{args.name}.png"))
    print(f"\nwrote {os.path.join(args.out, 'fidelity.json')}, {res['montage']}, "
          f"{os.path.join(args.out, 'real_factors.csv')}; copies in {args.results}/fidelity-{args.name}.*")
    print("stage times (s): " + ", ".join(f"{k.split(' (')[0]} {v}" for k, v in stages.times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
