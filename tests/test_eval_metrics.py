"""FID / precision-recall / IS math against closed forms and hand-checkable cases."""

import numpy as np
import pytest

from eval_jax.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)


def test_identical_sets_give_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_two_gaussians_give_the_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    s1 = a @ a.T + np.eye(6)
    b = rng.normal(size=(6, 6))
    s2 = b @ b.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    from scipy.linalg import sqrtm

    want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(sqrtm(s1 @ s2).real))
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-10)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 per dimension
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    np.testing.assert_allclose(frechet_distance(np.zeros(3), np.diag(d1), np.ones(3),
                                                np.diag(d2)),
                               3 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2), rtol=1e-12)


def test_rank_deficient_covariances_are_finite_and_right():
    """Fewer samples than dimensions (as 50 images of 2048-d features): singular covariances."""
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0][:, :5]  # a 5-d subspace of R^64
    x = rng.normal(size=(20, 5)) @ basis.T
    mu, sigma = feature_statistics(x)
    assert np.linalg.matrix_rank(sigma) <= 5
    value = frechet_distance(mu, sigma, mu + 1.0, sigma)  # a pure shift: exactly ||shift||^2
    np.testing.assert_allclose(value, 64.0, rtol=1e-8)
    y = rng.normal(size=(20, 5)) @ basis.T
    other = frechet_distance(mu, sigma, *feature_statistics(y))
    assert np.isfinite(other) and other > 0


def test_statistics_shape_errors():
    with pytest.raises(ValueError, match="statistics differ in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"expected features \(N >= 2, D\)"):
        feature_statistics(np.zeros((1, 3)))


def test_precision_recall_hand_checkable():
    # real: 4 points on a line, 1 apart: each 3-NN radius (squared) reaches 2 or 3 units away
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    np.testing.assert_allclose(knn_radii(real, k=3), [9.0, 4.0, 4.0, 9.0])
    fake = np.array([[1.5], [100.0]])  # one inside the real manifold, one far away
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 0.5
    # fake's 1-NN radius is 98.5^2 for both points: the balls cover every real point
    assert recall == 1.0
    same_p, same_r = precision_recall(real, real, k=1)
    assert same_p == same_r == 1.0


def test_inception_score_bounds():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform) == pytest.approx(1.0)
    perfect = np.full((100, 10), -1e4)
    perfect[np.arange(100), np.arange(100) % 10] = 1e4  # confident and balanced
    assert inception_score(perfect) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(perfect, splits_of=50) == pytest.approx(10.0, rel=1e-6)


# --- ADM's float16 distances, against a numpy port of its DistanceBlock / ManifoldEstimator ---

def _adm_distances(u, v):
    """ADM's `DistanceBlock` in numpy: numpy's float16 arithmetic rounds every step, as the
    TensorFlow graph does on a GPU; row sums and the matmul accumulate in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
        norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d16 = (norm_u[:, None] - np.float16(2) * mm) + norm_v[None, :]
    if np.all(np.isfinite(d16)):
        return np.maximum(d16, np.float16(0)).astype(np.float32)
    u, v = u.astype(np.float64), v.astype(np.float64)
    d = (np.square(u).sum(1)[:, None] - 2 * u @ v.T) + np.square(v).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32)


def _adm_precision_recall(real, fake, k, block):
    """ADM's `compute_prec_recall`: radii from row x column blocks, then `evaluate_pr`."""
    def radii(x):
        rows = [np.concatenate([_adm_distances(x[i:i + block], x[j:j + block])
                                for j in range(0, len(x), block)], axis=1)
                for i in range(0, len(x), block)]
        return np.concatenate([np.partition(r, k, axis=1)[:, k] for r in rows])

    real_radii, fake_radii = radii(real), radii(fake)
    real_in, fake_in = np.zeros(len(real), bool), np.zeros(len(fake), bool)
    for i in range(0, len(real), block):
        for j in range(0, len(fake), block):
            d = _adm_distances(real[i:i + block], fake[j:j + block])
            real_in[i:i + block] |= np.any(d <= fake_radii[None, j:j + block], axis=1)
            fake_in[j:j + block] |= np.any(d <= real_radii[i:i + block, None], axis=0)
    return fake_in.mean(), real_in.mean()


