"""Where runs live: `MLFLOW_TRACKING_URI`, default an embedded sqlite file in the working directory."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient

from kd.tracking import tags

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kd"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3 opens an experiment in its GenAI view (traces, prompts) unless told otherwise: the
# query selects the model-training view, the experiment tag makes it the experiment's default.
TRAINING_VIEW = "workflowType=machine_learning"
TRAINING_KIND = "custom_model_development"


def tracking_uri() -> str:
    """The store every part of kd uses; a relative sqlite path is made absolute (jobs change cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks")):
        from kd.spec import SpecError

        raise SpecError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 no longer supports: "
            f"use {DEFAULT_URI} or an MLflow server URL"
        )
    return uri


def get_client() -> MlflowClient:
    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so MLflow's own helpers agree with us
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str = DEFAULT_EXPERIMENT) -> str:
    """Get or create the experiment; with a sqlite store, artifacts go beside the database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={tags.EXPERIMENT_KIND: TRAINING_KIND})
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def runs_url(base: str, exp_id: str) -> str:
    """The experiment's runs table in MLflow's model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}"


def ui_hint(exp_id: str) -> str:
    """How to see the experiment's runs: a server store's URL, else the `mlflow ui` command and
    the URL it will serve them at. Every command that prints a UI link prints this."""
    uri = tracking_uri()
    if uri.startswith(("http:", "https:")):
        return f"MLflow UI: {runs_url(uri, exp_id)}"
    return f"MLflow UI: run `mlflow ui --backend-store-uri '{uri}'`, then open {runs_url(LOCAL_UI, exp_id)}"
