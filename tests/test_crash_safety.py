"""Crash-safe runs: kill -9 anywhere, corrupt checkpoints, SIGTERM, errors, one run per spec, the guard."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import Tensor

from kd.engine.job import run_specs
from kd.engine.trainer import TrainingDiverged
from kd.methods.base import METHODS, Method, register_method
from kd.models import create_model
from kd.models.weights import load_weights_only
from kd.spec import RunOptions, RunSpec
from kd.tracking.registry import alias
from kd.tracking.runs import AlreadyFinished
from tests.conftest import CPU, mlflow_run, registered_teacher, run_kd

# The students below train longer than their teacher: they name it (--teacher-version), as a user must.
TEACHER_SPEC = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=2, batch_size=64)


def student(epochs: int = 4, train_limit: int = 640) -> tuple[str, ...]:
    """A short KD run (by default 4 epochs of 10 steps), logit KD from the 2-epoch ResNet8 teacher."""
    return ("distill", "--dataset", "digits", "--teacher", "ResNet8", "--student", "ResNet8", "--method", "logit",
            "--alpha", "0.5", "--epochs", str(epochs), "--batch-size", "64", "--train-limit", str(train_limit),
            "--device", "cpu", "--teacher-version", alias(TEACHER_SPEC))


STUDENT = student()
LONG = student(epochs=60, train_limit=1400)  # long enough to be caught running
TEACHER = ("train", "--dataset", "digits", "--model", "ResNet8", "--role", "teacher", "--epochs", "2",
           "--batch-size", "64", "--device", "cpu")
# Crash points and how many times each may be reached before the kill, so that the kill
# lands in the epoch being trained (10 steps, one evaluation batch, one checkpoint per epoch).
CRASH_POINTS = {"step": 10, "eval": 1, "checkpoint_write": 1, "checkpoint_upload": 1, "metrics_log": 1}


def runs_of(experiment: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`kd.role` = 'student'") if exp else []


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def method_state_after_kill_9(spec: RunSpec, argv: tuple[str, ...], crash_at: str, terms: list[str],
                              tmp: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train `spec` uninterrupted (experiment 'reference'), and as `kd ARGV` SIGKILLed at `crash_at`
    then resumed ('crashed'); the resumed run ends FINISHED with the same history of `terms` (and the
    total loss and accuracies). Returns the method's final checkpoint state: (resumed, reference)."""
    run_specs([spec], options=CPU, experiment="reference", progress=False)
    crashed = run_kd(*argv, "--experiment", "crashed", env={"KD_CRASH_AT": crash_at})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_specs([spec], options=CPU, experiment="crashed", progress=False)
    (run,), (ref,) = runs_of("crashed"), runs_of("reference")
    assert run.info.status == "FINISHED"
    for key in [*terms, "loss_total", "train_acc", "test_acc"]:
        assert history(run.info.run_id, key) == history(ref.info.run_id, key), key
    return tuple(torch.load(MlflowClient().download_artifacts(r.info.run_id, "checkpoint/checkpoint.pth",
                                                              str(tmp / r.info.run_id)), weights_only=True)["method"]
                 for r in (run, ref))


def final_weights(run_id: str, tmp: Path) -> dict[str, Tensor]:
    path = MlflowClient().download_artifacts(run_id, "best.pth", str(tmp))
    return load_weights_only(Path(path))["weights"]


@pytest.fixture
def teacher(store):
    done = run_kd(*TEACHER)
    assert done.returncode == 0, done.stderr
    return store


