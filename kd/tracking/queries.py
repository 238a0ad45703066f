"""What the submitter and `kd status` ask MLflow: which specs are done, running, dead or new."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Run

from kd.errors import first_line
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.runs import lease_is_live
from kd.tracking.store import experiment_id

# The state of a spec, from its newest run.
FINISHED, RUNNING, QUEUED, FAILED, KILLED, STALE, NEW = (
    "finished", "running", "queued", "failed", "killed", "stale", "never started",
)


def latest_runs(client: MlflowClient, experiment: str) -> dict[str, Run]:
    """The newest run of every spec key in the experiment (one query per 1000 runs)."""
    runs: dict[str, Run] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id(client, experiment)], f"tags.`{T.KEY}` != ''",
            order_by=["attributes.start_time DESC"], max_results=1000, page_token=token,
        )
        for run in page:
            runs.setdefault(run.data.tags[T.KEY], run)
        token = page.token
        if not token:
            return runs


def spec_state(run: Run | None) -> str:
    """finished / running (live lease) / queued (submitted, not started) / failed / killed /
    stale (RUNNING but its process is gone: walltime or node failure) / never started."""
    if run is None:
        return NEW
    status = run.info.status
    if status == "FINISHED":
        return FINISHED
    if status == "RUNNING":
        return RUNNING if lease_is_live(run) else STALE
    if status == "SCHEDULED":
        return QUEUED
    return FAILED if status == "FAILED" else KILLED


@dataclass
class SpecStatus:
    spec: RunSpec
    run: Run | None
    state: str

    @property
    def epochs_done(self) -> int:
        return int(self.run.data.tags.get(T.EPOCH, 0)) if self.run else 0


def summarize(client: MlflowClient, specs: list[RunSpec], experiment: str) -> list[SpecStatus]:
    runs = latest_runs(client, experiment)
    return [SpecStatus(s, runs.get(s.key()), spec_state(runs.get(s.key()))) for s in specs]


def format_summary(rows: list[SpecStatus]) -> str:
    """The `kd status` table: one line per spec, then the counts per state."""
    lines = [f"{'run':58s} {'state':14s} {'epochs':>9s}  {'job':>10s}  run id"]
    for row in rows:
        job = row.run.data.tags.get(T.JOB_ID, "") if row.run else ""
        run_id = row.run.info.run_id if row.run else ""
        lines.append(f"{row.spec.name():58s} {row.state:14s} {row.epochs_done:>4d}/{row.spec.epochs:<4d}  {job:>10s}  {run_id}")
        if row.state in (FAILED, KILLED) and row.run.data.tags.get(T.ERROR):  # why, where the user looks first
            lines.append(f"    {first_line(row.run.data.tags[T.ERROR])}")
    counts = Counter(row.state for row in rows)
    lines.append(", ".join(f"{n} {state}" for state, n in counts.most_common()) + f" ({len(rows)} specs)")
    return "\n".join(lines)
