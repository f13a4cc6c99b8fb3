"""benchmarks/fidelity.py and its measuring code (hagan_tf.evaluation.fidelity)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hagan_tf.data.synthetic import THORAX_FACTORS, hu_to_unit, thorax_hu
from hagan_tf.evaluation import fidelity as fd
from hagan_tf.evaluation.metrics import mean_pairwise_l1
from hagan_tf.preprocess.transform import preprocess_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MID = {k: (lo + hi) / 2 for k, (lo, hi) in THORAX_FACTORS.items()}


def measured(size=32, seed=0, **factors):
    """anatomy_factors of a thorax phantom (72 x 96 x 96) preprocessed to size^3, and its truth."""
    hu, truth = thorax_hu((72, 96, 96), np.random.default_rng(seed), factors={**MID, **factors})
    vol, _ = preprocess_array(hu, size)
    return fd.anatomy_factors(vol), truth


@pytest.mark.parametrize("factor, key, low, high", [
    ("lung", "lung_scale", 0.65, 1.0),
    ("body", "body_rx", 0.72, 0.94),
    ("bone", "rib_thickness", 0.020, 0.034),
    ("emphysema", "emphysema_extent", 0.0, 0.3),
])
def test_factors_at_32_follow_the_generating_factor(factor, key, low, high):
    (a, _), (b, _), (c, _) = (measured(**{key: v}) for v in (low, (low + high) / 2, high))
    assert a[factor] < b[factor] < c[factor]


def test_factors_at_32_are_near_the_true_mask_fractions():
    m, truth = measured(emphysema_extent=0.2)
    assert m["body"] == pytest.approx(truth["true_body"], abs=0.02)
    assert m["lung"] == pytest.approx(truth["true_lung"], abs=0.02)
    assert m["bone"] == pytest.approx(truth["true_bone"], abs=0.01)
    assert 0.05 < m["emphysema"] <= truth["true_emphysema"] + 0.02  # small clusters blur away
    # at the written resolution the estimator reads the masks back almost exactly
    hu, truth = thorax_hu((72, 96, 96), np.random.default_rng(0), factors={**MID, "emphysema_extent": 0.2})
    native = fd.anatomy_factors(hu_to_unit(hu))
    for k in fd.FACTORS:
        assert native[k] == pytest.approx(truth[f"true_{k}"], abs=0.005)


def test_factors_of_air_and_of_a_constant_volume():
    air = np.full((32, 32, 32), -1.0, np.float32)
    assert fd.anatomy_factors(air) == {"body": 0.0, "lung": 0.0, "bone": 0.0, "emphysema": 0.0}
    full = np.ones((32, 32, 32, 1), np.float32)  # [..., 1] volumes too
    assert fd.anatomy_factors(full) == {"body": 1.0, "lung": 0.0, "bone": 1.0, "emphysema": 0.0}


def test_phantom_anatomy_is_where_ras_puts_it():
    """[D, H, W] = [z, y, x] in RAS+: spine posterior (low y), heart anterior, inferior and to
    the patient's left (low x), lungs on both sides."""
    def phantom(**f):
        return thorax_hu((72, 96, 96), np.random.default_rng(0),
                         factors={**MID, "emphysema_extent": 0.0, **f}, noise_hu=0)[0]

    hu = phantom()
    bone = np.argwhere(hu[36] > 500)
    midline = bone[np.abs(bone[:, 1] - 47.5) < 3, 0]
    assert (midline < 40).mean() > 0.7 and (midline > 60).any()  # spine posterior, sternum anterior
    lungs = np.argwhere(hu[40] < -500)
    assert (lungs[:, 1] < 40).any() and (lungs[:, 1] > 56).any()
    heart = np.argwhere((phantom(heart_scale=1.2) > -500) & (phantom(heart_scale=0.85) < -500))
    z, y, x = heart.mean(0)
    assert z < 35.5 and y > 47.5 and x < 47.5


def test_w1_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=100)
    assert fd.normalized_w1(x, x) == 0.0
    assert fd.normalized_w1(x, x + x.std(ddof=1)) == pytest.approx(1.0)
    assert fd.normalized_w1(np.ones(5), np.ones(3)) == 0.0
    assert fd.normalized_w1(np.ones(5), np.zeros(3)) == float("inf")


def test_diversity_of_identical_volumes_is_zero_l1_and_ms_ssim_one():
    v = np.random.default_rng(0).uniform(-1, 1, (32, 32, 32)).astype(np.float32)
    d = fd.diversity([v, v, v])
    assert d["l1"] == 0.0 and d["ms_ssim"] == pytest.approx(1.0) and d["ms_ssim_scales"] == 3
    w = -v
    assert mean_pairwise_l1([v, w]) == pytest.approx(np.abs(2 * v).mean(), rel=1e-5)


def test_histogram_distances():
    rng = np.random.default_rng(0)
    a = [rng.uniform(-1, 1, (16, 16, 16)) for _ in range(2)]
    h = fd.intensity_histogram(a)
    assert h.sum() == 2 * 16 ** 3
    assert fd.histogram_distances(h, h) == {"w1_hu": 0.0, "l1": 0.0}
    low = fd.intensity_histogram([np.full((8, 8, 8), -1.0)])
    high = fd.intensity_histogram([np.full((8, 8, 8), 1.0)])
    d = fd.histogram_distances(low, high)
    assert d["l1"] == pytest.approx(2.0)
    assert d["w1_hu"] == pytest.approx(1624 - 8, abs=1e-6)  # bin centres 8 HU apart at the ends


