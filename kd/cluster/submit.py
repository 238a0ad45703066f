"""`kd submit`: plan under an exclusive lock, then create runs, write job scripts and submit them.

Idempotence rests on two things: the plan is made from MLflow and the scheduler, never from
local files; and two submitters never plan at once (a `flock` on a file beside the store), so
the second one sees the first one's jobs (across login nodes, the ledger's creation claim stops a
second run of a spec). Every round first ships the journals jobs left behind (`kd sync`), so a
grid converges when the store was away or when jobs never open it (`tracking: journal`). A failed
submission leaves nothing behind: runs created for it are deleted, and runs it was to resume stay
unfinished with a dead job, which the next round resubmits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag

from kd.cluster.estimate import TO_TRAIN, gpu_hours_line
from kd.cluster.grids import Grid
from kd.cluster.planner import (
    SKIP_FINISHED,
    SKIP_RUNNING,
    SUBMIT,
    WAIT_SLOT,
    Item,
    Observed,
    Plan,
    observe,
    plan,
)
from kd.cluster.schedulers import Scheduler, get_scheduler
from kd.cluster.templates import WORD_CHARS, JobSettings, check_chars
from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.journal import journal_root
from kd.tracking.registry import register_if_missing, resolve_teacher
from kd.tracking.runs import create_spec_run
from kd.tracking.sender import sync_journals
from kd.tracking.store import JOURNAL_ONLY_URI, check_writable, get_client, sqlite_path, tracking_uri
from kd.tuning.workers import tune_worker_command

LOCK_TIMEOUT_S = 600  # a submitter stuck longer than a cron period is reported, not waited for


def lock_path() -> Path:
    """Beside the sqlite store; for a server store, per user under ~/.kd (one login node)."""
    db = sqlite_path()
    if db:
        return db.with_name(db.name + ".submit.lock")
    return Path.home() / ".kd" / f"submit-{hashlib.sha256(tracking_uri().encode()).hexdigest()[:16]}.lock"


@contextmanager
def submit_lock(timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SpecError(f"another kd submit has held {path} for {timeout:.0f} s: "
                                    f"check for a hung submitter (ps) and try again") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def repair_registrations(client: MlflowClient, specs: Sequence[RunSpec], seen: Observed) -> None:
    """FINISHED teachers without a registry entry (killed between the two) are registered now,
    so that their students are not held back forever."""
    for spec in specs:
        run = seen.runs.get(spec.key())
        repaired = register_if_missing(client, run, spec) if run is not None else None
        if repaired:
            print(f"registered {repaired}: the teacher had finished without its registry entry", flush=True)


def store_exists() -> bool:
    """False for a sqlite store not created yet: a dry run must not create it."""
    db = sqlite_path()
    return db is None or db.exists()


def ready_to_submit(sched: Scheduler) -> None:
    """The scheduler's commands and a writable store, checked before the lock, a run or a script exists."""
    sched.check_available()
    check_writable()


def left_to_train(p: Plan) -> list[tuple[RunSpec, int]]:
    """(spec, epochs done) of every run of the plan that is not finished, failed or running."""
    return [(item.spec, int(item.run.data.tags.get(T.EPOCH, "0")) if item.run else 0)
            for item in p.items if item.action in TO_TRAIN]


