"""Distances between two sets of features: Fréchet distance (FVD/FID), KVD/KID, precision/recall, IS.

Pure numpy in float64, independent of any network. Features are rows: `[N, D]` arrays.

* Fréchet distance (Heusel et al. 2017; Unterthiner et al. 2018):
      FD = |mu_1 - mu_2|^2 + Tr(Sigma_1) + Tr(Sigma_2) - 2 Tr((Sigma_1^1/2 Sigma_2 Sigma_1^1/2)^1/2)
  computed through symmetric eigendecompositions only (no `scipy.linalg.sqrtm`, whose `disp=` argument
  StyleGAN-V relies on and SciPy 1.18 removes): r = Sigma_1^1/2 from `eigh`, then the eigenvalues of the
  symmetric PSD matrix r Sigma_2 r, clipped at 0, give Tr(...)^1/2 as the sum of their square roots.
  This is exact for rank-deficient covariances (N < D), where sqrtm is ill-conditioned, and the result
  is clamped at 0 (two identical sets give about -1e-13 in floating point).
* KVD / KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, which is sklearn's `polynomial_kernel` with its defaults, as in DIGAN's
  `compute_fvd_kvd.py` (whole set). Optionally averaged over random subsets (KID's protocol).
* Precision/recall (Kynkäänniemi et al. 2019, k-NN manifolds) and the Inception Score.

Every value depends on the number of samples N (FD is biased by about D^2 / 2N for same-distribution
sets), so callers always report N next to the number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Feature statistics.


@dataclass
class FeatureStats:
    """Mean and (unbiased) covariance of a feature set, plus N. Enough for the Fréchet distance."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64, ddof=1 (as VideoGPT/DIGAN's `cov` and pytorch-fid's np.cov)
    num: int  # N, the number of feature rows

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
        mu = x.mean(axis=0)
        xc = x - mu
        sigma = xc.T @ xc / (x.shape[0] - 1)
        return cls(mu=mu, sigma=sigma, num=int(x.shape[0]))


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; negative round-off eigenvalues clipped at 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, clamped at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    # Symmetrise: covariances accumulated in different orders differ by round-off in their asymmetry.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def frechet_distance_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FD between the Gaussians fitted to two feature sets."""
    a, b = FeatureStats.from_features(feats1), FeatureStats.from_features(feats2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------------------------------
# KVD / KID: unbiased MMD^2 with the cubic polynomial kernel.


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / D + 1)^3: sklearn's `polynomial_kernel` defaults (degree 3, gamma 1/D, coef0 1)."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3): diagonal terms of K_xx and K_yy left out.

    It is an unbiased estimate of a non-negative quantity, so it can come out slightly negative."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need [>=2, D] feature sets of equal D, got {x.shape} and {y.shape}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    s_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    s_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(s_xx + s_yy - 2.0 * k_xy.mean())


def kernel_distance(
    x: np.ndarray, y: np.ndarray, num_subsets: int = 0, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KVD/KID. `num_subsets=0`: the MMD^2 of the whole sets (DIGAN's protocol), std 0.
    Otherwise mean and std over `num_subsets` random subsets of `min(subset_size, N)` rows each
    (Bińkowski et al.'s protocol), drawn with a seeded generator."""
    if num_subsets <= 0:
        return mmd2_unbiased(x, y), 0.0
    rng = np.random.Generator(np.random.PCG64(seed))
    size = min(subset_size, len(x), len(y))
    vals = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# ----------------------------------------------------------------------------------------------------
# Precision / recall on k-NN manifolds (Kynkäänniemi et al. 2019).


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake samples inside the real manifold) and recall (real inside fake).

    A manifold is the union of balls around each sample with radius = distance to its k-th nearest
    neighbour (the sample itself excluded)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")

    def radii(x: np.ndarray) -> np.ndarray:
        d = _pairwise_sq_dists(x, x)
        return np.sqrt(np.sort(d, axis=1)[:, k])  # column 0 is the point itself

    def coverage(manifold: np.ndarray, probes: np.ndarray) -> float:
        r = radii(manifold)
        d = np.sqrt(_pairwise_sq_dists(probes, manifold))
        return float((d <= r[None, :]).any(axis=1).mean())

    return coverage(real, fake), coverage(fake, real)


# ----------------------------------------------------------------------------------------------------
# Inception Score from class probabilities (TGAN/TGANv2 protocol for video IS on UCF-101).


def inception_score(probs: np.ndarray, num_splits: int = 10, eps: float = 1e-7) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `num_splits` equal splits.

    eps = 1e-7 inside the logs as in TGANv2's `calc_inception`."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < num_splits:
        raise ValueError(f"probs must be [N >= num_splits={num_splits}, classes], got {p.shape}")
    scores = []
    for part in np.array_split(p, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
