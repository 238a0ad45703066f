"""`kd tune` on digits: real training, real Optuna storages, real worker processes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from kd.cli import main as kd_main
from kd.data import load_dataset
from kd.data.loader import DeviceData
from kd.engine.job import run_specs
from kd.spec import RunSpec, SpecError
from kd.tracking.registry import with_teacher_version
from kd.tracking.store import get_client
from kd.tuning.space import Dim, build_space, default_dim, trial_spec
from kd.tuning.storage import open_storage
from kd.tuning.workers import tune_worker_command
from tests.conftest import CPU

# one worker: its module fixtures train once, not once per xdist worker
pytestmark = pytest.mark.xdist_group("tune")

EXPERIMENT = "tune"
TINY = ["--dataset", "digits", "--method", "rkd", "--teacher", "ResNet8", "--student", "ResNet8",
        "--batch-size", "64", "--train-limit", "320", "--device", "cpu", "--experiment", EXPERIMENT]
FAST_HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]
TEACHER = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=3, batch_size=64, train_limit=320)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty MLflow store (and working directory) for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`--teacher-weights` of one digits teacher trained for the module (the registry is tested once)."""
    folder = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        [outcome] = run_specs([TEACHER], experiment=EXPERIMENT, options=CPU, progress=False)
        return ["--teacher-weights", MlflowClient().download_artifacts(outcome.run_id, "best.pth", str(folder))]


def worker(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """`python -m kd.cli tune ARGS` in the background, its output in worker-N.log."""
    with open(tmp_path / f"worker-{time.monotonic_ns()}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "kd.cli", "tune", *args], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("worker-*.log")))


def study_runs(study: str, kind: str) -> list:
    """The study's parent run (kind 'study') or its trial runs (kind 'trial')."""
    client = get_client()  # kd's: a store a worker is creating is not opened half-made
    exp = client.get_experiment_by_name(EXPERIMENT)
    query = f"tags.`kd.study` = '{study}' AND tags.`kd.tuning` = '{kind}'"
    return [] if exp is None else client.search_runs([exp.experiment_id], query)


def child_runs(study: str) -> list:
    return study_runs(study, "trial")


def parent_runs(study: str) -> list:
    return study_runs(study, "study")


def wait_for_epoch(study: str, proc: subprocess.Popen) -> None:
    """Until the worker's trial has trained an epoch (so it is mid-training)."""
    deadline = time.monotonic() + 120
    while not [r for r in child_runs(study) if int(r.data.tags.get("kd.epoch", 0)) >= 1]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def load(study: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage, 60, 300, 2))


def test_validation_split_is_disjoint_from_training_and_fixed_by_the_seed() -> None:
    data = load_dataset("digits")
    cpu = torch.device("cpu")
    a, again = (DeviceData(data, "digits", cpu, seed=0, val_fraction=0.1) for _ in range(2))
    other = DeviceData(data, "digits", cpu, seed=1, val_fraction=0.1)
    limited = DeviceData(data, "digits", cpu, seed=0, val_fraction=0.1, train_limit=320)
    assert torch.equal(a.val_indices, again.val_indices) and torch.equal(a.train_indices, again.train_indices)
    assert not torch.equal(a.val_indices, other.val_indices)
    for d in (a, other, limited):
        assert not set(d.train_indices.tolist()) & set(d.val_indices.tolist())
    assert len(a.train_indices) + len(a.val_indices) == len(data.train_labels)
    assert torch.equal(limited.val_indices, a.val_indices) and len(limited.train) == 320
    val_counts = torch.bincount(data.train_labels[a.val_indices], minlength=10)
    all_counts = torch.bincount(data.train_labels, minlength=10)
    assert ((val_counts - 0.1 * all_counts).abs() <= 1).all()  # stratified
    assert len(a.test) == len(data.test_labels)  # the test set is never split


def test_search_spaces() -> None:
    from kd.methods import METHODS

    assert all(build_space(method, None, None) for method in METHODS)  # every method has a default space
    rkd = {d.name: d for d in build_space("rkd", None, None)}
    assert list(rkd) == ["rkd_distance_weight", "rkd_angle_weight", "alpha"]
    assert rkd["rkd_distance_weight"].log and rkd["rkd_angle_weight"].log
    assert (rkd["alpha"].low, rkd["alpha"].high, rkd["alpha"].log) == (0.05, 0.95, False)
    assert default_dim("w", 50.0) == Dim("w", 5.0, 500.0, log=True)
    assert default_dim("n", 20) == Dim("n", 10, 40, integer=True)
    space = build_space("rkd", "alpha,rkd-angle-weight", "rkd_angle_weight=1:10,lr=0.01:0.1:linear")
    assert [d.name for d in space] == ["alpha", "rkd_angle_weight", "lr"]
    assert space[1] == Dim("rkd_angle_weight", 1, 10, log=True) and not space[2].log
    for params, ranges in (("at_weight", None), ("alpha", "alpha=0.9:0.1"), ("milestones", None), ("x", "x")):
        with pytest.raises(SpecError):
            build_space("rkd", params, ranges)
    base = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="rkd", val_fraction=0.1)
    spec = trial_spec(base, {"alpha": 0.3, "rkd_angle_weight": 7.0})
    assert (spec.alpha, spec.options["rkd_angle_weight"], spec.options["rkd_distance_weight"]) == (0.3, 7.0, 25.0)


