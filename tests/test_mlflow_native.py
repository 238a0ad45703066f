"""What a researcher sees in MLflow: pt2 models in the registry, descriptions, datasets, provenance, names."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from kd.data import load_dataset
from kd.methods import METHODS
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP
from tests.conftest import DIGITS_FAST, ROOT, registered_teacher, run_kd

NAME_CHARS = 24  # what MLflow's runs table and chart legends show of a run name
DISTILL = {"dataset": "digits", "epochs": "2", "batch-size": "64", "device": "cpu", "teacher": "ResNet8",
           "student": "ResNet8", "method": "logit", "alpha": "0.25"}


def test_names_keep_method_alpha_and_seed_within_24_characters():
    for method in METHODS:
        fields = {"teacher": "ResNet110", "method": method, "alpha": 0.125} if method != "pure" else {}
        spec = RunSpec.create(dataset="tinyimagenet", model="ResNet56", seed=12, **fields)
        head = spec.name()[:NAME_CHARS]
        assert (METHODS[method].label or method) in head and "-s12-" in head, spec.name()
        if method != "pure":
            assert "-a0.125-" in head, spec.name()
    teacher = RunSpec.create(dataset="tinyimagenet", model="ResNet110", role="teacher", seed=12)
    assert teacher.name()[:NAME_CHARS].startswith("teacher-s12-")


def test_registered_teachers_serve_users_without_kd_and_mlflow_run_meets_kd_in_one_home(store, tmp_path):
    done = run_kd("train", *DIGITS_FAST, "--model", "ResNet8", "--role", "teacher")
    assert done.returncode == 0, done.stderr
    # `mlflow run` without --experiment-name (MLflow's Default experiment), then kd's command: one run
    launched = subprocess.run(
        ["mlflow", "run", str(ROOT), "-e", "distill", "--env-manager", "local",
         *[a for k, v in DISTILL.items() for a in ("-P", f"{k}={v}")]],
        capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert launched.returncode == 0, launched.stderr
    again = run_kd("distill", *[a for k, v in DISTILL.items() for a in (f"--{k}", v)])
    assert again.returncode == 0 and "already trained in run" in again.stdout, again.stdout + again.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("kd").experiment_id
    [run] = client.search_runs([exp], f"tags.`{T.ROLE}` = 'student'")
    [launcher] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert launcher.data.tags[T.RESUMED_IN] == run.info.run_id and T.KEY not in launcher.data.tags
    assert f"#/experiments/{exp}/runs/{run.info.run_id}?workflowType=machine_learning" in launcher.data.tags[T.NOTE]
    assert f"{run.info.run_name} " in run_kd("status").stdout
    [student_model] = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert student_model.name == run.info.run_name.replace(".", "_")  # MLflow allows no '.' in a model's name

    # the registered version is the run's pt2 logged model, linked both ways, usable without kd or pickle
    version = registered_teacher("digits-ResNet8")
    teacher_run = client.get_run(version.run_id)
    model_id = version.source.removeprefix("models:/")
    assert [o.model_id for o in teacher_run.outputs.model_outputs] == [model_id]
    logged = client.get_logged_model(model_id)
    assert json.loads(logged.tags[T.MODEL_VERSIONS]) == [{"name": "digits-ResNet8", "version": version.version}]
    assert logged.name == teacher_run.info.run_name
    [test_split] = [i.dataset for i in teacher_run.inputs.dataset_inputs if i.tags[0].value == "test"]
    assert {(m.key, m.dataset_digest) for m in logged.metrics} == {
        (key, test_split.digest) for key in ("best_test_acc", "best_epoch", "test_acc", "test_loss")}  # no system
    assert "float32 images in [0, 1]" in version.description and "9 = 9" in version.description
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "m")))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert [p.name for p in (model_dir / "data").iterdir()] == ["model.pt2"]  # torch.export's archive, no pickle
    assert "float32" in mlmodel["signature"]["inputs"] and "[-1, 10]" in mlmodel["signature"]["outputs"]
    images = load_dataset("digits").test_images
    example = np.array(json.loads((model_dir / "input_example.json").read_text()), dtype=np.float32)
    assert np.array_equal(example * 255, images[:len(example)].numpy())  # real test images, in [0, 1]
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # MLflow then refuses any pickle payload
    try:
        loaded = mlflow.pytorch.load_model(f"models:/digits-ResNet8/{version.version}")
    finally:
        del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    labels = load_dataset("digits").test_labels
    with torch.no_grad():
        accuracy = 100 * (loaded(images.float() / 255).argmax(1) == labels).double().mean().item()
    assert accuracy == pytest.approx(teacher_run.data.metrics["best_test_acc"], abs=100 / len(labels))  # one image

    # every run: summary metrics at one step, dataset inputs, provenance, a description
    [run] = client.search_runs([exp], f"tags.`{T.ROLE}` = 'student'")
    for key in ("best_test_acc", "final_test_acc", "best_epoch", "train_time"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [SUMMARY_STEP], key
    history = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
               for k in ("loss_total", "loss_ce", "loss_distill", "loss_kd")}
    for total, ce, distill, term in zip(*history.values(), strict=True):  # one meaning per name
        assert distill == pytest.approx(term) and total == pytest.approx(0.75 * ce + 0.25 * distill)
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"train", "test"} and contexts["train"].name == "digits"
    assert contexts["train"].digest != contexts["test"].digest
    teacher_inputs = {i.tags[0].value: i.dataset.digest for i in teacher_run.inputs.dataset_inputs}
    assert teacher_inputs == {k: d.digest for k, d in contexts.items()}  # same data, same digest
    tags = run.data.tags
    assert tags[T.ALPHA] == run.data.params["alpha"] == "0.25"
    assert tags[T.USER] and tags[T.SOURCE_NAME] and tags[T.VERSION] and tags[T.TORCH] == torch.__version__
    assert "--method logit" in tags[T.COMMAND] and tags[T.GPU] == "none"
    assert tags[T.PRECISION] == "fp32" and tags[T.CUDNN_DETERMINISTIC] == "true" and tags[T.HOST]
    assert not [k for k in tags if k.startswith("kd.") and k.removeprefix("kd.") in ("owner", "heartbeat", "host")]
    note = tags[T.NOTE]
    assert note.startswith("Student ResNet8 distilled from ResNet8 with `logit` (alpha=0.25")
    assert f"#/experiments/{exp}/runs/{teacher_run.info.run_id}" in note
    assert "[digits-ResNet8 v1](#/models/digits-ResNet8/versions/1?workflowType=machine_learning)" in note
    assert "Registered as [digits-ResNet8 v1]" in teacher_run.data.tags[T.NOTE]