def assert_same_as_reference(run, ref, tmp_path: Path) -> None:
    """Every metric of every epoch, and the final weights, equal the uninterrupted run's."""
    assert run.info.status == "FINISHED"
    keys = set(ref.data.metrics) - {"epoch_time", "train_time"} - {k for k in ref.data.metrics if k.startswith("system/")}
    assert set(run.data.metrics) >= keys
    for key in sorted(keys):
        got, want = history(run.info.run_id, key), history(ref.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: duplicate or missing steps"
        assert got == want, f"{key} differs after resume"
    steps = [s for s, _ in history(run.info.run_id, "epoch_time")]
    assert steps == [1, 2, 3, 4]
    a, b = final_weights(ref.info.run_id, tmp_path / "a"), final_weights(run.info.run_id, tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reference(teacher):
    """The student trained without interruption, in the experiment `reference`."""
    done = run_kd(*STUDENT, "--experiment", "reference")
    assert done.returncode == 0, done.stderr
    (ref,) = runs_of("reference")
    return ref


def test_kill_9_anywhere_resumes_bit_identical(reference, tmp_path):
    rng = random.Random(20261122)
    points = list(CRASH_POINTS) + ["step"]
    rng.shuffle(points)
    for point in points:
        n = rng.randint(1, CRASH_POINTS[point])
        crashed = run_kd(*STUDENT, "--experiment", "crashed", env={"KD_CRASH_AT": f"{point}:{n}"})
        assert crashed.returncode == -signal.SIGKILL, (point, n, crashed.stdout, crashed.stderr)
    last = run_kd(*STUDENT, "--experiment", "crashed")
    assert last.returncode == 0, last.stderr
    (run,) = runs_of("crashed")
    assert_same_as_reference(run, reference, tmp_path)


def test_sigterm_mid_epoch_resumes_bit_identical(reference, tmp_path):
    """A walltime SIGTERM in epoch 2 (step 15 of 40): the mid-epoch checkpoint resumes at that batch,
    with the same batches, RNG and sums, to the uninterrupted run's metrics and weights."""
    stopped = run_kd(*STUDENT, "--experiment", "stopped", env={"KD_CRASH_AT": "step:15:term"})
    assert stopped.returncode == 143, stopped.stderr
    (run,) = runs_of("stopped")
    assert run.info.status == "KILLED"
    resumed = run_kd(*STUDENT, "--experiment", "stopped")
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch 1, batch 5" in resumed.stdout
    (run,) = runs_of("stopped")
    assert_same_as_reference(run, reference, tmp_path)


def artifact_path(run_id: str, artifact: str) -> Path:
    uri = MlflowClient().get_run(run_id).info.artifact_uri
    return Path(uri.removeprefix("file://")) / artifact


def test_corrupt_newest_checkpoint_falls_back_to_previous(teacher, tmp_path):
    """A resume reads the journal folder's checkpoint (the store's is a mirror); a damaged newest one
    falls back to the previous one."""
    crashed = run_kd(*STUDENT, env={"KD_CRASH_AT": "step:25"})  # killed in epoch 3: checkpoints of 1 and 2
    assert crashed.returncode == -signal.SIGKILL
    (run,) = runs_of("kd")
    mirror = artifact_path(run.info.run_id, "checkpoint/checkpoint.pth")
    mirror.write_bytes(b"")  # the store's copy is not read while the journal folder has one
    newest = tmp_path / "kd-journal" / run.info.run_id / "checkpoint" / "checkpoint.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a disk that lost its last write
    resumed = run_kd(*STUDENT)
    assert resumed.returncode == 0, resumed.stderr
    assert "is unreadable: resuming from checkpoint/previous.pth" in resumed.stderr
    assert "after epoch 1" in resumed.stdout
    assert [s for s, _ in history(run.info.run_id, "test_acc")] == [1, 2, 3, 4]


def test_no_readable_checkpoint_stops_instead_of_starting_over(teacher, tmp_path):
    crashed = run_kd(*STUDENT, env={"KD_CRASH_AT": "step:25"})  # killed in epoch 3: checkpoints of 1 and 2
    assert crashed.returncode == -signal.SIGKILL
    (run,) = runs_of("kd")
    for artifact in ("checkpoint/checkpoint.pth", "checkpoint/previous.pth"):  # the journal folder's and the store's
        for path in (tmp_path / "kd-journal" / run.info.run_id / artifact, artifact_path(run.info.run_id, artifact)):
            path.write_bytes(path.read_bytes()[:1000])
    resumed = run_kd(*STUDENT)
    assert resumed.returncode == 2, resumed.stderr
    assert "Traceback" not in resumed.stderr and "resuming" not in resumed.stdout
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kd: run {run.info.run_id} has no readable checkpoint (checkpoint/checkpoint.pth")
    assert "checkpoint/previous.pth" in last and last.endswith("pass --force to train a new attempt from epoch 1")
    assert "unreadable" not in resumed.stderr.replace(last, "")  # one line says it, no fallback warning before
    (after,) = runs_of("kd")
    assert after.info.status != "FINISHED" and "no readable checkpoint" in after.data.tags["kd.error"]
    assert [s for s, _ in history(run.info.run_id, "test_acc")] == [1, 2]  # nothing trained again
    again = run_kd(*STUDENT, "--force")
    assert again.returncode == 0, again.stderr
    assert {r.data.tags.get("kd.attempt") for r in runs_of("kd")} == {None, "2"}


def wait_for_epoch(experiment: str, epoch: int, timeout: float = 120) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = runs_of(experiment)
        if runs and int(runs[0].data.tags.get("kd.epoch", 0)) >= epoch:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no run reached epoch {epoch}")


def start_kd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kd.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.getcwd())


def test_sigterm_writes_a_usable_checkpoint_and_marks_killed(teacher, tmp_path):
    proc = start_kd(*LONG)
    run = wait_for_epoch("kd", 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    state = load_weights_only(Path(MlflowClient().download_artifacts(
        run.info.run_id, "checkpoint/checkpoint.pth", str(tmp_path))))
    assert state["epoch"] >= 1 and state["batch"] > 0, "SIGTERM checkpoints mid-epoch, at the next batch"
    assert set(state) >= {"model", "method", "optimizer", "scheduler", "rng_cpu", "history", "sums"}
    create_model("ResNet8", 10, 1, 8).load_state_dict(state["model"])
    assert [s for s, _ in history(run.info.run_id, "test_acc")] == list(range(1, state["epoch"] + 1))


def test_concurrent_same_spec_is_refused_and_mlflow_run_resumes_the_unfinished_run(teacher, monkeypatch):
    proc = start_kd(*LONG)
    try:
        wait_for_epoch("kd", 1)
        second = run_kd(*LONG)
        assert second.returncode == 3 and "is being trained right now" in second.stderr
    finally:
        proc.kill()
        proc.wait()
    (run,) = runs_of("kd")
    monkeypatch.setenv("KD_CRASH_AT", "metrics_log:1")  # resume, finish one epoch, then die
    done = mlflow_run("distill", dataset="digits", teacher="ResNet8", student="ResNet8", method="logit",
                      alpha=0.5, epochs=60, batch_size=64, device="cpu", train_limit=1400,
                      teacher_version=alias(TEACHER_SPEC))
    assert "resuming run " + run.info.run_id in done.stdout, done.stderr[-2000:]
    client = MlflowClient()
    created = client.search_runs([run.info.experiment_id], f"tags.`ops.resumed_in` = '{run.info.run_id}'")
    assert len(created) == 1 and "kd.key" not in created[0].data.tags


class PlantedNaN(Method):
    name = "planted_nan"

    def forward(self, student, teacher, targets, epoch):
        return {"loss_planted": student[-1].sum() * float("nan")}


class InfiniteGradient(Method):
    """The old RKD bug: sqrt at a zero distance is finite forwards, infinite backwards."""

    name = "infinite_gradient"

    def forward(self, student, teacher, targets, epoch):
        return {"loss_sqrt": torch.sqrt(student[-1].float().sum() * 0.0)}


@pytest.fixture
def broken_methods():
    for cls in (PlantedNaN, InfiniteGradient):
        register_method(cls)
    yield
    for cls in (PlantedNaN, InfiniteGradient):
        METHODS.pop(cls.name)


def test_guard_stops_a_nan_loss_as_failed(teacher, broken_methods):
    spec = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="planted_nan", epochs=2,
                          batch_size=64)
    with pytest.raises(TrainingDiverged, match=r"method 'planted_nan' at epoch 1, step 1: .*loss_planted=nan"):
        run_specs([spec], options=CPU, progress=False)
    (run,) = runs_of("kd")
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["kd.error"]


def test_guard_stops_skipped_fp16_steps_as_failed(teacher, broken_methods):
    spec = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="infinite_gradient",
                          epochs=20, batch_size=16).taught_by(TEACHER_SPEC)
    with pytest.raises(TrainingDiverged, match=r"100 optimiser steps in a row skipped .* 'infinite_gradient'"):
        run_specs([spec], options=RunOptions(device="cpu", precision="fp16"), progress=False)
    (run,) = runs_of("kd")
    assert run.info.status == "FAILED"


def pure_and(spec_values: dict, epochs: int) -> list[RunSpec]:
    """A pack of a pure student and a KD student on digits (ResNet8, 7 steps per epoch)."""
    common = dict(dataset="digits", model="ResNet8", epochs=epochs, batch_size=48, train_limit=320)
    taught = RunSpec.create(**common, teacher="ResNet8", **spec_values)
    return [RunSpec.create(**common), taught if taught.teacher_weights else taught.taught_by(TEACHER_SPEC)]


def test_a_diverged_student_fails_alone_and_its_pack_trains_on(teacher, broken_methods):
    pack = pure_and({"method": "planted_nan"}, epochs=2)
    with pytest.raises(TrainingDiverged, match=r"'planted_nan' at epoch 1, step 1: .*\(1 other run\(s\) of the "
                                               r"pack finished\)"):
        run_specs(pack, options=CPU, progress=False)
    runs = {r.data.tags["kd.method"]: r for r in runs_of("kd")}
    assert runs["planted_nan"].info.status == "FAILED" and "non-finite" in runs["planted_nan"].data.tags["kd.error"]
    assert runs["pure"].info.status == "FINISHED" and [s for s, _ in history(runs["pure"].info.run_id, "test_acc")] \
        == [1, 2]


def test_a_student_stuck_at_chance_is_stopped_and_says_why(store, tmp_path):
    """The beta RKD runs sat at chance for 150 epochs and nobody was told. A logit student with alpha 1
    copies an untrained teacher, which is chance: after --collapse-after epochs its run stops FAILED,
    saying why, while the pure student of its pack (past 2x chance in epoch 2) trains to the end."""
    untrained = tmp_path / "untrained.pth"
    torch.save({"weights": create_model("ResNet8", 10, 1, 8).state_dict()}, untrained)
    pack = pure_and({"method": "logit", "alpha": 1.0, "teacher_weights": str(untrained)}, epochs=4)
    with pytest.raises(TrainingDiverged, match=r"collapsed: method 'logit' stayed at \d+\.\d\d % test_acc or "
                                               r"less for 2 epochs \(epoch 2\), below 2x chance \(10\.00 %\); "
                                               r"stopped \(--collapse-after 0 trains on regardless\)"):
        run_specs(pack, options=RunOptions(device="cpu", collapse_after=2), progress=False)
    runs = {r.data.tags["kd.method"]: r for r in runs_of("kd")}
    stuck, pure = runs["logit"], runs["pure"]
    assert stuck.info.status == "FAILED" and "collapsed" in stuck.data.tags["kd.error"]
    assert [s for s, _ in history(stuck.info.run_id, "test_acc")] == [1, 2]
    assert max(v for _, v in history(stuck.info.run_id, "test_acc")) < 20.0
    assert pure.info.status == "FINISHED" and [s for s, _ in history(pure.info.run_id, "test_acc")] == [1, 2, 3, 4]
    status = run_kd("status").stdout
    assert " failed " in status and "\n    TrainingDiverged: collapsed: method 'logit' stayed at" in status
    # the same pack with the watch off trains both to the end
    [_, watched_off] = run_specs(pack, experiment="off", options=RunOptions(device="cpu", collapse_after=0),
                                 progress=False)
    assert [s for s, _ in history(watched_off.run_id, "test_acc")] == [1, 2, 3, 4]
    # with a validation split (tuning) the watch reads it: the test set never decides a trial
    with pytest.raises(TrainingDiverged, match=r"stayed at \d+\.\d\d % val_acc or less for 2 epochs"):
        run_specs([pack[1].replace(val_fraction=0.2)], experiment="val",
                  options=RunOptions(device="cpu", collapse_after=2), progress=False,
                  )


def test_a_resumed_student_keeps_the_teacher_it_started_with(teacher):
    """The teacher is re-trained (--force) while a student's job is dead: the resumed student must go
    on distilling from its first teacher, not switch mid-run to the alias's new version."""
    first = registered_teacher("digits-ResNet8").run_id
    assert run_kd(*STUDENT, env={"KD_CRASH_AT": "step:15"}).returncode == -signal.SIGKILL  # in epoch 2
    assert run_kd(*TEACHER, "--force").returncode == 0
    assert registered_teacher("digits-ResNet8").run_id != first
    resumed = run_kd(*STUDENT)
    assert resumed.returncode == 0, resumed.stderr
    (run,) = runs_of("kd")
    assert run.info.status == "FINISHED" and run.data.tags["kd.teacher_run"] == first
    assert run.data.tags["kd.teacher_source"].endswith(f"(run {first})")


def test_a_refused_spec_releases_the_runs_its_pack_claimed(teacher):
    """The pack's second spec is FINISHED already: the first, claimed a moment before, must not stay
    RUNNING (held until its lease goes stale) but be KILLED, which the submitter resubmits."""
    done = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=2, batch_size=64)
    new = RunSpec.create(dataset="digits", model="ResNet20", role="teacher", epochs=2, batch_size=64)
    with pytest.raises(AlreadyFinished):
        run_specs([new, done], options=CPU, progress=False)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.model` = 'ResNet20'")
    assert run.info.status == "KILLED" and "another run of its pack was refused" in run.data.tags["kd.error"]


def test_an_exception_marks_the_run_failed(teacher):
    spec = RunSpec.create(dataset="digits", model="ResNet8", role="student", epochs=3, batch_size=64)

    def explode(student, epoch, metrics):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_specs([spec], options=CPU, progress=False, on_epoch=explode)
    (run,) = runs_of("kd")
    assert run.info.status == "FAILED" and run.data.tags["kd.error"] == "RuntimeError: disk full"
