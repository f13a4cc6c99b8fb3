"""Metrics against closed forms: FID of Gaussians, unbiased MMD², IS limits, 3D MS-SSIM."""

import numpy as np
import pytest

from hagan_tf.evaluation import metrics as M


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def _sqrt_spd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w)) @ v.T


def test_frechet_distance_closed_form_non_commuting():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    r1 = _sqrt_spd(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sqrt_spd(r1 @ s2 @ r1))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_diagonal_and_1d():
    # 1D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert M.frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(4 + 1)
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1.0 + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert M.frechet_distance([0, 0, 1], np.diag(var1), [0, 0, 0], np.diag(var2)) == pytest.approx(expected)


def test_fid_of_samples_approaches_gaussian_value():
    rng = np.random.default_rng(1)
    n, d = 40000, 3
    mu2 = np.array([1.0, -0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), _spd(rng, d) / d
    a = rng.multivariate_normal(np.zeros(d), s1, n)
    b = rng.multivariate_normal(mu2, s2, n)
    r1 = _sqrt_spd(s1)
    expected = mu2 @ mu2 + np.trace(s1 + s2 - 2 * _sqrt_spd(r1 @ s2 @ r1))
    assert M.fid(a, b) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("n,d", [(200, 8), (10, 64)])  # second: singular covariances (n < d)
def test_fid_of_identical_sets_is_zero(n, d):
    x = np.random.default_rng(2).normal(size=(n, d)) * 3
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-3)
    assert M.fid(x, x + 1.0) == pytest.approx(d, rel=1e-3)  # only the means differ


def test_fid_does_not_depend_on_the_features_units_with_few_samples():
    # 8 samples of 512 features (a singular product): sqrtm's round-off failed an absolute
    # test ("imaginary component 0.0232") at this scale and passed at a 100th of it
    rng = np.random.default_rng(1)
    base = rng.normal(size=512) * 100
    a = np.abs(base + rng.normal(size=(8, 512)) * 100)
    b = np.abs(base + rng.normal(size=(8, 512)) * 150)
    assert M.fid(a, b) == pytest.approx(M.fid(a / 100, b / 100) * 1e4, rel=1e-6)


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError):
        M.fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        M.fid(np.full((4, 3), np.nan), np.zeros((5, 3)))


@pytest.mark.parametrize("kernel", ["gaussian", "polynomial"])
def test_mmd2_same_distribution_near_zero_shifted_positive(kernel):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
    same = M.mmd2(x, y, kernel)
    shifted = M.mmd2(x, y + 1.5, kernel)
    assert abs(same) < 0.02
    assert shifted > 0.2
    assert shifted > 20 * abs(same)


def test_mmd2_identical_samples_unbiased_closed_form():
    # x == y as sets: the unbiased estimate is exactly -2 (1 - mean off-diagonal k) / n
    x = np.random.default_rng(4).normal(size=(50, 4))
    k = np.exp(-M.euclidean_distances(x, squared=True) / 2.0)
    off = (k.sum() - np.trace(k)) / (50 * 49)
    assert M.mmd2(x, x, "gaussian", bandwidth=1.0) == pytest.approx(-2 * (1 - off) / 50, rel=1e-9)
    assert abs(M.mmd2(x, x, "gaussian")) < 2 / 50


def test_mmd2_polynomial_matches_kid_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 4)), rng.normal(1, 1, size=(20, 4))
    k = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    expected = ((kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (20 * 19)
                - 2 * k(x, y).mean())
    assert M.mmd2(x, y, "polynomial") == pytest.approx(expected, rel=1e-9)


def test_mmd2_rejects_unknown_kernel_and_mismatched_dims():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError):
        M.mmd2(x, x, "linear")
    with pytest.raises(ValueError):
        M.mmd2(x, np.zeros((4, 2)))


@pytest.mark.parametrize("k", [2, 10, 1000])
def test_inception_score_limits(k):
    uniform = np.full((64, k), 1.0 / k)
    assert M.inception_score(uniform)[0] == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(5 * k) % k]  # confident and evenly spread over k classes
    assert M.inception_score(one_hot)[0] == pytest.approx(k)
    mean, std = M.inception_score(one_hot, splits=5)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0)


def test_inception_score_all_same_class_is_one_and_rejects_non_probabilities():
    assert M.inception_score(np.eye(7)[np.zeros(20, int)])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.inception_score(np.ones((4, 3)))


