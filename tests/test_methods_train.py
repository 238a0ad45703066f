"""Real learning on real data: teacher, pure and every KD method on digits; five on a Fashion-MNIST subset.

All students of a dataset train as one pack (one teacher forward per batch, as on the cluster):
each reaches a best accuracy far above chance and ends above twice chance, with finite loss terms
logged every epoch, and RKD does so at alpha 0.25, 0.5, 0.75 and 0.95 (digits; 0.25 and 0.95 on
Fashion-MNIST) with the paper's weights (the old RKD collapsed to a flat loss at 1-18 %).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd.data import load_dataset
from kd.data.fashion_mnist import find_files
from kd.engine.job import run_specs
from kd.spec import RunSpec
from tests.conftest import CPU, mlflow_run, run_kd

TERMS = {
    "logit": ["loss_kd"],
    "fitnets": ["loss_fitnets"],
    "attention_transfer": ["loss_at"],
    "factor_transfer": ["loss_ft"],
    "rkd": ["loss_rkd_distance", "loss_rkd_angle"],
    "nst": ["loss_nst"],
    "tucker": ["loss_tucker"],
    "dkd": ["loss_dkd_tckd", "loss_dkd_nckd"],
}
# (method, alpha, options). AT's per-position mean grows as 1/(H*W): its default weight is
# calibrated for 32x32 maps, and on 8x8 digits 1000 / 16 keeps the CIFAR balance.
CASES = [
    ("logit", 0.5, {}),
    ("fitnets", 0.5, {}),
    ("attention_transfer", 0.5, {}),
    ("factor_transfer", 0.5, {"ft_pretrain_epochs": 2}),
    ("rkd", 0.25, {}),
    ("rkd", 0.5, {}),
    ("rkd", 0.75, {}),
    ("rkd", 0.95, {}),
    ("nst", 0.5, {}),
    ("tucker", 0.5, {}),
    ("tucker", 0.5, {"tucker_mode": "sample"}),
    ("dkd", 0.5, {"dkd_warmup": 2}),
]
# Fashion-MNIST takes logit KD, one feature method, RKD at both ends of alpha and DKD (digits trains
# every case): each run costs about a minute on 2 cores, most of it the 10,000 test images per epoch.
ON_FASHION = [case for case in CASES if case[:2] in {("logit", 0.5), ("fitnets", 0.5), ("rkd", 0.25), ("rkd", 0.95),
                                                     ("dkd", 0.5)}]
DATASETS = {  # dataset: (common spec fields, teacher model, minimum best accuracy, AT weight, cases)
    "digits": (dict(dataset="digits", epochs=4, batch_size=64), "ResNet20", 60.0, 60.0, CASES),
    "fashion_mnist": (dict(dataset="fashion_mnist", epochs=3, batch_size=64, train_limit=3000), "ResNet8", 40.0,
                      1000.0, ON_FASHION),
}
CHANCE = 10.0  # both datasets have 10 classes



def students(dataset: str) -> list[RunSpec]:
    common, teacher, _, at_weight, cases = DATASETS[dataset]
    pure = RunSpec.create(model="ResNet8", role="student", **common)
    kd = [
        RunSpec.create(model="ResNet8", teacher=teacher, method=method, alpha=alpha,
                       options={**options, **({"at_weight": at_weight} if method == "attention_transfer" else {})},
                       **common)
        for method, alpha, options in cases
    ]
    return [pure, *kd]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_teacher_pure_and_every_method_learn(store, dataset):
    if dataset == "fashion_mnist" and find_files(Path("data")) is None:
        pytest.skip("Fashion-MNIST idx files not installed (Debian package dataset-fashion-mnist; .ci/run installs it)")
    common, teacher_model, minimum, *_ = DATASETS[dataset]
    [teacher] = run_specs([RunSpec.create(model=teacher_model, role="teacher", **common)], options=CPU,
                          progress=False)
    assert teacher.best_acc > minimum, f"teacher reached only {teacher.best_acc:.1f} %"
    outcomes = run_specs(students(dataset), options=CPU, progress=False)
    client = MlflowClient()
    epochs = common["epochs"]
    for o in outcomes:
        label = f"{o.spec.method} at alpha {o.spec.alpha}"
        assert o.best_acc > minimum, f"{label} reached only {o.best_acc:.1f} % on {dataset}"
        assert o.final_acc > 2 * CHANCE, f"{label} ended at {o.final_acc:.1f} % on {dataset}: collapsed"
        for key in ["loss_ce", *TERMS.get(o.spec.method, [])]:
            history = client.get_metric_history(o.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (label, key)
            assert all(math.isfinite(m.value) for m in history), (label, key)
        if o.spec.method == "factor_transfer":
            assert sorted(m.step for m in client.get_metric_history(o.run_id, "paraphraser_loss")) == [1, 2]
            assert "paraphraser.pth" in {f.path for f in client.list_artifacts(o.run_id)}


def test_factor_transfer_pretrains_once_and_a_resumed_run_skips_it(store):
    base = ("--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--device", "cpu")
    assert run_kd("train", *base, "--model", "ResNet8", "--role", "teacher").returncode == 0
    ft = ("distill", *base, "--teacher", "ResNet8", "--student", "ResNet8", "--method", "factor_transfer",
          "--ft-pretrain-epochs", "2")
    killed = run_kd(*ft, env={"KD_CRASH_AT": "step:5"})  # pre-trained, then killed in epoch 1
    assert killed.returncode == -signal.SIGKILL
    resumed = run_kd(*ft)
    assert resumed.returncode == 0, resumed.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("kd")
    (run,) = client.search_runs([exp.experiment_id], "tags.`kd.method` = 'factor_transfer'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "paraphraser_loss")) == [1, 2]


def test_sigterm_during_pretraining_kills_the_run_and_the_resume_logs_each_step_once(store):
    """A walltime SIGTERM can land in factor transfer's pre-training: the run ends KILLED (exit 143),
    not RUNNING, and its resume pre-trains again without logging a pre-training step twice."""
    base = ("--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--device", "cpu")
    assert run_kd("train", *base, "--model", "ResNet8", "--role", "teacher").returncode == 0
    ft = ("distill", *base, "--teacher", "ResNet8", "--student", "ResNet8", "--method", "factor_transfer",
          "--ft-pretrain-epochs", "6")
    steps_per_epoch = math.ceil(len(load_dataset("digits").train_labels) / 64)
    # a real SIGTERM, sent by the process to itself in the third pre-training epoch
    job = run_kd(*ft, env={"KD_CRASH_AT": f"pretrain_step:{2 * steps_per_epoch + 3}:term"})
    assert job.returncode == 143, job.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id],
                                "tags.`kd.method` = 'factor_transfer'")
    assert run.info.status == "KILLED" and "pre-training" in job.stderr
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "paraphraser_loss")) == [1, 2]
    resumed = run_kd(*ft)
    assert resumed.returncode == 0, resumed.stderr
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "paraphraser_loss"))
    assert steps == list(range(1, 7)) and client.get_run(run.info.run_id).info.status == "FINISHED"


def test_sigterm_after_the_last_epoch_still_ends_the_run_finished(store):
    """A SIGTERM while the job waits for its sender (training done) does not kill the process
    with the signal's default action: the run is FINISHED, the job exits 0."""
    base = ("--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--device", "cpu")
    job = run_kd("train", *base, "--model", "ResNet8", "--role", "teacher", env={"KD_CRASH_AT": "finished:1:term"})
    assert job.returncode == 0, job.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.role` = 'teacher'")
    assert run.info.status == "FINISHED"


def test_distill_entry_point_nst_quarter_alpha_finishes_on_digits(store):
    """The user's own example, `-e distill -P method=nst -P alpha=0.25`, on digits."""
    assert run_kd("train", "--dataset", "digits", "--model", "ResNet8", "--epochs", "2", "--batch-size", "64",
                  "--device", "cpu").returncode == 0
    done = mlflow_run("distill", method="nst", alpha=0.25, dataset="digits", teacher="ResNet8", student="ResNet8",
                      epochs=2, batch_size=64, device="cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.method` = 'nst'")
    assert run.info.status == "FINISHED" and run.data.params["alpha"] == "0.25"
