"""Training-run utilities: checkpoints, metrics, and import/export of upstream PyTorch runs."""
