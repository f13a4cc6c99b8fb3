"""HAGANConfig: presets, YAML round trip, validation, --set overrides."""

import os

import pytest

from hagan_tf import HAGANConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("name,size", [("paper_512", 512), ("paper_256", 256), ("paper_128", 128),
                                       ("tiny_32", 32), ("small_64", 64)])
def test_presets_load(name, size):
    cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg.size == size


@pytest.mark.parametrize("name", ["paper_512", "paper_256", "paper_128"])
def test_paper_presets_keep_the_papers_algorithm(name):
    """The remedies against collapse are switches that the paper presets leave off."""
    cfg = HAGANConfig.from_yaml(os.path.join(CONFIGS, f"{name}.yaml"))
    assert (cfg.loss, cfg.r1_gamma, cfg.augment, cfg.ema_decay, cfg.minibatch_std,
            cfg.lambda_recon, cfg.lambda_ms, cfg.g_norm_groups) == ("bce", 0, "", 0, False, 0, 0, 8)
    assert (cfg.lr_g, cfg.lr_d, cfg.beta_1) == (1e-4, 4e-4, 0.0)
    assert cfg.batch_size == (1 if cfg.size == 512 else 4)  # 512^3: what one iteration fits


def test_paper_defaults():
    cfg = HAGANConfig(size=256)
    assert (cfg.latent_dim, cfg.num_classes, cfg.width) == (1024, 0, 1.0)
    assert (cfg.lr_g, cfg.lr_d, cfg.lr_eh, cfg.lr_eg, cfg.beta_1) == (1e-4, 4e-4, 1e-4, 1e-4, 0.0)
    assert (cfg.a_size, cfg.slab_depth, cfg.max_crop) == (64, 32, 224)


def test_yaml_round_trip(tmp_path):
    cfg = HAGANConfig(size=64, num_classes=3, width=0.25)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert HAGANConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("bad", [{"size": 48}, {"size": 16}, {"size": 1024}, {"width": 0},
                                 {"downsample": "cubic"}, {"mixed_precision": "fp8"},
                                 {"batch_size": 0}, {"log_every": 0}, {"lr_d": -1e-4},
                                 {"beta_2": 1.0}, {"fold": -1}, {"spacing": 0}])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValueError):
        HAGANConfig(**bad)


def test_unknown_keys_and_overrides():
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        HAGANConfig.from_dict({"colour": 1})
    cfg = HAGANConfig(size=32).with_overrides(["batch_size=8", "lr_g=0.5", "jit_compile=true"])
    assert (cfg.batch_size, cfg.lr_g, cfg.jit_compile) == (8, 0.5, True)
    with pytest.raises(ValueError, match="key=value"):
        HAGANConfig().with_overrides(["batch_size"])


def test_channels_stay_multiples_of_eight():
    cfg = HAGANConfig(size=32, width=0.1)
    assert all(cfg.channels(c) % 8 == 0 and cfg.channels(c) >= 8 for c in (16, 32, 64, 512))


def test_overrides_are_parsed_to_the_fields_types():
    # PyYAML reads 1e-4 (no dot) as a string; a learning rate given so must still be a float
    cfg = HAGANConfig(size=32).with_overrides(["lr_g=1e-4", "max_steps=8e4", "width=1", "fold=null"])
    assert (cfg.lr_g, cfg.max_steps, cfg.width, cfg.fold) == (1e-4, 80000, 1.0, None)
    assert (type(cfg.lr_g), type(cfg.max_steps), type(cfg.width)) == (float, int, float)


@pytest.mark.parametrize("item,message", [
    ("batch_size=abc", "batch_size must be a number, got 'abc'"),
    ("seed=1.5", "seed must be an integer"),
    ("jit_compile=maybe", "jit_compile must be true or false"),  # a string would be truthy
    ("downsample=3", "downsample must be a string"),
    ("log_every=0", "log_every must be > 0"),
    ("width=[1", "width must be a number, got '\\[1'"),  # not YAML: the field says what it wants
    ("seed=-1", "seed must be in 0..2\\*\\*32-1"),
    ("seed=9223372036854775807", "seed must be in 0..2\\*\\*32-1, got 9223372036854775807$"),
])
def test_overrides_of_the_wrong_type_are_clear_errors(item, message):
    with pytest.raises(ValueError, match=message):
        HAGANConfig(size=32).with_overrides([item])


def test_config_files_that_are_not_a_mapping_of_keys_are_clear_errors(tmp_path):
    (tmp_path / "broken.yaml").write_text("size: [32\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML: .*line 2"):
        HAGANConfig.from_yaml(tmp_path / "broken.yaml")
    (tmp_path / "text.yaml").write_text("size\n")  # it read as "unknown keys: e, i, s, z"
    with pytest.raises(ValueError, match="a config is a mapping of keys to values, got str 'size'"):
        HAGANConfig.from_yaml(tmp_path / "text.yaml")
    assert HAGANConfig.from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1  # no float rounding
