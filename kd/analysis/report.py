"""`kd report`: tables, plots and report.json from the tracking store, logged as an analysis run.

report.json follows the user's lab plan: `{"cnn": {...}, "vit": {...}}`, each with
`teacher_accuracy`, `student_accuracy_without_kd` and `student_accuracy_with_kd` as fractions
(0.912, like the plan), plus where the numbers come from. Per family (ViT* students -> vit, else
cnn) the primary dataset is `--dataset`, else the dataset with the most finished student runs of
the family; the student model is the one with the most finished KD runs there; "with KD" is its
best (method, alpha) group. Every value is a mean over seeds; a family without runs gets nulls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from kd.analysis import plots
from kd.analysis.collect import collect_runs, family, histories, select_grid
from kd.analysis.field import field_table, load_field, write_field
from kd.analysis.tables import COLLAPSE_FACTOR, best_kd, panel, summarize, write_methodology, write_tables
from kd.errors import SpecError

FAMILIES = ("cnn", "vit")
REPORT_KEYS = ("teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd")


def most_runs(frame: pd.DataFrame, column: str) -> str:
    """The value of `column` with the most finished runs (summed n); ties -> alphabetical first."""
    counts = frame.groupby(column).n.sum()
    return counts[counts == counts.max()].index.min()


def fraction(row: pd.Series | None, metric: str) -> float | None:
    if row is None or row.n == 0:
        return None
    return round(float(row[f"{metric}_mean"]) / 100.0, 6)


def family_entry(summary: pd.DataFrame, name: str, metric: str, dataset: str | None) -> dict[str, Any]:
    students = summary[(summary.role == "student") & (summary.model.map(family) == name)]
    if dataset:
        students = students[students.dataset == dataset]
    if students.empty or students.n.sum() == 0:
        return {**dict.fromkeys(REPORT_KEYS), "metric": metric}
    chosen = dataset or most_runs(students, "dataset")
    here = students[students.dataset == chosen]
    kd_runs = here[here.teacher != ""]
    model = most_runs(kd_runs if kd_runs.n.sum() > 0 else here, "model")
    p = panel(summary, chosen, model)
    best = best_kd(p.kd, metric)
    return {
        "teacher_accuracy": fraction(p.teacher, metric),
        "student_accuracy_without_kd": fraction(p.pure, metric),
        "student_accuracy_with_kd": fraction(best, metric),
        "metric": metric,
        "dataset": chosen,
        "teacher": None if p.teacher is None else p.teacher.model,
        "student": model,
        "kd_method": None if best is None else best.method,
        "kd_alpha": None if best is None else float(best.alpha),
        "kd_recipe": None if best is None else best.recipe,  # the key without the seed (tag kd.recipe)
        "seeds": {label: None if row is None else int(row.n)
                  for label, row in (("teacher", p.teacher), ("without_kd", p.pure), ("with_kd", best))},
    }


def report_json(summary: pd.DataFrame, metric: str = "final", dataset: str | None = None) -> dict[str, Any]:
    if dataset and dataset not in set(summary.dataset):
        raise SpecError(f"--dataset {dataset} has no runs: choose one of {', '.join(sorted(set(summary.dataset)))}")
    return {name: family_entry(summary, name, metric, dataset) for name in FAMILIES}


@dataclass
class Material:
    """What a report is made of: the runs, their groups (tables.summarize) and the test accuracy
    per epoch of the finished runs."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame

    @functools.cached_property
    def field(self) -> pd.DataFrame:
        """The field's table beside kd's groups on the field's pairs (empty without such runs)."""
        return field_table(self.summary, self.runs, load_field())


def gather(
    client: MlflowClient,
    experiment: str,
    grid: str | None = None,
    seeds: Sequence[int] | None = None,
    collapse_factor: float = COLLAPSE_FACTOR,
) -> Material:
    runs = select_grid(collect_runs(client, experiment), grid)
    if runs.empty:
        raise SpecError(f"experiment '{experiment}' has no training runs: train some, or pass --experiment NAME")
    curves = histories(client, list(runs.run_id[runs.finished]), "test_acc")
    return Material(runs, summarize(runs, seeds, collapse_factor), curves)


def write_report(material: Material, out: Path, metric: str = "final", dataset: str | None = None) -> dict[str, Any]:
    """Write tables, plots, report.json and (with runs on the field's pairs) field.md under `out`;
    returns the report."""
    runs, summary = material.runs, material.summary
    report = report_json(summary, metric, dataset)
    write_tables(runs, summary, out, metric)
    write_methodology(runs, out)
    if not material.field.empty:
        write_field(material.field, load_field(), out)
    plots.accuracy_curves(runs, material.curves, summary, out / "plots")
    plots.alpha_curves(summary, out / "plots", metric)
    plots.baseline_dots(summary, out / "plots", metric)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_report(
    client: MlflowClient,
    experiment: str,
    out: Path,
    *,
    grid: str | None = None,
    seeds: Sequence[int] | None = None,
    metric: str = "final",
    dataset: str | None = None,
    collapse_factor: float = COLLAPSE_FACTOR,
) -> dict[str, Any]:
    """Write tables, plots and report.json under `out`; returns the report (logs nothing)."""
    return write_report(gather(client, experiment, grid, seeds, collapse_factor), out, metric, dataset)
