"""`hagan-import-torch`: turn the authors' published PyTorch weights into a run directory.

The reference (batmanlab/HA-GAN) is channels-first and names layers by position (`tp_conv3`,
`sub_D.conv5`); ours is channels-last and named by role. `_entries` walks our networks in layer
order and pairs every Keras variable with the reference tensor name, its PyTorch shape and the
layout conversion, so one table drives both the check (every key present, known and well-shaped)
and the copy. The spectral-norm vector `u0` becomes our `u`, so the imported discriminator
computes the same function as the reference, in inference and when training resumes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from ._compat import kernel_variable
from .config import HAGANConfig
from .state_dict import TORCH_HINT, read_state_dict  # noqa: F401 (both were defined here)

SIZES = (128, 256)
NETWORKS = {  # CLI option -> (what the file holds, published file name)
    "generator": ("G", "G_iter80000.pth"),
    "discriminator": ("D", "D_iter80000.pth"),
    "encoder": ("E^H", "E_iter80000.pth"),
    "sub_encoder": ("E^G", "Sub_E_iter80000.pth"),
}


class CheckpointMismatch(ValueError):
    """The files do not hold exactly the tensors the chosen architecture needs."""


# --- layout conversions: PyTorch array -> Keras array ---------------------------------------------

def _same(w):
    return w


def _conv(w):  # [out, in, kD, kH, kW] -> [kD, kH, kW, in, out]
    return np.transpose(w, (2, 3, 4, 1, 0))


def _linear(w):  # [out, in] -> [in, out]
    return w.T


def _to_channels_last(x, channels):
    """Reorder a flat [C*4*4*4, ...] axis from view(C, 4, 4, 4) order to Reshape((4, 4, 4, C)) order."""
    x = x.reshape((channels, 4, 4, 4) + x.shape[1:])
    return np.moveaxis(x, 0, 3).reshape((-1,) + x.shape[4:])


# --- the table: (torch key, Keras variable or None, torch shape, conversion) ----------------------

def _conv_entries(key, conv, spectral=False):
    k = tuple(kernel_variable(conv).shape)
    out = [(f"{key}.weight", kernel_variable(conv), (k[4], k[3]) + k[:3], _conv),
           (f"{key}.bias", conv.bias, (k[4],), _same)]
    return out + (_sn_entries(key, conv) if spectral else [])


class _JoinedKernel:
    """A BlockDense's kernel as one variable, for the table."""

    def __init__(self, layer):
        self.layer, self.dtype = layer, layer.kernels[0].dtype
        self.shape = (layer.kernels[0].shape[0], layer.units)

    def assign(self, value):
        self.layer.assign_kernel(value)


def _dense_entries(key, dense, spectral=False, reshape_channels=None):
    kernel = _JoinedKernel(dense) if hasattr(dense, "kernels") else kernel_variable(dense)
    fan_in, units = tuple(kernel.shape)
    if reshape_channels:  # the dense layer whose output is reshaped to 4^3 x C
        weight = lambda w: _to_channels_last(w, reshape_channels).T  # noqa: E731
        bias = lambda b: _to_channels_last(b, reshape_channels)  # noqa: E731
    else:
        weight, bias = _linear, _same
    out = [(f"{key}.weight", kernel, (units, fan_in), weight),
           (f"{key}.bias", dense.bias, (units,), bias)]
    return out + (_sn_entries(key, dense) if spectral else [])


def _sn_entries(key, layer):
    # sv0 is the reference's logged sigma, never read in its forward pass: checked, not stored.
    units = layer.u.shape[-1]
    return [(f"{key}.u0", layer.u, (1, units), _same), (f"{key}.sv0", None, (1,), None)]


def _norm_entries(key, norm):
    c = norm.gamma.shape[0]
    return [(f"{key}.weight", norm.gamma, (c,), _same), (f"{key}.bias", norm.beta, (c,), _same)]


def _block_entries(conv_key, norm_key, block):
    return _conv_entries(conv_key, block.conv) + (_norm_entries(norm_key, block.norm) if block.norm else [])


def _of_type(sequential, cls):
    return [layer for layer in sequential.layers if isinstance(layer, cls)]


