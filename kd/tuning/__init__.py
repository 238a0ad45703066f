"""Optuna tuning of a method's options: search spaces, study storage, trials as MLflow runs."""

SAMPLERS = ("tpe", "random")  # what `kd tune --sampler` offers and kd.tuning.study builds
PRUNERS = ("median", "hyperband", "none")