def test_ridge_r2_finds_a_linear_factor_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    r2 = fd.ridge_r2(x, {"linear": x[:, 3] - 0.5 * x[:, 7], "noise": rng.normal(size=120),
                         "constant": np.ones(120)})
    assert r2["linear"] > 0.95 and r2["noise"] < 0.1 and np.isnan(r2["constant"])


def test_sampling_floor_and_feature_distances():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 4))
    floor = fd.sampling_floor(real[:, 0], 10, fd.normalized_w1, repeats=10)
    assert 0 < floor < 1
    assert np.isnan(fd.sampling_floor(real[:5, 0], 10, fd.normalized_w1))
    d = fd.feature_distances(real, rng.normal(3.0, 1.0, size=(10, 4)))
    assert d["fid"] > 10 * d["fid_floor"] and d["mmd2_gaussian"] > d["mmd2_gaussian_floor"]
    assert {"mmd2_polynomial", "mmd2_polynomial_floor"} <= set(d)


def test_check_targets():
    ratios = fd.diversity_ratios({"l1": 0.12, "ms_ssim": 0.96}, {"l1": 0.1, "ms_ssim": 0.84})
    assert ratios["l1"] == pytest.approx(1.2) and ratios["ms_ssim_dissimilarity"] == pytest.approx(0.25)
    res = {"factors": {k: {"w1_over_sd": 0.1} for k in fd.FACTORS}, "diversity": {"ratio": ratios},
           "ridge_r2": {"lung": 0.95}}
    checks = fd.check_targets(res)
    assert [c["pass"] for c in checks] == [True] * 4 + [True, False, True]  # 1 - MS-SSIM: 0.25x, fails
    res["ridge_r2"]["lung"] = float("nan")
    assert not fd.check_targets(res)[-1]["pass"]


def test_write_phantom_scans_writes_nifti_and_the_factors_csv(tmp_path):
    import nibabel as nib

    from hagan_tf.preprocess.transform import preprocess_file

    rows = fd.write_phantom_scans(str(tmp_path), 3, shape=(36, 48, 48), spacing=(4.0, 3.6, 3.6))
    img = nib.load(str(tmp_path / "thorax0000.nii.gz"))
    assert img.shape == (48, 48, 36) and img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), (3.6, 3.6, 4.0))
    vol, meta = preprocess_file(str(tmp_path / "thorax0000.nii.gz"), 32)
    assert vol.shape == (32, 32, 32) and meta["orientation"] == "RAS"
    with open(tmp_path / "factors.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["subject_id"] for r in read] == ["thorax0000", "thorax0001", "thorax0002"]
    for key in [*THORAX_FACTORS, *(f"true_{k}" for k in fd.FACTORS)]:
        assert key in read[0]
    assert float(read[1]["lung_scale"]) == pytest.approx(rows[1]["lung_scale"])
    assert fd.read_csv(str(tmp_path / "factors.csv"))[2]["true_lung"] == rows[2]["true_lung"]


def test_benchmark_cli_end_to_end(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fidelity.py"), "--preset", "tiny_32",
           "--scans", "8", "--steps", "4", "--samples", "4", "--recon", "4", "--features", "none",
           "--out", str(out), "--results", str(results)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "targets met" in res.stdout and ("PASS" in res.stdout or "FAIL" in res.stdout)
    with open(results / "fidelity-tiny_32.json") as f:
        report = json.load(f)
    assert report["step"] == 4 and report["n_real"] == 8 and report["n_generated"] == 4
    assert report["train_seconds"] > 0 and report["config"]["size"] == 32
    assert set(report["factors"]) == set(fd.FACTORS) and len(report["targets"]) == 7
    assert {"avx2", "avx512f", "avx512_bf16"} <= set(report["cpu"])
    assert "--preset tiny_32" in report["command"]
    for png in (results / "fidelity-tiny_32.png", out / "montage.png"):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / "real_factors.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and "measured32_lung" in rows[0] and "lung_scale" in rows[0]


def test_benchmark_over_seeds_trains_each_and_reports_the_spread(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fidelity.py"), "--preset", "tiny_32",
           "--scans", "8", "--steps", "2", "--samples", "2", "--recon", "2", "--features", "none",
           "--ms-ssim-pairs", "4", "--out", str(out), "--results", str(results), "--seeds", "3,5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    runs = {}
    for seed in (3, 5):
        with open(results / f"seed-{seed}" / "fidelity-tiny_32.json") as f:
            runs[seed] = json.load(f)
        assert runs[seed]["config"]["seed"] == seed and runs[seed]["step"] == 2
    with open(results / "fidelity-tiny_32-seeds.json") as f:
        summary = json.load(f)
    assert summary["seeds"] == [3, 5] and set(summary["targets_met"]) == {"3", "5"}
    body = summary["figures"]["body W1/sd"]
    assert body["values"] == [runs[3]["factors"]["body"]["w1_over_sd"],
                              runs[5]["factors"]["body"]["w1_over_sd"]]
    assert body["min"] <= body["mean"] <= body["max"] and "FID" not in summary["figures"]
    assert "over training seeds [3, 5]" in res.stdout
    bad = subprocess.run(cmd[:-1] + ["3,x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds" in bad.stderr