def _entries(model, network: str) -> list:
    """The reference's names for `network`'s variables; numbering ends where the reference's does.

    The 128^3 reference drops the first layer of D^H, D^L and E^G but keeps the later names
    (its D^H starts at conv2), so those chains are numbered backwards from their last layer.
    """
    from .layers import ConvBlock, SNConvLeaky

    if network == "generator":
        g = model.generator
        fc = g.common.get_layer("fc")
        out = _dense_entries("fc1", fc, reshape_channels=fc.units // 64)
        for i, b in enumerate(_of_type(g.common, ConvBlock) + _of_type(g.high_res_head, ConvBlock), 1):
            out += _block_entries(f"tp_conv{i}", f"bn{i}", b)
        for i, b in enumerate(_of_type(g.low_res_head, ConvBlock), 1):
            out += _block_entries(f"sub_G.tp_conv{i}", f"sub_G.bn{i}", b)
        return out
    if network == "discriminator":
        dh, dl = model.discriminator.high_res, model.discriminator.low_res
        convs = _of_type(dh.convs, SNConvLeaky)
        out = []
        for i, layer in enumerate(convs, 8 - len(convs)):
            out += _conv_entries(f"conv{i}", layer.conv, spectral=True)
        out += _dense_entries("fc1", dh.fc1, spectral=True) + _dense_entries("fc2", dh.fc2, spectral=True)
        if dh.fc_class is not None:
            out += _dense_entries("fc2_class", dh.fc_class, spectral=True)
        convs = _of_type(dl.convs, SNConvLeaky)
        for i, layer in enumerate(convs, 6 - len(convs)):
            out += _conv_entries(f"sub_D.conv{i}", layer.conv, spectral=True)
        return out
    if network == "encoder":
        out = []
        for i, b in enumerate(_of_type(model.encoder.high_res, ConvBlock), 1):
            out += _block_entries(f"conv{i}", f"bn{i}", b)
        return out
    if network == "sub_encoder":
        blocks = _of_type(model.encoder.latent_head, ConvBlock)
        out = []
        for i, b in enumerate(blocks, 6 - len(blocks)):
            out += _block_entries(f"conv{i}", f"bn{i}", b)
        return out
    raise ValueError(f"unknown network {network!r}; expected one of {', '.join(NETWORKS)}")


def expected_keys(model, network: str) -> dict[str, tuple]:
    """{reference key: PyTorch shape} that a `network` file must hold for `model`'s architecture."""
    return {key: shape for key, _, shape, _ in _entries(model, network)}


def _problems(entries, state: dict) -> list[str]:
    expected = {key: shape for key, _, shape, _ in entries}
    missing = [k for k in expected if k not in state]
    unknown = sorted(k for k in state if k not in expected)
    present = [k for k in expected if k in state]
    shapes = [f"{k} is not a tensor" for k in present if np.asarray(state[k]).dtype == object]
    shapes += [f"{k} {list(np.shape(state[k]))} (expected {list(expected[k])})" for k in present
               if np.asarray(state[k]).dtype != object and tuple(np.shape(state[k])) != expected[k]]
    out = []
    if missing:
        out.append("missing keys: " + ", ".join(missing))
    if unknown:
        out.append("unknown keys: " + ", ".join(unknown))
    if shapes:
        out.append("wrong shapes: " + "; ".join(shapes))
    return out


def load_state_dicts(model, state_dicts: dict[str, dict], sources: dict[str, str] | None = None) -> None:
    """Copy reference state dicts {network: state_dict} into `model` (a HAGAN), all or nothing.

    Every file is checked before any variable is written; one CheckpointMismatch lists every
    missing, unknown and mis-shaped key of every file.
    """
    sources = sources or {}
    tables = {net: _entries(model, net) for net in state_dicts}
    errors = []
    for net, state in state_dicts.items():
        for problem in _problems(tables[net], state):
            errors.append(f"{sources.get(net, net)} ({NETWORKS[net][0]}): {problem}")
    if errors:
        raise CheckpointMismatch("\n".join(errors))
    for net, state in state_dicts.items():
        for key, variable, _, convert in tables[net]:
            if variable is not None:
                variable.assign(np.ascontiguousarray(convert(state[key]), dtype=variable.dtype))


PUBLISHED_LATENT = 1024  # the paper's z, in every released model


def config_for(size: int, generator_state: dict, num_classes: int = 0) -> HAGANConfig:
    """The paper preset for `size`, with the latent size read off fc1 (its input is latent + classes)."""
    if size not in SIZES:
        raise ValueError(f"the published models are {SIZES[0]}^3 and {SIZES[1]}^3, not {size}^3")
    preset = os.path.join(os.path.dirname(__file__), "configs", f"paper_{size}.yaml")
    config = HAGANConfig.from_yaml(preset)
    fc1 = generator_state.get("fc1.weight")
    if fc1 is None or np.ndim(fc1) != 2:  # leave the default; the key check will name fc1.weight
        return config.replace(num_classes=num_classes)
    latent = int(np.shape(fc1)[1]) - num_classes
    if latent < 1:
        raise CheckpointMismatch(f"fc1.weight has {np.shape(fc1)[1]} inputs: too few for "
                                 f"--num-classes {num_classes}")
    return config.replace(latent_dim=latent, num_classes=num_classes)


def step_from_name(path: str) -> int:
    """The iteration in a reference file name (G_iter80000.pth -> 80000), else 0."""
    m = re.search(r"iter(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else 0


def import_torch(out: str, size: int, generator: str, discriminator: str | None = None,
                 encoder: str | None = None, sub_encoder: str | None = None,
                 num_classes: int = 0, step: int | None = None):
    """Import reference .pth files into a new run directory `out`; returns (HAGAN, step)."""
    from tqdm import tqdm

    import tensorflow as tf

    from .gan import HAGAN
    from .rundir import save_model, write_config

    if (encoder is None) != (sub_encoder is None):
        raise ValueError("give --encoder and --sub-encoder together (E^H and E^G form one encoder)")
    gfile = tf.io.gfile  # --out may be a gs:// URL, like every run directory
    if gfile.exists(out) and (not gfile.isdir(out) or gfile.listdir(out)):
        raise FileExistsError(f"{out!r} exists and is not an empty directory; choose a new --out")
    files = {net: path for net, path in [("generator", generator), ("discriminator", discriminator),
                                         ("encoder", encoder), ("sub_encoder", sub_encoder)]
             if path is not None}
    states = {net: read_state_dict(path) for net, path in tqdm(files.items(), desc="reading", unit="file")}
    config = config_for(size, states["generator"], num_classes)
    model = HAGAN(config)
    load_state_dicts(model, states, sources=files)
    step = step_from_name(generator) if step is None else step
    write_config(out, config)
    save_model(out, model, step=step)
    return model, step


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="hagan-import-torch",
        description="Import the published PyTorch HA-GAN weights (G/D/E/Sub_E_iterN.pth) into a "
                    "run directory that hagan-export, hagan-train and the other commands accept.")
    p.add_argument("--size", type=int, choices=SIZES, required=True, help="output size S of the model")
    p.add_argument("--generator", required=True, metavar="G.pth")
    p.add_argument("--discriminator", metavar="D.pth", help="needed to resume or fine-tune training")
    p.add_argument("--encoder", metavar="E.pth", help="E^H; give with --sub-encoder")
    p.add_argument("--sub-encoder", metavar="Sub_E.pth", help="E^G; give with --encoder")
    p.add_argument("--num-classes", type=int, default=0, help="classes of a conditional model (default 0)")
    p.add_argument("--step", type=int, default=None,
                   help="training step to record (default: the N of 'iterN' in the generator's name, else 0)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory to write")
    args = p.parse_args(argv)
    missing = [f"--{opt.replace('_', '-')} {getattr(args, opt)}"
               for opt in ("generator", "discriminator", "encoder", "sub_encoder")
               if getattr(args, opt) is not None and not os.path.isfile(getattr(args, opt))]
    if missing:  # all at once: the published weights come as four files
        p.error(f"no such file: {'; '.join(missing)} (the published weights: see README, "
                "'Use the published weights')")
    if args.num_classes < 0:
        p.error("--num-classes must be >= 0")
    if args.step is not None and args.step < 0:
        p.error("--step must be >= 0")
    try:
        model, step = import_torch(args.out, args.size, args.generator, args.discriminator,
                                   args.encoder, args.sub_encoder, args.num_classes, args.step)
    except ImportError as e:
        print(f"hagan-import-torch: error: {e}", file=sys.stderr)
        return 1
    except CheckpointMismatch as e:
        print(f"hagan-import-torch: error: the files do not match the {args.size}^3 architecture with "
              f"--num-classes {args.num_classes}:\n{e}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    left = [f"--{opt.replace('_', '-')}" for opt in ("discriminator", "encoder")
            if getattr(args, opt) is None]
    print(f"wrote {args.out} (size {args.size}, latent {model.config.latent_dim}, "
          f"{args.num_classes} classes, step {step})")
    if left:
        print(f"note: no {' / '.join(left)} given: those networks keep a random initialisation")
    latent = model.config.latent_dim
    if args.discriminator is None and args.sub_encoder is None and (latent, args.num_classes) != (
            PUBLISHED_LATENT, 0):  # only D and E^G have a layer sized by the class count
        print(f"note: the generator alone cannot confirm --num-classes: its fc1 takes "
              f"{latent + args.num_classes} inputs, read as latent {latent} + "
              f"{args.num_classes} classes (the published models: latent {PUBLISHED_LATENT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
