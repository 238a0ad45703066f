"""Shared fixtures: a fresh sqlite MLflow store per test, and the `kd` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# pytest-xdist runs one worker per core: each computes with one thread, and so do the kd processes
# it starts (kd takes OMP_NUM_THREADS as the user's choice). Two workers at the cores' default of
# two threads each oversubscribe them: three ResNet-20 trainings at once took 333 s, not 58 s.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from kd.spec import RunOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A temporary tracking store, set as MLFLOW_TRACKING_URI for this process and its children."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # `mlflow run` and job scripts call `python` / `kd`: make them this interpreter's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return uri


def run_kd(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
           wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`kd ARGS` as a user runs it (a new process, started by `wrapper` if given), capturing its output."""
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "kd.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


CPU = RunOptions(device="cpu")  # what the in-process trainings of the tests run with

DIGITS_FAST = ("--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--device", "cpu")


def mlflow_run(entry_point: str, **params: object) -> subprocess.CompletedProcess:
    """`mlflow run . -e ENTRY -P k=v ...` with the local environment, into the experiment `kd`."""
    pairs = [arg for k, v in params.items() for arg in ("-P", f"{k}={v}")]
    return subprocess.run(
        ["mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local", "--experiment-name", "kd", *pairs],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )


def registered_teacher(name: str, seed: int = 0) -> ModelVersion:
    """The newest registered version of teacher model `name` (e.g. digits-ResNet8) for `seed`, of
    whatever recipe (alias `seed0` is the default recipe's only: tests train shorter ones)."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.seed = '{seed}'")
    assert found, f"no registered teacher {name} for seed {seed}"
    return max(found, key=lambda v: int(v.version))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (marked slow, and the Slurm group): two xdist workers then finish
    together instead of one waiting on the other's last long test."""
    def late(item: pytest.Item) -> bool:
        group = item.get_closest_marker("xdist_group")
        return item.get_closest_marker("slow") is None and not (group and group.args == ("slurm",))

    items.sort(key=late)
