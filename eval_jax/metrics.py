"""Sample-quality metrics on Inception features, as pure functions (no I/O).

- `frechet_distance`: FID / sFID from feature means and covariances, in float64 with a matrix
  square root taken through symmetric eigendecompositions, so rank-deficient covariances (fewer
  samples than the 2048 feature dimensions) give a finite, correct value instead of the complex
  or NaN results `scipy.linalg.sqrtm` can return.
- `precision_recall`: improved precision / recall (Kynkaanniemi et al. 2019) with k-NN balls
  (k = 3) as the ADM evaluator computes them, in its 10,000 x 10,000 blocks. By default the
  squared distances are in float16 as in ADM's TensorFlow graph: features, squares, products
  and each elementwise step rounded to float16, a block redone in float32 where float16
  overflows. Two sums accumulate in float32 here: the matmul's (as cuBLAS does for TF's float16
  matmul on a GPU) and the squared norms'. ADM's TensorFlow sums the norms in float16, in the
  order of its reduction kernel (CUB's on a GPU, Eigen's on a CPU), which is not reproduced.
  Rounding moves borderline points across a ball's edge: float32 distances
  (`distances='float32'`) change precision and recall in the third decimal, and so does
  float16 accumulation (README, "Evaluation").
- `inception_score`: exp(E KL(p(y|x) || p(y))) averaged over splits, as the ADM evaluator.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ADM_BLOCK = 10000  # ADM's ManifoldEstimator row and column batch sizes


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


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _round_to_float16(x: jax.Array) -> jax.Array:
    """The float16 value nearest to float32 `x` (ties to even, overflow to inf), kept in float32.

    `reduce_precision` flushes float16's subnormals (|x| < 2^-14) to zero; those are rounded
    to multiples of 2^-24 here, so every value matches a cast to float16 (tested against
    numpy). An explicit op, unlike a cast pair that XLA may skip as excess precision."""
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    subnormal = jnp.round(x * 2.0**24) * 2.0**-24
    return jnp.where(jnp.abs(x) < 2.0**-14, subnormal, normal)


class _Rows(NamedTuple):
    """Features (N, D) float32 with their squared norms (N,): float32, and float16 (squares of
    the float16 features, rounded, summed in float32, rounded). Summed once here, not in every
    block: the same values."""

    x: jax.Array
    norms: jax.Array
    norms16: jax.Array


@jax.jit
def _squared_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x16 = _round_to_float16(x)
    return (jnp.sum(x * x, axis=1),
            _round_to_float16(jnp.sum(_round_to_float16(x16 * x16), axis=1)))


def _rows(features: np.ndarray) -> _Rows:
    x = jnp.asarray(features, jnp.float32)
    return _Rows(x, *_squared_norms(x))


def _slice(rows: _Rows, lo: int, hi: int) -> _Rows:
    return _Rows(*(a[lo:hi] for a in rows))


def _distances_float32(u: _Rows, v: _Rows) -> jax.Array:
    """Squared distances (Nu, Nv) as ADM's `_batch_pairwise_distances` in float32.

    The norms come in as arguments: summed in the same program as the matmul, XLA:CPU fuses
    all of it into one kernel that runs 5x slower than the matmul alone."""
    mm = jnp.matmul(u.x, v.x.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum((u.norms[:, None] - 2.0 * mm) + v.norms[None, :], 0.0)


def _distances_float16(u: _Rows, v: _Rows) -> jax.Array:
    """The same formula with every value rounded to float16, as in ADM's TensorFlow graph:
    float16 features, products and elementwise steps; the matmul accumulates in float32 (and
    the norms, see the module docstring). Non-finite where float16 overflows; not yet clipped
    at 0."""
    u16, v16 = _round_to_float16(u.x), _round_to_float16(v.x)
    mm = _round_to_float16(jnp.matmul(u16, v16.T, precision=jax.lax.Precision.HIGHEST))
    d = _round_to_float16(u.norms16[:, None] - _round_to_float16(2.0 * mm))
    return _round_to_float16(d + v.norms16[None, :])


@functools.partial(jax.jit, static_argnames="float16")
def _distance_block(u: _Rows, v: _Rows, *, float16: bool) -> jax.Array:
    """One of ADM's `DistanceBlock` results (Nu, Nv): the float16 distances if all of this
    block's are finite, else the float32 ones (ADM's `tf.cond`), clipped at 0."""
    if not float16:
        return _distances_float32(u, v)
    d16 = _distances_float16(u, v)
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: jnp.maximum(d16, 0.0),
                        lambda: _distances_float32(u, v))


@functools.partial(jax.jit, static_argnames=("count", "float16"))
def _smallest_distances(u: _Rows, v: _Rows, *, count: int, float16: bool) -> jax.Array:
    """The `count` smallest distances from each row of u to the rows of v (Nu, count),
    ascending; inf-padded where v has fewer rows."""
    d = _distance_block(u, v, float16=float16)
    if d.shape[1] < count:
        d = jnp.pad(d, ((0, 0), (0, count - d.shape[1])), constant_values=jnp.inf)
    return -jax.lax.top_k(-d, count)[0]


@functools.partial(jax.jit, static_argnames="float16")
def _inside_block(real: _Rows, fake: _Rows, real_radii, fake_radii, *, float16: bool):
    """(real points inside some fake ball (Nr,), fake points inside some real ball (Nf,)) for
    one block, from one distance block with the real features as rows, as ADM's
    `less_thans` (its distances are not symmetric in float16)."""
    d = _distance_block(real, fake, float16=float16)
    return (jnp.any(d <= fake_radii[None, :], axis=1),
            jnp.any(d <= real_radii[:, None], axis=0))


def _check_distances(distances: str) -> bool:
    if distances not in ("float16", "float32"):
        raise ValueError(f"distances must be 'float16' or 'float32', got {distances!r}")
    return distances == "float16"


def _feature_rows(features: np.ndarray, k: int) -> _Rows:
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] <= k:
        raise ValueError(f"k = {k} nearest neighbours need features (N > {k}, D), got "
                         f"shape {shape}")
    return _rows(features)


def _radii(x: _Rows, k: int, float16: bool, block: int) -> jax.Array:
    n = len(x.x)
    radii = []
    for lo, hi in _blocks(n, block):
        # The k + 1 smallest of a row are among the k + 1 smallest of each column block.
        nearest = jnp.concatenate([
            _smallest_distances(_slice(x, lo, hi), _slice(x, c_lo, c_hi), count=k + 1,
                                float16=float16)
            for c_lo, c_hi in _blocks(n, block)], axis=1)
        radii.append(jnp.sort(nearest, axis=1)[:, k])
    return jnp.concatenate(radii)


def knn_radii(features: np.ndarray, k: int = 3, *, distances: str = "float16",
              block: int = ADM_BLOCK) -> np.ndarray:
    """Squared distance from each feature (N, D) to its k-th nearest other feature (N,): the
    (k + 1)-th smallest in its row of distances, which holds its own (about 0), as ADM's
    `manifold_radii` (row and column blocks of `block`)."""
    float16 = _check_distances(distances)
    return np.asarray(_radii(_feature_rows(features, k), k, float16, block))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, *,
                     distances: str = "float16", block: int = ADM_BLOCK) -> tuple[float, float]:
    """Precision: fraction of `fake` (Nf, D) inside the real manifold (the union of each real
    feature's k-NN ball); recall: fraction of `real` (Nr, D) inside the fake manifold.

    `distances='float16'` rounds them to float16 as the ADM evaluator does (see the module
    docstring), in ADM's `block` x `block` blocks, each falling back to float32 where float16
    overflows; 'float32' computes them all in float32."""
    float16 = _check_distances(distances)
    # each side on the device once, with its norms, for its radii and the memberships
    r, f = _feature_rows(real, k), _feature_rows(fake, k)
    real_radii, fake_radii = _radii(r, k, float16, block), _radii(f, k, float16, block)
    real_inside = np.zeros(len(r.x), bool)
    fake_inside = np.zeros(len(f.x), bool)
    for lo, hi in _blocks(len(r.x), block):
        for c_lo, c_hi in _blocks(len(f.x), block):
            r_in, f_in = _inside_block(_slice(r, lo, hi), _slice(f, c_lo, c_hi),
                                       real_radii[lo:hi], fake_radii[c_lo:c_hi],
                                       float16=float16)
            real_inside[lo:hi] |= np.asarray(r_in)
            fake_inside[c_lo:c_hi] |= np.asarray(f_in)
    return float(fake_inside.mean()), float(real_inside.mean())


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
