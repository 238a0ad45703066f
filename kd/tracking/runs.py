"""One MLflow run per RunSpec: find it by key, create it, resume it, finish it.

Everything goes through `MlflowClient` with explicit run ids, so several runs (packed students)
can be filled from one process.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from kd.spec import RunSpec, SpecError
from kd.tracking.store import experiment_id, get_client

UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
LEASE_SECONDS = 180  # a RUNNING run whose heartbeat is younger than this is being trained now
HEARTBEAT_SECONDS = 30


class RunRefused(SpecError):
    """The spec is finished or being trained by another process."""


class AlreadyFinished(RunRefused):
    """The spec's run is FINISHED: nothing to do (not an error for cron-driven submitters)."""

    def __init__(self, message: str, run: Run, spec: RunSpec) -> None:
        super().__init__(message)
        self.run, self.spec = run, spec


def spec_tags(spec: RunSpec) -> dict[str, str]:
    """The searchable identity of a run (ARCHITECTURE.md contract 2)."""
    tags = {
        "kd.key": spec.key(),
        "kd.role": spec.role,
        "kd.dataset": spec.dataset,
        "kd.model": spec.model,
        "kd.method": spec.method,
        "kd.alpha": f"{spec.alpha:g}",
        "kd.seed": str(spec.seed),
    }
    if spec.teacher:
        tags["kd.teacher"] = spec.teacher
    return tags


def runs_by_key(client: MlflowClient, key: str, experiment: str) -> list[Run]:
    """Runs of one spec, newest first (more than one only after `--force`)."""
    return client.search_runs(
        [experiment_id(client, experiment)],
        f"tags.`kd.key` = '{key}'",
        order_by=["attributes.start_time DESC"],
    )


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str) -> bool:
    """True if the owner process ran on this host and is gone (a kill -9 leaves no goodbye)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_is_live(run: Run, now: float | None = None) -> bool:
    """RUNNING with a recent heartbeat from a process that is not known to be dead."""
    beat = run.data.tags.get("kd.heartbeat")
    if run.info.status != "RUNNING" or beat is None:
        return False
    if owner_is_dead_here(run.data.tags.get("kd.owner", "")):
        return False
    return (now or time.time()) - float(beat) < LEASE_SECONDS


def write_spec(client: MlflowClient, run_id: str, spec: RunSpec, extra_tags: dict[str, str] | None = None,
               logged: dict[str, str] | None = None) -> None:
    """Params, identity tags and config.json: what makes an MLflow run the run of this spec.

    `logged`: the params of a run `mlflow run` created, the `-P` values as the user typed them
    (`50`, `.25`, `60,120`); MLflow refuses to change a param, so those stay, after a check that
    they mean the spec's values.
    """
    logged = logged or {}
    for key, value in spec.params().items():
        if key in logged and not same_param(logged[key], value):
            raise SpecError(f"param {key} is {logged[key]!r} in run {run_id} but the spec has {value!r}: "
                            "pass the same value")
    tags = {**spec_tags(spec), "mlflow.runName": spec.name(), **(extra_tags or {})}
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in spec.params().items() if k not in logged],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.log_dict(run_id, spec.to_dict(), "config.json")


def same_param(typed: str, ours: str) -> bool:
    """Whether a param as typed (`-P alpha=1`) means the spec's value as written (`1.0`)."""
    a, b = (v.strip().strip("()[]").replace(" ", "") for v in (typed, ours))
    if a.lower() == b.lower():
        return True
    try:
        return [float(x) for x in a.split(",")] == [float(x) for x in b.split(",")]
    except ValueError:
        return bool(a) and Path(a).expanduser().absolute() == Path(b)  # a relative init_weights


def create_spec_run(
    client: MlflowClient, spec: RunSpec, experiment: str, extra_tags: dict[str, str] | None = None
) -> str:
    """A new run for the spec, SCHEDULED until a trainer claims it (the submitter creates runs too)."""
    run = client.create_run(experiment_id(client, experiment), run_name=spec.name())
    write_spec(client, run.info.run_id, spec, extra_tags)
    client.update_run(run.info.run_id, status="SCHEDULED")
    return run.info.run_id


