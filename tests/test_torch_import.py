"""hagan-import-torch: the published .pth files load by name, and compute what the reference computes.

The reference networks are written in PyTorch in tests/torch_reference.py (from the architecture
doc); their random weights are saved the way the authors' files are, imported through the CLI,
and both frameworks run on the same inputs. Full width, as published; batch 1 to stay on CPU.
"""

import copy
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed (pip install '.[torch]')")

import torch_reference as R  # noqa: E402

from hagan_tf import torch_import as T  # noqa: E402
from hagan_tf.rundir import load_hagan  # noqa: E402

TOL = 1e-4
CROP_128 = 50  # not a multiple of 4: the slab of A starts at 50 // 4, as in the reference


def _cl(t):
    """PyTorch [B, C, D, H, W] -> channels-last NumPy."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))


@pytest.fixture(scope="module")
def published_128(tmp_path_factory):
    """Reference networks at 128^3 with random weights, written as G/D/E/Sub_E_iter80000.pth and imported."""
    d = tmp_path_factory.mktemp("published_128")
    nets = {"generator": R.Generator(128), "discriminator": R.Discriminator(128),
            "encoder": R.Encoder(), "sub_encoder": R.SubEncoder(128)}
    paths = {}
    for seed, (net, module) in enumerate(nets.items()):
        R.randomize_(module, seed).eval()
        paths[net] = str(d / T.NETWORKS[net][1])
        R.save_published(module, paths[net])
    run = str(d / "run")
    assert T.main(["--size", "128", "--out", run] + [
        f"--{net.replace('_', '-')}={path}" for net, path in paths.items()]) == 0
    gan, step = load_hagan(run)
    return {"nets": nets, "paths": paths, "run": run, "gan": gan, "step": step}


def test_import_writes_a_run_directory(published_128):
    gan, step = published_128["gan"], published_128["step"]
    assert step == 80000  # from G_iter80000.pth
    assert (gan.config.size, gan.config.latent_dim, gan.config.num_classes) == (128, 1024, 0)
    # the imported values are the file's, not a fresh initialisation
    fc = published_128["nets"]["generator"].fc1
    np.testing.assert_array_equal(gan.generator.common.get_layer("fc").bias.numpy().reshape(4, 4, 4, 512),
                                  np.moveaxis(fc.bias.detach().numpy().reshape(512, 4, 4, 4), 0, -1))
    u0 = published_128["nets"]["discriminator"].sub_D.conv5.u0.numpy()
    np.testing.assert_array_equal(gan.discriminator.low_res.convs.get_layer("conv_out").conv.u.numpy(), u0)


@pytest.mark.slow  # two passes of the 52M-parameter generator at 128^3 per framework: ~40 s on 2 cores
def test_generator_parity_128(published_128):
    gan, g = published_128["gan"], published_128["nets"]["generator"]
    z = np.random.default_rng(0).standard_normal((1, 1024)).astype("float32")
    with torch.no_grad():
        full, slab, low = g(torch.from_numpy(z), CROP_128)
    ours_full = np.asarray(gan.generate(z))
    assert ours_full.shape == (1, 128, 128, 128, 1)
    assert _err(ours_full, _cl(full)) < TOL
    ours_slab, ours_low = gan.generator(z, crop=CROP_128, training=True)
    assert ours_slab.shape == (1, 16, 128, 128, 1) and ours_low.shape == (1, 32, 32, 32, 1)
    assert _err(ours_slab, _cl(slab)) < TOL
    assert _err(ours_low, _cl(low)) < TOL


def test_encoder_parity_128(published_128):
    gan, nets = published_128["gan"], published_128["nets"]
    volume = np.random.default_rng(1).uniform(-1, 1, (1, 1, 128, 128, 128)).astype("float32")
    with torch.no_grad():
        ref = R.encode(nets["encoder"], nets["sub_encoder"], torch.from_numpy(volume)).numpy()
    ours = gan.encode(np.moveaxis(volume, 1, -1)).numpy()
    assert ours.shape == ref.shape == (1, 1024)
    assert _err(ours, ref) < TOL


def _sn_layers(gan):
    d = gan.discriminator
    convs = [l.conv for l in d.high_res.convs.layers + d.low_res.convs.layers if hasattr(l, "conv")]
    return convs + [d.high_res.fc1, d.high_res.fc2]


def test_discriminator_parity_128(published_128):
    gan, ref_d = published_128["gan"], published_128["nets"]["discriminator"]
    rng = np.random.default_rng(2)
    slab = rng.uniform(-1, 1, (1, 1, 16, 128, 128)).astype("float32")
    low = rng.uniform(-1, 1, (1, 1, 32, 32, 32)).astype("float32")
    args = (np.moveaxis(slab, 1, -1), np.moveaxis(low, 1, -1))
    u_before = [l.u.numpy().copy() for l in _sn_layers(gan)]

    # inference: sigma from the imported u0 on every call, u left alone
    with torch.no_grad():
        ref = ref_d(torch.from_numpy(slab), torch.from_numpy(low), CROP_128).numpy()
    ours = gan.discriminator(*args, crop=CROP_128).numpy()
    assert _err(ours, ref) < TOL
    for layer, u in zip(_sn_layers(gan), u_before):
        np.testing.assert_array_equal(layer.u.numpy(), u)

    # training (resuming): the same output, and the same power-iteration update of u
    ref_train = copy.deepcopy(ref_d).train()
    try:
        ref = ref_train(torch.from_numpy(slab), torch.from_numpy(low), CROP_128).detach().numpy()
        ours = gan.discriminator(*args, crop=CROP_128, training=True).numpy()
        assert _err(ours, ref) < TOL
        assert _err(gan.discriminator.high_res.fc1.u.numpy(), ref_train.fc1.u0.numpy()) < 1e-5
        assert _err(gan.discriminator.low_res.convs.get_layer("conv_out").conv.u.numpy(),
                    ref_train.sub_D.conv5.u0.numpy()) < 1e-5
        assert _err(gan.discriminator.high_res.fc1.u.numpy(), u_before[-2]) > 1e-3  # it did move
    finally:
        for layer, u in zip(_sn_layers(gan), u_before):
            layer.u.assign(u)


def test_reference_matches_the_published_parameter_counts():
    """The PyTorch reference used here has the exact sizes of the authors' networks (docs/architecture.md)."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        for size, d_total, eg in [(128, 7_241_442, 19_663_168), (256, 7_402_258, 19_663_264)]:
            assert count(R.Generator(size)) == 52_518_210
            assert count(R.Discriminator(size)) == d_total
            assert count(R.Encoder()) == 161_152
            assert count(R.SubEncoder(size)) == eg


