"""Evaluation: sample-quality metric math (FID / sFID, precision / recall, IS), pure functions,
and the FID Inception-v3 network that computes their features (`eval_jax.inception`; weights via
`eval_jax.inception_convert`)."""

from eval_jax.inception import InceptionV3
from eval_jax.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "InceptionV3",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
]
