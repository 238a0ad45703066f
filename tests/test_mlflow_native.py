"""What a researcher sees in MLflow: pt2 models in the registry, descriptions, datasets, provenance, names."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
import yaml
from mlflow import MlflowClient

from kd.data import load_dataset
from kd.data.loader import DeviceData
from kd.engine.job import load_teacher
from kd.methods import METHODS
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP
from kd.tracking.registry import resolve_teacher, teacher_uri
from kd.tracking.store import get_client
from tests.conftest import DIGITS_FAST, registered_teacher, run_kd

NAME_CHARS = 24  # what MLflow's runs table and chart legends show of a run name


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


def test_registry_versions_are_pt2_models_with_kd_logits_and_runs_say_what_they_are(store, tmp_path):
    done = run_kd("train", *DIGITS_FAST, "--model", "ResNet8", "--role", "teacher")
    assert done.returncode == 0, done.stderr
    distilled = run_kd("distill", *DIGITS_FAST, "--teacher", "ResNet8", "--student", "ResNet8", "--method", "logit",
                       "--alpha", "0.25")
    assert distilled.returncode == 0, distilled.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("kd").experiment_id
    assert f"#/experiments/{exp}/runs?workflowType=machine_learning" in distilled.stdout

    # the registered version is the run's pt2 logged model, loadable without pickle and without kd
    version = registered_teacher("digits-ResNet8")
    teacher_run = client.get_run(version.run_id)
    model_id = version.source.removeprefix("models:/")
    assert [o.model_id for o in teacher_run.outputs.model_outputs] == [model_id]
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "m")))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert [p.name for p in (model_dir / "data").iterdir()] == ["model.pt2"]  # torch.export's archive, no pickle
    assert "float32" in mlmodel["signature"]["inputs"] and "[-1, 10]" in mlmodel["signature"]["outputs"]
    assert mlmodel["saved_input_example_info"]["type"] == "ndarray"
    student = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="logit", epochs=2,
                             batch_size=64)
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # MLflow then refuses any pickle payload
    try:
        loaded = mlflow.pytorch.load_model(teacher_uri(student.teacher_spec()))
    finally:
        del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    data = DeviceData(load_dataset("digits"), "digits", torch.device("cpu"), 0)
    ours = load_teacher(student, data, torch.device("cpu"), resolve_teacher(get_client(), student, tmp_path))
    x, _ = next(data.eval_batches(data.test, 64))
    with torch.no_grad():
        assert torch.allclose(loaded(x), ours(x)[-1], rtol=0, atol=1e-5)
    logged = client.get_logged_model(model_id)
    assert {m.key for m in logged.metrics} >= {"best_test_acc", "final_test_acc", "best_epoch"}

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
    assert tags[T.COMMAND].endswith("--method logit --alpha 0.25") and tags[T.GPU] == "none"
    assert tags[T.PRECISION] == "fp32" and tags[T.CUDNN_DETERMINISTIC] == "true" and tags[T.HOST]
    assert not [k for k in tags if k.startswith("kd.") and k.removeprefix("kd.") in ("owner", "heartbeat", "host")]
    note = tags[T.NOTE]
    assert note.startswith("Student ResNet8 distilled from ResNet8 with `logit` (alpha=0.25")
    assert f"#/experiments/{exp}/runs/{teacher_run.info.run_id}" in note
    assert "[digits-ResNet8 v1](#/models/digits-ResNet8/versions/1)" in note
    assert "Registered as [digits-ResNet8 v1]" in teacher_run.data.tags[T.NOTE]
