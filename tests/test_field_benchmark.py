"""The field's CIFAR-100 benchmark as a grid: its pairs, recipe, loss weights and seeds, planned like any
grid, with an estimate of its GPU-hours from kd bench's measured speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd.cluster.grids import load_grid
from kd.methods import METHODS
from kd.presets import FIELD, FIELD_LIGHT_LR
from tests.conftest import run_kd
from tests.test_cluster import kd, wait_for

PAIRS = {("ResNet32x4", "ResNet8x4"), ("WRN40_2", "WRN16_2"), ("ResNet110", "ResNet32"), ("ResNet56", "ResNet20"),
         ("WRN40_2", "WRN40_1"), ("VGG13", "VGG8"), ("VGG13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
         ("ResNet32x4", "ShuffleNetV1"), ("ResNet32x4", "ShuffleNetV2")}
LIGHT = {"MobileNetV2", "ShuffleNetV1", "ShuffleNetV2"}  # trained with lr 0.01 in the field


def test_the_field_grid_is_every_pair_method_and_seed_with_the_fields_recipe() -> None:
    grid = load_grid("field")
    teachers = [s for s in grid.specs if s.role == "teacher"]
    taught = [s for s in grid.specs if s.teacher]
    assert grid.specs[:len(teachers)] == tuple(teachers)  # teachers first: a limited queue fills with them
    assert {(s.teacher, s.model) for s in taught} == PAIRS
    assert {s.method for s in taught} == set(METHODS) - {"pure"}
    assert {s.seed for s in grid.specs} == {0, 1, 2, 3, 4}
    assert len(teachers) == 6 * 5 and len(taught) == len(PAIRS) * len({s.method for s in taught}) * 5
    keys = {t.key() for t in teachers}
    for spec in grid.specs:
        assert (spec.epochs, spec.batch_size, spec.milestones, spec.label_smoothing) == (
            FIELD["epochs"], FIELD["batch_size"], FIELD["milestones"], 0.0), spec.name()
        assert spec.lr == (FIELD_LIGHT_LR if spec.model in LIGHT else FIELD["lr"]), spec.name()
        if spec.teacher:  # every student is taught by a grid teacher, trained with the field's lr 0.05
            assert spec.teacher_spec().key() in keys and spec.teacher_spec().lr == FIELD["lr"]
    weights = {s.method: s.loss_weights() for s in taught}
    assert weights["logit"] == pytest.approx((0.1, 0.9)) and weights["fitnets"] == (1.0, 1.0)


def test_a_dry_run_estimates_gpu_hours_from_the_measured_speed(store: str, tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    env = {"KD_BENCH_FILE": str(bench)}
    unmeasured = run_kd("submit", "--grid", "field", "--dry-run", "--scheduler", "local", env=env)
    assert unmeasured.returncode == 0, unmeasured.stderr
    assert "GPU-hours" not in unmeasured.stdout
    rate = 12_000.0
    bench.write_text(json.dumps({"NVIDIA H100": {
        "device": "cuda", "device_name": "NVIDIA H100", "teacher": "ResNet112", "student": "ResNet56",
        "method": "logit", "batch_size": 128,
        "results": [{"pipeline": "solo", "compile": "off", "images_per_s": rate},
                    {"pipeline": "solo", "compile": "inductor", "images_per_s": 3 * rate}]}}))
    measured = run_kd("submit", "--grid", "field", "--dry-run", "--scheduler", "local", env=env)
    specs = load_grid("field").specs
    hours = sum(s.epochs * 50_000 for s in specs) / rate / 3600  # CIFAR-100's 50000 training images
    assert f"the {len(specs)} runs to train take about {hours:,.1f} GPU-hours" in measured.stdout, measured.stdout


FASHION = Path(os.environ.get("KD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REDUCED = """experiment: field-fashion
datasets: [fashion_mnist]
seeds: [0, 1]
pure_student: false
methods:
  logit: {alpha: 0.9}
tracks:
  - {teacher: ResNet56, student: ResNet20, presets: {teacher: field, student: field}}
spec: {epochs: 1, train_limit: 256}
job: {ncpus: 1, gpus: 0, device: cpu, walltime: "00:30:00"}
"""


@pytest.mark.slow  # 4 jobs (a teacher and a student per seed), each evaluating on 10000 test images
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="the real Fashion-MNIST files are not installed (Debian's dataset-fashion-mnist)")
def test_a_reduced_field_grid_on_fashion_mnist_reaches_the_fields_table_and_the_summary_runs(store, tmp_path):
    """The field's recipe and a field pair on real offline data, through kd submit's rounds to the report."""
    grid = tmp_path / "field-fashion.yaml"
    grid.write_text(REDUCED)
    specs = load_grid(str(grid)).specs

    def finished() -> bool:
        code, out = kd("submit", "--grid", str(grid), "--scheduler", "local", "--pack", "4")
        assert code == 0, out
        return f"skip-finished {len(specs)}" in out

    wait_for(finished, 900, "the reduced field grid to finish", every=5)
    done = run_kd("report", "--grid", str(grid), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert "The field's table beside kd's" in done.stdout and "ResNet20" in done.stdout
    client = MlflowClient()
    summaries = client.search_runs([client.get_experiment_by_name("field-fashion-analysis").experiment_id],
                                   "metrics.n_seeds >= 0")
    recipes = {s.recipe() for s in specs}  # one summary run per recipe: every spec's recipe over its 2 seeds
    assert {r.data.tags["kd.recipe"] for r in summaries} == recipes
    assert {r.data.metrics["n_seeds"] for r in summaries} == {2.0}
