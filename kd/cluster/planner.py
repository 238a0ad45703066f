"""What `kd submit` should do for each spec of a grid, decided from MLflow and the scheduler.

MLflow says what is finished and which job last held each run (tags `ops.job_id`,
`ops.scheduler`); the scheduler says whether that job is still alive; the Model Registry says
which teachers are ready. Nothing here writes anything: `plan()` is a pure function of those
observations, so a dry run is exactly what a real run would do.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Run

from kd.cluster.schedulers import get_scheduler
from kd.errors import first_line
from kd.spec import PACK_FIELDS, RunSpec
from kd.tracking import tags as T
from kd.tracking.queries import latest_runs, spec_state
from kd.tracking.registry import teacher_uri, teacher_version
from kd.tracking.runs import lease_is_live

SUBMIT, RESUME = "submit", "resume"
SKIP_FINISHED, SKIP_RUNNING, SKIP_FAILED = "skip-finished", "skip-running", "skip-failed"
WAIT_TEACHER, WAIT_SLOT = "wait-for-teacher", "wait-for-slot"
ACTIONS = (SUBMIT, RESUME, SKIP_FINISHED, SKIP_RUNNING, SKIP_FAILED, WAIT_TEACHER, WAIT_SLOT)
# A job outlives its runs by the seconds Python takes to exit (teacher registration, uploads):
# the jobs of runs finished this recently are still asked about, so they count against max-queued.
LINGER_S = 1800


@dataclass
class Item:
    spec: RunSpec
    action: str
    run: Run | None = None
    note: str = ""


@dataclass
class Observed:
    """What the submitter knows before deciding: runs, live jobs, ready teachers."""

    runs: dict[str, Run] = field(default_factory=dict)  # newest run per spec key
    live_jobs: set[tuple[str, str]] = field(default_factory=set)  # (scheduler, job id)
    teacher_ready: Callable[[RunSpec], bool] = lambda spec: False


@dataclass
class Plan:
    items: list[Item]  # one per spec, in grid order (teachers first)
    jobs: list[list[Item]]  # what is submitted now: one list of runs per job
    live_jobs: int
    max_queued: int

    def counts(self) -> Counter:
        return Counter(item.action for item in self.items)

    def format(self, header: str) -> str:
        lines = [f"{header}: {len(self.items)} specs, {self.live_jobs} live job(s) of at most {self.max_queued}"]
        for item in self.items:
            if item.action != SKIP_FINISHED:
                lines.append(f"  {item.action:17s} {item.spec.name()}" + (f"  ({item.note})" if item.note else ""))
        counts = self.counts()
        lines.append("plan: " + ", ".join(f"{action} {counts[action]}" for action in ACTIONS)
                     + f"; {len(self.jobs)} job(s) to submit")
        return "\n".join(lines)


def job_of(run: Run) -> tuple[str, str] | None:
    tags = run.data.tags
    return (tags[T.SCHEDULER], tags[T.JOB_ID]) if T.JOB_ID in tags and T.SCHEDULER in tags else None


def observe(client: MlflowClient | None, experiment: str, now: float | None = None) -> Observed:
    """Runs of the experiment, the liveness of their jobs, and a cached teacher-readiness check.

    Reads only: an experiment that does not exist yet is not created (dry runs leave no trace).
    """
    if client is None or client.get_experiment_by_name(experiment) is None:
        runs: dict[str, Run] = {}
    else:
        runs = latest_runs(client, experiment)
    now = time.time() if now is None else now
    asked: dict[str, set[str]] = {}
    for run in runs.values():
        job = job_of(run)
        recent = run.info.end_time is not None and now - run.info.end_time / 1000 < LINGER_S
        if job and (run.info.status != "FINISHED" or recent):
            asked.setdefault(job[0], set()).add(job[1])
    live = {(name, job_id) for name, ids in asked.items() for job_id in get_scheduler(name).live(ids)}
    ready: dict[str, bool] = {}

    def teacher_ready(spec: RunSpec) -> bool:
        """Whether the teacher of exactly this student's recipe (RunSpec.teacher_spec) is registered."""
        teacher = spec.teacher_spec()
        if teacher.key() not in ready:
            ready[teacher.key()] = client is not None and teacher_version(client, teacher) is not None
        return ready[teacher.key()]

    return Observed(runs, live, teacher_ready)


def classify(spec: RunSpec, run: Run | None, seen: Observed, retry_failed: bool) -> Item:
    needs_teacher = spec.teacher is not None and spec.teacher_weights is None
    if run is not None:
        job = job_of(run)
        if run.info.status == "FINISHED":
            return Item(spec, SKIP_FINISHED, run)
        if job in seen.live_jobs:
            return Item(spec, SKIP_RUNNING, run, f"{job[0]} job {job[1]}")
        if lease_is_live(run):
            return Item(spec, SKIP_RUNNING, run, f"trained by {run.data.tags.get(T.OWNER, '?')}")
    if needs_teacher and not seen.teacher_ready(spec):
        return Item(spec, WAIT_TEACHER, run, f"{teacher_uri(spec.teacher_spec())} not registered")
    if run is None:
        return Item(spec, SUBMIT)
    state = spec_state(run)
    if run.info.status == "FAILED" and not retry_failed:
        error = first_line(run.data.tags.get(T.ERROR) or "no error recorded", 120)
        return Item(spec, SKIP_FAILED, run, f"{error}; --retry-failed resubmits")
    job = job_of(run)
    dead = f", {job[0]} job {job[1]} gone" if job else ""
    return Item(spec, RESUME, run, f"{state}, epoch {run.data.tags.get(T.EPOCH, '0')}/{spec.epochs}{dead}")


def pack_key(spec: RunSpec) -> tuple:
    """Students that can share one job (`kd job --run-id A --run-id B`); a teacher trains alone."""
    if spec.role == "teacher":
        return ("teacher", spec.key())
    return tuple(spec.pack_value(name) for name in PACK_FIELDS)


def plan(specs: list[RunSpec] | tuple[RunSpec, ...], seen: Observed, *, max_queued: int, pack: int = 1,
         retry_failed: bool = False) -> Plan:
    """Classify every spec, group what is to run into jobs, keep within max-queued live jobs."""
    items = [classify(spec, seen.runs.get(spec.key()), seen, retry_failed) for spec in specs]
    groups: dict[tuple, list[list[Item]]] = {}
    jobs: list[list[Item]] = []
    for item in items:
        if item.action not in (SUBMIT, RESUME):
            continue
        open_jobs = groups.setdefault(pack_key(item.spec), [])
        if open_jobs and len(open_jobs[-1]) < pack:
            open_jobs[-1].append(item)
        else:
            open_jobs.append([item])
            jobs.append(open_jobs[-1])
    slots = max(0, max_queued - len(seen.live_jobs))
    for job in jobs[slots:]:
        for item in job:
            item.note = f"would {item.action}" + (f"; {item.note}" if item.note else "")
            item.action = WAIT_SLOT
    return Plan(items, jobs[:slots], len(seen.live_jobs), max_queued)
