"""What a researcher sees of a run in MLflow: its description, summary metrics, datasets, provenance.

Each writer is `fn(client, run_id, <JSON-serializable args>)`, so that a job can record the call
and replay it later against the store; the rest are pure functions that compute those arguments.
"""

from __future__ import annotations

import getpass
import shlex
import socket
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, RunTag
from mlflow.exceptions import MlflowException

from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.store import TRAINING_VIEW

# Summary metrics hold one value per run. MLflow's charts draw a metric whose every run has a
# single point as a bar per run (a comparison across runs); at step = last epoch a run's value
# was a lone dot at x = 15 on the epoch axis. Step 0 keeps them off the epoch axis and is the
# step `log_model` links to the logged model.
SUMMARY_STEP = 0
DATASET_CONTEXT = "mlflow.data.context"


def summary_values(history: dict[str, list[float]]) -> dict[str, float]:
    """A finished run's summary metrics from its per-epoch history (the best epoch is the first
    with the best test accuracy, the one best.pth holds)."""
    acc = history["test_acc"]
    best = max(range(len(acc)), key=lambda i: (acc[i], -i))
    return {"best_test_acc": acc[best], "final_test_acc": acc[-1], "best_epoch": best + 1,
            "train_time": sum(history.get("epoch_time", []))}


def log_dataset_inputs(client: MlflowClient, run_id: str, inputs: list[dict[str, Any]]) -> None:
    """The splits (from `kd.data.inputs.dataset_inputs`) as the run's MLflow dataset inputs."""
    client.log_inputs(run_id, [
        DatasetInput(Dataset(i["name"], i["digest"], i["source_type"], i["source"], i["schema"], i["profile"]),
                     [InputTag(DATASET_CONTEXT, i["context"])])
        for i in inputs
    ])


@cache
def git_commit() -> str | None:
    """The commit of kd's source checkout, if it is one (MLflow's Version column)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpu_facts(device: torch.device) -> dict[str, str]:
    """GPU model and driver of a CUDA device; "none" on the CPU."""
    if device.type != "cuda":
        return {T.GPU: "none", T.GPU_DRIVER: "none"}
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                               str(device.index or 0)], capture_output=True, text=True, timeout=10)
        driver = done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {T.GPU: torch.cuda.get_device_name(device), T.GPU_DRIVER: driver}


def provenance_tags(device: torch.device) -> dict[str, str]:
    """Where and with what a run computed: MLflow's source, version and user columns, kd's version
    and command line, the GPU, the driver, torch / CUDA / cuDNN (precision and cuDNN determinism
    are tagged with the step mode)."""
    program = Path(sys.argv[0]).name or "python"
    tags = {
        T.SOURCE_NAME: program,
        T.SOURCE_TYPE: "LOCAL",
        T.USER: getpass.getuser(),
        T.VERSION: metadata.version("kd"),
        T.COMMAND: shlex.join([program, *sys.argv[1:]]),
        T.HOST: socket.gethostname(),
        T.TORCH: torch.__version__,
        T.CUDA: torch.version.cuda or "none",
        T.CUDNN: str(torch.backends.cudnn.version() or "none"),
        **gpu_facts(device),
    }
    commit = git_commit()
    if commit:
        tags[T.GIT_COMMIT] = commit
    return tags


def run_link(client: MlflowClient, run_id: str) -> str:
    """A markdown link to a run's page (relative: it works on any host serving the UI), in the
    model-training view (MLflow 3.17 takes a page's view from its URL, else the browser's last choice)."""
    run = client.get_run(run_id)
    return f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run_id}?{TRAINING_VIEW})"


def point_to_spec_run(client: MlflowClient, launcher: str, run_id: str) -> None:
    """The run `mlflow run` made in MLflow's Default experiment says where its spec's run is (kd's
    experiment): it has no `kd.key`, so no query counts it, and its description links the run."""
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    note = f"Launched by `mlflow run`: kd trains this spec in {run_link(client, run_id)} of experiment '{experiment}'."
    client.log_batch(launcher, tags=[RunTag(T.RESUMED_IN, run_id), RunTag(T.NOTE, note)])


def version_link(name: str, version: str) -> str:
    return f"[{name} v{version}](#/models/{name}/versions/{version}?{TRAINING_VIEW})"


def teacher_version(client: MlflowClient, run_id: str) -> tuple[str, str] | None:
    """(registered name, version) of a teacher run's newest model version, if it has one."""
    try:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:
        return None
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return newest.name, newest.version


def recipe(spec: RunSpec) -> str:
    """The run's recipe in one line (the spec's values, as the flags spell them)."""
    if spec.role == "teacher":
        what = f"Teacher {spec.model}"
    elif spec.method == "pure":
        what = f"Student {spec.model} without distillation"
    else:
        options = "".join(f", {k}={v}" for k, v in spec.options.items())
        source = spec.teacher or "the given weights"
        what = (f"Student {spec.model} distilled from {source} with `{spec.method}` "
                f"(alpha={spec.params()['alpha']}, temperature={spec.temperature:g}{options})")
    schedule = spec.schedule + (f" at {','.join(map(str, spec.milestones))}" if spec.milestones else "")
    return (f"{what} on {spec.dataset}, seed {spec.seed}: {spec.epochs} epochs, batch {spec.batch_size}, "
            f"{spec.optimizer} lr {spec.lr:g} ({schedule}), weight decay {spec.weight_decay:g}, "
            f"label smoothing {spec.label_smoothing:g}.")


def describe_run(client: MlflowClient, run_id: str, spec: dict[str, Any], teacher_run: str | None = None) -> None:
    """The run's description (its markdown note): the recipe, for a student the links to its
    teacher's run and registered version, for a teacher its registered versions. Call it again
    after registering a teacher."""
    lines = [recipe(RunSpec.from_dict(spec))]
    if teacher_run:
        registered = teacher_version(client, teacher_run)
        shown = f" = {version_link(*registered)}" if registered else ""
        lines.append(f"Teacher: {run_link(client, teacher_run)}{shown}.")
    registered = teacher_version(client, run_id) if spec["role"] == "teacher" else None
    if registered:
        lines.append(f"Registered as {version_link(*registered)}: load it with "
                     f"`mlflow.pytorch.load_model('models:/{registered[0]}/{registered[1]}')`.")
    client.log_batch(run_id, tags=[RunTag(T.NOTE, "\n\n".join(lines))])