@pytest.mark.parametrize("size", [128, 256])
def test_published_key_names(size):
    """The names the issue lists: 128 drops conv1 and sub_D.conv1 (D) and conv1/bn1 (Sub_E)."""
    with torch.device("meta"):
        d = R.Discriminator(size).state_dict()
        se = R.SubEncoder(size).state_dict()
        g = R.Generator(size).state_dict()
    first = 1 if size == 256 else 2
    assert {k.rsplit(".", 1)[0] for k in d} == (
        {f"conv{i}" for i in range(first, 8)} | {"fc1", "fc2"} | {f"sub_D.conv{i}" for i in range(first, 6)})
    assert {k.rsplit(".", 1)[1] for k in d} == {"weight", "bias", "u0", "sv0"}
    assert {k.rsplit(".", 1)[0] for k in se} == (
        {f"conv{i}" for i in range(first, 6)} | {f"bn{i}" for i in range(first, 5)})
    assert {k.rsplit(".", 1)[0] for k in g} == (
        {"fc1"} | {f"tp_conv{i}" for i in range(1, 8)} | {f"bn{i}" for i in range(1, 7)}
        | {"sub_G.tp_conv1", "sub_G.tp_conv2", "sub_G.tp_conv3", "sub_G.bn1", "sub_G.bn2"})