@dataclass
class RunTracker:
    """A handle on one spec's MLflow run, held by the process that trains it."""

    client: MlflowClient
    run_id: str
    spec: RunSpec
    owner: str
    resumed: bool

    @classmethod
    def open(
        cls,
        spec: RunSpec,
        experiment: str,
        *,
        force: bool = False,
        attach_run_id: str | None = None,
        extra_tags: dict[str, str] | None = None,
    ) -> RunTracker:
        """Find-or-create the spec's run and take its lease.

        FINISHED -> refused (unless force: a new attempt); unfinished -> resumed; live lease
        elsewhere -> refused. `attach_run_id` is the run `mlflow run` created: it becomes the
        spec's run when the spec has none yet (see docs/architecture.md for the other cases).
        """
        client = get_client()
        existing = runs_by_key(client, spec.key(), experiment)
        latest = existing[0] if existing else None
        attempt = len(existing) + 1
        if latest is not None and attach_run_id and latest.info.run_id == attach_run_id:
            latest = existing[1] if len(existing) > 1 else None
            attempt -= 1
        if latest is not None and latest.info.status == "FINISHED" and not force:
            raise AlreadyFinished(
                f"spec {spec.key()} already trained in run {latest.info.run_id} "
                f"('{latest.info.run_name}', FINISHED): pass --force to train a new attempt",
                latest, spec,
            )
        if latest is not None and lease_is_live(latest):
            raise RunRefused(
                f"spec {spec.key()} is being trained right now by {latest.data.tags.get('kd.owner')} "
                f"in run {latest.info.run_id}: wait for it, or stop that process"
            )
        resume = latest is not None and latest.info.status != "FINISHED" and not force
        tags = {**(extra_tags or {}), **({"kd.attempt": str(attempt)} if force else {})}
        if resume:
            run_id = latest.info.run_id
            if attach_run_id and attach_run_id != run_id:
                client.set_tag(attach_run_id, "kd.resumed_in", run_id)
        elif attach_run_id:
            run_id = attach_run_id
            write_spec(client, run_id, spec, tags, logged=client.get_run(run_id).data.params)
        else:
            run_id = create_spec_run(client, spec, experiment, tags)
        tracker = cls(client, run_id, spec, owner_id(), resume)
        tracker._claim()
        return tracker

    def _claim(self) -> None:
        """Mark the run RUNNING under our lease; lose gracefully if another process won the race."""
        tags = {"kd.owner": self.owner, "kd.heartbeat": f"{time.time():.0f}", "kd.host": socket.gethostname()}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.update_run(self.run_id, status="RUNNING")
        time.sleep(0.05)
        holder = self.client.get_run(self.run_id).data.tags.get("kd.owner")
        if holder != self.owner:
            raise RunRefused(f"run {self.run_id} was claimed by {holder} at the same moment: not starting twice")

    def heartbeat(self) -> threading.Event:
        """Refresh the lease from a daemon thread until the returned event is set."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.client.set_tag(self.run_id, "kd.heartbeat", f"{time.time():.0f}")
                except Exception:  # a flaky store must not kill training; the next beat retries
                    pass

        threading.Thread(target=beat, daemon=True).start()
        return stop

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One point per metric at step=epoch, in one batch (all or nothing), then the epoch tag."""
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), ts, epoch) for k, v in metrics.items()],
            tags=[RunTag("kd.epoch", str(epoch)), RunTag("kd.heartbeat", f"{time.time():.0f}")],
        )

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_json(self, name: str, payload: Any) -> None:
        self.client.log_dict(self.run_id, payload, name)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def download(self, artifact: str, dst: Path) -> Path | None:
        """A run artifact downloaded into dst, or None if the run has no such artifact."""
        folder, _, name = artifact.rpartition("/")
        if name not in {Path(f.path).name for f in self.client.list_artifacts(self.run_id, folder or None)}:
            return None
        return Path(self.client.download_artifacts(self.run_id, artifact, str(dst)))

    def end(self, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(self.run_id, "kd.error", error[:5000])
        elif status == "FINISHED" and "kd.error" in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, "kd.error")  # an earlier attempt's: not why it ended
        self.client.set_terminated(self.run_id, status=status)


def read_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    return json.loads(Path(client.download_artifacts(run_id, "config.json")).read_text())

