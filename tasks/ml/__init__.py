"""Executors for predictions with machine-learned interatomic potentials."""
