"""hagan-evaluate end to end on a freshly initialised tiny model and tiny real records."""

import json
import os

import matplotlib.image
import numpy as np
import pytest

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.data.synthetic import write_synthetic_dataset
from hagan_tf.evaluation import cli
from hagan_tf.evaluation.inception import SliceInceptionScorer, slices_for_classifier
from hagan_tf.rundir import save_model, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = HAGANConfig(size=32, width=0.125, latent_dim=16)
    run = str(root / "run")
    write_config(run, cfg)
    save_model(run, HAGAN(cfg), 0)
    real = write_synthetic_dataset(str(root / "real"), n=8, size=32, folds=2)
    return root, run, real


def _by_name(metrics, name, res):
    (m,) = [m for m in metrics if m["name"] == name and m["resolution"] == res]
    return m


def _fake_classifier(k=5):
    """One-hot class from a slice's mean intensity; records what it was given."""
    seen = []

    def classify(x):
        seen.append(x.shape)
        assert x.shape[1:] == (299, 299, 3) and x.min() >= -1 and x.max() <= 1
        idx = np.clip(((x.mean((1, 2, 3)) + 1) / 2 * k).astype(int), 0, k - 1)
        return np.eye(k)[idx]

    return classify, seen


def test_evaluate_end_to_end(setup, monkeypatch, capsys):
    root, run, real = setup
    out = str(root / "report")
    weights = root / "inception.weights.h5"
    weights.write_bytes(b"stand-in; the classifier is replaced below")
    classify, seen = _fake_classifier()
    monkeypatch.setattr(cli, "load_inception", lambda path: classify)
    rc = cli.main(["--run", run, "--real", real, "--n", "8", "--batch-size", "8", "--seed", "3",
                   "--features", "random-resnet", "--resnet-width", "0.125",
                   "--inception-weights", str(weights), "--ms-ssim-samples", "4", "--out", out])
    assert rc == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "report.md")
    for f in ("metrics.json", "features.npz", "mds.png", "montage.png", "report.md"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f

    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["n"] == 8 and report["seed"] == 3 and report["real"]["n"] == 8
    assert report["extractor"]["name"] == "random-resnet"
    assert "RANDOM" in report["extractor"]["description"]
    metrics = report["metrics"]
    assert {m["resolution"] for m in metrics} == {32, 16}
    for m in metrics:
        assert m["n_generated"] == 8 and m["n_real"] == 8 and m["seed"] == 3
        assert m["value"] is not None and np.isfinite(m["value"]), m
    for res in (32, 16):
        fid = _by_name(metrics, "fid", res)
        assert fid["extractor"] == "random-resnet" and "RANDOM" in fid["extractor_description"]
        assert fid["value"] > 0  # an untrained generator does not match the phantoms
        assert _by_name(metrics, "mmd2_gaussian", res)["value"] > 0
        assert 0 < _by_name(metrics, "ms_ssim_real", res)["value"] <= 1
        assert _by_name(metrics, "ms_ssim_real", res)["pairs"] == 6
        is_gen = _by_name(metrics, "inception_score_generated", res)
        assert 1 - 1e-9 <= is_gen["value"] <= 5 + 1e-9
        assert set(is_gen["per_view"]) == {"axial", "coronal", "sagittal"}
    assert sum(s[0] for s in seen) == 3 * 2 * 2 * 8  # 3 views x 2 sets x 2 resolutions x 8

    feats = np.load(os.path.join(out, "features.npz"))
    assert sorted(feats.files) == ["generated_16", "generated_32", "real_16", "real_32"]
    assert feats["real_32"].shape == (8, 256)
    from hagan_tf.evaluation.metrics import fid as fid_fn
    assert _by_name(metrics, "fid", 32)["value"] == pytest.approx(fid_fn(feats["real_32"], feats["generated_32"]))

    for png in ("mds.png", "montage.png"):
        img = matplotlib.image.imread(os.path.join(out, png))
        assert img.ndim == 3 and min(img.shape[:2]) > 100
    md = open(os.path.join(out, "report.md")).read()
    assert "random-resnet" in md and "RANDOM" in md and "| fid |" in md and "32^3 | 16^3" in md


def test_evaluate_encoder_features_on_one_fold(setup):
    root, run, real = setup
    out = str(root / "report_enc")
    assert cli.main(["--run", run, "--real", real, "--fold", "1", "--n", "4", "--batch-size", "4",
                     "--features", "encoder", "--ms-ssim-samples", "2", "--out", out]) == 0
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["real"] == {"dir": os.path.abspath(real), "fold": 1, "n": 4}
    assert report["extractor"]["independent_of_model"] is False
    assert "not independent" in report["extractor"]["description"]
    full = _by_name(report["metrics"], "fid", 32)
    assert full["value"] > 0 and full["extractor"] == "encoder"
    low = _by_name(report["metrics"], "fid", 16)  # E only takes the model's own resolution
    assert low["value"] is None and low["available"] is False and "32^3" in low["reason"]
    ms = _by_name(report["metrics"], "ms_ssim_generated", 16)
    assert ms["value"] is not None and ms["pairs"] == 1  # --ms-ssim-samples 2, though 4 are kept
    is_gen = _by_name(report["metrics"], "inception_score_generated", 32)
    assert is_gen["value"] is None and is_gen["available"] is False  # never invented
    assert "inception-weights" in is_gen["reason"]
    assert "n/a" in open(os.path.join(out, "report.md")).read()


def test_a_metric_that_cannot_be_computed_is_reported_as_such_and_the_rest_written(setup, monkeypatch):
    root, run, real = setup
    out = str(root / "report_fid_fails")

    def fails(a, b):
        raise ValueError("sqrtm has an imaginary component 0.5")

    monkeypatch.setattr(cli, "fid", fails)
    assert cli.main(["--run", run, "--real", real, "--n", "4", "--batch-size", "4",
                     "--features", "encoder", "--ms-ssim-samples", "2", "--out", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))["metrics"]
    fid = _by_name(metrics, "fid", 32)
    assert fid["value"] is None and fid["available"] is False and "imaginary" in fid["reason"]
    assert _by_name(metrics, "mmd2_gaussian", 32)["value"] is not None


def test_a_conditional_model_samples_classes_in_the_real_proportions():
    labels = cli.generated_labels([0, 0, 0, 1, 0, 0, 1, 0], 2, 8, seed=0)
    assert np.bincount(labels).tolist() == [6, 2] and labels.tolist() != sorted(labels.tolist())
    assert np.array_equal(labels, cli.generated_labels([0, 0, 0, 1, 0, 0, 1, 0], 2, 8, seed=0))
    assert np.bincount(cli.generated_labels([-1, -1], 3, 6, seed=0)).tolist() == [2, 2, 2]  # unlabelled
    assert cli.generated_labels([0, 1], 0, 4, seed=0) is None  # unconditional


@pytest.mark.parametrize("argv,message", [
    (["--features", "medicalnet"], "needs --weights"),
    (["--features", "random-resnet", "--weights", "x.pth"], "only used with"),
    (["--features", "medicalnet", "--weights", "/nonexistent.pth"], "does not exist; it comes from MedicalNet's release"),
    (["--features", "random-resnet", "--n", "1"], ">= 2"),
    (["--features", "random-resnet", "--lowres", "24"], "--lowres must divide"),
    (["--features", "random-resnet", "--fold", "7"], "found 0 real volume(s)"),
])
def test_evaluate_bad_arguments_exit_2(setup, tmp_path, capsys, argv, message):
    root, run, real = setup
    with pytest.raises(SystemExit) as e:
        cli.main(["--run", run, "--real", real, "--out", str(tmp_path / "r"), "--resnet-width", "0.125",
                  "--batch-size", "8", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "metrics.json")


def test_evaluate_missing_model_or_data_exit_2(setup, tmp_path, capsys):
    root, run, real = setup
    with pytest.raises(SystemExit) as e:
        cli.main(["--run", str(tmp_path / "none"), "--real", real, "--features", "random-resnet",
                  "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "cannot open the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--run", run, "--model-base", run, "--real", real, "--out", str(tmp_path / "r")])
    assert e.value.code == 2


def test_slices_are_the_middle_views_resized():
    d = np.linspace(-1, 1, 16, dtype=np.float32)
    vol = np.broadcast_to(d[:, None, None], (16, 16, 16)).copy()  # value varies along D only
    axial, coronal, sagittal = slices_for_classifier([vol])
    assert axial.shape == coronal.shape == sagittal.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(axial, d[8], atol=1e-6)  # the middle axial slice is constant
    assert coronal[0, :, 150, 0].std() > 0.5 and np.allclose(coronal[..., 0], coronal[..., 2])


def test_slice_inception_score_averages_views():
    classify, seen = _fake_classifier(k=4)
    scorer = SliceInceptionScorer(classify, batch_size=3)
    levels = [-0.75, -0.25, 0.25, 0.75]  # one constant volume per class
    scorer.update(np.stack([np.full((8, 8, 8, 1), v, np.float32) for v in levels]))
    r = scorer.result()
    assert r["value"] == pytest.approx(4.0)
    assert r["per_view"] == pytest.approx({"axial": 4.0, "coronal": 4.0, "sagittal": 4.0})
    assert [s[0] for s in seen] == [3, 1] * 3  # batched per view
