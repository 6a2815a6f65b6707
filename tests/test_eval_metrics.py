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
