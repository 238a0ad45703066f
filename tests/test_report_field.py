"""The field's published table beside kd's, and one summary run per recipe, on stores the tests fill
with runs (MlflowClient, kd's tags, no training); the reference numbers are the tests' own arithmetic."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from kd.analysis.field import MIN_SEEDS, SPREAD, load_field
from kd.methods import METHODS
from kd.models import MODELS
from kd.spec import RunSpec
from kd.tracking.store import experiment_id
from tests import test_analysis
from tests.test_analysis import add_run, kd

pytestmark = pytest.mark.xdist_group("analysis")  # test_analysis's session store, made once per worker
empty_db, client = test_analysis.empty_db, test_analysis.client  # its fixtures: a fresh store per test

FIELD_PAIRS = {("ResNet32x4", "ResNet8x4"), ("WRN40_2", "WRN16_2"), ("ResNet110", "ResNet32"),
               ("ResNet56", "ResNet20"), ("WRN40_2", "WRN40_1"), ("VGG13", "VGG8"), ("VGG13", "MobileNetV2"),
               ("ResNet50", "MobileNetV2"), ("ResNet32x4", "ShuffleNetV1"), ("ResNet32x4", "ShuffleNetV2")}
# The sources' recipe, as a kd spec (published_cifar100.yaml's `recipe`)
FIELD_RECIPE = {"dataset": "cifar100", "epochs": 240, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4,
                "milestones": (150, 180, 210), "schedule": "multistep", "label_smoothing": 0.0}
PAIR = {"teacher": "ResNet32x4", "model": "ResNet8x4"}


def test_published_rows_load_with_their_sources() -> None:
    field = load_field()
    assert {(r.teacher, r.student) for r in field.rows} == FIELD_PAIRS
    assert {r.source.name for r in field.rows} == {"RepDistiller", "mdistiller", "logit-standardization"}
    for row in field.rows:
        assert row.source.repository.startswith("https://github.com/") and row.source.paper and row.source.reports
        assert {row.teacher, row.student} <= set(MODELS), row
        assert 50.0 < row.top1 < 85.0, row
        if row.kd_method not in (None, "teacher"):
            assert row.kd_method in METHODS and set(row.kd_options) <= set(METHODS[row.kd_method].options), row
    published = {(r.source.name, r.teacher, r.student, r.method): r.top1 for r in field.rows}
    # one number per (source, pair, method); spot checks against the READMEs
    assert len(published) == len(field.rows)
    assert published["RepDistiller", "ResNet32x4", "ResNet8x4", "CRD"] == 75.51
    assert published["mdistiller", "ResNet32x4", "ShuffleNetV2", "DKD"] == 77.07
    assert published["logit-standardization", "WRN40_2", "WRN16_2", "MLKD+LS"] == 76.95
    assert ("RepDistiller", "WRN40_2", "WRN40_1", "FSP") not in published  # the README has no number
    kd_plus_ls = next(r for r in field.rows if r.method == "KD+LS")
    assert (kd_plus_ls.kd_method, kd_plus_ls.kd_options) == ("logit", {"logit_standardize": True})


def field_runs(client: MlflowClient, accs: dict[int, float], **fields: object) -> None:
    """One run per seed, trained with the sources' recipe unless `fields` say otherwise; best = last."""
    for seed, acc in accs.items():
        spec = {**FIELD_RECIPE, "seed": seed, **fields}
        add_run(client, [acc / 2, acc], extra_tags={"kd.grid": "field"}, **spec)


def table_row(table: pd.DataFrame, method: str, **where: object) -> pd.Series:
    mask = (table.method == method) & (table.dataset == where.pop("dataset", "cifar100"))
    for column, value in where.items():
        mask &= table[column] == value
    assert mask.sum() == 1, (method, where, table[["method", "kd_method", "n", "flags"]])
    return table[mask].iloc[0]