def test_study_prunes_and_every_trial_is_a_child_run(store: Path, capsys: pytest.CaptureFixture) -> None:
    from kd.cli import build_parser
    from kd.flags import spec_from_args

    study_name = "prune"
    run_specs([TEACHER], experiment=EXPERIMENT, options=CPU, progress=False)  # registers digits-ResNet8@seed0
    code = kd_main(["tune", *TINY, "--study", study_name, "--trials", "6", "--epochs", "3",
                      "--params", "rkd_distance_weight,rkd_angle_weight,alpha,lr",
                      "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "0"])
    out = capsys.readouterr().out
    assert code == 0
    study = load(study_name, f"sqlite:///{store}/optuna.db")  # the default: beside mlflow.db
    states = [t.state for t in study.trials]
    assert len(states) == 6 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1

    [parent] = parent_runs(study_name)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.alpha"] == "uniform [0.05, 0.95]"
    assert {"sampler", "pruner", "storage", "study"} <= set(parent.data.params)
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert parent.data.metrics["best_alpha"] == pytest.approx(study.best_params["alpha"])
    plots = {Path(a.path).name for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"optimization_history.png", "param_importances.png", "intermediate_values.png"}

    children = child_runs(study_name)
    assert sorted(int(r.data.tags["kd.trial"]) for r in children) == list(range(6))
    for run in children:
        trial = study.trials[int(run.data.tags["kd.trial"])]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["kd.trial_state"] == trial.state.name
        assert run.data.params["val_fraction"] == "0.1"
        assert float(run.data.params["alpha"]) == pytest.approx(trial.params["alpha"])
        history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert run.info.status == "FAILED" and run.data.tags["kd.error"].startswith("TrialPruned")
        else:
            assert run.info.status == "FINISHED" and history[-1].value == pytest.approx(trial.value)

    best = study.best_trial
    best_run = next(r for r in children if r.data.tags["kd.trial"] == str(best.number))
    assert f"{best_run.data.metrics['final_test_acc']:.2f} %" in out
    assert out.count("TEST accuracy of the best trial") == 1
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("kd distill"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    base = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="rkd", epochs=3,
                          batch_size=64, train_limit=320)  # val_fraction 0: the whole training set
    expected = trial_spec(base, {k: float(f"{v:.6g}") for k, v in best.params.items()})  # printed to 6 digits
    chosen = with_teacher_version(get_client(), spec_from_args(args, model=args.student, role="student"),
                                  args.teacher_version)  # the study's teacher, named in the command
    assert chosen == expected and expected.teacher_spec() == TEACHER


def test_two_workers_share_one_study(store: Path, teacher_weights: list[str]) -> None:
    study_name = "shared"
    args = [*TINY, *teacher_weights, "--study", study_name, "--trials", "4", "--epochs", "2",
            "--pruner", "none", "--params", "alpha,lr"]
    procs = [worker([*args, "--worker", str(i)], store) for i in range(2)]
    assert [p.wait(240) for p in procs] == [0, 0], logs(store)
    study = load(study_name, f"sqlite:///{store}/optuna.db")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 4 <= len(numbers) <= 5  # a worker may finish one extra
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    children = child_runs(study_name)
    assert sorted(int(r.data.tags["kd.trial"]) for r in children) == sorted(numbers)  # one run per trial
    assert all(r.info.status == "FINISHED" for r in children)
    owners = {r.data.tags["ops.owner"].rsplit(":", 1)[0] for r in children}  # host:pid
    assert len(owners) == 2  # both workers trained trials
    assert len(parent_runs(study_name)) == 1


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_killed_worker_trial_is_failed_and_retried(store: Path, teacher_weights: list[str], kind: str) -> None:
    """kill -9 mid-training; the next worker fails the stale trial and runs its copy."""
    study_name = "killed"
    storage = f"journal:{store}/study.journal" if kind == "journal" else f"sqlite:///{store}/study.db"
    first = worker([*TINY, *teacher_weights, "--study", study_name, "--storage", storage, "--trials", "1",
                    "--epochs", "6", "--pruner", "none", "--params", "alpha", *FAST_HEARTBEAT], store)
    wait_for_epoch(study_name, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    time.sleep(3)  # the grace period: the next worker's first request for a trial finds it stale

    second = worker(tune_worker_command(study_name, storage, 0, options=CPU, heartbeat_interval=1,
                                        grace_period=3)[4:], store)
    assert second.wait(240) == 0, logs(store)
    study = load(study_name, storage)
    lost = study.trials[0]
    assert lost.state == optuna.trial.TrialState.FAIL
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost.params
    runs = {int(r.data.tags["kd.trial"]): r for r in child_runs(study_name)}
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["kd.trial_state"] == "FAIL"
    assert runs[0].data.tags["kd.error"].startswith("worker lost")
    assert runs[retry.number].info.status == "FINISHED"
    assert runs[retry.number].data.tags["kd.key"] == runs[0].data.tags["kd.key"]  # same spec, a new run


def test_sigterm_queues_the_stopped_trial_again(store: Path, teacher_weights: list[str]) -> None:
    study_name = "walltime"
    proc = worker([*TINY, *teacher_weights, "--study", study_name, "--trials", "1", "--epochs", "6",
                   "--pruner", "none", "--params", "alpha"], store)
    wait_for_epoch(study_name, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, logs(store)
    stopped, queued = load(study_name, f"sqlite:///{store}/optuna.db").trials
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert queued.state == optuna.trial.TrialState.WAITING and queued.system_attrs["failed_trial"] == 0
    assert queued.params == stopped.params
    [run] = child_runs(study_name)
    assert run.info.status == "KILLED" and run.data.tags["kd.trial_state"] == "FAIL"
