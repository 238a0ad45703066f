"""What a kd process sets up for itself: torch's threads from the CPUs it was given, MLflow's telemetry off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd.cpus import cgroup_quota, cpu_threads

AFFINITY = len(os.sched_getaffinity(0))


def test_threads_are_the_smallest_grant_and_omp_num_threads_wins(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota: 2 threads
    assert cgroup_quota(v2) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1.parent) == 3
    nothing = tmp_path / "none"
    assert cpu_threads({}, nothing) == AFFINITY
    assert cpu_threads({"SLURM_CPUS_PER_TASK": "1"}, nothing) == 1
    assert cpu_threads({"NCPUS": "1", "SLURM_CPUS_PER_TASK": "junk"}, nothing) == 1
    assert cpu_threads({"NCPUS": "999"}, nothing) == AFFINITY  # a grant never exceeds what the process may use
    assert cpu_threads({"OMP_NUM_THREADS": "7", "NCPUS": "1"}, nothing) == 7  # the user's choice wins


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_run_pinned_to_one_cpu_trains_with_one_thread(store: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "NCPUS")}
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "kd.cli", "train", "--dataset", "digits",
                           "--model", "ResNet8", "--epochs", "1", "--batch-size", "64", "--train-limit", "128",
                           "--device", "cpu"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("kd").experiment_id])
    assert run.data.tags["kd.cpu_threads"] == "1"


def mlflow_settings_in_a_job_process(**env: str) -> list[str]:
    quiet = {k: v for k, v in os.environ.items() if k not in (
        "PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")}
    probe = ("import kd.engine.job\nfrom mlflow.telemetry.utils import is_telemetry_disabled\n"
             "from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT as quiet\n"
             "print(is_telemetry_disabled(), quiet.get())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**quiet, **env})
    return done.stdout.split() or [done.stderr]


def test_mlflow_telemetry_and_run_links_are_off_in_a_job_process_unless_the_user_turns_them_on() -> None:
    """MLflow's telemetry thread, offline, deletes an environment variable kd's requests read; its
    "View run" lines broke the progress bar."""
    assert mlflow_settings_in_a_job_process() == ["True", "True"]
    assert mlflow_settings_in_a_job_process(MLFLOW_DISABLE_TELEMETRY="false",
                                      MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="false") == ["False", "False"]