def test_256_published_names_and_shapes_are_what_the_importer_expects():
    from hagan_tf import HAGAN

    gan = HAGAN(T.config_for(256, {}))  # the paper's 256^3 model: latent 1024, unconditional
    with torch.device("meta"):
        ref = {"generator": R.Generator(256), "discriminator": R.Discriminator(256),
               "encoder": R.Encoder(), "sub_encoder": R.SubEncoder(256)}
    for net, module in ref.items():
        published = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert T.expected_keys(gan, net) == published, net


@pytest.fixture(scope="module")
def conditional_256(tmp_path_factory):
    """A class-conditional 256^3 model (3 classes, latent 64 to stay small), files as bare state dicts for E."""
    d = tmp_path_factory.mktemp("conditional_256")
    nets = {"generator": R.Generator(256, latent_dim=64, num_class=3),
            "discriminator": R.Discriminator(256, num_class=3),
            "encoder": R.Encoder(), "sub_encoder": R.SubEncoder(256, latent_dim=64)}
    paths = {}
    for seed, (net, module) in enumerate(nets.items(), 10):
        R.randomize_(module, seed).eval()
        paths[net] = str(d / f"{T.NETWORKS[net][0].replace('^', '')}_iter1234.pth")
        if net in ("encoder", "sub_encoder"):  # the older format: a bare state dict, no 'module.'
            torch.save(module.state_dict(), paths[net])
        else:
            R.save_published(module, paths[net])
    return {"nets": nets, "paths": paths, "dir": d}


def _cli_args(paths):
    return [f"--{net.replace('_', '-')}={path}" for net, path in paths.items()]


def test_import_256_conditional(conditional_256):
    nets, run = conditional_256["nets"], str(conditional_256["dir"] / "run")
    assert T.main(["--size", "256", "--num-classes", "3", "--out", run]
                  + _cli_args(conditional_256["paths"])) == 0
    gan, step = load_hagan(run)
    assert step == 1234
    assert (gan.config.size, gan.config.latent_dim, gan.config.num_classes) == (256, 64, 3)
    rng = np.random.default_rng(3)

    # the discriminator, both heads (D^H has conv1 and D^L sub_D.conv1 at 256)
    slab = rng.uniform(-1, 1, (1, 1, 32, 256, 256)).astype("float32")
    low = rng.uniform(-1, 1, (1, 1, 64, 64, 64)).astype("float32")
    with torch.no_grad():
        ref_logit, ref_class = nets["discriminator"](torch.from_numpy(slab), torch.from_numpy(low), 100)
    logit, cls = gan.discriminator(np.moveaxis(slab, 1, -1), np.moveaxis(low, 1, -1), crop=100)
    assert _err(logit, ref_logit) < TOL and _err(cls, ref_class) < TOL

    # the generator's first layers, where the one-hot class enters (the rest is tested at 128)
    g, z, labels = nets["generator"], rng.standard_normal((2, 64)).astype("float32"), np.array([2, 0])
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).float()
    with torch.no_grad():
        ref = g.fc1(torch.cat([torch.from_numpy(z), onehot], 1)).view(-1, 512, 4, 4, 4)
        ref_block1 = torch.relu(g.bn1(g.tp_conv1(ref)))
    common = gan.generator.common.layers
    h = common[1](common[0](gan.generator.latent_input(z, labels)))
    assert _err(h, _cl(ref)) < TOL
    assert _err(common[2](h), _cl(ref_block1)) < TOL

    # E^G (has conv1/bn1 at 256) on an A-like input
    a = rng.uniform(0, 1, (1, 64, 64, 64, 64)).astype("float32")
    with torch.no_grad():
        ref_z = nets["sub_encoder"](torch.from_numpy(a)).numpy()
    assert _err(gan.encoder.ground(np.moveaxis(a, 1, -1)), ref_z) < TOL


