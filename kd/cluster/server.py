"""`kd server`: the MLflow tracking server for many jobs, on PostgreSQL with shared artifacts.

One sqlite file cannot take many writers on a shared filesystem; PostgreSQL behind `mlflow
server` can. Binding to anything but loopback without MLflow's basic-auth app would hand every
cluster user write access to the runs and the teacher registry, so that is refused
(docs/cluster.md has the login-node recipe: bind 127.0.0.1 and tunnel, or basic-auth).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kd.errors import SpecError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow's server starts a job runner and a pool of huey consumers for its GenAI jobs (scorers,
# trace roll-ups) by default; kd's runs need none of them, and a login node is spared the daemons.
SERVER_SETTINGS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_argv(backend_store_uri: str, artifacts_destination: str, *, host: str = "127.0.0.1",
                port: int = 5000, workers: int = 4, app_name: str | None = None) -> list[str]:
    if host not in LOOPBACK and app_name != "basic-auth":
        raise SpecError(f"refusing to serve MLflow on {host} without authentication: bind 127.0.0.1 and "
                        f"tunnel (ssh -L {port}:127.0.0.1:{port} LOGIN-NODE), or add --app-name basic-auth")
    if not backend_store_uri.startswith(("postgresql", "mysql", "sqlite:")):
        raise SpecError(f"--backend-store-uri {backend_store_uri}: use a database URI "
                        f"(postgresql://USER:PASSWORD@HOST:5432/DB)")
    destination = artifacts_destination
    if "://" not in destination:
        destination = str(Path(destination).expanduser().absolute())
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", destination, "--host", host, "--port", str(port),
            "--workers", str(workers)]
    return argv + (["--app-name", app_name] if app_name else [])
