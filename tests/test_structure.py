"""The package's structure: what importing it does, the deprecated names, the shared helpers."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from hagan_tf import HAGANConfig
from hagan_tf.arrays import class_counts, downsample

_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
_PROBE = ("import os, sys, hagan_tf.serving, hagan_tf.layout; "
          "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), 'tensorflow' in sys.modules)")


def test_importing_hagan_tf_leaves_the_process_alone():
    # A library must not change TensorFlow's logging for the program that imports it; the
    # package, the layouts and the serving constants load without TensorFlow.
    out = subprocess.run([sys.executable, "-c", _PROBE], env=_ENV, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["None", "False"]


def test_a_hagan_command_quiets_tensorflow(tmp_path):
    script = tmp_path / "hagan-probe"  # a console script's name, as pip writes hagan-train
    script.write_text(_PROBE)
    out = subprocess.run([sys.executable, str(script)], env=_ENV, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["2", "False"]


def test_deprecated_names_still_work_and_say_so():
    import hagan_tf.rundir as rundir
    from hagan_tf import HAGAN

    sys.modules.pop("hagan_tf.run", None)
    with pytest.warns(DeprecationWarning, match="hagan_tf.rundir"):
        import hagan_tf.run as run
    assert run.load_hagan is rundir.load_hagan and run.CHECKPOINTS == rundir.CHECKPOINTS
    import hagan_tf.trained as trained

    sys.modules.pop("hagan_tf.source", None)
    with pytest.warns(DeprecationWarning, match="hagan_tf.trained"):
        import hagan_tf.source as source
    assert source.open_model is trained.open_model and source.SavedModelSource is trained.ExportedModel
    from hagan_tf.apps import common

    with pytest.warns(DeprecationWarning, match="open_model_from_args"):
        with pytest.raises(common.AppError, match="cannot open the model"):
            common.open_source(type("Args", (), {"run": "/nonexistent", "model_base": None,
                                                "name": "hagan", "step": None, "version": None}))

    gan = HAGAN(HAGANConfig(size=32, width=0.125, latent_dim=16))
    with pytest.warns(DeprecationWarning, match="use `.config`"):
        assert gan.config_ is gan.config
    with pytest.warns(DeprecationWarning):
        assert gan.encoder.config_ is gan.encoder.config
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old attribute name of E^G is its stored name
        assert gan.encoder.ground is gan.encoder.latent_head


def test_downsample_averages_blocks():
    v = np.arange(2 * 4 ** 3, dtype=np.float32).reshape(2, 4, 4, 4, 1)
    out = downsample(v, 2)
    assert out.shape == (2, 2, 2, 2, 1)
    assert out[1, 1, 0, 1, 0] == v[1, 2:4, 0:2, 2:4].mean()
    assert downsample(v, 1) is v


def test_class_counts_follow_the_proportions():
    assert class_counts(np.array([0, 0, 0, 1]), 3, 6).tolist() == [5, 1, 0]
    assert class_counts(np.array([0, 1, 2]), 3, 2).sum() == 2
