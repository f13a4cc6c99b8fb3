"""hagan-export: the SavedModel's signatures against the Keras model, versions, saved_model_cli."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.rundir import save_model, write_config
from hagan_tf.serving import export
from hagan_tf.layout import CONFIG_ASSET
from hagan_tf.trained import open_model

CFG = HAGANConfig(size=32, width=0.125, latent_dim=16, spacing=1.5)
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run directory exported by the CLI: (gan, model_base, version dir)."""
    root = tmp_path_factory.mktemp("export")
    run, base = str(root / "run"), str(root / "models")
    gan = HAGAN(CFG)
    write_config(run, CFG)
    save_model(run, gan, 0)
    assert export.main(["--run", run, "--model-base", base]) == 0
    return gan, base, os.path.join(base, "hagan", "1")


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[2])


def _call(loaded, name, **inputs):
    out = loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def test_every_signature_matches_the_keras_model(exported, loaded):
    gan = exported[0]
    z = gan.sample_z(2, seed=1)
    volume = np.asarray(gan.generate(z))
    assert volume.shape == (2, 32, 32, 32, 1)
    np.testing.assert_allclose(_call(loaded, "generate", z=z)["volume"], volume, atol=1e-5)
    np.testing.assert_allclose(_call(loaded, "serving_default", z=z)["volume"], volume, atol=1e-5)
    preview = _call(loaded, "generate_preview", z=z)["volume"]
    assert preview.shape == (2, 8, 8, 8, 1)
    np.testing.assert_allclose(preview, gan.generator.preview(z).numpy(), atol=1e-5)
    z_hat = _call(loaded, "encode", volume=volume)["z"]
    assert z_hat.shape == (2, 16)
    np.testing.assert_allclose(z_hat, gan.encode(volume).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_call(loaded, "reconstruct", volume=volume)["volume"],
                               np.asarray(gan.generate(gan.encode(volume))), atol=1e-4)


def test_generate_from_seed_is_deterministic_and_uses_the_seed(exported, loaded):
    gan = exported[0]
    seeds = np.array([7, 8, 7], np.int64)
    first = _call(loaded, "generate_from_seed", seed=seeds)["volume"]
    second = _call(loaded, "generate_from_seed", seed=seeds)["volume"]
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], first[2])  # the same seed within a batch
    assert np.abs(first[0] - first[1]).max() > 1e-3   # different seeds, different volumes
    z = export.seed_latents(seeds, CFG.latent_dim).numpy()
    assert abs(z.std() - 1.0) < 0.35 and abs(z.mean()) < 0.5  # N(0, I) draws
    np.testing.assert_allclose(first, np.asarray(gan.generate(z)), atol=1e-5)


def test_config_travels_with_the_model(exported, loaded):
    _, base, path = exported
    assert HAGANConfig.from_yaml(os.path.join(path, CONFIG_ASSET)) == CFG
    text = _call(loaded, "config", format=np.asarray(b"yaml", object))["config"]
    import yaml

    assert HAGANConfig.from_dict(yaml.safe_load(text.decode())) == CFG
    with pytest.raises(tf.errors.InvalidArgumentError, match="only format is yaml"):
        _call(loaded, "config", format=np.asarray(b"json", object))
    source = open_model(model_base=base)  # how the other commands read an export
    z = exported[0].sample_z(1, seed=3)
    np.testing.assert_allclose(source.generate(z), exported[0].generate(z), atol=1e-5)


def test_versions_default_to_the_step_or_the_next_free_number(tmp_path):
    model_dir = str(tmp_path / "hagan")
    assert export.default_version(model_dir, 0) == 1
    assert export.default_version(model_dir, 500) == 500
    for v in ("3", "12", ".tmp-13-x", "notes"):
        os.makedirs(os.path.join(model_dir, v))
    assert export.versions(model_dir) == [3, 12]
    assert export.default_version(model_dir, 500) == 500
    assert export.default_version(model_dir, 10) == 13


def test_a_failed_export_leaves_no_version_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export.ServingModule, "signatures", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(HAGAN(CFG), str(tmp_path), "hagan", 4)
    assert os.listdir(tmp_path / "hagan") == []


