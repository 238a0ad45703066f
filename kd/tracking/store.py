"""Where runs live: `MLFLOW_TRACKING_URI`, default an embedded sqlite file in the working directory."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from mlflow import MlflowClient

from kd.spec import SpecError

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kd"


def tracking_uri() -> str:
    """The store every part of kd uses; a relative sqlite path is made absolute (jobs change cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks")):
        raise SpecError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 no longer supports: "
            f"use {DEFAULT_URI} or an MLflow server URL"
        )
    return uri


def check_writable() -> None:
    """Refuse at once a sqlite store this process cannot write (MLflow would fail much later, at length).

    The probe takes sqlite's write lock and changes the schema inside a transaction it rolls back, so
    the database and its folder (where sqlite writes its journal) are both tried; a store not created
    yet is tried by a temporary file in its folder. Server stores are not probed.
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    try:
        if path.exists():
            with closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=60)) as db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("CREATE TABLE kd_write_probe (x)")
                db.rollback()
        else:
            tempfile.TemporaryFile(dir=path.parent).close()
    except (OSError, sqlite3.Error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SpecError(f"the MLflow store {path} is not writable ({reason}): make it and its folder writable, "
                        f"or set MLFLOW_TRACKING_URI=sqlite:///PATH to a writable place") from None


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
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def ui_command() -> str:
    """The exact command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri '{tracking_uri()}'"
