"""MLflow -> pandas: one row per training run, the input of every table, plot and report.

Only training results become rows: analysis runs (`kd.role=analysis`), runs without `kd.key`
(foreign runs, a legacy import that died half-way) and tuning trials (child runs, tag
`mlflow.parentRunId`) are left out. A spec trained more than once (`--force`) counts once: its
newest FINISHED run, else its newest run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from kd.data import DATASETS
from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.runs import read_config
from kd.tracking.store import experiment_id, tracking_uri

ANALYSIS = "analysis"
# tag -> column; every row has these, "" where the run has no such tag
TAG_COLUMNS = {
    T.KEY: "key",
    T.ROLE: "role",
    T.DATASET: "dataset",
    T.MODEL: "model",
    T.TEACHER: "teacher",
    T.METHOD: "method",
    T.SOURCE: "source",
    T.GRID: "grid",
}
COLUMNS = [
    "run_id", "run_name", "status", "finished", "start_time", *TAG_COLUMNS.values(), "alpha", "seed",
    "epoch", "epochs", "final_acc", "best_acc", "recipe", "train_time", "family", "num_classes", "chance",
    *(tag.removeprefix("kd.") for tag in T.PROVENANCE),
]
NOT_RECIPE = ("seed",)  # the params that may differ between runs averaged together


def same_spelling(value: str) -> str:
    """A param as one spelling (`mlflow run` keeps `.25` as typed, kd writes `0.25`)."""
    try:
        return repr(float(value))
    except ValueError:
        return value


def params_recipe(params: dict[str, str]) -> str:
    """A recipe from the params alone (every spec param but the seed), for a run whose config.json
    no longer makes a spec."""
    fields = {k: same_spelling(v) for k, v in sorted(params.items()) if k not in NOT_RECIPE}
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def stored_recipe(client: MlflowClient, run: Run) -> str:
    """Which runs may be averaged over seeds: the tag `kd.recipe` (RunSpec.recipe, the key without
    the seed); for an older run without it, its config.json's spec's recipe, else params_recipe."""
    if run.data.tags.get(T.RECIPE):
        return run.data.tags[T.RECIPE]
    try:
        return RunSpec.from_dict(read_config(client, run.info.run_id)).recipe()
    except (MlflowException, OSError, ValueError, TypeError, SpecError):
        return params_recipe(run.data.params)


def family(model: str) -> str:
    """The report.json family of a model: ViT* -> vit, anything else -> cnn."""
    return "vit" if model.startswith("ViT") else "cnn"


def find_experiment(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SpecError(f"no experiment '{experiment}' in {tracking_uri()}: pass --experiment NAME "
                        "(an experiment that has runs; see the MLflow UI)")
    return found.experiment_id


def search_all(client: MlflowClient, experiment: str, filter_string: str = "") -> list[Run]:
    """Every active run of the experiment that matches, across result pages."""
    exp_id = find_experiment(client, experiment)
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def training_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Runs that trained (or are training) a spec: a `kd.key` and not an analysis run."""
    return [r for r in search_all(client, experiment)
            if r.data.tags.get(T.KEY) and r.data.tags.get(T.ROLE) != ANALYSIS]


def run_row(run: Run, recipe: str) -> dict[str, object]:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    dataset = tags.get(T.DATASET, "")
    num_classes = DATASETS[dataset].num_classes if dataset in DATASETS else math.nan
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "finished": run.info.status == "FINISHED",
        "start_time": run.info.start_time,
        **{column: tags.get(tag, "") for tag, column in TAG_COLUMNS.items()},
        "alpha": float(tags.get(T.ALPHA, 0)),
        "seed": int(tags.get(T.SEED, 0)),
        "epoch": int(tags.get(T.EPOCH, 0)),
        "epochs": int(params.get("epochs") or 0),
        "final_acc": metrics.get("final_test_acc", metrics.get("test_acc", math.nan)),
        "best_acc": metrics.get("best_test_acc", math.nan),
        "recipe": recipe,
        "train_time": metrics.get("train_time", math.nan),
        **{tag.removeprefix("kd."): tags.get(tag, "") for tag in T.PROVENANCE},
        "family": family(tags.get(T.MODEL, "")),
        "num_classes": num_classes,
        "chance": 100.0 / num_classes,
        **{f"params.{k}": v for k, v in params.items()},
    }