def test_run_and_model_directories_may_be_urls(exported, tmp_path, monkeypatch):
    """A file:// URL stands in for gs://: the config, checkpoints and the export must go through
    tf.io.gfile (plain `os` calls would write a relative 'file:' directory into the working
    directory), and an object store's export moves saved_model.pb last."""
    gan = exported[0]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run, base = f"file://{tmp_path}/run", f"file://{tmp_path}/models"
    write_config(run, CFG)
    save_model(run, gan, 7)
    moved, rename = [], tf.io.gfile.rename
    monkeypatch.setattr(tf.io.gfile, "rename",
                        lambda a, b, overwrite=False: (moved.append(b), rename(a, b, overwrite)))
    assert export.main(["--run", run, "--model-base", base]) == 0
    assert moved[-1] == f"{base}/hagan/7/saved_model.pb" and len(moved) > 3
    assert os.listdir(tmp_path / "models" / "hagan") == ["7"]  # the temporary directory is gone
    assert os.listdir(cwd) == []
    model = open_model(model_base=base)
    assert model.config == CFG
    z = gan.sample_z(1, seed=3)
    np.testing.assert_allclose(model.generate(z), np.asarray(gan.generate(z)), atol=1e-5)
    assert export.default_version(f"{base}/hagan", 7) == 8


def test_cli_refuses_bad_arguments(exported, tmp_path, capsys):
    _, base, _ = exported
    run = str(tmp_path / "run")
    write_config(run, CFG)
    save_model(run, HAGAN(CFG), 0)
    for argv, message in [
        (["--run", str(tmp_path / "nowhere"), "--model-base", base], "not a run directory"),
        (["--run", run, "--step", "9", "--model-base", base], "no checkpoint for step 9"),
        (["--run", run, "--model-base", base, "--version", "1"], "already exists"),
        (["--run", run, "--model-base", base, "--version", "-1"], "must be >= 0"),
        (["--run", run, "--model-base", base, "--name", "../x"], "plain directory name"),
    ]:
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(base, "hagan"))) == ["1"]  # nothing half-written


def test_conditional_model_takes_and_checks_labels(tmp_path):
    cfg = CFG.replace(num_classes=3)
    gan = HAGAN(cfg)
    loaded = tf.saved_model.load(export.export_model(gan, str(tmp_path), "cond", 2))
    for name in ("generate", "generate_from_seed", "generate_preview", "reconstruct"):
        assert "label" in loaded.signatures[name].structured_input_signature[1]
    z = gan.sample_z(2, seed=0)
    labels = np.array([0, 2], np.int32)
    np.testing.assert_allclose(_call(loaded, "generate", z=z, label=labels)["volume"],
                               np.asarray(gan.generate(z, labels)), atol=1e-5)
    seeded = _call(loaded, "generate_from_seed", seed=np.array([1, 1], np.int64), label=labels)
    assert np.abs(seeded["volume"][0] - seeded["volume"][1]).max() > 0  # the class matters
    with pytest.raises(tf.errors.InvalidArgumentError, match="label must be < 3"):
        _call(loaded, "generate", z=z, label=np.array([0, 3], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one entry per sample"):
        _call(loaded, "generate_preview", z=z, label=np.array([1], np.int32))


def test_saved_model_cli_shows_and_runs_the_export(exported, tmp_path):
    gan, _, path = exported
    show = subprocess.run([os.path.join(BIN, "saved_model_cli"), "show", "--all", "--dir", path],
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    for name in ("generate", "generate_from_seed", "generate_preview", "encode", "reconstruct",
                 "config", "serving_default"):
        assert f"signature_def['{name}']" in show.stdout
    assert "inputs['seed'] tensor_info:\n        dtype: DT_INT64" in show.stdout
    assert "outputs['volume'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 32, 32, 32, 1)" in show.stdout

    z = gan.sample_z(2, seed=5)
    np.save(tmp_path / "z.npy", z)
    out = tmp_path / "out"
    run = subprocess.run(
        [os.path.join(BIN, "saved_model_cli"), "run", "--dir", path, "--tag_set", "serve",
         "--signature_def", "generate", "--inputs", f"z={tmp_path / 'z.npy'}", "--outdir", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(np.load(out / "volume.npy"), np.asarray(gan.generate(z)), atol=1e-5)


def test_tf_serving_model_config_points_at_the_export_layout():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == export.DEFAULT_MODEL_NAME
    assert model.base_path == "/models/" + model.name and model.model_platform == "tensorflow"
