"""The distance maths against scipy, closed forms and brute force (no network involved)."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import special_ortho_group

from digan.metrics.distances import (FeatureStats, frechet_distance, frechet_distance_from_features,
                                     inception_score, kernel_distance, mmd2_unbiased, polynomial_kernel,
                                     precision_recall)


def _rng(seed=0):
    return np.random.Generator(np.random.PCG64(seed))


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_diagonal_closed_form():
    rng = _rng(1)
    a, b = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("d", [8, 400])
def test_fd_matches_scipy_sqrtm_full_rank(d):
    rng = _rng(d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_rank_deficient_covariances():
    # n = 16 samples in d = 400 (a small FVD run): both covariances have rank 15.
    rng = _rng(2)
    x, y = rng.standard_normal((16, 400)), rng.standard_normal((16, 400)) + 0.3
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    ref = _fd_scipy(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert np.linalg.matrix_rank(a.sigma) == 15


def test_fd_rotation_invariant_and_symmetric():
    rng = _rng(3)
    d = 32
    s1, s2 = _spd(rng, d), _spd(rng, d, rank=5)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    q = special_ortho_group.rvs(d, random_state=4)
    base = frechet_distance(mu1, s1, mu2, s2)
    rotated = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(base, rel=1e-9)
    # s2 has rank 5: sqrt of its round-off eigenvalues (~1e-16) adds ~1e-8 each when it goes first.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-7)


def test_fd_identical_sets_is_zero_and_clamped():
    rng = _rng(5)
    x = rng.standard_normal((50, 200))  # rank-deficient: round-off would give a tiny negative number
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_from_features(x, x) >= 0.0


def test_fd_of_gaussians_closed_form_scalar():
    # 1-D: FD(N(m1, v1), N(m2, v2)) = (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == \
        pytest.approx(9.0 + 1.0)


def test_feature_stats_match_numpy_cov():
    x = _rng(6).standard_normal((30, 7))
    st = FeatureStats.from_features(x)
    np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(st.mu, x.mean(0))
    assert st.num == 30
    with pytest.raises(ValueError):
        FeatureStats.from_features(x[:1])


def test_kvd_matches_naive_double_loop():
    rng = _rng(7)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((7, 5)) + 0.5
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
    assert mmd2_unbiased(y, x) == pytest.approx(mmd2_unbiased(x, y), rel=1e-12)
    assert kernel_distance(x, y)[0] == mmd2_unbiased(x, y)


def test_polynomial_kernel_is_sklearns_default():
    # sklearn.metrics.pairwise.polynomial_kernel(X, Y) = (gamma <x, y> + coef0)^degree, gamma 1/D, 1, 3.
    x, y = _rng(8).standard_normal((3, 4)), _rng(9).standard_normal((2, 4))
    np.testing.assert_allclose(polynomial_kernel(x, y), (x @ y.T * 0.25 + 1.0) ** 3)


def test_kvd_unbiased_for_same_distribution():
    rng = _rng(10)
    vals = [mmd2_unbiased(rng.standard_normal((40, 16)), rng.standard_normal((40, 16))) for _ in range(200)]
    mean, sem = np.mean(vals), np.std(vals) / np.sqrt(len(vals))
    assert abs(mean) < 4 * sem  # unbiased: zero mean, single draws can be negative
    assert min(vals) < 0
    shifted = mmd2_unbiased(rng.standard_normal((40, 16)), rng.standard_normal((40, 16)) + 1.0)
    assert shifted > max(vals)


def test_kvd_subsets():
    rng = _rng(11)
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((60, 8)) + 0.5
    mean, std = kernel_distance(x, y, num_subsets=10, subset_size=30, seed=0)
    assert std > 0 and mean > 0
    assert kernel_distance(x, y, num_subsets=10, subset_size=30, seed=0) == (mean, std)  # seeded
    # Subsets as large as the sets: every subset is a permutation, so every draw equals the full value.
    full = mmd2_unbiased(x, y)
    m, s = kernel_distance(x, y, num_subsets=3, subset_size=1000)
    assert m == pytest.approx(full, rel=1e-10) and s == pytest.approx(0.0, abs=1e-10)


def test_precision_recall_brute_force():
    rng = _rng(12)
    real, fake = rng.standard_normal((25, 3)), rng.standard_normal((20, 3)) * 1.5 + 0.5
    k = 3

    def brute(manifold, probes):
        radii = []
        for i, p in enumerate(manifold):
            d = sorted(np.linalg.norm(p - q) for j, q in enumerate(manifold) if j != i)
            radii.append(d[k - 1])
        return np.mean([any(np.linalg.norm(q - m) <= r for m, r in zip(manifold, radii)) for q in probes])

    p, r = precision_recall(real, fake, k=k)
    assert p == pytest.approx(brute(real, fake), abs=1e-12)
    assert r == pytest.approx(brute(fake, real), abs=1e-12)
    assert precision_recall(real, real, k=k) == (1.0, 1.0)


def test_inception_score_closed_forms():
    # Confident and uniformly spread over C classes: IS = C. All predictions identical: IS = 1.
    c = 10
    one_hot = np.eye(c)[np.arange(200) % c]
    assert inception_score(one_hot, num_splits=1)[0] == pytest.approx(c, rel=1e-5)  # eps=1e-7 in the logs
    same = np.tile(_rng(13).dirichlet(np.ones(c)), (100, 1))
    assert inception_score(same, num_splits=5)[0] == pytest.approx(1.0, abs=1e-6)
    mean, std = inception_score(one_hot, num_splits=10)
    assert mean == pytest.approx(c, rel=1e-5) and std == pytest.approx(0.0, abs=1e-9)
