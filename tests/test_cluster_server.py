"""Server mode: `kd server` (mlflow server on the PostgreSQL of .ci/run, artifacts in a shared
folder) takes 16 trainings logging at once without losing a metric point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from kd.tracking.presentation import SUMMARY_STEP
from kd.tracking.store import PROBE_PATH
from tests.test_cluster import wait_for

POSTGRES = os.environ.get("KD_TEST_POSTGRES_URI")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES, reason="needs the PostgreSQL started by .ci/run (KD_TEST_POSTGRES_URI)"),
]
SUMMARY = {"best_test_acc", "final_test_acc", "best_epoch", "train_time"}
EPOCH_METRICS = {"loss_total", "train_acc", "test_loss", "test_acc", "lr", "epoch_time", "loss_ce"}
TRAININGS = 16
WORKERS = 4  # the server's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def warm(url: str, workers: int) -> None:
    """Each server worker's first API request opens its database (seconds of CPU): a server that has
    been up a while, as one serving a cluster is, has done that before 16 jobs ask it at once."""
    def ask(_: int) -> int:
        with urllib.request.urlopen(url + PROBE_PATH, timeout=120) as response:
            return response.status

    with ThreadPoolExecutor(2 * workers) as pool:
        assert set(pool.map(ask, range(4 * workers))) == {200}


@pytest.mark.slow
def test_sixteen_trainings_log_every_point_through_the_server(tmp_path):
    port, artifacts = free_port(), tmp_path / "shared" / "mlartifacts"
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kd.cli", "server", "--backend-store-uri", POSTGRES,
             "--artifacts-destination", str(artifacts), "--port", str(port), "--workers", str(WORKERS)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: healthy(url) or server.poll() is not None, 180, "mlflow server")
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        warm(url, WORKERS)
        helpers = [" ".join(p.cmdline()) for p in psutil.Process(server.pid).children(recursive=True)]
        assert not [c for c in helpers if "jobs._job_runner" in c or "huey" in c], helpers  # no GenAI job daemons
        experiment = f"server-{uuid.uuid4().hex[:8]}"  # the database outlives this test
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        env.pop("MLFLOW_RUN_ID", None)
        trainings = [subprocess.Popen(
            [sys.executable, "-m", "kd.cli", "train", "--dataset", "digits", "--model", "ResNet8", "--role", "student",
             "--epochs", "2", "--batch-size", "64", "--train-limit", "256", "--seed", str(seed),
             "--experiment", experiment, "--device", "cpu"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for seed in range(TRAININGS)]
        outputs = [t.communicate(timeout=600)[0] for t in trainings]
        assert [t.returncode for t in trainings] == [0] * TRAININGS, "\n".join(o[-1500:] for o in outputs)
        client = MlflowClient(tracking_uri=url)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(runs) == TRAININGS and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            logged = {k for k in run.data.metrics if not k.startswith("system/")}
            assert EPOCH_METRICS <= logged, sorted(logged)
            for key in logged:  # per-epoch points at steps 1 and 2, the summary at step 0, each once
                want = [SUMMARY_STEP] if key in SUMMARY else [1, 2]
                assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == want, key
            assert "best.pth" in {f.path for f in client.list_artifacts(run.info.run_id)}
        assert len(list(artifacts.rglob("best.pth"))) == TRAININGS  # proxied into the shared folder
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert Path(tmp_path / "server.log").read_text().startswith("MLflow server on http://127.0.0.1")
