"""`kd submit`: plan under an exclusive lock, then create runs, write job scripts and submit them.

Idempotence rests on two things: the plan is made from MLflow and the scheduler, never from
local files; and two submitters never plan at once (a `flock` on a file beside the store), so
the second one sees the first one's jobs. A failed submission leaves nothing behind: runs
created for it are deleted, and runs it was to resume stay unfinished with a dead job, which
the next round resubmits.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag

from kd.cluster.grids import Grid
from kd.cluster.planner import Item, Plan, observe, plan
from kd.cluster.schedulers import Scheduler, get_scheduler
from kd.cluster.templates import JobSettings, render
from kd.spec import SpecError
from kd.tracking.runs import create_spec_run
from kd.tracking.store import get_client, tracking_uri

LOCK_TIMEOUT_S = 600  # a submitter stuck longer than a cron period is reported, not waited for


def lock_path() -> Path:
    """Beside the sqlite store; for a server store, per user under ~/.kd (one login node)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".submit.lock")
    return Path.home() / ".kd" / f"submit-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


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


def store_exists() -> bool:
    """False for a sqlite store not created yet: a dry run must not create it."""
    uri = tracking_uri()
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def submit_grid(grid: Grid, scheduler: str, *, experiment: str, max_queued: int, pack: int = 1,
                dry_run: bool = False, retry_failed: bool = False) -> Plan:
    """Print the plan, then (unless dry_run) submit its jobs."""
    if pack < 1 or max_queued < 0:
        raise SpecError("--pack must be >= 1 and --max-queued >= 0")
    sched = get_scheduler(scheduler)
    settings = grid.job.resolved()  # validates paths before anything is touched
    client = get_client() if (store_exists() or not dry_run) else None
    with nullcontext() if dry_run else submit_lock():
        p = plan(grid.specs, observe(client, experiment), max_queued=max_queued, pack=pack,
                 retry_failed=retry_failed)
        mode = "dry run, nothing submitted" if dry_run else f"scheduler {scheduler}"
        print(p.format(f"grid {grid.name} -> experiment {experiment} ({mode})"), flush=True)
        if not dry_run:
            for job in p.jobs:
                submit_job(client, sched, settings, job, grid.name, experiment)
    return p


def submit_job(client: MlflowClient, sched: Scheduler, settings: JobSettings, job: list[Item], grid: str,
               experiment: str) -> str:
    """One job for the items' runs (created now if new); on failure the new runs are deleted."""
    created: list[str] = []
    try:
        run_ids = []
        for item in job:
            if item.run is None:
                run_ids.append(create_spec_run(client, item.spec, experiment, {"kd.grid": grid}))
                created.append(run_ids[-1])
            else:
                run_ids.append(item.run.info.run_id)
                client.update_run(run_ids[-1], status="SCHEDULED")  # before the job can claim it
        first = job[0].spec.name()
        stem = f"{first}.{time.strftime('%Y%m%d-%H%M%S')}.{run_ids[0][:8]}"
        folder = Path(settings.jobs_dir) / grid
        folder.mkdir(parents=True, exist_ok=True)
        script, log = folder / f"{stem}.sh", folder / f"{stem}.log"
        command = ["kd", "job", *[a for r in run_ids for a in ("--run-id", r)], "--device", settings.device]
        env = {"MLFLOW_TRACKING_URI": tracking_uri(), "KD_DATA_ROOT": settings.data_root,
               "OMP_NUM_THREADS": str(settings.ncpus)}  # torch's default oversubscribes shared nodes
        name = f"kd-{first}" + (f"+{len(job) - 1}" if len(job) > 1 else "")
        script.write_text(render(sched.name, settings, name, command, env))
        script.chmod(0o700)  # it may hold the store's password
        job_id = sched.submit(script, log)
    except BaseException:
        for run_id in created:
            client.delete_run(run_id)
        raise
    tags = {"kd.job_id": job_id, "kd.scheduler": sched.name, "kd.grid": grid, "kd.job_log": str(log),
            "kd.submitted_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
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
