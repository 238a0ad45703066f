"""Shipping journals to the store: in a background thread while training, and by `kd sync`.

`ship(client, folder)` replays one run's pending records in order and notes how far it got; every
record is idempotent in the store (see kd/tracking/journal.py), so replaying one twice is harmless.
A `Sender` thread ships the journals of the runs its process trains, retrying with backoff while
the store is away (training goes on meanwhile), and refreshes their leases' heartbeats.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from kd.errors import SpecError, first_line
from kd.faults import crash_point
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.journal import (
    JOURNAL,
    STORE_RUN_ID,
    BadJournal,
    JournalError,
    SetAside,
    journal_folders,
    local_state,
    mark_shipped,
    pending,
    prune,
    read_records,
    set_aside,
    store_run_id,
)
from kd.tracking.ledger import Ledger
from kd.tracking.logged_models import log_trained_model, run_model_id
from kd.tracking.presentation import describe_run, log_dataset_inputs
from kd.tracking.registry import register_teacher
from kd.tracking.runs import TakenOver, create_spec_run, heartbeat_now, read_json, taken_over
from kd.tracking.store import get_client

MAX_BACKOFF_S = 30.0
HEARTBEAT_SECONDS = 30
REGISTERED = "registered"  # the journal folder's note of what a shipped `register` record became
# log_batch limits of the MLflow API (per request)
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


class RunGone(SetAside):
    """The store refuses the journal's run (deleted, or not there): nothing to ship it to."""


def refused(err: MlflowException) -> bool:
    """The store answered and said no (as opposed to not answering)."""
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_STATE") or "must be in the 'active' state" in str(err)


def ship(client: MlflowClient, folder: Path, ledger: Ledger | None = None) -> int:
    """Ship one journal's pending records, in order; the number shipped. Raises what the store raised
    (the caller retries later), or SetAside in one line: the store has no such run (RunGone), a line
    of the journal is not a record (BadJournal, raised before anything is shipped), or another
    process has taken the run over (TakenOver)."""
    every = read_records(folder / JOURNAL)
    records = pending(folder, every)
    if not records:
        return 0
    fenced = taken_over(lambda: ledger or Ledger(client), folder, every, len(records))
    if fenced:
        raise fenced
    run_id = store_run_id(folder)
    shipped = 0
    records = latest_artifacts(records)
    try:
        if records[0]["op"] == "create":
            run_id = create_local_run(client, folder, records.pop(0))
        for chunk in chunks(records):
            apply(client, run_id, folder, chunk)
            mark_shipped(folder, chunk[-1]["seq"])
            shipped += len(chunk)
    except MlflowException as err:
        if refused(err):
            raise RunGone(f"run {run_id} of journal {folder} is not in the store {client.tracking_uri} "
                          f"(deleted?): nothing to ship it to; remove the folder if the run is not wanted") from None
        raise
    return shipped


def latest_artifacts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without the artifact uploads a later pending record repeats: each upload sends the
    file as it is now, so after a long outage (160 checkpoint records) each artifact path goes once."""
    last = {(r["path"], r.get("dir")): r["seq"] for r in records if r.get("op") == "artifact"}
    return [r for r in records if r.get("op") != "artifact" or last[(r["path"], r.get("dir"))] == r["seq"]]


def create_local_run(client: MlflowClient, folder: Path, record: dict[str, Any]) -> str:
    """The store's run for a journal started without it; created once (a crash after creating it
    and before noting its id leaves one SCHEDULED run, which the next create claims past)."""
    try:
        spec = RunSpec.from_dict(read_json(folder / "config.json"))
    except (OSError, ValueError, TypeError, SpecError) as err:
        raise BadJournal(f"{folder / 'config.json'} is not a run's spec ({first_line(err, 160)}): this "
                         "journal is set aside (the others are shipped); restore the file, then run kd sync again") from None
    run_id = store_run_id(folder)
    while run_id is None:
        run_id = create_spec_run(client, spec, record["experiment"], {T.JOURNAL: str(folder)})
    (folder / STORE_RUN_ID).write_text(run_id)
    mark_shipped(folder, record["seq"])
    return run_id


def chunks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive `log` records merge into one log_batch (within the API's limits); others go alone."""
    out: list[list[dict[str, Any]]] = []
    counts = [0, 0, 0]
    for record in records:
        sizes = [len(record.get(k, {})) for k in ("metrics", "params", "tags")]
        last = out[-1] if out else None
        if (record["op"] == "log" and last and last[-1]["op"] == "log"
                and all(c + s <= m for c, s, m in zip(counts, sizes, (MAX_METRICS, MAX_PARAMS, MAX_TAGS),
                                                        strict=True))):
            last.append(record)
            counts = [c + s for c, s in zip(counts, sizes, strict=True)]
        else:
            out.append([record])
            counts = sizes
    return out


