"""Optuna tuning of a method's options: search spaces, study storage, trials as MLflow runs."""
