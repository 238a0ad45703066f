"""Experiment grids to PBS / Slurm jobs: plan from MLflow, submit, resubmit the dead (docs/cluster.md)."""
