"""Experiment grids to PBS / Slurm jobs: plan from MLflow, submit, resubmit the dead (docs/cluster.md)."""

CRONTAB_ENV = "KD_CRONTAB_FILE"  # a file standing in for the user's crontab (tests, no cron daemon)