def submit_grid(grid: Grid, scheduler: str, *, experiment: str, max_queued: int, pack: int = 1,
                dry_run: bool = False, retry_failed: bool = False) -> Plan:
    """Print the plan, then (unless dry_run) submit its jobs."""
    if pack < 1 or max_queued < 0:
        raise SpecError("--pack must be >= 1 and --max-queued >= 0")
    sched = get_scheduler(scheduler)
    settings = grid.job.resolved()  # validates paths before anything is touched
    if not dry_run:
        ready_to_submit(sched)
    with nullcontext() if dry_run else submit_lock():
        # inside the lock: two processes creating one new sqlite store at once break its migrations
        client = get_client() if (store_exists() or not dry_run) else None
        if not dry_run:
            sync_journals([journals_dir(settings), journal_root()], client)
        seen = observe(client, experiment)
        if not dry_run:
            repair_registrations(client, grid.specs, seen)
        p = plan(grid.specs, seen, max_queued=max_queued, pack=pack, retry_failed=retry_failed)
        mode = "dry run, nothing submitted" if dry_run else f"scheduler {scheduler}"
        print(p.format(f"grid {grid.name} -> experiment {experiment} ({mode})"), flush=True)
        if dry_run and (hours := gpu_hours_line(left_to_train(p))):
            print(hours, flush=True)
        if not dry_run:
            for job in p.jobs:
                submit_job(client, sched, settings, job, grid.name, experiment)
    return p


def journals_dir(settings: JobSettings) -> Path:
    """Where the grid's jobs keep their run journals: on the shared filesystem, beside the job logs."""
    return Path(settings.jobs_dir) / "run-journals"


