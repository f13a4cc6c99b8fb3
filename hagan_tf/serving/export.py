"""`hagan-export`: a run directory's checkpoint as a SavedModel in TF Serving's layout.

DIR/NAME/V/ holds the signatures below, built from TF ops only so the stock TF Serving binary
loads them, and the run's config at V/assets.extra/hagan_config.yaml. `label` int32 [N] is an
extra input of every generating signature when the model is class-conditional.

  generate (= serving_default)  z float32 [N, latent]            -> volume [N, S, S, S, 1]
  generate_from_seed            seed int64 [N]                   -> volume (stateless RNG)
  generate_preview              z float32 [N, latent]            -> volume [N, S/4, S/4, S/4, 1]
  encode                        volume float32 [N, S, S, S, 1]   -> z [N, latent]
  reconstruct                   volume float32 [N, S, S, S, 1]   -> volume, G(E(x))
  config                        format string [] ("yaml")        -> config string [], the YAML

A version is written to a hidden temporary directory next to its final place and renamed in
one step, so a server polling DIR never sees half of it. DIR may be a URL (gs://...), which TF
Serving reads too; there the files move one by one, `saved_model.pb` last, since a server only
loads a version once that file is there.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import uuid

import tensorflow as tf
import yaml

from ..layout import CONFIG_ASSET, DEFAULT_MODEL_NAME, default_version, versions  # noqa: F401 (re-exported)
from .warmup import write_warmup

SEED_RNG_ALG = "philox"  # named, not "auto_select", which may pick another algorithm per device


def seed_latents(seeds, latent_dim: int) -> tf.Tensor:
    """z [N, latent] drawn from N(0, I) with one stateless Philox stream per int64 seed."""
    seeds = tf.convert_to_tensor(seeds, tf.int64)
    return tf.map_fn(
        lambda s: tf.random.stateless_normal([latent_dim], seed=tf.stack([s, tf.zeros_like(s)]),
                                             alg=SEED_RNG_ALG),
        seeds, fn_output_signature=tf.TensorSpec([latent_dim], tf.float32))


def _f32(x):
    """Outputs are float32 whatever policy the model was built under (mixed precision)."""
    return tf.cast(x, tf.float32)


class ServingModule(tf.Module):
    """The exported object: one tf.function per signature and the variables they read.

    Only the tf.Variables under the Keras variables are tracked, not the layers: saving then
    skips walking (and re-tracing) the layer tree and leaves out the discriminator, which no
    signature uses. Tracking the Keras wrappers instead would export each variable twice,
    restore one copy and read the other, which the C++ loader of TF Serving and
    `saved_model_cli run` report as "Could not find variable" (keras-team/keras#19274).
    """

    def __init__(self, gan):
        super().__init__(name="hagan")
        variables = list(gan.generator.variables) + list(gan.encoder.variables)
        self.weights = [v.value for v in variables]
        self.nets = types.SimpleNamespace(generator=gan.generator, encoder=gan.encoder)  # untracked
        self.config = gan.config
        self._config_text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)

    def _checked_labels(self, labels, n):
        if labels is None:
            return None
        classes = self.config.num_classes
        with tf.control_dependencies([
            tf.debugging.assert_equal(tf.shape(labels)[0], n,
                                      message="label must have one entry per sample"),
            tf.debugging.assert_non_negative(labels, message="label must be >= 0"),
            tf.debugging.assert_less(labels, classes, message=f"label must be < {classes}"),
        ]):
            return tf.identity(labels)

    def generate(self, z, label=None):
        labels = self._checked_labels(label, tf.shape(z)[0])
        return {"volume": _f32(self.nets.generator.volume(z, labels=labels))}  # slab by slab

    def generate_from_seed(self, seed, label=None):
        return self.generate(seed_latents(seed, self.config.latent_dim), label)

    def generate_preview(self, z, label=None):
        labels = self._checked_labels(label, tf.shape(z)[0])
        return {"volume": _f32(self.nets.generator.preview(z, labels))}

    def encode(self, volume):
        return {"z": _f32(self.nets.encoder(volume, training=False))}

    def reconstruct(self, volume, label=None):
        return self.generate(self.encode(volume)["z"], label)

    def config_yaml(self, format):  # noqa: A002 - the signature's input name
        with tf.control_dependencies([tf.debugging.assert_equal(
                format, "yaml", message="config: the only format is yaml")]):
            return {"config": tf.identity(tf.constant(self._config_text))}

    def signatures(self) -> dict:
        """Concrete functions keyed by signature name, inputs named as in the module doc."""
        c = self.config
        s = c.size
        z = tf.TensorSpec([None, c.latent_dim], tf.float32, name="z")
        seed = tf.TensorSpec([None], tf.int64, name="seed")
        volume = tf.TensorSpec([None, s, s, s, 1], tf.float32, name="volume")
        label = [tf.TensorSpec([None], tf.int32, name="label")] if c.num_classes else []
        specs = {
            "generate": (self.generate, [z] + label),
            "generate_from_seed": (self.generate_from_seed, [seed] + label),
            "generate_preview": (self.generate_preview, [z] + label),
            "encode": (self.encode, [volume]),
            "reconstruct": (self.reconstruct, [volume] + label),
            "config": (self.config_yaml, [tf.TensorSpec([], tf.string, name="format")]),
        }
        out = {name: tf.function(fn, input_signature=sig).get_concrete_function()
               for name, (fn, sig) in specs.items()}
        out["serving_default"] = out["generate"]
        return out


def export_model(gan, model_base: str, name: str = DEFAULT_MODEL_NAME, version: int = 1) -> str:
    """Write `gan` as DIR/NAME/VERSION and return that path; an existing version is an error."""
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    model_dir = os.path.join(model_base, name)
    final = os.path.join(model_dir, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(f"{final!r} already exists; pick another --version")
    tf.io.gfile.makedirs(model_dir)
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        module = ServingModule(gan)
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        tf.io.gfile.makedirs(os.path.join(tmp, os.path.dirname(CONFIG_ASSET)))
        gan.config.to_yaml(os.path.join(tmp, CONFIG_ASSET))
        write_warmup(tmp)  # assets.extra/tf_serving_warmup_requests: TF Serving warms up with it
        if "://" in model_base:
            _move_files(tmp, final)
        else:
            os.rename(tmp, final)  # atomic; fails instead of merging if `final` appeared meanwhile
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    return final


def _move_files(src: str, dst: str) -> None:
    """Object stores have no directory rename: move each file, saved_model.pb last."""
    files = [os.path.join(root, f) for root, _, names in tf.io.gfile.walk(src) for f in names]
    files.sort(key=lambda f: os.path.basename(f) == "saved_model.pb")
    for f in files:
        target = os.path.join(dst, f[len(src):].lstrip("/"))
        tf.io.gfile.makedirs(os.path.dirname(target))
        tf.io.gfile.rename(f, target)
    tf.io.gfile.rmtree(src)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-export",
        description="Export a trained HA-GAN run as a TF Serving SavedModel at DIR/NAME/VERSION.")
    p.add_argument("--run", required=True, help="run directory written by hagan-train")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--model-base", required=True, help="TF Serving model base directory DIR")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name (default: %(default)s)")
    p.add_argument("--version", type=int, default=None,
                   help="version number (default: the step, at least 1, or the next free number when a "
                        "version that high already exists)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 0:
        parser.error("--version must be >= 0")
    if not args.name or args.name.startswith(".") or os.sep in args.name:
        parser.error(f"--name must be a plain directory name, got {args.name!r}")
    model_dir = os.path.join(args.model_base, args.name)
    if args.version is not None and tf.io.gfile.exists(os.path.join(model_dir, str(args.version))):
        parser.error(f"{os.path.join(model_dir, str(args.version))!r} already exists; "
                     "pick another --version")
    from ..rundir import load_hagan

    try:
        gan, step = load_hagan(args.run, args.step)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    version = args.version if args.version is not None else default_version(model_dir, step)
    try:
        path = export_model(gan, args.model_base, args.name, version)
    except FileExistsError as e:
        parser.error(str(e))
    print(f"exported step {step} of {args.run} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
