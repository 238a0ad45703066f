"""One MLflow run per RunSpec: find it by key, create it, resume it, finish it.

Who creates a spec's run and who trains it are decided by atomic claims in the store's ledger
(kd/tracking/ledger.py), so N identical commands started at the same instant, on one host or
several, on sqlite or a server, train one run. What the run records goes to its journal first
(kd/tracking/journal.py) and reaches the store through the sender: training never waits on it.
In journal-only mode (`--tracking journal`) the process never opens the store at all.
"""

from __future__ import annotations

import calendar
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag, ViewType

from kd.errors import SpecError
from kd.spec import TRACKING_MODES, RunSpec
from kd.tracking import tags as T
from kd.tracking.journal import (
    JOURNAL,
    LEASE,
    LOCAL_PREFIX,
    Journal,
    SetAside,
    WriterLock,
    journal_folders,
    lease_generation,
    local_state,
    pending,
    read_records,
    set_aside,
    store_run_id,
)
from kd.tracking.ledger import Ledger, owner_id
from kd.tracking.presentation import SUMMARY_STEP, summary_values
from kd.tracking.store import experiment_id, get_client


class Shipper(Protocol):
    """What ships a run's journal to the store (kd.tracking.sender.Sender): told of each journal it
    opens, woken by a durable record. A protocol, so this module names no sender (no import circle)."""

    def add(self, folder: Path) -> None: ...

    def poke(self) -> None: ...

DIRECT, JOURNAL_ONLY = TRACKING_MODES
CREATION_WAIT_S = 30.0  # how long a process that lost the creation claim waits for the winner's run
LEASE_SECONDS = 180  # a RUNNING run whose heartbeat is younger than this is being trained now


class RunRefused(SpecError):
    """The spec is finished or being trained by another process."""


class AlreadyFinished(RunRefused):
    """The spec's run is FINISHED: nothing to do (not an error for cron-driven submitters)."""

    def __init__(self, message: str, run: Run | None, spec: RunSpec) -> None:
        super().__init__(message)
        self.run, self.spec = run, spec


def spec_tags(spec: RunSpec) -> dict[str, str]:
    """The searchable identity of a run (the tags in docs/architecture.md), spelled as its params."""
    params = spec.params()
    tags = {T.KEY: spec.key(), T.ROLE: spec.role, T.DATASET: spec.dataset, T.MODEL: spec.model,
            T.METHOD: spec.method, T.ALPHA: params["alpha"], T.SEED: params["seed"], T.RECIPE: spec.recipe()}
    if spec.teacher:
        tags[T.TEACHER] = spec.teacher
    return tags


def runs_by_key(client: MlflowClient, key: str, experiment: str) -> list[Run]:
    """Runs of one spec, newest first (more than one only after `--force`)."""
    return client.search_runs(
        [experiment_id(client, experiment)],
        f"tags.`{T.KEY}` = '{key}'",
        order_by=["attributes.start_time DESC"],
    )


def runs_made(client: MlflowClient, key: str, experiment: str) -> list[Run]:
    """Every run ever created for one spec, deleted ones too: a run a failed submission rolled back
    has spent its attempt's claim, so the next attempt is the one after it."""
    return client.search_runs([experiment_id(client, experiment)], f"tags.`{T.KEY}` = '{key}'",
                              run_view_type=ViewType.ALL)


def claimant_gone(holder: str, now: float | None = None) -> bool:
    """A creation claim `claimant@time` whose claimant will never create its run: it died on this
    host, or claimed longer ago than any creation takes (its run would be counted by now)."""
    claimant, _, stamp = holder.rpartition("@")
    if owner_is_dead_here(claimant):
        return True
    try:
        return (now or time.time()) - float(stamp) > CREATION_WAIT_S
    except ValueError:  # a claim without a time (an older kd's): its claimant is long gone
        return True


def claim_creation(ledger: Ledger, exp: str, spec: RunSpec, attempt: int, claimant: str) -> tuple[int, str]:
    """Claim the creation of the spec's run as attempt `attempt`, or the first attempt after it whose
    claim is not held by a claimant that is gone: (the attempt, its claimant; ours if we won)."""
    value = f"{claimant}@{time.time():.0f}"
    while True:
        holder = ledger.claim(attempt_key(exp, spec, attempt), value)
        if holder == value or not claimant_gone(holder):
            return attempt, holder.rpartition("@")[0]
        attempt += 1


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