def test_a_difference_is_flagged_when_it_should_be(client: MlflowClient, tmp_path: Path) -> None:
    near = {0: 73.30, 1: 73.45, 2: 73.20}  # KD: within 2 sd of the published 73.33
    far = {0: 70.00, 1: 70.10, 2: 69.95}  # DKD: 6 points below 76.32, sd 0.08
    field_runs(client, {0: 79.40, 1: 79.50, 2: 79.30}, model="ResNet32x4", role="teacher")
    field_runs(client, near, method="logit", alpha=0.9, **PAIR)
    field_runs(client, far, method="dkd", alpha=0.9, **PAIR)
    field_runs(client, {0: 76.6, 1: 76.7, 2: 76.5}, method="logit", alpha=0.9, options={"logit_standardize": True},
               **PAIR)
    field_runs(client, {0: 73.44, 1: 73.44}, method="attention_transfer", alpha=0.9, **PAIR)
    field_runs(client, {0: 73.0, 1: 73.7, 2: 73.2}, method="nst", alpha=0.9, epochs=3, milestones=(), **PAIR)
    field_runs(client, {0: 90.0, 1: 91.0, 2: 92.0}, method="logit", alpha=0.9, dataset="cifar10", **PAIR)
    assert kd("report", "--out", str(tmp_path / "r"), "--grid", "field", "--experiment", "kd", "--seeds", "0,1") == 0
    table = pd.read_csv(tmp_path / "r" / "field.csv", keep_default_na=False)

    kd_row = table_row(table, "KD", teacher="ResNet32x4", student="ResNet8x4")
    assert kd_row.n == 3 and kd_row["flags"] == ""
    assert float(kd_row.d_final) == pytest.approx(statistics.mean(near.values()) - 73.33)
    assert float(kd_row.final_sd) == pytest.approx(statistics.stdev(near.values()))
    assert abs(float(kd_row.d_final)) <= SPREAD * float(kd_row.final_sd)

    dkd_row = table_row(table, "DKD", teacher="ResNet32x4", student="ResNet8x4")
    assert float(dkd_row.d_best) == pytest.approx(statistics.mean(far.values()) - 76.32)
    assert dkd_row["flags"] == "Δ best epoch outside 2 sd; Δ last epoch outside 2 sd"
    assert table_row(table, "KD+LS", student="ResNet8x4").n == 3  # logit with standardisation, not KD
    assert table_row(table, "AT", student="ResNet8x4")["flags"] == f"2 seeds < {MIN_SEEDS}"
    assert table_row(table, "NST", student="ResNet8x4")["flags"].startswith("not the sources' recipe: epochs=3")
    assert table_row(table, "teacher", student="ResNet8x4")["flags"] == ""
    assert table_row(table, "FitNet", student="ResNet8x4")["flags"] == "no kd runs"
    assert table_row(table, "SP", student="ResNet8x4")["flags"] == "no such method in kd"
    other = table_row(table, "logit", dataset="cifar10")  # another dataset: kd's numbers, nothing published
    assert (other.published, other.source, other.n) == ("", "", 3)
    assert "DKD" in (tmp_path / "r" / "field.md").read_text() and "## Sources" in (tmp_path / "r" / "field.md").read_text()


# --- summary runs ----------------------------------------------------------------------------------

# per-epoch test accuracy per recipe and seed: two recipes (3 and 4 epochs) of the same student
CURVES = {3: {0: [40.0, 60.0, 70.0], 1: [42.0, 61.5, 69.0], 2: [39.0, 63.0, 71.5]},
          4: {0: [30.0, 50.0, 66.0, 65.0], 1: [35.0, 52.0, 64.0, 66.5], 2: [33.0, 49.0, 67.0, 67.5]}}
STUDENT = {"model": "ResNet8", "teacher": "ResNet20", "method": "logit", "alpha": 0.5}


def summary_runs(client: MlflowClient) -> dict[str, object]:
    runs = client.search_runs([experiment_id(client, "kd-analysis")], "tags.`kd.analysis` = 'summary'")
    return {run.data.tags["kd.recipe"]: run for run in runs}


def test_summary_runs_equal_an_independent_computation(client: MlflowClient, tmp_path: Path) -> None:
    seed_runs = {epochs: {seed: add_run(client, accs, epochs=epochs, seed=seed, **STUDENT)
                          for seed, accs in curves.items()} for epochs, curves in CURVES.items()}
    older = seed_runs[4][2]  # a run from before kd.recipe: its recipe comes from its config.json
    client.delete_tag(older, "kd.recipe")
    client.log_dict(older, RunSpec.create(epochs=4, seed=2, dataset="cifar10", **STUDENT).to_dict(), "config.json")
    assert kd("report", "--out", str(tmp_path / "r")) == 0
    found = summary_runs(client)
    assert len(found) == 2
    for epochs, curves in CURVES.items():
        recipe = RunSpec.create(epochs=epochs, dataset="cifar10", **STUDENT).recipe()
        run = found[recipe]
        assert set(run.data.tags["kd.seed_runs"].split(",")) == set(seed_runs[epochs].values())
        assert all(run_id in run.data.tags["mlflow.note.content"] for run_id in seed_runs[epochs].values())
        assert run.data.tags["kd.role"] == "analysis" and run.info.run_name.startswith("logit-a0.5-n3-")
        for key, reference in (("test_acc_mean", statistics.mean), ("test_acc_sd", statistics.stdev)):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == list(range(1, epochs + 1))
            for m in history:
                assert m.value == pytest.approx(reference(c[m.step - 1] for c in curves.values()))
        for name, pick in (("best_test_acc", max), ("final_test_acc", lambda c: c[-1])):
            values = [pick(c) for c in curves.values()]
            assert run.data.metrics[f"{name}_mean"] == pytest.approx(statistics.mean(values))
            assert run.data.metrics[f"{name}_sd"] == pytest.approx(statistics.stdev(values))
        assert run.data.metrics["n_seeds"] == 3
    # a report again: the same two runs, each point once
    assert kd("report", "--out", str(tmp_path / "again")) == 0
    again = summary_runs(client)
    assert {r: run.info.run_id for r, run in again.items()} == {r: run.info.run_id for r, run in found.items()}
    for run in again.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc_mean")]
        assert len(steps) == len(set(steps))
    # a fourth seed: its recipe's summary is replaced, the other kept
    add_run(client, [41.0, 62.0, 70.5], epochs=3, seed=3, **STUDENT)
    assert kd("report", "--out", str(tmp_path / "third")) == 0
    third = summary_runs(client)
    three = RunSpec.create(epochs=3, dataset="cifar10", **STUDENT).recipe()
    assert len(third) == 2 and third[three].data.metrics["n_seeds"] == 4
    assert third[three].info.run_id != found[three].info.run_id
    assert [r.info.run_id for k, r in third.items() if k != three] == [r.info.run_id for k, r in found.items()
                                                                       if k != three]
