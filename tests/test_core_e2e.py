"""The core suite end to end: `kd` and `mlflow run` on digits against a temporary sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kd.models import create_model
from kd.spec import RunSpec
from kd.tracking.registry import teacher_uri
from tests.conftest import DIGITS_FAST, mlflow_run, registered_teacher, run_kd

FAST_TEACHER = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=2, batch_size=64)
EPOCH_METRICS = ("loss_total", "train_acc", "test_loss", "test_acc", "lr", "epoch_time", "loss_ce", "loss_distill",
                 "loss_kd")


def train_digits_teacher(model: str = "ResNet8") -> None:
    done = run_kd("train", *DIGITS_FAST, "--model", model, "--role", "teacher")
    assert done.returncode == 0, done.stderr
    assert f"registered digits-{model}@seed0" in done.stdout


def test_mlflow_run_distill_fills_the_run_it_created(store, tmp_path):
    train_digits_teacher()
    # values spelled otherwise than Python prints them: mlflow run logs them as typed
    done = mlflow_run("distill", dataset="digits", teacher="ResNet8", student="ResNet8", method="logit",
                      alpha=".25", temperature=4, epochs=2, batch_size=64, device="cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("kd")
    students = client.search_runs([exp.experiment_id], "tags.`kd.role` = 'student'")
    assert len(students) == 1, "mlflow run's own run must be the spec's run: no second run"
    run = students[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["kd.method"] == "logit" and run.data.tags["kd.alpha"] == "0.25"
    assert (run.data.tags["kd.precision"], run.data.tags["kd.cudnn_deterministic"]) == ("fp32", "true")
    assert (run.data.tags["kd.compile"], run.data.tags["kd.step_mode"]) == ("off", "eager: no CUDA device (cpu)")
    assert run.data.params["alpha"] == ".25" and run.data.params["temperature"] == "4"  # mlflow's record stays
    assert run.data.params["epochs"] == "2" and run.data.params["label_smoothing"] == "0.0"  # the spec's own
    assert run.data.tags["kd.teacher_source"].startswith(teacher_uri(FAST_TEACHER))
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2], key
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"best.pth", "config.json", "metrics.json", "checkpoint"} <= artifacts
    assert "checkpoint/checkpoint.pth" in {f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    best = Path(client.download_artifacts(run.info.run_id, "best.pth", str(tmp_path)))
    student = create_model("ResNet8", 10, 1, 8)
    student.load_state_dict(torch.load(best, weights_only=True)["weights"])
    metrics = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert len(__import__("json").load(open(metrics))["test_acc"]) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("train", "--dataset", "imagenet", "--model", "ResNet8"), "unknown dataset 'imagenet'"),
        (("train", "--dataset", "digits", "--model", "ResNet9000"), "unknown model 'ResNet9000'"),
        (("distill", "--dataset", "digits", "--method", "magic", "--teacher", "ResNet8"), "unknown method 'magic'"),
        (("distill", "--dataset", "digits", "--alpha", "1.5", "--teacher", "ResNet8", "--method", "logit"),
         "outside [0, 1]"),
        (("distill", "--dataset", "digits", "--teacher", "ResNet8", "--method", "rkd", "--rkd-angle-weight", "-50"),
         "rkd option rkd_angle_weight=-50.0 is out of range: pass --rkd-angle-weight >= 0"),
        (("distill", *DIGITS_FAST, "--teacher", "ResNet20", "--student", "ResNet8", "--method", "logit"),
         "no registered teacher of this student's recipe (seed0-r"),
        (("train", "--dataset", "cifar10", "--model", "ResNet8", "--epochs", "1"), "cifar-10-batches-py"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(store, tmp_path, args, needle):
    done = run_kd(*args, env={"KD_DATA_ROOT": str(tmp_path / "no-data")})
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("kd")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert client.search_registered_models() == []


def test_finished_spec_is_not_retrained_and_force_starts_a_new_attempt(store):
    train_digits_teacher()
    again = run_kd("train", *DIGITS_FAST, "--model", "ResNet8", "--role", "teacher")
    assert again.returncode == 0 and "already trained in run" in again.stdout
    forced = run_kd("train", *DIGITS_FAST, "--model", "ResNet8", "--role", "teacher", "--force")
    assert forced.returncode == 0, forced.stderr
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert sorted(r.data.tags.get("kd.attempt", "1") for r in runs) == ["1", "2"]
    versions = client.search_model_versions("name = 'digits-ResNet8'")
    alias_run = registered_teacher("digits-ResNet8").run_id
    assert len(versions) == 2 and alias_run == max(runs, key=lambda r: r.info.start_time).info.run_id


def test_mlflow_run_demo_nests_its_runs_under_the_run_it_created(store):
    done = mlflow_run("demo", epochs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    [parent] = [r for r in runs if "kd.key" not in r.data.tags]  # mlflow's own run holds no spec
    children = [r for r in runs if "kd.key" in r.data.tags]
    assert len(children) == 3 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    table = client.download_artifacts(parent.info.run_id, "demo.md")
    assert all(r.info.run_id in open(table).read() for r in children)


def test_demo_prints_the_table_and_the_ui_command(store):
    done = run_kd("demo", "--epochs", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    for label in ("teacher (ResNet20)", "student, no KD (ResNet8)", "student, logit KD (ResNet8)"):
        assert label in done.stdout
    assert f"mlflow ui --backend-store-uri '{store}'" in done.stdout
    assert registered_teacher("digits-ResNet20") is not None
    rerun = run_kd("demo", "--epochs", "2", "--device", "cpu")
    assert rerun.stdout.count("reusing finished run") == 3