def apply(client: MlflowClient, run_id: str, folder: Path, chunk: list[dict[str, Any]]) -> None:
    record = chunk[0]
    op = record["op"]
    if op == "log":
        metrics = [Metric(k, float(v), r["ts"], r.get("step", 0)) for r in chunk for k, v in r.get("metrics", {}).items()]
        params = {k: v for r in chunk for k, v in r.get("params", {}).items()}
        tags = {k: v for r in chunk for k, v in r.get("tags", {}).items()}
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    elif op == "status":
        if record["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
            return
        if record["status"] == "FINISHED":  # a finished run carries no reason it once stopped
            if T.ERROR in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, T.ERROR)
        client.set_terminated(run_id, status=record["status"], end_time=record["ts"])
    elif op == "artifact":
        path = folder / record["path"]
        if path.exists():  # a file replaced since (a newer checkpoint) was shipped with its newer record
            client.log_artifact(run_id, str(path), record.get("dir"))
            crash_point("checkpoint_upload")
    elif op == "inputs":
        log_dataset_inputs(client, run_id, record["inputs"])
    elif op == "describe":
        describe_run(client, run_id, record["spec"], record.get("teacher_run"))
    elif op == "model":  # once: a logged model of the run exists after a crash between logging and noting it
        if run_model_id(client, run_id) is None:
            log_trained_model(client, run_id, record["spec"], str(folder / record["path"]), record["shape"])
    elif op == "lease":  # the journal's own note of the lease its process held (see taken_over)
        pass
    elif op == "register":
        model_id = run_model_id(client, run_id)
        if model_id is None:
            raise JournalError(f"journal {folder} registers run {run_id}, which has no logged model: "
                               "run kd sync again after the run's `model` record is shipped")
        note = register_teacher(client, run_id, RunSpec.from_dict(record["spec"]), record["best_acc"], model_id)
        if note:
            (folder / REGISTERED).write_text(note)
            describe_run(client, run_id, record["spec"])
    else:
        raise JournalError(f"journal {folder} holds an unknown record '{op}': update kd, or remove the folder")


class Sender:
    """Ships the journals of this process's runs in the background until stopped."""

    def __init__(self, client: MlflowClient, *, heartbeat: bool = True) -> None:
        self.client = client
        self.folders: list[Path] = []
        self.heartbeat = heartbeat
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.gone: dict[str, SetAside] = {}
        self.ledger: Ledger | None = None  # found at the first shipment (the store may be away at the start)
        self.outage_since: float | None = None
        self.thread = threading.Thread(target=self.loop, name="kd-sender", daemon=True)

    def add(self, folder: Path) -> None:
        self.folders.append(folder)

    def start(self) -> None:
        self.thread.start()

    def loop(self) -> None:
        backoff = 1.0
        last_beat = 0.0
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                if self.heartbeat and time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                    self.beat()
                    last_beat = time.monotonic()
                self.ledger = self.ledger or Ledger(self.client)
                for folder in self.folders:
                    if folder.name not in self.gone:
                        try:
                            ship(self.client, folder, self.ledger)
                        except SetAside as err:
                            self.gone[folder.name] = err
                            print(f"kd: {err}", file=sys.stderr, flush=True)
                if self.outage_since is not None:
                    print(f"kd: tracking store back after {time.time() - self.outage_since:.0f} s; "
                          "its journal is shipped", file=sys.stderr, flush=True)
                    self.outage_since = None
                backoff = 1.0
                self.wake.wait(HEARTBEAT_SECONDS)
            except Exception as err:  # the store is away: training goes on, the journal keeps everything
                if self.outage_since is None:
                    self.outage_since = time.time()
                    reason = first_line(err) if str(err) else type(err).__name__
                    print(f"kd: tracking store unreachable ({reason}): training goes on, records wait in the "
                          "journal and are shipped when it answers", file=sys.stderr, flush=True)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def beat(self) -> None:
        stamp = heartbeat_now()
        for folder in self.folders:
            if folder.name not in self.gone:  # a run taken over is another process's to beat for
                self.client.log_batch(folder.name, tags=[RunTag(T.HEARTBEAT, stamp)])

    def poke(self) -> None:
        self.wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every journal is shipped; True if they are."""
        deadline = time.monotonic() + timeout
        while True:
            self.poke()
            left = [f for f in self.folders if f.name not in self.gone and pending(f)]
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)


def sync_journals(roots: list[Path], client: MlflowClient | None = None,
                  lock: Callable[[], AbstractContextManager[Any]] = nullcontext, say_idle: bool = False) -> bool:
    """`kd sync` and every submit round: ship every journal under roots; one line per run shipped or
    set aside. False if a journal could not be shipped (the others are shipped regardless); a
    journal another process took over is moved to `set-aside/` beside it, kept, and not an error.
    `lock` is taken only when there is something to ship: with nothing to ship, the store is not
    opened (a read-only one can be synced, and nothing is written beside it); `say_idle` (kd sync):
    say so in one line."""

    folders, ok = [], True
    for folder in journal_folders(roots):
        try:
            if pending(folder):
                folders.append(folder)
        except BadJournal as err:
            print(f"kd: {err}", file=sys.stderr, flush=True)
            ok = False
    if not folders:
        if say_idle and ok:
            print(f"kd sync: nothing to ship: no journal under {', '.join(map(str, roots))} holds records "
                  "the store lacks", flush=True)
        return ok
    with lock():
        return ship_all(folders, client or get_client()) and ok


def ship_all(folders: list[Path], client: MlflowClient) -> bool:
    """Ship each journal; a journal set aside is said in one line and the others are shipped."""
    ledger, ok = Ledger(client), True
    for folder in folders:
        try:
            n = ship(client, folder, ledger)
        except TakenOver as fenced:
            kept = set_aside(folder, fenced.generation)
            print(f"kd sync: set aside {fenced.count} record(s) of {folder}, kept in {kept}: {fenced.why}", flush=True)
            continue
        except SetAside as err:
            print(f"kd: {err}", file=sys.stderr, flush=True)
            ok = False
            continue
        state = local_state(folder)
        prune(folder)
        registered = folder / REGISTERED
        print(f"synced run {store_run_id(folder)}: {n} record(s), epoch {state['epoch']}, {state['status'] or 'started'}"
              + (f"; registered {registered.read_text()}" if registered.exists() else ""), flush=True)
    return ok
