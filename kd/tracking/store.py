"""Where runs live: `MLFLOW_TRACKING_URI`, default an embedded sqlite file in the working directory."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient

from kd.errors import SpecError, first_line
from kd.tracking import tags

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kd"
MLFLOW_DEFAULT_EXPERIMENT = "Default"  # where `mlflow run` without --experiment-name puts its run: not kd's home
JOURNAL_ONLY_URI = "journal-only"  # what a journal-only job's MLFLOW_TRACKING_URI says: no store to open
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3 opens an experiment in its GenAI view (traces, prompts) unless told otherwise: the
# query selects the model-training view, the experiment tag makes it the experiment's default.
TRAINING_VIEW = "workflowType=machine_learning"
TRAINING_KIND = "custom_model_development"
# The runs table as a researcher opens it: MLflow loads a view shared under key K from the experiment
# tag `mlflow.sharedViewState.K` (plain JSON: its search facets and column state) when the URL says
# `viewStateShareKey=K`. kd's view: best test accuracy first, then what decides it.
RUNS_VIEW_KEY = "kd-runs"
RUNS_VIEW = {
    "orderByKey": "metrics.`best_test_acc`", "orderByAsc": False,
    "selectedColumns": ["metrics.`best_test_acc`", "metrics.`final_test_acc`", "params.`method`", "params.`alpha`",
                        "params.`seed`", "params.`model`", "params.`teacher`", "attributes.`Models`"],
}
EXPERIMENT_TAGS = {tags.EXPERIMENT_KIND: TRAINING_KIND, tags.SHARED_VIEW + RUNS_VIEW_KEY: json.dumps(RUNS_VIEW)}


def tracking_uri() -> str:
    """The store every part of kd uses; a relative sqlite path is made absolute (jobs change cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri == JOURNAL_ONLY_URI:
        raise SpecError("this job is journal-only (job setting tracking: journal): it never opens the tracking "
                        "store; kd submit ingests its journal")
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:///"):
        raise SpecError(f"MLFLOW_TRACKING_URI={uri} is not a sqlite file (an in-memory store forgets every run when "
                        f"the process ends, before kd sync can ship it): use {DEFAULT_URI} or sqlite:////ABSOLUTE/PATH")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(sqlite_path(uri).resolve())
    if not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks")):
        raise SpecError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 no longer supports: "
            f"use {DEFAULT_URI} or an MLflow server URL"
        )
    try:
        _ = urlparse(uri).port  # a malformed host or port ('http://[::1') would fail deep inside MLflow
    except ValueError as err:
        raise SpecError(f"MLFLOW_TRACKING_URI={uri} is not a valid URL ({err}): fix it, e.g. http://HOST:5000 "
                        f"or {DEFAULT_URI}") from None
    return uri


def sqlite_path(uri: str | None = None) -> Path | None:
    """The database file of a sqlite store (absolute), or None for a server or database store."""
    uri = uri or tracking_uri()
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# MLflow retries an unanswered request for minutes (7 retries, backoff 2): kd retries itself, in the
# journal's sender, so a request gives up in seconds. A user's own setting is kept.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# A store that refuses or does not accept the connection is down: 5 s. One that accepted it is
# there but busy (a server taking 16 jobs' first requests at once): 10 s more for its answer, so a
# hanging API is one line within 15 s.
PROBE_CONNECT_S, PROBE_READ_S = 5.0, 10.0
# The probe asks the API itself (a search reads the server's database), not only /health: a server
# whose database hangs answers /health and then hangs every request of the run.
PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
_reachable: set[str] = set()


class StoreUnreachable(SpecError):
    """The tracking store does not answer: one line naming the URI and what to check."""


def check_reachable(uri: str) -> None:
    """Ask a server store (or a database server) once per process, in seconds, before any data is
    loaded: a store that is down is reported in one line, not after minutes of retries."""
    if uri in _reachable or uri.startswith("sqlite:"):
        return
    parsed = urlparse(uri)
    try:
        if parsed.scheme in ("http", "https"):
            import requests  # mlflow's own HTTP client

            answer = requests.get(uri.rstrip("/") + PROBE_PATH, timeout=(PROBE_CONNECT_S, PROBE_READ_S),
                                  auth=basic_auth(), headers=bearer(), verify=tls_verify())
            if answer.status_code >= 500:  # it answered that it cannot serve (its database is away)
                answer.raise_for_status()
        elif parsed.hostname:
            default_port = {"postgresql": 5432, "mysql": 3306}.get(parsed.scheme.split("+")[0], 5432)
            socket.create_connection((parsed.hostname, parsed.port or default_port), timeout=PROBE_CONNECT_S).close()
    except Exception as err:
        shown = uri.replace(f":{parsed.password}@", ":***@") if parsed.password else uri
        reason = first_line(err, 160) if str(err) else type(err).__name__
        raise StoreUnreachable(
            f"the tracking store {shown} does not answer ({reason}): start it or fix MLFLOW_TRACKING_URI; "
            "jobs can train without it (job setting tracking: journal, docs/cluster.md)") from None
    _reachable.add(uri)