def _phantoms(n, size=32, seed=0):
    from hagan_tf.data.synthetic import hu_to_unit, phantom_hu

    rng = np.random.default_rng(seed)
    return [hu_to_unit(phantom_hu((size,) * 3, rng.uniform(0.5, 1), rng)) for _ in range(n)]


def test_ms_ssim_identity_symmetry_and_noise_monotone():
    a = _phantoms(1)[0]
    rng = np.random.default_rng(0)
    assert M.ms_ssim_3d(a, a) == pytest.approx(1.0, abs=1e-6)
    assert M.ms_ssim_3d(a[..., None], a) == pytest.approx(1.0, abs=1e-6)  # [D, H, W, 1] accepted
    b = a + rng.normal(0, 0.1, a.shape).astype(np.float32)
    c = a + rng.normal(0, 0.5, a.shape).astype(np.float32)
    assert M.ms_ssim_3d(a, b) == pytest.approx(M.ms_ssim_3d(b, a), rel=1e-6)
    assert 1.0 > M.ms_ssim_3d(a, b) > M.ms_ssim_3d(a, c) > 0.0
    noise = [rng.uniform(-1, 1, (32, 32, 32)) for _ in range(2)]
    assert M.ms_ssim_3d(*noise) < 0.2  # independent noise: little shared structure


def test_ms_ssim_takes_signed_volumes_as_intensities_and_ends_on_the_whole_ssim_map():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    u = ndimage.gaussian_filter(0.3 + rng.normal(0, 0.2, (32,) * 3), 1).astype(np.float32)
    v = ndimage.gaussian_filter(-0.3 + rng.normal(0, 0.2, (32,) * 3), 1).astype(np.float32)
    # local means of opposite signs made the luminance term negative, and the pair score 0
    assert M.ms_ssim_3d(u, v) == pytest.approx(M.ms_ssim_3d(u + 1, v + 1, low=0.0), rel=1e-6)
    assert M.ms_ssim_3d(u, v) > 0.5
    a = ndimage.gaussian_filter(rng.uniform(0, 1, (16,) * 3), 1).astype(np.float32)
    b = a.copy()
    b[..., 8:] = ndimage.gaussian_filter(rng.uniform(0.5, 1, (16, 16, 8)), 1)
    blur = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    ma, mb = blur(a), blur(b)  # one scale: SSIM is the mean of luminance x contrast-structure
    cs = (2 * (blur(a * b) - ma * mb) + 0.03 ** 2) / (blur(a * a) - ma ** 2 + blur(b * b) - mb ** 2 + 0.03 ** 2)
    lum = (2 * ma * mb + 0.01 ** 2) / (ma ** 2 + mb ** 2 + 0.01 ** 2)
    assert M.ms_ssim_3d(a, b, data_range=1.0, low=0.0, scales=1) == pytest.approx(np.mean(lum * cs), rel=1e-5)


def test_ms_ssim_scales_adapt_to_volume_size():
    assert M.ms_ssim_scales((16, 16, 16)) == 2
    assert M.ms_ssim_scales((32, 32, 32)) == 3
    assert M.ms_ssim_scales((128,) * 3) == 5
    assert M.ms_ssim_scales((256,) * 3) == 5
    a, b = _phantoms(2, size=16)
    assert 0 < M.ms_ssim_3d(a, b) < 1
    with pytest.raises(ValueError):
        M.ms_ssim_3d(a, b[:8])


def test_ms_ssim_diversity():
    vols = _phantoms(4)
    same = M.ms_ssim_diversity([vols[0]] * 3)
    assert same == pytest.approx(1.0, abs=1e-6)
    d_all = M.ms_ssim_diversity(vols)
    pairs = [M.ms_ssim_3d(vols[i], vols[j]) for i in range(4) for j in range(i + 1, 4)]
    assert d_all == pytest.approx(np.mean(pairs))
    assert d_all < same
    sub = M.ms_ssim_diversity(vols, max_pairs=2, seed=0)  # the mean of 2 of the 6 pairs
    assert min(abs(sub - (p + q) / 2) for i, p in enumerate(pairs) for q in pairs[i + 1:]) < 1e-9
    assert sub == M.ms_ssim_diversity(vols, max_pairs=2, seed=0)
    with pytest.raises(ValueError):
        M.ms_ssim_diversity(vols[:1])