HEARTBEAT_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def heartbeat_now() -> str:
    """`ops.heartbeat`: the time in a form people read in MLflow's UI."""
    return time.strftime(HEARTBEAT_FORMAT, time.gmtime())


def heartbeat_time(text: str) -> float:
    """Seconds since the epoch of a heartbeat: its readable form, or the number runs wrote before it
    (an unreadable one is long past)."""
    try:
        return float(text)
    except ValueError:
        try:
            return float(calendar.timegm(time.strptime(text, HEARTBEAT_FORMAT)))
        except ValueError:
            return 0.0


def lease_is_live(run: Run, now: float | None = None) -> bool:
    """RUNNING with a recent heartbeat from a process that is not known to be dead."""
    beat = run.data.tags.get(T.HEARTBEAT)
    if run.info.status != "RUNNING" or beat is None:
        return False
    if owner_is_dead_here(run.data.tags.get(T.OWNER, "")):
        return False
    return (now or time.time()) - heartbeat_time(beat) < LEASE_SECONDS


def holder_is_live(holder: str, run: Run, now: float | None = None) -> bool:
    """A lease claim `owner@time` still holds the run: its owner trains it (a live heartbeat), or
    claimed it a moment ago and has not tagged the run yet."""
    owner, _, stamp = holder.rpartition("@")
    if run.data.tags.get(T.OWNER) == owner:
        return lease_is_live(run, now)
    return not owner_is_dead_here(owner) and (now or time.time()) - float(stamp or 0) < LEASE_SECONDS


def take_lease(ledger: Ledger, client: MlflowClient, spec: RunSpec, run_id: str, owner: str) -> int:
    """Claim the lease generation after the latest, only if that one's holder is gone: of two
    processes resuming at once one wins, and neither takes over from a holder that is starting.
    The generation won: the run's journal records it, so what an earlier holder wrote after being
    taken over is never shipped (kd/tracking/sender.py fences it)."""
    prefix = f"{run_id}/lease"
    holders = ledger.generations(prefix)
    latest = max(holders, default=0)
    if latest and holder_is_live(holders[latest], client.get_run(run_id)):
        raise busy(spec, holders[latest].rpartition("@")[0], run_id)
    holder = ledger.claim(f"{prefix}/{latest + 1}", value := f"{owner}@{time.time():.0f}")
    if holder != value:
        raise busy(spec, holder.rpartition("@")[0], run_id)
    return latest + 1


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
    tags = {**spec_tags(spec), T.RUN_NAME: spec.name(), **(extra_tags or {})}
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
) -> str | None:
    """A new run for the spec, SCHEDULED until a trainer claims it; None if another process claimed
    the spec's next attempt first (two submitters, or a submitter and a `kd train`)."""
    exp = experiment_id(client, experiment)
    made = len(runs_made(client, spec.key(), experiment))
    if claim_creation(Ledger(client), exp, spec, made + 1, owner := owner_id())[1] != owner:
        return None
    run = client.create_run(exp, run_name=spec.name())
    write_spec(client, run.info.run_id, spec, extra_tags)
    client.update_run(run.info.run_id, status="SCHEDULED")
    return run.info.run_id


def attempt_key(experiment_id: str, spec: RunSpec, attempt: int) -> str:
    return f"{experiment_id}/{spec.key()}/{attempt}"