def _grid_features(seed, n, d=64):
    """Multiples of 1/8 or, in random rows, 1/64 below 8: every float32 sum is exact (at most
    18 significant bits, so the order of summation cannot matter), while float16 rounds the
    squares, norms, dot products and the steps between rows of different norms."""
    rng = np.random.default_rng(seed)
    scale = rng.choice(np.float32([1 / 8, 1 / 64]), (n, 1))
    return rng.integers(0, 64, (n, d)).astype(np.float32) * scale


def test_float16_rounding_equals_numpy_casts():
    from eval_jax.metrics import _round_to_float16

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * scale
                        for scale in (1e-7, 1e-5, 1e-3, 1.0, 1e3, 5e4, 1e5)])
    ties = np.float32([2049, 2051, 65504, 65519.99, 65520, 2**-25, 1.5 * 2**-24, 2.5 * 2**-24])
    x = np.concatenate([x, ties, -ties])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = np.asarray(_round_to_float16(x))
    np.testing.assert_array_equal(got, want)  # includes infinities and signed zeros' values
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def _block(u, v, float16):
    from eval_jax.metrics import _distance_block, _rows

    return np.asarray(_distance_block(_rows(u), _rows(v), float16=float16))


def test_float16_distances_equal_adm_distance_block():
    u, v = _grid_features(0, 40), _grid_features(1, 30)
    want = _adm_distances(u, v)
    np.testing.assert_array_equal(_block(u, v, True), want)
    f32 = _block(u, v, False)
    assert np.mean(f32 != want) > 0.3  # float16 rounds most of them
    np.testing.assert_allclose(f32, want, rtol=2e-3, atol=4)  # a few float16 steps at ~2000
    # features that float16 rounds; with 2 dimensions each float32 sum is one rounding, so the
    # order of summation cannot matter either
    x, y = np.random.default_rng(2).normal(size=(2, 50, 2)).astype(np.float32) * 3
    np.testing.assert_array_equal(_block(x, y, True), _adm_distances(x, y))
    # one overflowing row (norm > 65504) sends the whole block to float32
    big = np.concatenate([u, np.full((1, 64), 40.0, np.float32)])
    fallback = _block(big, v, True)
    assert np.all(np.isfinite(fallback))
    np.testing.assert_allclose(fallback, _block(big, v, False))


@pytest.mark.parametrize("block", [10000, 16])
def test_float16_precision_recall_equal_adm(block):
    """Equal to the numpy port of ADM, and not to float32 distances on these features. With
    an overflowing feature and blocks of 16, only the blocks holding it fall back to float32."""
    real, fake = _grid_features(6, 48), _grid_features(7, 40)
    want = _adm_precision_recall(real, fake, k=3, block=block)
    assert precision_recall(real, fake, k=3, block=block) == want
    assert precision_recall(real, fake, k=3, distances="float32", block=block) != want
    np.testing.assert_array_equal(
        knn_radii(fake, 3, block=block),
        np.partition(_adm_distances(fake, fake), 3, axis=1)[:, 3])
    real[5] = 40.0  # its squared norm overflows float16
    assert (precision_recall(real, fake, k=3, block=block)
            == _adm_precision_recall(real, fake, k=3, block=block))


def test_memberships_use_adm_distances_with_real_features_as_rows():
    """In float16, D(real, fake) is not D(fake, real): ADM's `less_thans` takes the first."""
    from eval_jax.metrics import _inside_block, _rows

    real, fake = _grid_features(6, 48), _grid_features(7, 40)
    d, d_swapped = _adm_distances(real, fake), _adm_distances(fake, real).T
    i, j = np.argwhere(d < d_swapped)[0]
    r, f = _rows(real[i:i + 1]), _rows(fake[j:j + 1])
    real_in, fake_in = _inside_block(r, f, np.float32([-1]), d[i:i + 1, j], float16=True)
    assert (bool(real_in[0]), bool(fake_in[0])) == (True, False)  # exactly on the ball's edge
    real_in, fake_in = _inside_block(r, f, d[i:i + 1, j], np.float32([-1]), float16=True)
    assert (bool(real_in[0]), bool(fake_in[0])) == (False, True)


def test_knn_radii_need_more_than_k_features():
    with pytest.raises(ValueError, match=r"k = 3 nearest neighbours need features \(N > 3"):
        knn_radii(np.zeros((3, 2)), 3)
    with pytest.raises(ValueError, match="distances must be 'float16' or 'float32'"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), distances="bfloat16")