def collect_runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    """One row per spec: tags, params (`params.*`), final and best test accuracy, epochs, status.

    `final_acc` is `final_test_acc`, or the last `test_acc` of a run still going; `best_acc` is
    `best_test_acc`, or the best `test_acc` so far.
    """
    runs = [r for r in training_runs(client, experiment) if T.PARENT_RUN not in r.data.tags]
    rows = pd.DataFrame([run_row(r, stored_recipe(client, r)) for r in runs])
    rows = rows.reindex(columns=[*COLUMNS, *sorted(c for c in rows.columns if c not in COLUMNS)])
    rows = rows.sort_values(["finished", "start_time"]).drop_duplicates("key", keep="last")
    for i in rows.index[rows.best_acc.isna()]:
        history = client.get_metric_history(rows.at[i, "run_id"], "test_acc")
        rows.at[i, "best_acc"] = max((m.value for m in history), default=math.nan)
    return rows.sort_values(["dataset", "role", "model", "method", "alpha", "seed"]).reset_index(drop=True)


def select_grid(rows: pd.DataFrame, grid: str | None) -> pd.DataFrame:
    """The runs of one grid (tag `kd.grid`) plus the baselines they compare with: the teachers
    and pure students of the grid's (dataset, model) and (dataset, teacher) pairs, wherever
    they were trained. Without a grid: all runs."""
    if not grid:
        return rows
    chosen = rows.grid == grid
    if not chosen.any():
        grids = ", ".join(sorted(set(rows.grid) - {""})) or "none"
        raise SpecError(f"no runs with kd.grid={grid}: choose one of {grids}, or drop --grid")
    picked = rows[chosen]
    wanted = {*zip(picked.dataset, picked.model, strict=True), *zip(picked.dataset, picked.teacher, strict=True)}
    pairs = pd.MultiIndex.from_frame(rows[["dataset", "model"]]).isin(wanted)
    baselines = (rows.role == "teacher") | (rows.method == "pure")
    return rows[chosen | (baselines & pairs)]


def histories(client: MlflowClient, run_ids: list[str], key: str) -> pd.DataFrame:
    """A metric's points per run (run_id, step, value), the last value per step."""
    points = [(run_id, m.step, m.timestamp, m.value)
              for run_id in run_ids for m in client.get_metric_history(run_id, key)]
    frame = pd.DataFrame(points, columns=["run_id", "step", "timestamp", "value"])
    frame = frame.sort_values("timestamp").drop_duplicates(["run_id", "step"], keep="last")
    return frame.drop(columns="timestamp").sort_values(["run_id", "step"]).reset_index(drop=True)


def find_teacher_run(client: MlflowClient, run: Run) -> str | None:
    """The teacher of a student run: the one it was taught by (`kd.teacher_run`), else (legacy
    imports, which are not registered) the newest FINISHED teacher run with the same dataset, model and seed."""
    tags = run.data.tags
    if not tags.get(T.TEACHER):
        return None
    if tags.get(T.TEACHER_RUN):
        return tags[T.TEACHER_RUN]
    query = " and ".join(f"tags.`{tag}` = '{value}'" for tag, value in (
        (T.ROLE, "teacher"), (T.DATASET, tags[T.DATASET]), (T.MODEL, tags[T.TEACHER]),
        (T.SEED, tags[T.SEED])))
    teachers = client.search_runs([run.info.experiment_id], f"{query} and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    return teachers[0].info.run_id if teachers else None


def analysis_experiment(experiment: str) -> str:
    """Where the analyses of an experiment's runs go: beside it, not among its training runs."""
    return f"{experiment}-{ANALYSIS}"


def log_analysis(client: MlflowClient, experiment: str, kind: str, out: Path, tags: dict[str, str]) -> tuple[str, str]:
    """Log a directory of results as the artifacts of a new run named `analysis` in the
    experiment's analysis experiment; returns (run id, that experiment)."""
    target = analysis_experiment(experiment)
    run_id = client.create_run(experiment_id(client, target), run_name=ANALYSIS,
                               tags={T.ROLE: ANALYSIS, T.ANALYSIS: kind, **tags}).info.run_id
    try:
        client.log_artifacts(run_id, str(out))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, target