def test_cli_names_the_keys_when_num_classes_is_forgotten(conditional_256, capsys):
    run = conditional_256["dir"] / "forgot_classes"
    assert T.main(["--size", "256", "--out", str(run)] + _cli_args(conditional_256["paths"])) == 2
    err = capsys.readouterr().err
    assert "unknown keys: fc2_class.bias, fc2_class.sv0, fc2_class.u0, fc2_class.weight" in err
    assert "sub_D.conv5.weight [4, 256, 4, 4, 4] (expected [1, 256, 4, 4, 4])" in err
    assert conditional_256["paths"]["discriminator"] in err and "--num-classes 0" in err
    assert not run.exists()  # nothing written
    # The generator alone has no layer sized by the class count: the import says how it read fc1.
    gen_only = ["--generator", conditional_256["paths"]["generator"]]
    assert T.main(["--size", "256", "--out", str(run)] + gen_only) == 0
    assert ("its fc1 takes 67 inputs, read as latent 67 + 0 classes (the published models: "
            "latent 1024)") in capsys.readouterr().out


@pytest.mark.parametrize("defect, key", [
    ("missing", "conv2.bias"), ("unknown", "conv9.weight"), ("shape", "bn3.weight")])
def test_a_bad_file_fails_naming_the_key(published_128, tmp_path, defect, key):
    gan, nets = published_128["gan"], published_128["nets"]
    state = dict(nets["encoder"].state_dict())
    if defect == "missing":
        del state[key]
    elif defect == "unknown":
        state[key] = torch.zeros(1)
    else:
        state[key] = torch.ones(65)
    bad = str(tmp_path / "E_bad.pth")
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {}}, bad)
    # a different but valid E^G: nothing may be written when any file is bad
    sub = {k: 2 * v.numpy() for k, v in nets["sub_encoder"].state_dict().items()}
    before = [v.numpy().copy() for v in gan.encoder.weights]
    with pytest.raises(T.CheckpointMismatch, match=key) as info:
        T.load_state_dicts(gan, {"encoder": T.read_state_dict(bad), "sub_encoder": sub},
                           sources={"encoder": bad})
    assert bad in str(info.value)
    for v, b in zip(gan.encoder.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_every_problem_is_listed_at_once(published_128):
    state = {k: v.numpy() for k, v in published_128["nets"]["encoder"].state_dict().items()}
    del state["conv1.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["bn2.bias"] = np.zeros((2, 16), np.float32)
    with pytest.raises(T.CheckpointMismatch) as info:
        T.load_state_dicts(published_128["gan"], {"encoder": state})
    msg = str(info.value)
    assert "missing keys: conv1.weight" in msg
    assert "unknown keys: extra.weight" in msg
    assert "bn2.bias [2, 16] (expected [32])" in msg


def test_bad_arguments_exit_2(published_128, tmp_path, capsys):
    g = published_128["paths"]["generator"]
    cases = [
        ["--size", "64", "--generator", g, "--out", str(tmp_path / "a")],
        ["--size", "128", "--generator", str(tmp_path / "nope.pth"), "--discriminator",
         str(tmp_path / "nope_d.pth"), "--out", str(tmp_path / "b")],
        ["--size", "128", "--generator", g, "--encoder", g, "--out", str(tmp_path / "c")],
        ["--size", "128", "--generator", g, "--out", published_128["run"]],  # not empty: never overwritten
        ["--size", "128", "--generator", g, "--num-classes", "-1", "--out", str(tmp_path / "d")],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as info:
            T.main(argv)
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "no such file" in err and "together" in err and "not an empty directory" in err
    assert "nope.pth; --discriminator " in err and "nope_d.pth" in err  # every missing file at once
    assert not any((tmp_path / n).exists() for n in "abcd")


_executed = []


class _Payload:
    def __reduce__(self):
        return (_executed.append, ("ran",))


def test_files_are_read_without_running_pickled_code(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"fc1.weight": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        T.read_state_dict(path)
    assert _executed == []


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[torch\]'"):
        T.read_state_dict(os.fspath(tmp_path / "G.pth"))
