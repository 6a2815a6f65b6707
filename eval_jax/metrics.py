"""Sample-quality metrics on Inception features, as pure functions (no I/O).

- `frechet_distance`: FID / sFID from feature means and covariances, in float64 with a matrix
  square root taken through symmetric eigendecompositions, so rank-deficient covariances (fewer
  samples than the 2048 feature dimensions) give a finite, correct value instead of the complex
  or NaN results `scipy.linalg.sqrtm` can return.
- `precision_recall`: improved precision / recall (Kynkaanniemi et al. 2019) with k-NN balls
  (k = 3) as the ADM evaluator computes them; distances in JAX, in blocks, in float32 (ADM's
  `DistanceBlock` computes them in float16 unless that overflows, which moves borderline
  points across a ball's edge: expect differences in the third decimal).
- `inception_score`: exp(E KL(p(y|x) || p(y))) averaged over splits, as the ADM evaluator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), unbiased as np.cov."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected features (N >= 2, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD, so
    both roots come from eigendecompositions and stay real for singular covariances."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)


@jax.jit
def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances (Na, Nb), float32, clipped at 0."""
    d = (jnp.sum(a * a, axis=1)[:, None] - 2.0 * (a @ b.T) + jnp.sum(b * b, axis=1)[None, :])
    return jnp.maximum(d, 0.0)


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def knn_radii(features: np.ndarray, k: int = 3, block: int = 4096) -> np.ndarray:
    """Squared distance from each feature to its k-th nearest other feature (N,)."""
    x = jnp.asarray(features, jnp.float32)
    radii = []
    for lo, hi in _blocks(x.shape[0], block):
        d = _squared_distances(x[lo:hi], x)
        radii.append(np.asarray(jnp.sort(d, axis=1)[:, k]))  # column 0 is the point itself
    return np.concatenate(radii)


def _fraction_inside(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                     block: int = 4096) -> float:
    """Fraction of `queries` inside at least one ball (center, radius) (squared distances)."""
    q, c = jnp.asarray(queries, jnp.float32), jnp.asarray(centers, jnp.float32)
    r = jnp.asarray(radii, jnp.float32)
    inside = 0
    for lo, hi in _blocks(q.shape[0], block):
        inside += int(jnp.sum(jnp.any(_squared_distances(q[lo:hi], c) <= r[None, :], axis=1)))
    return inside / q.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: fraction of `fake` inside the real manifold (the union of each real feature's
    k-NN ball); recall: fraction of `real` inside the fake manifold."""
    precision = _fraction_inside(fake, real, knn_radii(real, k))
    recall = _fraction_inside(real, fake, knn_radii(fake, k))
    return precision, recall


def inception_score(logits: np.ndarray, splits_of: int = 5000) -> float:
    """Mean over splits of `splits_of` samples of exp(E_x KL(p(y|x) || p(y)))."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    scores = []
    for lo, hi in _blocks(len(probs), splits_of):
        p = probs[lo:hi]
        marginal = p.mean(axis=0, keepdims=True)
        kl = np.sum(p * (np.log(p + 1e-12) - np.log(marginal + 1e-12)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