def prepare_journal(client: MlflowClient, spec: RunSpec, run_id: str, folder: Path) -> None:
    """A journal-only job's folder: its spec, and a student's teacher weights (the job never asks the
    store). A resubmitted run keeps the teacher it started with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec.to_dict(), indent=2))
    if spec.teacher and not spec.teacher_weights and not (folder / "teacher.json").exists():
        found = resolve_teacher(client, spec, folder / "download")
        shutil.copyfile(found.path, folder / "teacher.pth")
        shutil.rmtree(folder / "download", ignore_errors=True)
        (folder / "teacher.json").write_text(json.dumps(found.to_json()))


def submit_job(client: MlflowClient, sched: Scheduler, settings: JobSettings, job: list[Item], grid: str,
               experiment: str) -> str | None:
    """One job for the items' runs (created now if new); on failure the new runs are deleted.
    None if another submitter created one of its runs at the same moment (it submits them)."""
    created: list[str] = []
    journal = settings.tracking == "journal"
    try:
        run_ids = []
        for item in job:
            if item.run is None:
                run_id = create_spec_run(client, item.spec, experiment, {T.GRID: grid})
                if run_id is None:
                    print(f"skipped {item.spec.name()}: another submitter created its run just now", flush=True)
                    raise SkipJob
                run_ids.append(run_id)
                created.append(run_ids[-1])
            else:
                run_ids.append(item.run.info.run_id)
                client.update_run(run_ids[-1], status="SCHEDULED")  # before the job can claim it
            if journal:
                prepare_journal(client, item.spec, run_ids[-1], journals_dir(settings) / run_ids[-1])
        first = job[0].spec.name()
        command = ["kd", "job", *[a for r in run_ids for a in ("--run-id", r)], *settings.options().argv(),
                   "--journal-dir", str(journals_dir(settings))]
        name = f"kd-{first}" + (f"+{len(job) - 1}" if len(job) > 1 else "")
        job_id, log = write_and_submit(sched, settings, Path(settings.jobs_dir) / grid, f"{first}.{run_ids[0][:8]}",
                                       name, command)
    except SkipJob:
        for run_id in created:
            client.delete_run(run_id)
        return None
    except BaseException:
        for run_id in created:
            client.delete_run(run_id)
            shutil.rmtree(journals_dir(settings) / run_id, ignore_errors=True)
        raise
    tags = {T.JOB_ID: job_id, T.SCHEDULER: sched.name, T.GRID: grid, T.JOB_LOG: str(log),
            T.SUBMITTED_AT: utc_now()}
    try:
        for run_id in run_ids:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except BaseException:
        sched.cancel(job_id)
        for run_id in created:
            client.delete_run(run_id)
        raise
    names = ", ".join(item.spec.name() for item in job)
    print(f"submitted {sched.name} job {job_id}: {names} (run {', '.join(run_ids)}); log {log}", flush=True)
    return job_id


class SkipJob(Exception):
    """A run of the job was claimed by another submitter: this round leaves the job to it."""


def write_and_submit(sched: Scheduler, settings: JobSettings, folder: Path, stem: str, name: str,
                     command: list[str]) -> tuple[str, Path]:
    """Render the job script into folder (a new file per submission) and submit it: (job id, log)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}"
    script, log = folder / f"{stem}.sh", folder / f"{stem}.log"
    env = {"KD_DATA_ROOT": settings.data_root,
           "OMP_NUM_THREADS": str(settings.ncpus)}  # torch's default oversubscribes shared nodes
    # a journal-only job never opens the store: it is not told where it is, and an attempt fails loudly
    env["MLFLOW_TRACKING_URI"] = tracking_uri() if settings.tracking == "direct" else JOURNAL_ONLY_URI
    script.write_text(sched.script(settings, name, command, env))
    script.chmod(0o700)  # it may hold the store's password
    return sched.submit(script, log), log


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def submit_tune(study: str, storage: str, workers: int, scheduler: str, settings: JobSettings, *,
                experiment: str, max_queued: int, dry_run: bool = False) -> None:
    """K worker jobs on an existing Optuna study (`kd tune --create-only`), idempotent like grids.

    Worker i's job is a tag of the study's MLflow run (`kd.worker{i}.job_id`); a worker whose
    job is dead is submitted again (Optuna retries its lost trial); none once the run is FINISHED.
    """

    sched, settings = get_scheduler(scheduler), settings.resolved()
    if not dry_run:
        ready_to_submit(sched)
    with nullcontext() if dry_run else submit_lock():
        client = get_client()
        parent = study_run(client, study, experiment)
        tags = parent.data.tags
        jobs = {i: (tags.get(f"kd.worker{i}.scheduler"), tags.get(f"kd.worker{i}.job_id")) for i in range(workers)}
        asked: dict[str, set[str]] = {}
        for name, job_id in jobs.values():
            if name and job_id:
                asked.setdefault(name, set()).add(job_id)
        live = {(name, job_id) for name, ids in asked.items() for job_id in get_scheduler(name).live(ids)}
        todo = []
        print(f"study {study} (run {parent.info.run_id}, {parent.info.status}): {workers} worker(s), "
              f"{len(live)} live", flush=True)
        for i, job in jobs.items():
            if parent.info.status == "FINISHED":
                action = SKIP_FINISHED
            elif job in live:
                action = f"{SKIP_RUNNING} ({job[0]} job {job[1]})"
            elif len(todo) + len(live) < max_queued:
                action = SUBMIT
                todo.append(i)
            else:
                action = WAIT_SLOT
            print(f"  worker {i}: {action}", flush=True)
        for i in [] if dry_run else todo:
            command = tune_worker_command(study, storage, i, options=settings.options(), python="python")
            job_id, log = write_and_submit(sched, settings, Path(settings.jobs_dir) / f"tune-{study}",
                                           f"worker{i}", f"kd-tune-{study}-w{i}", command)
            worker_tags = {f"kd.worker{i}.job_id": job_id, f"kd.worker{i}.scheduler": sched.name,
                           f"kd.worker{i}.submitted_at": utc_now()}
            client.log_batch(parent.info.run_id, tags=[RunTag(k, v) for k, v in worker_tags.items()])
            print(f"submitted {sched.name} job {job_id}: worker {i} of study {study}; log {log}", flush=True)


def study_run(client: MlflowClient, study: str, experiment: str) -> Run:
    check_chars("study", study, allowed=WORD_CHARS)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`kd.study` = '{study}' AND tags.`kd.tuning` = 'study'"
    found = client.search_runs([exp.experiment_id], query) if exp else []
    if not found:
        raise SpecError(f"no study '{study}' in experiment '{experiment}': create it first with "
                        f"`kd tune ... --study {study} --create-only` (docs/tuning.md)")
    return found[0]