def basic_auth() -> tuple[str, str] | None:
    """MLflow's basic-auth credentials, as its client sends them (a 401 would still be an answer)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def bearer() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def tls_verify() -> bool | str:
    """How MLflow's client checks the server's certificate (its insecure and CA-file settings)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def check_writable() -> None:
    """Refuse at once a sqlite store this process cannot write (MLflow would fail much later, at length).

    The probe takes sqlite's write lock and changes the schema inside a transaction it rolls back, so
    the database and its folder (where sqlite writes its journal) are both tried; a store not created
    yet is tried by a temporary file in its folder. Server stores are not probed.
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = sqlite_path(uri)
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
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    check_reachable(uri)
    db = sqlite_path(uri)
    if db is not None and uri not in _reachable:
        open_sqlite(uri, db)
        _reachable.add(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_sqlite(uri: str, db: Path) -> None:
    """A sqlite store made whole before MLflow opens it: a missing one is created atomically; one an
    interrupted creation left half-made (it holds no run) is set aside and created again. An existing
    store is only read here, so a read-only one can be looked at (no lock file beside it)."""
    if db.exists() and not half_made(db):
        return
    # MLflow creates (migrates) a store's tables when a client first opens it; two processes doing it
    # at once break the migrations (N identical commands on a fresh store): one at a time.
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait_while_created_elsewhere(db)
        if db.exists() and half_made(db):
            aside = db.with_name(f"{db.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            print(f"kd: the MLflow store {db} was left half-made by an interrupted first command (it held no run): "
                  f"moved to {aside.name}, created again", file=sys.stderr, flush=True)
        if not db.exists():
            create_sqlite(db)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # its first open writes the default experiment
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)


CREATION_QUIET_S = 20.0  # a half-made store unchanged this long is an interrupted creation


def wait_while_created_elsewhere(db: Path, limit_s: float = 180.0) -> None:
    """MLflow itself (an `mlflow ui`, a plain client) creates a store in place, outside our lock: a
    half-made store still being written is waited for, never moved from under its creator."""
    deadline = time.monotonic() + limit_s
    while db.exists() and half_made(db) and time.time() - db.stat().st_mtime < CREATION_QUIET_S \
            and time.monotonic() < deadline:
        time.sleep(0.5)


def create_sqlite(db: Path) -> None:
    """Build the store's tables in a file beside it, then rename it into place: a kill at any moment
    leaves either no store or a whole one (the next command builds it again)."""
    import sqlalchemy  # MLflow's own database layer: only when a store is created
    from mlflow.store.db.utils import _initialize_tables

    building = db.with_name(db.name + ".creating")
    building.unlink(missing_ok=True)  # a build a kill interrupted: we hold the init lock
    engine = sqlalchemy.create_engine(f"sqlite:///{building}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(building, db)


def half_made(db: Path) -> bool:
    """A store whose creation was interrupted: no run and its schema short of MLflow's (older kd
    created stores in place). A store with runs is never touched here."""
    from mlflow.store.db.utils import _get_latest_schema_revision  # alembic: only for this check

    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" in tables and con.execute("SELECT 1 FROM runs LIMIT 1").fetchone():
                return False
            revision = con.execute("SELECT version_num FROM alembic_version").fetchone() \
                if "alembic_version" in tables else None
    except sqlite3.DatabaseError:  # not a database at all: MLflow says so when it opens it
        return False
    return revision is None or revision[0] != _get_latest_schema_revision()


def experiment_id(client: MlflowClient, name: str = DEFAULT_EXPERIMENT) -> str:
    """Get or create the experiment; with a sqlite store, artifacts go beside the database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before kd set them (or by hand)
            if key not in found.tags:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        location = (sqlite_path(uri).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags=EXPERIMENT_TAGS)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def runs_url(base: str, exp_id: str) -> str:
    """The experiment's runs table in MLflow's model-training view, with kd's columns and order."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}&viewStateShareKey={RUNS_VIEW_KEY}"


def ui_hint(exp_id: str) -> str:
    """How to see the experiment's runs: a server store's URL, else the `mlflow ui` command and
    the URL it will serve them at. Every command that prints a UI link prints this."""
    uri = tracking_uri()
    if uri.startswith(("http:", "https:")):
        return f"MLflow UI: {runs_url(uri, exp_id)}"
    return f"MLflow UI: run `mlflow ui --backend-store-uri '{uri}'`, then open {runs_url(LOCAL_UI, exp_id)}"
