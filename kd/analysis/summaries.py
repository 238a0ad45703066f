"""One summary run per recipe in the analysis experiment: the seeds' mean and spread where MLflow looks.

MLflow's Group-by (tag `kd.recipe`) averages a recipe's seeds but shows no spread. A summary run
holds per epoch `test_acc_mean` and `test_acc_sd`, and at step 0 `best_test_acc_mean` / `_sd`,
`final_test_acc_mean` / `_sd` and `n_seeds` (sd: the sample sd, ddof=1, left out for one seed), so
MLflow's chart view compares methods by their mean curves. It names its seed runs (tag
`kd.seed_runs`, and links in its description). Idempotent: `kd report` again keeps a summary whose
seed runs and numbers are unchanged, and replaces (deletes, then logs anew) one that changed, so a
recipe never has two summary runs nor a point twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Run

from kd.analysis.collect import ANALYSIS, analysis_experiment, search_all
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP, run_link
from kd.tracking.store import experiment_id

SUMMARY = "summary"  # the kd.analysis tag of a summary run
ENDS = (("best_test_acc", "best_acc"), ("final_test_acc", "final_acc"))  # summary metric -> runs column
MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def epoch_stats(curves: pd.DataFrame, run_ids: pd.Series) -> pd.DataFrame:
    """Per step (epoch) of the runs' points: mean, sample sd (ddof=1; NaN for one run) and n."""
    points = curves[curves.run_id.isin(run_ids)]
    return points.groupby("step").value.agg(mean="mean", sd="std", n="count")


@dataclass(frozen=True)
class RecipeSummary:
    """A recipe's finished runs (one per seed) and their per-epoch test accuracy over seeds."""

    recipe: str
    runs: pd.DataFrame
    curve: pd.DataFrame

    def values(self) -> dict[str, float]:
        """The step-0 metrics: mean and sd (two seeds or more) of the best and final accuracies."""
        values = {"n_seeds": float(len(self.runs))}
        for metric, column in ENDS:
            values[f"{metric}_mean"] = float(self.runs[column].mean())
            if len(self.runs) > 1:
                values[f"{metric}_sd"] = float(self.runs[column].std(ddof=1))
        return values

    def metrics(self) -> list[Metric]:
        now = int(time.time() * 1000)
        points = [Metric(key, value, now, SUMMARY_STEP) for key, value in self.values().items()]
        for step, row in self.curve.iterrows():
            points.append(Metric("test_acc_mean", float(row["mean"]), now, int(step)))
            if row.n > 1:
                points.append(Metric("test_acc_sd", float(row.sd), now, int(step)))
        return points

    def digest(self) -> str:
        """What the summary was computed from and what it holds: equal digests, nothing to redo."""
        content = [sorted(self.runs.run_id), self.values(), self.curve.round(10).reset_index().values.tolist()]
        return hashlib.sha256(json.dumps(content, default=float).encode()).hexdigest()[:16]

    def name(self) -> str:
        """A seed run's name with the seed replaced by the number of seeds: `logit-a0.5-n3-cifar10-...`."""
        return re.sub(r"-s\d+-", f"-n{len(self.runs)}-", self.runs.run_name.iloc[0], count=1)

    def tags(self, client: MlflowClient) -> dict[str, str]:
        first = self.runs.iloc[0]
        values = self.values()
        spread = ", ".join(f"{metric.split('_')[0]} test accuracy {values[f'{metric}_mean']:.2f}"
                           + (f" ± {values[f'{metric}_sd']:.2f}" if f"{metric}_sd" in values else "")
                           for metric, _ in ENDS)
        seeds = ", ".join(str(s) for s in self.runs.seed)
        links = "\n".join(f"- seed {r.seed}: {run_link(client, r.run_id)}" for r in self.runs.itertuples())
        note = (f"Mean ± sample sd over seeds {seeds} (n={len(self.runs)}) of recipe `{self.recipe}`: {spread}."
                f"\n\nSeed runs:\n{links}\n")
        tags = {T.ROLE: ANALYSIS, T.ANALYSIS: SUMMARY, T.RECIPE: self.recipe, T.DATASET: first.dataset,
                T.MODEL: first.model, T.TEACHER: first.teacher, T.METHOD: first.method,
                T.ALPHA: str(first.get("params.alpha", first.alpha)), T.SEEDS: seeds,
                T.SEED_RUNS: ",".join(self.runs.run_id), T.DIGEST: self.digest(), T.NOTE: note}
        return {tag: value for tag, value in tags.items() if value}  # a teacher has no kd.teacher


def recipe_summaries(runs: pd.DataFrame, curves: pd.DataFrame) -> list[RecipeSummary]:
    """A summary per recipe with a finished run (its seeds: one run each, as collect_runs keeps)."""
    done = runs[runs.finished].sort_values("seed")
    return [RecipeSummary(recipe, part, epoch_stats(curves, part.run_id))
            for recipe, part in done.groupby("recipe", sort=True)]


def log_summaries(client: MlflowClient, experiment: str, summaries: list[RecipeSummary]) -> tuple[int, int]:
    """Log each summary run in the experiment's analysis experiment, replacing one that changed and
    keeping one that did not; returns (logged, unchanged)."""
    target = analysis_experiment(experiment)
    exp_id = experiment_id(client, target)
    existing: dict[str, list[Run]] = {}
    for run in search_all(client, target, f"tags.`{T.ANALYSIS}` = '{SUMMARY}'"):
        existing.setdefault(run.data.tags.get(T.RECIPE, ""), []).append(run)
    logged = unchanged = 0
    for summary in summaries:
        old = existing.get(summary.recipe, [])
        if len(old) == 1 and old[0].data.tags.get(T.DIGEST) == summary.digest():
            unchanged += 1
            continue
        for run in old:
            client.delete_run(run.info.run_id)
        log_summary(client, exp_id, summary)
        logged += 1
    return logged, unchanged


def log_summary(client: MlflowClient, exp_id: str, summary: RecipeSummary) -> None:
    """One summary run; its digest is set last, and a run whose writing failed is deleted, so a
    half-written summary never passes for a finished one."""
    tags = summary.tags(client)
    digest = tags.pop(T.DIGEST)
    run_id = client.create_run(exp_id, run_name=summary.name(), tags=tags).info.run_id
    try:
        points = summary.metrics()
        for start in range(0, len(points), MAX_BATCH):
            client.log_batch(run_id, metrics=points[start:start + MAX_BATCH])
        client.set_tag(run_id, T.DIGEST, digest)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.delete_run(run_id)
        raise
