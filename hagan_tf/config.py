"""HAGANConfig: every knob of the model and its training, loadable from YAML."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml


# G's image outputs: the paper's tanh, and the same values with two other gradients (layers.py)
G_OUTPUTS = ("tanh", "tanh_st", "tanh_inward")


@dataclasses.dataclass
class HAGANConfig:
    """Model and training settings; the defaults are the paper's 256^3 setup."""

    size: int = 256
    latent_dim: int = 1024
    num_classes: int = 0
    width: float = 1.0
    # training
    batch_size: int = 4
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    lr_eh: float = 1e-4
    lr_eg: float = 1e-4
    beta_1: float = 0.0
    beta_2: float = 0.999
    lambda_class: float = 0.1
    downsample: str = "nearest"  # how real X^L is made: "nearest" (paper) or "area"
    max_steps: int = 80000
    seed: int = 0
    mixed_precision: str = "float32"  # or "mixed_bfloat16", "mixed_float16"
    jit_compile: bool = False
    # remedies for mode collapse and small datasets; the paper presets leave them off
    loss: str = "bce"  # "bce" (the paper's sigmoid cross-entropy) or "hinge"
    r1_gamma: float = 0.0  # weight of the R1 penalty on D's gradient at real inputs (0: off)
    augment: str = ""  # DiffAugment of D's real and fake inputs: "translation,cutout,intensity"
    ema_decay: float = 0.0  # moving average of G's weights, used for sampling and export (0: off)
    g_norm_groups: int = 8  # GroupNorm groups in G (the paper: 8). With 8 channels to a layer
    # (width 0.125), 8 groups normalise each channel per sample, which fixes how much of each
    # tissue a sample holds; fewer groups let samples differ in it
    lambda_recon: float = 0.0  # G also learns to reproduce real scans from E's codes (0: off)
    lambda_ms: float = 0.0  # weight of the mode-seeking term on G (MSGAN; 0: off)
    lambda_hist: float = 0.0  # G also matches the real batch's voxel intensities (1-D W1; 0: off)
    d_steps: int = 1  # D updates per iteration (WGAN's n_critic), each on its own batch of
    # batch_size real scans; G, E^H and E^G then update once, on the last of them (1: the paper)
    d_window: str = ""  # "LOW,HIGH[;LOW,HIGH...]" in volume units: D^H and D^L also see the
    # input through each window, stretched to [-1, 1], as one more channel each ("-1,-0.6" =
    # -1024..-699 HU under hagan-preprocess's default window: lung against air 5x magnified;
    # "": off)
    intensity_map: str = ""  # "X,Y;X,Y;..." knots of a monotone piecewise-linear map f of volume
    # units that G works in: its tanh output goes through f^-1 (f scaled to f(+-1) = +-1). With
    # "-1,-1;-0.6,0;1,1" the dark range -1024..-699 HU (air, lung) fills half of tanh's range,
    # so lung is mid-grey, not next to air at tanh's saturated end ("": off, the paper)
    intensity_map_d: bool = False  # D^H and D^L also see f(volume), f unscaled: lung levels
    # further apart for D (an f wider than [-1, 1] makes D more sensitive under spectral norm)
    minibatch_std: bool = False  # D^H and D^L also see the batch's feature spread (ProGAN)
    g_output: str = "tanh"  # G's image outputs: "tanh" (the paper) or "tanh_st", the same values
    # with the gradient passed straight through in training: a saturated tanh passes none, and
    # small Gs push air and lungs to -1 early, where they stay (see lambda_hist); "tanh_inward"
    # gives a step back toward 0 at least tanh's slope at air's level (layers.tanh_inward)
    diversity_every: int = 500  # steps between collapse checks (TensorBoard diversity/*; 0: off)
    collapse_threshold: float = 0.5  # warn when sample diversity / real diversity falls below
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    image_every: int = 1000
    # data
    fold: int | None = None  # hold this fold out of training (cross-validation)
    shuffle_buffer: int = 64
    spacing: float = 1.0  # voxel size in mm of the training volumes (NIfTI affine of samples)
    # inference
    # output slices decoded at a time (exactly, in bounded memory). None (null): auto, 32 slices
    # of 256^2 voxels' worth whatever S, i.e. 32 * (256 / S)^2: 8 at 512^3, 32 at 256^3, the
    # whole volume at 128^3 and below (hagan_tf.tiled.auto_tile_depth); 0: the whole volume
    tile_depth: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        positive = ("batch_size", "d_steps", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                    "image_every", "shuffle_buffer", "lr_g", "lr_d", "lr_eh", "lr_eg", "spacing")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not (0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1):
            raise ValueError(f"beta_1 and beta_2 must be in [0, 1), got {self.beta_1}, {self.beta_2}")
        if self.lambda_class < 0 or (self.fold is not None and self.fold < 0):
            raise ValueError("lambda_class and fold must be >= 0")
        if not 0 <= self.seed < 2**32:  # keras.utils.set_random_seed takes no other
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.size < 32 or self.size > 512 or 2 ** int(round(math.log2(self.size))) != self.size:
            raise ValueError(f"size must be a power of two from 32 to 512, got {self.size}")
        if self.latent_dim < 1 or self.num_classes < 0 or self.width <= 0:
            raise ValueError("latent_dim must be >= 1, num_classes >= 0 and width > 0")
        if self.downsample not in ("nearest", "area"):
            raise ValueError(f"downsample must be 'nearest' or 'area', got {self.downsample!r}")
        if self.g_norm_groups not in (1, 2, 4, 8):  # channel counts are multiples of 8
            raise ValueError(f"g_norm_groups must be 1, 2, 4 or 8, got {self.g_norm_groups}")
        if self.g_output not in G_OUTPUTS:
            raise ValueError(f"g_output must be one of {G_OUTPUTS}, got {self.g_output!r}")
        if self.loss not in ("bce", "hinge"):
            raise ValueError(f"loss must be 'bce' or 'hinge', got {self.loss!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.tile_depth is not None and self.tile_depth < 0:
            raise ValueError(f"tile_depth must be >= 0 (0: decode the whole volume at once), "
                             f"got {self.tile_depth}")
        if min(self.r1_gamma, self.lambda_recon, self.lambda_ms, self.lambda_hist, self.diversity_every,
               self.collapse_threshold) < 0:
            raise ValueError("r1_gamma, lambda_recon, lambda_ms, lambda_hist, diversity_every and "
                             "collapse_threshold must be >= 0")
        parse_windows(self.d_window)
        if not parse_knots(self.intensity_map) and self.intensity_map_d:
            raise ValueError("intensity_map_d needs intensity_map's knots")
        if self.intensity_map_d and parse_windows(self.d_window):
            # d_window's bounds are volume units; behind f they would read f(volume)
            raise ValueError("intensity_map_d and d_window are not combined: set one of them")
        from .diffaugment import parse_ops

        parse_ops(self.augment)
        if self.mixed_precision not in ("float32", "mixed_bfloat16", "mixed_float16"):
            raise ValueError(f"unknown mixed_precision policy {self.mixed_precision!r}")

    # -- derived sizes (docs/architecture.md, "Sizes as functions of S") --
    @property
    def a_size(self) -> int:
        """Edge of the common feature map A and of X^L."""
        return self.size // 4

    @property
    def slab_depth(self) -> int:
        """Depth of a high-resolution sub-volume (S/8)."""
        return self.size // 8

    @property
    def num_slabs(self) -> int:
        return 8

    @property
    def max_crop(self) -> int:
        """Largest start slice r of a sub-volume (7S/8)."""
        return self.size - self.slab_depth

    def channels(self, c: int) -> int:
        """Width-scaled channel count, kept a multiple of 8 for GroupNorm(8)."""
        if self.width == 1.0:
            return c
        return max(8, 8 * int(round(c * self.width / 8)))

    # -- (de)serialisation --
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HAGANConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of keys to values, got {type(d).__name__} {d!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> "HAGANConfig":
        with _open(path, "r") as f:
            try:
                d = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        try:
            return cls.from_dict({} if d is None else d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_yaml(self, path: str) -> None:
        with _open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def replace(self, **overrides) -> "HAGANConfig":
        return HAGANConfig.from_dict({**self.to_dict(), **overrides})

    def with_overrides(self, assignments: list[str]) -> "HAGANConfig":
        """Apply `key=value` strings (values parsed as YAML scalars), as `--set` gives them."""
        out = {}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = yaml.safe_load(v)
            except yaml.YAMLError:
                out[k.strip()] = v  # then the field's own check says what it must be
        return self.replace(**out)


def _open(path, mode: str):
    """Local files with `open`; URLs (gs://, s3://, hdfs://) through TensorFlow's file systems,
    imported only then so that reading a config stays light."""
    if "://" not in str(path):
        return open(path, mode)
    import tensorflow as tf

    return tf.io.gfile.GFile(str(path), mode)


def parse_knots(text: str) -> list[tuple[float, float]]:
    """config.intensity_map "X,Y;X,Y[;...]" -> [(x, y), ...], x and y strictly increasing."""
    if not text.strip():
        return []
    try:
        knots = [tuple(float(v) for v in part.split(",")) for part in text.split(";")]
        ok = all(len(k) == 2 and all(math.isfinite(v) for v in k) for k in knots)
    except ValueError:
        ok = False
    if ok:
        ok = len(knots) >= 2 and all(a[0] < b[0] and a[1] < b[1] for a, b in zip(knots, knots[1:]))
    if not ok:
        raise ValueError(f"intensity_map must be two or more 'X,Y' knots separated by ';', X and Y "
                         f"strictly increasing, got {text!r}")
    return knots


def g_knots(knots: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """G's f: the knots with y scaled so that f(-1) = -1 and f(1) = 1, tanh's range covering
    the volume's whatever D's f (config.intensity_map_d) spans."""
    if not knots:
        return []

    def f(x):
        (x0, y0), (x1, y1) = next(((a, b) for a, b in zip(knots, knots[1:]) if x <= b[0]),
                                  knots[-2:])
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    lo, hi = f(-1.0), f(1.0)
    return [(x, 2 * (y - lo) / (hi - lo) - 1) for x, y in knots]


def parse_windows(text: str) -> list[tuple[float, float]]:
    """config.d_window "LOW,HIGH[;LOW,HIGH...]" -> [(low, high), ...]; "" -> []."""
    windows = []
    for part in text.split(";") if text.strip() else []:
        try:
            low, high = (float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"d_window must be 'LOW,HIGH' pairs separated by ';', got {text!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"d_window must have finite LOW < HIGH in each window, got {text!r}")
        windows.append((low, high))
    return windows


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Check a field against its annotation. YAML reads `1e-4` (no dot) as a string and a typo as
    any type, so numbers are parsed here and anything else is a clear error, not a late crash."""
    if value is None and annotation.endswith("| None"):
        return None
    kind = annotation.split("|")[0].strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string, got {value!r}")
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind == "int":
        if not number.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value if isinstance(value, int) else int(number)  # float() rounds beyond 2**53
    return number
