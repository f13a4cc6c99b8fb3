"""`hagan-quickstart`: the whole chain on built-in synthetic scans, on a CPU, in a few minutes.

scans (.nii.gz) -> hagan-preprocess (Beam) -> hagan-train -> hagan-export -> hagan-serve ->
hagan-sample / hagan-encode -> hagan-evaluate. Every step is the real command, run in-process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np


def write_scans(out_dir: str, n: int, seed: int = 0) -> list[str]:
    """Chest-CT-like NIfTI scans in HU (int16, 0.8 x 0.8 x 1.5 mm; the thorax phantoms of
    benchmarks/fidelity.py, whose body, lung, heart, bone and emphysema vary by subject),
    plus one corrupt file."""
    import nibabel as nib

    from .data.synthetic import thorax_hu

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (int(rng.integers(44, 56)), int(rng.integers(44, 56)), int(rng.integers(36, 48)))
        hu = thorax_hu(shape[::-1], rng)[0].transpose(2, 1, 0)
        img = nib.Nifti1Image(np.round(hu).astype(np.int16), np.diag([0.8, 0.8, 1.5, 1.0]))
        paths.append(os.path.join(out_dir, f"subject{i:03d}.nii.gz"))
        nib.save(img, paths[-1])
    with open(os.path.join(out_dir, "corrupt.nii.gz"), "wb") as f:  # goes to the dead letters
        f.write(b"\x1f\x8bnot really a scan")
    return paths


def _step(title: str, fn, argv: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    rc = fn(argv[1:])
    if rc not in (0, None):
        raise SystemExit(f"hagan-quickstart: step '{title}' failed with exit code {rc}")
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)


OUTPUTS = ("scans", "data", "run", "models", "samples", "report", "embeddings.csv")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hagan-quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart", help="directory for everything it writes")
    p.add_argument("--scans", type=int, default=64, help="synthetic scans to generate")
    p.add_argument("--steps", type=int, default=1000,
                   help="training iterations (1000: about 3 minutes on 2 cores, enough for "
                        "varied lungs, body and spine)")
    p.add_argument("--overwrite", action="store_true", help="start from an empty --out")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file")
    if os.path.exists(args.out) and os.listdir(args.out):
        if not args.overwrite:
            p.error(f"{args.out!r} is not empty: pass --overwrite or another --out")
        foreign = sorted(set(os.listdir(args.out)) - set(OUTPUTS))
        if foreign:  # --overwrite replaces a quickstart's outputs, never anything else
            p.error(f"{args.out!r} holds files the quickstart did not write ({', '.join(foreign[:5])}): "
                    "choose another --out")
        for name in os.listdir(args.out):
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    from .data.records import DEAD_LETTER
    from .evaluation.cli import main as evaluate
    from .layout import DEFAULT_MODEL_NAME, tensorboard_dir
    from .preprocess.beam import main as preprocess
    from .serving.client import encode_main, sample_main
    from .serving.export import main as export
    from .serving.server import Server
    from .training.cli import main as train

    out = args.out
    d = {k: os.path.join(out, k) for k in OUTPUTS}
    t0 = time.perf_counter()
    scans = write_scans(d["scans"], args.scans)
    print(f"wrote {len(scans)} synthetic CT scans (+1 corrupt file) to {d['scans']}")
    _step("preprocess (Beam, DirectRunner)", preprocess,
          ["hagan-preprocess", "--input", d["scans"], "--output", d["data"], "--size", "32",
           "--modality", "ct", "--folds", "4"])
    _step("train", train, ["hagan-train", "--config", "tiny_32", "--data", d["data"], "--out",
                           d["run"], "--max-steps", str(args.steps), "--set", "fold=3"])
    _step("export", export, ["hagan-export", "--run", d["run"], "--model-base", d["models"],
                             "--name", DEFAULT_MODEL_NAME])
    with Server(d["models"], "127.0.0.1", port=0, rest_port=0, poll_seconds=60) as server:
        addr = f"127.0.0.1:{server.port}"
        print(f"\n== serving {d['models']} on gRPC {addr}, REST 127.0.0.1:{server.rest_port}")
        _step("sample over gRPC", sample_main,
              ["hagan-sample", "--server", addr, "-n", "4", "--seed", "0", "--out", d["samples"]])
        _step("encode over REST", encode_main,
              ["hagan-encode", "--server", f"127.0.0.1:{server.rest_port}", "--rest", *scans[:4],
               "--like", d["data"], "--out", d["embeddings.csv"]])
    _step("evaluate (held-out fold 3)", evaluate,
          ["hagan-evaluate", "--run", d["run"], "--real", d["data"], "--fold", "3", "--n", "8",
           "--features", "random-resnet", "--resnet-width", "0.25", "--ms-ssim-samples", "4",
           "--out", d["report"]])
    print(f"\nquickstart finished in {time.perf_counter() - t0:.0f} s. Open:")
    for path, what in [
        (os.path.join(d["samples"], "montage.png"), "mid slices of the generated samples"),
        (d["samples"], "the samples as NIfTI (any viewer: ITK-SNAP, 3D Slicer, nibabel)"),
        (os.path.join(d["report"], "report.md"), "the metrics report (+ mds.png, montage.png)"),
        (d["embeddings.csv"], "latent codes of four scans"),
        (os.path.join(d["data"], DEAD_LETTER), "the corrupt input and why it was refused"),
        (tensorboard_dir(d["run"]), "tensorboard --logdir " + tensorboard_dir(d["run"])),
    ]:
        print(f"  {path:<45} {what}")
    return 0


def summary_main(argv=None) -> int:
    """`hagan-summary`: parameter counts and layer summaries of a config's networks."""
    p = argparse.ArgumentParser(prog="hagan-summary", description=summary_main.__doc__)
    p.add_argument("--config", default="paper_256", help="YAML file or preset name")
    p.add_argument("--layers", action="store_true", help="also print Keras layer summaries")
    args = p.parse_args(argv)
    from .gan import HAGAN
    from .training.cli import load_config

    gan = HAGAN(load_config(args.config))
    if args.layers:
        for net in (gan.generator.common, gan.generator.low_res_head, gan.generator.high_res_head,
                    gan.discriminator.high_res.convs, gan.discriminator.low_res.convs,
                    gan.encoder.high_res, gan.encoder.latent_head):
            net.summary()
    for k, v in gan.parameter_counts().items():
        print(f"{k:>4}: {v:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