@dataclass
class RunTracker:
    """A handle on one spec's run, held by the process that trains it; it writes to the journal."""

    run_id: str
    spec: RunSpec
    journal: Journal
    resumed: bool
    client: MlflowClient | None = None  # None in journal-only mode: nothing here talks to the store
    sender: Shipper | None = None
    lock: WriterLock | None = None
    store_steps: dict[str, set[int]] = field(default_factory=dict)
    ended: str | None = None  # the status this process ended the run with

    @classmethod
    def open(
        cls,
        spec: RunSpec,
        experiment: str,
        *,
        journal_root: Path,
        force: bool = False,
        attach_run_id: str | None = None,
        extra_tags: dict[str, str] | None = None,
        sender: Shipper | None = None,
    ) -> RunTracker:
        """Find-or-create the spec's run in the store and take its lease.

        FINISHED -> refused (unless force: a new attempt); unfinished -> resumed; live lease
        elsewhere -> refused. `attach_run_id` is the run `mlflow run` created: it becomes the
        spec's run when the spec has none yet (see docs/architecture.md for the other cases).
        """
        client = get_client()
        runs = SpecRuns(client, Ledger(client), spec, experiment, attach_run_id, owner_id())
        run_id, resume = runs.find_or_create(journal_root, force, extra_tags)
        generation = take_lease(runs.ledger, client, spec, run_id, runs.owner)
        tags = {T.OWNER: runs.owner, T.HEARTBEAT: heartbeat_now(), T.HOST: socket.gethostname(), T.TRACKING: DIRECT}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.update_run(run_id, status="RUNNING")
        tracker = cls(run_id, spec, Journal(journal_root / run_id), resume, client, sender)
        tracker.journal.append(LEASE, sync=True, generation=generation, owner=runs.owner)
        if resume:
            tracker.store_steps = {"test_acc": {m.step for m in client.get_metric_history(run_id, "test_acc")}}
        if sender is not None:
            sender.add(tracker.journal.folder)
        return tracker

    @classmethod
    def open_journal_only(cls, folder: Path) -> RunTracker:
        """A run the submitter created, trained without the store: its spec is the folder's config.json."""
        spec = RunSpec.from_dict(read_json(folder / "config.json"))
        lock = WriterLock(folder)
        if not lock.acquire():
            raise busy(spec, "another process on this host", folder.name)
        state = local_state(folder)
        if state["status"] == "FINISHED":
            lock.release()
            raise AlreadyFinished(f"run {folder.name} is FINISHED in its journal {folder}: the next `kd submit` "
                                  "round (or `kd sync`) ships it", None, spec)
        journal = Journal(folder)
        tracker = cls(folder.name, spec, journal, bool(journal.seq), lock=lock)
        tracker.record("log", tags={T.OWNER: owner_id(), T.HOST: socket.gethostname(), T.TRACKING: JOURNAL_ONLY})
        tracker.record("status", status="RUNNING")
        return tracker

    def record(self, op: str, *, sync: bool = False, **fields: Any) -> None:
        """Append to the journal; a durable record (an epoch, a status) also wakes the sender, the
        others (system samples, tags) ride along with it: a store transaction per epoch, not per
        sample, so the sender's thread costs training next to nothing."""
        self.journal.append(op, sync=sync, **fields)
        if sync and self.sender is not None:
            self.sender.poke()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record("log", tags=tags)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One point per metric at step=epoch, then the epoch tag; fsynced: an epoch is durable."""
        self.record("log", sync=True, step=epoch, epoch=True, metrics={k: float(v) for k, v in metrics.items()},
                    tags={T.EPOCH: str(epoch)})

    def log_metric(self, key: str, value: float, step: int) -> None:
        self.record("log", step=step, metrics={key: float(value)})

    def logged_steps(self, key: str) -> set[int]:
        """Steps of `key` this run has recorded: its journal's, and the store's when the journal
        started elsewhere (a resume on another node)."""
        steps = {r["step"] for r in self.journal.records() if r["op"] == "log" and key in r.get("metrics", {})}
        if key not in self.store_steps and self.client is not None and self.resumed:
            self.store_steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return steps | self.store_steps.get(key, set())

    def log_json(self, name: str, payload: Any) -> None:
        path = self.journal.folder / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        self.log_file(path)

    def log_file(self, path: Path, artifact_dir: str | None = None) -> None:
        """An artifact: a file inside the run's journal folder, shipped (its newest content) later."""
        self.record("artifact", path=str(path.relative_to(self.journal.folder)), dir=artifact_dir)

    def download(self, artifact: str, dst: Path) -> Path | None:
        """The run's artifact: the journal folder's copy if there is one, else the store's (a resume on
        another node), else None."""
        local = self.journal.folder / artifact
        return local if local.exists() else self.mirror(artifact, dst)

    def mirror(self, artifact: str, dst: Path) -> Path | None:
        """The store's copy of the run's artifact, downloaded to dst (None: none, or no store)."""
        if self.client is None:
            return None
        folder, _, name = artifact.rpartition("/")
        if name not in {Path(f.path).name for f in self.client.list_artifacts(self.run_id, folder or None)}:
            return None
        return Path(self.client.download_artifacts(self.run_id, artifact, str(dst)))

    def end(self, status: str, error: str | None = None) -> None:
        if error:
            self.record("log", tags={T.ERROR: error[:5000]})
        self.record("status", sync=True, status=status)
        self.ended = status

    def finish(self, best: Path, history: dict[str, list[float]], shape: dict[str, int], best_acc: float) -> None:
        """best.pth (written there), metrics.json, the summary metrics and the logged model, FINISHED,
        then (teachers) the registry alias and the description that names it: in this order in the
        journal, so the teacher is registered only once all of its epochs are in the store."""
        self.log_file(best)
        self.log_json("metrics.json", {**history, "config": self.spec.to_dict()})
        self.record("log", step=SUMMARY_STEP, metrics=summary_values(history))
        self.record("model", spec=self.spec.to_dict(), path=str(best.relative_to(self.journal.folder)), shape=shape)
        self.end("FINISHED")
        if self.spec.role == "teacher":
            self.record("register", sync=True, spec=self.spec.to_dict(), best_acc=best_acc)

    def release(self) -> None:
        self.journal.close()
        if self.lock is not None:
            self.lock.release()


