"""A run's durable journal: what a run records goes to its own filesystem first, the store later.

Training never waits on the tracking store (a server restart, a login node that reaped the
daemon, a compute node with no route out). Every record a run makes (tags, metric points,
status changes, artifacts, the teacher's registration) is appended to `journal.jsonl` in the
run's journal folder, one JSON object per line, fsynced once per epoch. A kill -9 at any byte
leaves at most one torn last line, which is dropped. A sender ships the records in order and
writes how far it got to `shipped`; shipping a record twice changes nothing in the store (a metric
point carries the timestamp it was recorded with, and MLflow keeps one row per (key, step,
timestamp, value); tags and status overwrite; artifacts are replaced; registration is claimed in
the ledger), so a crash of either side between shipping and noting it costs nothing.

Layout of one run's folder (`<journal root>/<run id>/`): `journal.jsonl`, `shipped`,
`config.json` (the spec), `checkpoint/` (the resume checkpoints: the store's copies are mirrors),
`files/` (best.pth, metrics.json), and for journal-only jobs `teacher.pth` + `teacher.json`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.errors import SpecError

JOURNAL = "journal.jsonl"
SHIPPED = "shipped"
JOURNAL_ENV = "KD_JOURNAL_DIR"
LOCAL_PREFIX = "local-"  # a run started without the store: its store run id comes at the first sync
STORE_RUN_ID = "run_id"  # ...and is kept in this file of the folder


LEASE = "lease"  # the record a direct run's journal starts each process with: the lease generation it holds
SET_ASIDE = "set-aside"  # where `kd sync` moves journals it must not ship (beside them, kept on disk)
OPS = frozenset({"create", "log", "status", "artifact", "inputs", "describe", "model", "register", LEASE})
STATUSES = frozenset({"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"})


class JournalError(SpecError):
    """The journal cannot be written or read back: one line naming the folder and the fix."""


class SetAside(JournalError):
    """This journal cannot be shipped as it is (one line says why); the other journals are shipped."""


class BadJournal(SetAside):
    """A complete line of a journal that kd did not write: named by file and line, never half-shipped."""


def unwritable(folder: Path, err: OSError) -> JournalError:
    return JournalError(f"cannot write the run journal in {folder} ({err.strerror or err}): "
                        f"point --journal-dir (or ${JOURNAL_ENV}) at a writable folder")


def check_root(root: Path) -> None:
    """Refuse a journal root this process cannot write before any data loads or any run exists."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as err:
        raise unwritable(root, err) from None


def now_ms() -> int:
    return int(time.time() * 1000)


class Journal:
    """The append-only record of one run, owned by the process that trains it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / JOURNAL
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.repair()
            self._file = open(self.path, "ab")  # noqa: SIM115 - held for the run's life
        except OSError as err:
            raise unwritable(folder, err) from None
        self.seq = self.last_seq()

    @property
    def run_id(self) -> str:
        return self.folder.name

    def repair(self) -> None:
        """Cut a torn last line (a kill mid-append): that record only is lost, never the file."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, op: str, *, sync: bool = False, **fields: Any) -> int:
        """Write one record now (the OS has it even if the process is killed); fsync if `sync`."""
        self.seq += 1
        line = json.dumps({"seq": self.seq, "op": op, "ts": now_ms(), **fields}, separators=(",", ":")) + "\n"
        try:
            self._file.write(line.encode())
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())
        except OSError as err:
            raise JournalError(f"cannot append to {self.path} ({err.strerror or err}): free space or fix "
                               "the folder's permissions, then run the same command again (it resumes)") from None
        return self.seq

    def pending(self) -> list[dict[str, Any]]:
        return pending(self.folder)

    def close(self) -> None:
        self._file.close()

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def last_seq(self) -> int:
        records = self.records()
        return records[-1]["seq"] if records else 0


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record; a torn last line (no newline: a kill mid-append) is dropped. Any other line that is
    not a record kd writes raises BadJournal naming the file and line: nothing of it is shipped."""
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        problem = record_problem(record, records[-1]["seq"] if records else 0)
        if problem:
            raise BadJournal(f"{path} line {number} {problem}: this journal is set aside (the others are shipped); "
                             "fix or delete that line, then run kd sync again")
        records.append(record)
    return records


def record_problem(record: Any, previous_seq: int) -> str | None:
    """What makes a parsed line not a journal record (None: it is one): what `ship` relies on."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    seq, op = record.get("seq"), record.get("op")
    if not isinstance(seq, int) or seq <= previous_seq:
        return f"has seq {seq!r}, not a number after {previous_seq}"
    if op not in OPS or not isinstance(record.get("ts"), int):
        return f"has op {op!r} and ts {record.get('ts')!r}: not a record kd writes"
    if op == "log":
        metrics = record.get("metrics", {})
        if not isinstance(metrics, dict) or not all(is_number(v) for v in metrics.values()):
            return f"has a metric that is not a number ({json.dumps(metrics)[:80]})"
        texts = [record.get(k, {}) for k in ("params", "tags")]
        if not all(isinstance(t, dict) and all(isinstance(v, str) or is_number(v) for v in t.values()) for t in texts):
            return "has a param or tag that is neither text nor a number"
        if not isinstance(record.get("step", 0), int):
            return f"has step {record.get('step')!r}, not a whole number"
    if op == "status" and record.get("status") not in STATUSES:
        return f"has status {record.get('status')!r}, not one of {', '.join(sorted(STATUSES))}"
    if op == "artifact" and not isinstance(record.get("path"), str):
        return "names no artifact path"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def lease_generation(records: list[dict[str, Any]]) -> int | None:
    """The lease generation the journal's last process held (None: a journal-only or older journal)."""
    return next((r["generation"] for r in reversed(records) if r["op"] == LEASE), None)


