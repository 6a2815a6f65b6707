"""Evaluation: sample-quality metric math (FID / sFID, precision / recall, IS), pure functions."""

from eval_jax.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall"]
