"""hagan-embed, hagan-directions and hagan-augment on a tiny fresh model and synthetic phantoms."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.apps import augment, directions, embed
from hagan_tf.apps.common import class_counts, write_csv
from hagan_tf.data.pipeline import make_dataset
from hagan_tf.data.synthetic import write_synthetic_dataset
from hagan_tf.rundir import save_model, write_config
from hagan_tf.trained import open_model

CFG = HAGANConfig(size=32, width=0.125, latent_dim=16, num_classes=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    write_config(d, CFG)
    save_model(d, HAGAN(CFG), 0)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data")), n=12, size=32,
                                   num_classes=2, folds=3)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def embeddings_csv(run_dir, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embed") / "embeddings.csv")
    embed.main(["--run", run_dir, "--data", data_dir, "--out", out, "--batch-size", "5"])
    return out


def test_embed_writes_one_row_per_subject(run_dir, data_dir, embeddings_csv):
    rows = read_csv(embeddings_csv)
    assert list(rows[0]) == ["subject_id"] + [f"z{i}" for i in range(16)]
    assert sorted(r["subject_id"] for r in rows) == [f"phantom{i:04d}" for i in range(12)]
    # the rows are the encoder's output for the matching volume
    batch = next(iter(make_dataset(data_dir, 3, repeat=False, shuffle=0)))
    z = open_model(run=run_dir).encode(batch["volume"].numpy())
    by_id = {r["subject_id"]: r for r in rows}
    for sid, zi in zip(batch["subject_id"].numpy(), z):
        np.testing.assert_allclose([float(by_id[sid.decode()][f"z{i}"]) for i in range(16)], zi,
                                   rtol=1e-5, atol=1e-6)


def test_embed_from_an_exported_model_matches_the_run(run_dir, data_dir, embeddings_csv, tmp_path):
    """--model-base reads DIR/NAME/V with an `encode` signature and the config asset.

    A minimal SavedModel with only that signature keeps this test fast (hagan-export traces six).
    """
    import tensorflow as tf

    from hagan_tf.rundir import load_hagan
    from hagan_tf.layout import CONFIG_ASSET

    gan = load_hagan(run_dir)[0]
    module = tf.Module()
    module.encoder = gan.encoder
    encode = tf.function(lambda volume: {"z": module.encoder(volume)},
                         input_signature=[tf.TensorSpec([None, 32, 32, 32, 1], tf.float32, "volume")])
    version = tmp_path / "models" / "tiny" / "3"
    tf.saved_model.save(module, str(version), signatures={"encode": encode.get_concrete_function()})
    (version / "assets.extra").mkdir()
    CFG.to_yaml(str(version / CONFIG_ASSET))
    a, b = embeddings_csv, str(tmp_path / "b.csv")
    embed.main(["--model-base", str(tmp_path / "models"), "--name", "tiny", "--data", data_dir,
                "--out", b])
    za = np.array([[float(v) for k, v in r.items() if k != "subject_id"] for r in read_csv(a)])
    zb = np.array([[float(v) for k, v in r.items() if k != "subject_id"] for r in read_csv(b)])
    np.testing.assert_allclose(za, zb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--run", "/nonexistent/run"], "cannot open the model"),
    (["--run", "RUN", "--model-base", "/x"], "not allowed with argument"),
    (["--run", "RUN", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_embed_bad_requests_exit_2(run_dir, data_dir, tmp_path, capsys, argv, message):
    argv = [run_dir if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        embed.main(argv + ["--data", data_dir, "--out", str(tmp_path / "e.csv")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()


@pytest.fixture(scope="module")
def planted_direction(tmp_path_factory):
    """z of 60 subjects and a target that is exactly linear in z along w_true (plus tiny noise)."""
    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(3)
    z = rng.standard_normal((60, 16))
    w_true = rng.standard_normal(16)
    w_true /= np.linalg.norm(w_true)
    y = 0.5 + 0.1 * z @ w_true + 1e-3 * rng.standard_normal(60)
    ids = [f"s{i:02d}" for i in range(60)]
    emb = write_csv(str(d / "z.csv"), ["subject_id"] + [f"z{i}" for i in range(16)],
                    ([s] + list(r) for s, r in zip(ids, z)))
    tgt = write_csv(str(d / "t.csv"), ["subject_id", "lung"], zip(ids, y))
    return emb, tgt, w_true, y


def test_direction_walk_moves_the_prediction_monotonically(run_dir, planted_direction, tmp_path):
    emb, tgt, w_true, y = planted_direction
    out = tmp_path / "walk"
    directions.main(["--run", run_dir, "--embeddings", emb, "--targets", tgt, "--target", "lung",
                     "--steps", "5", "--label", "1", "--measure", "threshold:-1,-0.5",
                     "--out", str(out)])
    info = json.loads((out / "direction.json").read_text())
    assert float(np.dot(info["direction"], w_true)) > 0.999  # least squares found the planted w
    assert abs(info["slope"] - 0.1) < 0.005 and info["fit_r2"] > 0.99
    rows = read_csv(out / "walk.csv")
    pred = [float(r["predicted_lung"]) for r in rows]
    np.testing.assert_allclose(pred, np.linspace(y.mean() - 2 * y.std(), y.mean() + 2 * y.std(), 5),
                               atol=1e-9)
    assert info["monotonic"]["predicted_lung"] == "increasing"
    assert np.all(np.diff([float(r["t"]) for r in rows]) > 0)
    fractions = [float(r["fraction_in_-1_-0.5"]) for r in rows]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert info["monotonic"]["fraction_in_-1_-0.5"] in ("increasing", "decreasing", "constant", "no")
    for i in range(5):
        img = nib.load(out / f"step_{i:02d}.nii.gz")
        assert img.shape == (32, 32, 32)
    assert (out / "strip.png").stat().st_size > 1000
    assert "| step | t | predicted_lung |" in (out / "walk.md").read_text()


def test_direction_from_a_subject_to_a_given_range(run_dir, planted_direction, tmp_path):
    emb, tgt, w_true, _ = planted_direction
    out = tmp_path / "walk"
    directions.main(["--run", run_dir, "--embeddings", emb, "--targets", tgt, "--target", "lung",
                     "--steps", "3", "--subject", "s07", "--targets-range", "0.9", "0.1",
                     "--out", str(out)])
    info = json.loads((out / "direction.json").read_text())
    assert info["start"] == "s07" and info["monotonic"]["predicted_lung"] == "decreasing"
    np.testing.assert_allclose([float(r["predicted_lung"]) for r in read_csv(out / "walk.csv")],
                               [0.9, 0.5, 0.1], atol=1e-9)


@pytest.mark.parametrize("extra, message", [
    (["--measure", "threshold:0.5"], "--measure expects threshold:LOW,HIGH"),
    (["--subject", "nobody"], "subject 'nobody' is not in"),
    (["--label", "2"], "--label must be in 0..1"),
    (["--steps", "1"], "--steps must be at least 2"),
])
def test_direction_bad_requests_exit_2(run_dir, planted_direction, tmp_path, capsys, extra, message):
    emb, tgt, _, _ = planted_direction
    with pytest.raises(SystemExit) as e:
        directions.main(["--run", run_dir, "--embeddings", emb, "--targets", tgt, "--target", "lung",
                         "--out", str(tmp_path / "w"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_augment_end_to_end_writes_both_accuracies(run_dir, data_dir, tmp_path):
    out = tmp_path / "aug"
    augment.main(["--run", run_dir, "--data", data_dir, "--fraction", "0.5", "--epochs", "2",
                  "--classifier-size", "16", "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    for key in ("real_only", "real_plus_synthetic"):
        assert 0.0 <= r[key]["accuracy"] <= 1.0 and 0.0 <= r[key]["balanced_accuracy"] <= 1.0
    assert r["test_fold"] == 2 and r["n_test"] == 4 and r["n_train_real"] == 8
    assert r["n_synthetic"] == 4 and sum(r["synthetic_class_counts"]) == 4
    assert r["accuracy_gain"] == pytest.approx(r["real_plus_synthetic"]["accuracy"]
                                               - r["real_only"]["accuracy"])
    # class proportions of the synthetic set follow the real training set
    train = np.array(r["train_class_counts"]) / r["n_train_real"]
    assert np.all(np.abs(np.array(r["synthetic_class_counts"]) / 4 - train) <= 0.25)
    assert "real + synthetic" in (out / "results.md").read_text()
    assert (out / "samples.png").exists()


def test_augment_class_counts_follow_proportions():
    assert class_counts(np.array([0, 0, 0, 1]), 3, 6).tolist() == [5, 1, 0]
    assert class_counts(np.array([0, 1, 2]), 3, 2).sum() == 2


def test_augment_needs_a_conditional_model(data_dir, tmp_path, capsys):
    d = str(tmp_path / "uncond")
    cfg = CFG.replace(num_classes=0)
    write_config(d, cfg)
    save_model(d, HAGAN(cfg), 0)
    with pytest.raises(SystemExit) as e:
        augment.main(["--run", d, "--data", data_dir, "--out", str(tmp_path / "aug")])
    assert e.value.code == 2 and "needs a conditional model" in capsys.readouterr().err
