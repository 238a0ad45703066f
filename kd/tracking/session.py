"""A pack's tracking session: all the engine knows of the store.

Made before any data loads, a session checks that the store and the journal root can be written.
It resolves the pack's exact teacher (the registry's, the one a resumed student started with, the
weights file the spec names, or the copy the submitter put in a journal folder); `open` claims,
creates or resumes every run and starts the sender; the engine records through the runs'
trackers; `close` ends the runs an error stopped, waits for the sender to ship, and lets the runs
go. Three ways to track, one interface: the store (`direct`), the folders a submitter prepared
(`journal`), and new local folders (`journal` started by hand, without the store).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.journal import JournalError, check_root, journal_root, prune
from kd.tracking.registry import FoundTeacher, resolve_teacher
from kd.tracking.runs import DIRECT, JOURNAL_ONLY, RunTracker, local_run_folder, read_json, runs_by_key
from kd.tracking.sender import REGISTERED, Sender
from kd.tracking.store import check_writable, get_client

DEFAULT_SYNC_TIMEOUT_S = 180.0  # how long a job's end waits for an away store before exiting unsynced


@dataclass(frozen=True)
class Shipped:
    """Where a run stands once its session closed."""

    unsynced: int  # records still in the journal (the store was away)
    registered: str | None  # the registered version of a teacher, once the store has it


class TrackingSession:
    """The runs of one pack, from their claim to their last shipped record."""

    def __init__(self, specs: list[RunSpec], experiment: str, mode: str, *, journal_dir: Path | None = None,
                 journal_runs: list[Path] | None = None, force: bool = False, attach_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None, sync_timeout: float = DEFAULT_SYNC_TIMEOUT_S) -> None:
        """`journal_runs`: the folders the submitter prepared (journal mode); `extra_tags` go on newly
        created runs; the end waits `sync_timeout` s for an away store."""
        self.specs, self.experiment, self.force = specs, experiment, force
        self.attach_run_id, self.extra_tags, self.sync_timeout = attach_run_id, extra_tags, sync_timeout
        self.root = journal_dir or journal_root()
        self.prepared = journal_runs or []
        self.local = mode == JOURNAL_ONLY and not journal_runs  # started by hand, without the store
        if self.local and any(s.teacher and not s.teacher_weights for s in specs):
            raise SpecError("a student trained without the store (--tracking journal) needs --teacher-weights: "
                            "its registered teacher is in the store")
        self.client: MlflowClient | None = None
        if mode == DIRECT:
            check_writable()
            self.client = get_client()
        if not journal_runs:
            check_root(self.root)
        self.sender = Sender(self.client) if self.client is not None else None
        self.trackers: list[RunTracker] = []

    def teacher(self, spec: RunSpec, dst: Path) -> FoundTeacher:
        """The exact teacher of a taught spec: the copy in its prepared journal folder, else the
        registry's (or the weights file the spec names), downloaded to `dst`; a resumed student keeps
        the teacher run it started with."""
        if self.prepared and not spec.teacher_weights:
            return journal_teacher(self.prepared[self.specs.index(spec)])
        started = started_with(self.client, spec, self.experiment) if self.client else None
        return resolve_teacher(self.client, spec, dst, started)

    def open(self) -> list[RunTracker]:
        """Every spec's run, claimed (created or resumed), one tracker each, in the specs' order."""
        if self.prepared or self.local:
            folders = self.prepared or [local_run_folder(self.root, s, self.experiment, self.force)
                                        for s in self.specs]
            self.trackers = open_journal_runs(folders)
        else:
            self.sender.start()
            self.trackers = self.open_store_runs()
        return self.trackers

    def open_store_runs(self) -> list[RunTracker]:
        """If one run is refused (finished, or trained elsewhere), the runs claimed before it are
        released as KILLED, so that the submitter resubmits them."""
        trackers: list[RunTracker] = []
        try:
            for spec in self.specs:
                trackers.append(RunTracker.open(spec, self.experiment, journal_root=self.root, force=self.force,
                                                attach_run_id=self.attach_run_id, extra_tags=self.extra_tags,
                                                sender=self.sender))
        except BaseException as err:
            for t in trackers:
                t.end("KILLED", f"not trained: another run of its pack was refused ({err})")
            ship_and_release(trackers, self.sender, DEFAULT_SYNC_TIMEOUT_S)
            raise
        return trackers

    def close(self, error: BaseException | None = None, *, stopped: bool = False) -> dict[str, Shipped]:
        """End the runs still open that `error` ended (`stopped`: it is the engine's answer to a
        SIGTERM), ship and let every run go: where each run stands, by run id."""
        if error is not None:
            end_stopped([t for t in self.trackers if t.ended is None], error, stopped)
        return ship_and_release(self.trackers, self.sender, self.sync_timeout)


def infrastructure_failure(err: BaseException) -> bool:
    """The store, the filesystem or the scheduler stopped the run: it would not fail again, so it
    ends KILLED (the next submit round resumes it), not FAILED."""
    return isinstance(err, (OSError, MlflowException, JournalError)) or type(err).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy"))


def end_stopped(trackers: list[RunTracker], err: BaseException, stopped: bool) -> None:
    """End runs that `err` ended: KILLED when they were `stopped` (SIGTERM) or the infrastructure
    failed, to be resumed; FAILED for what would fail again."""
    for t in trackers:
        try:
            if stopped or infrastructure_failure(err):
                t.end("KILLED", str(err) if stopped else f"{type(err).__name__}: {err}")
            else:
                t.end("FAILED", f"{type(err).__name__}: {err}")
        except JournalError:  # the journal's own filesystem failed: the run stays stale, then resumed
            pass


def ship_and_release(trackers: list[RunTracker], sender: Sender | None, timeout: float) -> dict[str, Shipped]:
    """Wait (at most `timeout` s) for the sender to ship every journal, then let the runs go: a run
    whose store is away ends unsynced, to be shipped by `kd sync` or the next `kd submit` round.
    A SIGTERM here (the runs are over) waits too: a scheduler's SIGKILL after its grace loses
    nothing, the journal keeps what was not shipped."""
    if sender is not None:
        sender.drain(timeout)
        sender.stop()
    shipped: dict[str, Shipped] = {}
    for t in trackers:
        t.release()
        left = len(t.journal.pending())
        if sender is not None:
            prune(t.journal.folder)
        if sender is None:
            print(f"kd: run {t.run_id} recorded in its journal {t.journal.folder} (journal-only): the next "
                  "`kd submit` round or `kd sync` ships it", flush=True)
        elif left:
            print(f"kd: run {t.run_id} is unsynced: {left} record(s) wait in {t.journal.folder}; "
                  f"`kd sync {t.journal.folder}` ships them (every kd submit round does)", file=sys.stderr, flush=True)
        registered = t.journal.folder / REGISTERED
        shipped[t.run_id] = Shipped(left, registered.read_text() if registered.exists() else None)
    return shipped


def open_journal_runs(folders: list[Path]) -> list[RunTracker]:
    """Journal-only runs (no store): claimed on this host by a lock on each folder."""
    trackers: list[RunTracker] = []
    try:
        for folder in folders:
            trackers.append(RunTracker.open_journal_only(folder))
    except BaseException:
        for t in trackers:
            t.release()
        raise
    return trackers


def journal_teacher(folder: Path) -> FoundTeacher:
    """A journal-only student's teacher: the weights the submitter put in its folder."""
    path = folder / "teacher.pth"
    if not path.exists():
        raise SpecError(f"{path} is missing: journal-only students get their teacher from the submitter; "
                        "submit them again with kd submit")
    return FoundTeacher(path, **read_json(folder / "teacher.json"))


def started_with(client: MlflowClient, spec: RunSpec, experiment: str) -> str | None:
    """The teacher run an unfinished run of this spec started with (None for a new run)."""
    if client.get_experiment_by_name(experiment) is None:
        return None
    runs = runs_by_key(client, spec.key(), experiment)
    if not runs or runs[0].info.status == "FINISHED":
        return None
    return runs[0].data.tags.get(T.TEACHER_RUN)