def set_aside(folder: Path, generation: int) -> Path:
    """Move a journal that must not be shipped out of its root, into `set-aside/` beside it: kept on
    disk, never shipped or resumed again."""
    if folder.parent.name == SET_ASIDE:
        return folder
    target = folder.parent / SET_ASIDE / f"{folder.name}.g{generation}"
    if target.exists():
        target = target.with_name(f"{target.name}.{now_ms()}")
    target.parent.mkdir(exist_ok=True)
    os.replace(folder, target)
    return target


def shipped_seq(folder: Path) -> int:
    try:
        return int((folder / SHIPPED).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def mark_shipped(folder: Path, seq: int) -> None:
    tmp = folder / f".{SHIPPED}.{os.getpid()}"
    tmp.write_text(str(seq))
    os.replace(tmp, folder / SHIPPED)


def pending(folder: Path, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The records not yet shipped (of `records`, the folder's journal if already read); a shipped mark
    past the last record (the journal was cut or replaced) raises BadJournal: never silently nothing."""
    records = read_records(folder / JOURNAL) if records is None else records
    done, last = shipped_seq(folder), (records[-1]["seq"] if records else 0)
    if done > last:
        raise BadJournal(f"{folder / SHIPPED} says record {done} was shipped but {folder / JOURNAL} ends at record "
                         f"{last} (cut or replaced): write 0 into {folder / SHIPPED} to ship it all again "
                         "(a record shipped twice changes nothing)")
    return [r for r in records if r["seq"] > done]


def store_run_id(folder: Path) -> str | None:
    """The store's id of the folder's run (None until the first sync created a local run there)."""
    if (folder / STORE_RUN_ID).exists():
        return (folder / STORE_RUN_ID).read_text().strip()
    return None if folder.name.startswith(LOCAL_PREFIX) else folder.name


def journal_folders(roots: list[Path]) -> Iterator[Path]:
    """Run folders under the given roots (or the roots themselves, if they are run folders)."""
    for root in roots:
        if (root / JOURNAL).exists():
            yield root
        elif root.is_dir():
            yield from sorted(p.parent for p in root.glob(f"*/{JOURNAL}"))


def local_state(folder: Path) -> dict[str, Any]:
    """What the journal says of its run: last status, epochs recorded, records not yet shipped."""
    records = read_records(folder / JOURNAL)
    status = next((r["status"] for r in reversed(records) if r["op"] == "status"), None)
    epoch = max((r.get("step", 0) for r in records if r["op"] == "log" and r.get("epoch")), default=0)
    return {"run_id": folder.name, "status": status, "epoch": epoch,
            "pending": len(pending(folder, records)), "folder": str(folder), "generation": lease_generation(records)}


def prune(folder: Path) -> None:
    """A FINISHED run whose journal is all in the store keeps its journal, not its big files:
    checkpoints, best.pth and a journal-only student's teacher copy have their copies in the store."""
    state = local_state(folder)
    if state["status"] == "FINISHED" and not state["pending"]:
        for name in ("checkpoint", "files"):
            shutil.rmtree(folder / name, ignore_errors=True)
        (folder / "teacher.pth").unlink(missing_ok=True)


class WriterLock:
    """One writer per journal on a host: a second process for the same run is refused (flock)."""

    def __init__(self, folder: Path) -> None:
        self.handle = open(folder / ".lock", "a")  # noqa: SIM115 - held for the run's life

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def journal_root() -> Path:
    """Where runs keep their journals: $KD_JOURNAL_DIR, else `kd-journal/` beside a sqlite store,
    else `kd-journal/` in the working directory (the job's own filesystem)."""
    from kd.tracking.store import sqlite_path  # the store module imports mlflow: only when asked

    if os.environ.get(JOURNAL_ENV):
        return Path(os.environ[JOURNAL_ENV]).expanduser().absolute()
    db = sqlite_path()
    return (db.parent if db else Path.cwd()) / "kd-journal"
