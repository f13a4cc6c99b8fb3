"""MedicalNet's 3D ResNet (Chen et al. 2019, "Med3D") in Keras 3, channels-last, and a loader
for the official PyTorch weights (`resnet_50_23dataset.pth`).

The backbone is MedicalNet's `resnet.py` with shortcut type B: conv1 7^3/2, max-pool 3^3/2,
bottleneck stages layer1..4 of 64, 128, 256, 512 planes (x4 out), layer2 stride 2, layer3 and
layer4 stride 1 with dilation 2 and 4. The segmentation head (`conv_seg`) is replaced by global
average pooling of layer4, the 2048 features HA-GAN's FID/MMD use. Padding is explicit
(zero-pad + valid conv) so every layer lines up voxel for voxel with PyTorch's symmetric padding.
Layer names are the PyTorch module names with '.' -> '_' ("layer3_0_downsample_0").
"""

from __future__ import annotations

import keras
import numpy as np

from ..state_dict import read_state_dict

RESNET50_BLOCKS = (3, 4, 6, 3)
PLANES = (64, 128, 256, 512)
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
EXPANSION = 4
BN_EPS = 1e-5


def keras_name(torch_name: str) -> str:
    return torch_name.replace(".", "_")


def _init(seed, counter):
    counter[0] += 1
    # MedicalNet's kaiming_normal(mode='fan_out'); a per-layer seed keeps builds reproducible.
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal",
                                              seed=None if seed is None else seed * 1000 + counter[0])


def medicalnet_resnet(blocks=RESNET50_BLOCKS, width: float = 1.0, seed: int | None = 0,
                      name: str = "medicalnet_resnet") -> keras.Model:
    """Volumes [B, D, H, W, 1] (any size >= 16^3) -> pooled layer4 features [B, 512*4*width].

    `width` scales every channel count (1.0 for the published weights; smaller for fast tests
    and the random-feature extractor); `blocks` per stage (3, 4, 6, 3) is ResNet-50.
    """
    counter = [0]

    def conv(x, filters, kernel, stride, dilation, pad, tname):
        if pad:
            x = keras.layers.ZeroPadding3D(pad, name=keras_name(tname) + "_pad")(x)
        return keras.layers.Conv3D(filters, kernel, strides=stride, dilation_rate=dilation,
                                   padding="valid", use_bias=False, name=keras_name(tname),
                                   kernel_initializer=_init(seed, counter))(x)

    def bn(x, tname):
        return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=0.9, name=keras_name(tname))(x)

    relu = keras.layers.ReLU
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731
    inputs = keras.Input((None, None, None, 1), name="volume")
    x = conv(inputs, c(64), 7, 2, 1, 3, "conv1")
    x = relu()(bn(x, "bn1"))
    # zero padding equals PyTorch's -inf padding here: the input is post-ReLU (>= 0)
    x = keras.layers.ZeroPadding3D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling3D(3, 2, name="maxpool")(x)
    in_ch = c(64)
    for stage, (n, planes, stride, dil) in enumerate(zip(blocks, PLANES, STRIDES, DILATIONS), 1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            s = stride if i == 0 else 1
            shortcut = x
            if i == 0 and (s != 1 or in_ch != c(planes) * EXPANSION):
                shortcut = conv(x, c(planes) * EXPANSION, 1, s, 1, 0, p + ".downsample.0")
                shortcut = bn(shortcut, p + ".downsample.1")
            y = relu()(bn(conv(x, c(planes), 1, 1, 1, 0, p + ".conv1"), p + ".bn1"))
            y = relu()(bn(conv(y, c(planes), 3, s, dil, dil, p + ".conv2"), p + ".bn2"))
            y = bn(conv(y, c(planes) * EXPANSION, 1, 1, 1, 0, p + ".conv3"), p + ".bn3")
            x = relu(name=keras_name(p) + "_out")(keras.layers.Add()([y, shortcut]))
            in_ch = c(planes) * EXPANSION
    features = keras.layers.GlobalAveragePooling3D(name="pool")(x)
    return keras.Model(inputs, features, name=name)


def load_torch_weights(model: keras.Model, state: dict[str, np.ndarray] | str) -> list[str]:
    """Copy a MedicalNet state dict (or a path to one) into `model`; returns the unused keys.

    Every conv and batch-norm layer of the model must be found with the right shape, otherwise
    nothing is half-loaded silently: a ValueError lists what is missing or mismatched.
    """
    if isinstance(state, str):
        state = read_state_dict(state)
    used, problems, assign = set(), [], []
    for layer in model.layers:
        tname = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv3D):
            keys = {tname + ".weight": lambda w: np.transpose(w, (2, 3, 4, 1, 0))}  # OIDHW -> DHWIO
        elif isinstance(layer, keras.layers.BatchNormalization):
            keys = {tname + "." + k: lambda w: w for k in ("weight", "bias", "running_mean", "running_var")}
        else:
            continue
        values = []
        for key, convert in keys.items():
            if key not in state:
                problems.append(f"missing {key}")
                continue
            values.append(convert(np.asarray(state[key], np.float32)))
            used.add(key)
        if len(values) != len(keys):
            continue
        targets = layer.get_weights()  # conv: [kernel]; BN: gamma, beta, moving mean, moving var
        for t, v, key in zip(targets, values, keys):
            if t.shape != v.shape:
                problems.append(f"{key}: file {v.shape} vs model {t.shape}")
        assign.append((layer, values))
    if problems:
        raise ValueError("state dict does not fit the network: " + "; ".join(problems[:10])
                         + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))
    for layer, values in assign:
        layer.set_weights(values)
    return sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
