"""MedicalNet ResNet: a PyTorch-format state dict with the published names and shapes loads into
the Keras network and gives the same features as a reference written here with torch.nn.functional."""

import numpy as np
import pytest

from hagan_tf.evaluation.resnet3d import load_torch_weights, medicalnet_resnet, read_state_dict

torch = pytest.importorskip("torch")  # the .pth format and the reference need PyTorch
F = torch.nn.functional

BLOCKS = (3, 4, 6, 3)  # ResNet-50
PLANES = (64, 128, 256, 512)


def published_shapes(width=1.0):
    """Names and shapes of MedicalNet's resnet50 (shortcut B) state dict, scaled by width."""
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731
    shapes = {"conv1.weight": (c(64), 1, 7, 7, 7)}

    def bn(name, ch):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{k}"] = (ch,)
        shapes[f"{name}.num_batches_tracked"] = ()

    bn("bn1", c(64))
    inplanes = c(64)
    for s, (n, planes) in enumerate(zip(BLOCKS, PLANES), 1):
        p = c(planes)
        for i in range(n):
            pre = f"layer{s}.{i}"
            shapes[f"{pre}.conv1.weight"] = (p, inplanes, 1, 1, 1)
            bn(f"{pre}.bn1", p)
            shapes[f"{pre}.conv2.weight"] = (p, p, 3, 3, 3)
            bn(f"{pre}.bn2", p)
            shapes[f"{pre}.conv3.weight"] = (4 * p, p, 1, 1, 1)
            bn(f"{pre}.bn3", 4 * p)
            if i == 0:
                shapes[f"{pre}.downsample.0.weight"] = (4 * p, inplanes, 1, 1, 1)
                bn(f"{pre}.downsample.1", 4 * p)
            inplanes = 4 * p
    return shapes


class Payload:
    """An arbitrary object: weights-only loading must refuse to unpickle it."""


def random_state_dict(width, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in published_shapes(width).items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(".weight") and len(shape) == 1:  # BN scale
            state[k] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 1:  # BN bias, running mean
            state[k] = 0.1 * torch.randn(shape, generator=g)
        else:  # conv, He-scaled so activations stay O(1) through 50 layers
            fan_in = int(np.prod(shape[1:]))
            state[k] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
    return state


def reference_features(state, x):
    """MedicalNet resnet50 forward (eval mode) up to layer4, then global average pooling."""
    def bn(y, name):
        return F.batch_norm(y, state[name + ".running_mean"], state[name + ".running_var"],
                            state[name + ".weight"], state[name + ".bias"], training=False, eps=1e-5)

    y = F.relu(bn(F.conv3d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    y = F.max_pool3d(y, 3, stride=2, padding=1)
    for s, (n, stride, dil) in enumerate(zip(BLOCKS, (1, 2, 1, 1), (1, 1, 2, 4)), 1):
        for i in range(n):
            p = f"layer{s}.{i}"
            st = stride if i == 0 else 1
            out = F.relu(bn(F.conv3d(y, state[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv3d(out, state[p + ".conv2.weight"], stride=st, padding=dil, dilation=dil),
                            p + ".bn2"))
            out = bn(F.conv3d(out, state[p + ".conv3.weight"]), p + ".bn3")
            short = y
            if p + ".downsample.0.weight" in state:
                short = bn(F.conv3d(y, state[p + ".downsample.0.weight"], stride=st), p + ".downsample.1")
            y = F.relu(out + short)
    return F.adaptive_avg_pool3d(y, 1).flatten(1)


def test_loader_matches_reference_forward(tmp_path):
    width = 0.125
    state = random_state_dict(width)
    path = str(tmp_path / "resnet_50_23dataset.pth")
    # the published file wraps the DataParallel state dict: {'state_dict': {'module.conv1.weight': ...}}
    extra = {"module.conv_seg.0.weight": torch.zeros(2, 2, 2, 2, 2)}
    torch.save({"state_dict": {**{"module." + k: v for k, v in state.items()}, **extra}}, path)

    model = medicalnet_resnet(width=width, seed=None)
    unused = load_torch_weights(model, path)
    assert unused == ["conv_seg.0.weight"]

    # a non-cubic, odd-sized volume catches axis-order and padding-alignment mistakes
    x = np.random.default_rng(0).uniform(-1, 1, (2, 27, 32, 30, 1)).astype(np.float32)
    ours = np.asarray(model(x, training=False))
    with torch.no_grad():
        ref = reference_features(state, torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())).numpy()
    assert ours.shape == ref.shape == (2, 256)
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_npz_state_dict_loads_the_same(tmp_path):
    width = 0.125
    state = random_state_dict(width, seed=1)
    torch.save(state, str(tmp_path / "w.pth"))
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in state.items()})
    a, b = medicalnet_resnet(width=width, seed=None), medicalnet_resnet(width=width, seed=None)
    load_torch_weights(a, str(tmp_path / "w.pth"))
    load_torch_weights(b, str(tmp_path / "w.npz"))
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_medicalnet_extractor_reads_a_full_resnet50_file(tmp_path):
    from hagan_tf.evaluation.features import make_extractor

    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(0) if not v else torch.rand(v, generator=g) * 0.01 + (0.5 if len(v) == 1 else 0))
             for k, v in published_shapes(1.0).items()}
    path = str(tmp_path / "resnet_50_23dataset.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    ext = make_extractor("medicalnet", weights=path)
    model = ext.model
    keras_shapes = {}
    for layer in model.layers:
        name = layer.name.replace("_", ".")
        for w in layer.weights:
            keras_shapes.setdefault(name, []).append(tuple(w.shape))
    expected = {k: v for k, v in published_shapes(1.0).items() if not k.endswith("num_batches_tracked")}
    convs = {k[: -len(".weight")]: v for k, v in expected.items() if len(v) == 5}
    assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 projections
    for name, (o, i, kd, kh, kw) in convs.items():
        assert keras_shapes[name] == [(kd, kh, kw, i, o)], name
    n_published = sum(int(np.prod(v)) for k, v in expected.items()
                      if not k.endswith(("running_mean", "running_var")))
    n_keras = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert n_keras == n_published
    assert model.output_shape == (None, 2048)
    np.testing.assert_array_equal(model.get_layer("layer4_2_conv3").get_weights()[0],
                                  state["layer4.2.conv3.weight"].numpy().transpose(2, 3, 4, 1, 0))
    feats = np.asarray(model(np.zeros((1, 16, 16, 16, 1), np.float32)))
    assert feats.shape == (1, 2048) and np.isfinite(feats).all() and ext.independent


def test_loader_refuses_mismatch_missing_and_pickled_code(tmp_path):
    width = 0.125
    model = medicalnet_resnet(width=width, seed=None)
    state = {k: v.numpy() for k, v in random_state_dict(width).items()}
    bad = dict(state)
    bad["layer2.0.conv2.weight"] = np.zeros((1, 1, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="layer2.0.conv2.weight"):
        load_torch_weights(model, bad)
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.2.bn3")}
    with pytest.raises(ValueError, match="missing layer4.2.bn3"):
        load_torch_weights(model, missing)

    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": Payload()}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(str(tmp_path / "evil.pth"))
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "nope.pth"))


def test_random_resnet_is_reproducible():
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 16, 1)).astype(np.float32)
    a = np.asarray(medicalnet_resnet(width=0.125, seed=3)(x))
    b = np.asarray(medicalnet_resnet(width=0.125, seed=3)(x))
    c = np.asarray(medicalnet_resnet(width=0.125, seed=4)(x))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