class TakenOver(SetAside):
    """The journal's records were written under a lease another process has since taken over (it
    resumed the run from the store and recorded those epochs itself): shipping them would log them twice."""

    def __init__(self, folder: Path, count: int, generation: int, latest: int, holder: str) -> None:
        self.folder, self.count, self.generation = folder, count, generation
        self.why = (f"written under lease generation {generation} of run {store_run_id(folder)}, which "
                    f"{holder.rpartition('@')[0]} took over since (generation {latest}) and recorded itself")
        super().__init__(f"{count} record(s) of {folder} are not shipped: {self.why}")


def taken_over(ledger: Callable[[], Ledger], folder: Path, records: list[dict[str, Any]], count: int,
               ) -> TakenOver | None:
    """Whether a later lease generation than the journal's own holds its run (journals without one,
    journal-only runs, are never taken over: one folder per run). `ledger` is asked only then."""
    generation = lease_generation(records)
    if generation is None:
        return None
    holders = ledger().generations(f"{store_run_id(folder)}/lease")
    latest = max(holders, default=0)
    return TakenOver(folder, count, generation, latest, holders[latest]) if latest > generation else None


def resume_folder(ledger: Ledger, spec: RunSpec, run: Run, folder: Path) -> None:
    """Before `run` resumes with this journal folder: a folder whose lease another process took over
    since (it resumed the run from the store, elsewhere) is moved to `set-aside/` and the run resumes
    from the store; a folder whose run FINISHED while the store was away is not trained again."""
    if not folder.is_dir():
        return
    records = read_records(folder / JOURNAL)
    fenced = taken_over(lambda: ledger, folder, records, len(pending(folder, records)))
    if fenced:
        kept = set_aside(folder, fenced.generation)
        print(f"kd: set aside {kept} ({fenced.count} record(s) not shipped): {fenced.why}; resuming from the store",
              file=sys.stderr, flush=True)
    elif local_state(folder)["status"] == "FINISHED":
        raise AlreadyFinished(f"spec {spec.key()} already trained in run {run.info.run_id}: FINISHED in its journal "
                              f"{folder}, not yet in the store: `kd sync` ships it", run, spec)


def make_spec_run(client: MlflowClient, exp: str, spec: RunSpec, tags: dict[str, str], attach_run_id: str | None) -> str:
    """The spec's new run, once its creation is claimed: the run `mlflow run` made, or a new one."""
    if attach_run_id:
        write_spec(client, attach_run_id, spec, tags, logged=client.get_run(attach_run_id).data.params)
        return attach_run_id
    run_id = client.create_run(exp, run_name=spec.name()).info.run_id
    write_spec(client, run_id, spec, tags)
    return run_id


@dataclass
class SpecRuns:
    """The runs of one spec in the store, as one process looking for the run to train sees them (the run
    `mlflow run` made for this process, `attach_run_id`, is not one of them until it is the spec's)."""

    client: MlflowClient
    ledger: Ledger
    spec: RunSpec
    experiment: str
    attach_run_id: str | None
    owner: str
    exp: str = field(init=False)  # the experiment's id, made if new

    def __post_init__(self) -> None:
        self.exp = experiment_id(self.client, self.experiment)

    def find_or_create(self, journal_root: Path, force: bool, extra_tags: dict[str, str] | None) -> tuple[str, bool]:
        """The run to train and whether it resumes: the spec's unfinished run, else a new one if this
        process wins its creation; one that loses waits (at most CREATION_WAIT_S) for the winner's run."""
        deadline = time.monotonic() + CREATION_WAIT_S
        latest = self.to_resume(force)
        while latest is None:
            run_id, creator = self.create(extra_tags, new_attempt=force)
            if run_id is not None:
                return run_id, False
            if time.monotonic() > deadline:  # the winner died between its claim and its run
                raise busy(self.spec, creator, "(not created yet)")
            time.sleep(0.2)  # another process won the creation: wait for its run, then race for its lease
            force = False  # the attempt is the winner's: its run is the one to wait for
            latest = self.to_resume(force)
        resume_folder(self.ledger, self.spec, latest, journal_root / latest.info.run_id)
        if self.attach_run_id:
            self.client.set_tag(self.attach_run_id, T.RESUMED_IN, latest.info.run_id)
        return latest.info.run_id, True

    def to_resume(self, force: bool) -> Run | None:
        """The spec's newest run if it is to be resumed; None when a run is to be made (there is none,
        or `force` asks for a new attempt). Refused: a FINISHED run (unless forced), a run trained now."""
        existing = [r for r in runs_by_key(self.client, self.spec.key(), self.experiment)
                    if r.info.run_id != self.attach_run_id]
        if not existing:
            return None
        latest = existing[0]
        if latest.info.status == "FINISHED" and not force:
            raise AlreadyFinished(
                f"spec {self.spec.key()} already trained in run {latest.info.run_id} "
                f"('{latest.info.run_name}', FINISHED): pass --force to train a new attempt",
                latest, self.spec,
            )
        if lease_is_live(latest):
            raise busy(self.spec, latest.data.tags.get(T.OWNER), latest.info.run_id)
        return None if force else latest

    def create(self, extra_tags: dict[str, str] | None, new_attempt: bool) -> tuple[str | None, str]:
        """The spec's next attempt, made if this process wins its creation claim: (its run id, or None
        when another claimant won; the claimant). Unless a new attempt is asked for, a run that appeared
        since `to_resume` looked (another process created it in between) is that run: this process
        goes back to resume or wait for it, never claiming the attempt after it (a second run)."""
        made = [r for r in runs_made(self.client, self.spec.key(), self.experiment)
                if r.info.run_id != self.attach_run_id]
        appeared = [r for r in made if r.info.lifecycle_stage == "active"]
        if appeared and not new_attempt:
            return None, appeared[0].data.tags.get(T.OWNER, appeared[0].info.run_id)
        attempt, creator = claim_creation(self.ledger, self.exp, self.spec, len(made) + 1,
                                          self.attach_run_id or self.owner)
        if creator not in (self.attach_run_id, self.owner):
            return None, creator
        tags = {**(extra_tags or {}), **({T.ATTEMPT: str(attempt)} if attempt > 1 else {})}
        return make_spec_run(self.client, self.exp, self.spec, tags, self.attach_run_id), creator


def local_run_folder(root: Path, spec: RunSpec, experiment: str, force: bool = False) -> Path:
    """The journal folder of a run started without the store (`--tracking journal` by hand): the spec's
    unfinished one under root, else a new `local-<id>` folder whose first record asks the first sync
    to create the run in the store."""
    for folder in journal_folders([root]):
        if folder.name.startswith(LOCAL_PREFIX) and RunSpec.from_dict(read_json(folder / "config.json")) == spec:
            if local_state(folder)["status"] != "FINISHED" or not force:
                return folder
    folder = root / f"{LOCAL_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.to_dict(), indent=2))
    journal = Journal(folder)
    journal.append("create", sync=True, experiment=experiment)
    journal.close()
    return folder


def busy(spec: RunSpec, owner: str | None, run_id: str) -> RunRefused:
    return RunRefused(f"spec {spec.key()} is being trained right now by {owner} in run {run_id}: "
                      "wait for it, or stop that process")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    return read_json(Path(client.download_artifacts(run_id, "config.json")))
