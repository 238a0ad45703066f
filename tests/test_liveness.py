"""Faults never block, brick or crash: a refused submission, a first command killed while it creates
the store, malformed journal lines; and a run resumed from another journal folder is shipped once."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import RunTag

import kd.engine.job
import kd.tracking.sender
from kd.cli import main
from kd.cluster.cli import print_unsynced
from kd.cluster.grids import load_grid
from kd.cluster.submit import submit_grid
from kd.engine.trainer import Stopped
from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import store as store_module
from kd.tracking import tags as T
from kd.tracking.journal import JOURNAL, SET_ASIDE, JournalError, pending, shipped_seq
from kd.tracking.ledger import Ledger
from kd.tracking.runs import RunTracker, SpecRuns
from kd.tracking.sender import sync_journals
from kd.tracking.store import StoreUnreachable, get_client
from tests.conftest import CPU

PURE = RunSpec.create(dataset="digits", model="ResNet8", role="student", epochs=3, batch_size=64, train_limit=320)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One new sqlite store for the module (MLflow's migrations take seconds), copied by `store`."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    store_module.open_sqlite(f"sqlite:///{db}", db)
    return db


@pytest.fixture
def store(empty_store: Path, store: str, tmp_path: Path) -> str:
    """conftest's store, from a copy of the module's empty one."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return store


def runs(experiment: str = "kd") -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def steps(run_id: str) -> dict[str, list[int]]:
    """Every per-epoch metric's steps, in order (a step logged twice shows twice)."""
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def fake_pbs(bin_dir: Path, refused_once: Path) -> None:
    """qsub that refuses its first job (as a PBS server with no queue for it does), then accepts;
    qstat that knows no job; qdel that does nothing."""
    bin_dir.mkdir()
    scripts = {
        "qsub": f'if [ ! -e "{refused_once}" ]; then touch "{refused_once}"; '
                'echo "qsub: Job rejected by all possible destinations" >&2; exit 1; fi; echo 4242.pbs',
        "qstat": "exit 0", "qdel": "exit 0"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_a_refused_submission_does_not_block_its_spec(store, tmp_path, monkeypatch):
    """The first round's qsub is refused and its runs are rolled back; their creation claims must not
    keep the spec for a submitter that is gone: `kd train` creates the run at once, the next round submits."""
    fake_pbs(tmp_path / "bin", tmp_path / "refused")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    grid = load_grid("smoke")
    with pytest.raises(SpecError, match="qsub"):
        submit_grid(grid, "pbs", experiment="smoke", max_queued=5)
    assert runs("smoke") == []  # rolled back
    teacher = grid.specs[0]
    started = time.monotonic()
    tracker = RunTracker.open(teacher, "smoke", journal_root=tmp_path / "journals")  # `kd train` of that spec
    assert time.monotonic() - started < 10
    tracker.release()
    MlflowClient().set_terminated(tracker.run_id, "KILLED")
    done = submit_grid(grid, "pbs", experiment="smoke", max_queued=5)
    assert [item.spec for job in done.jobs for item in job][:1] == [teacher]
    assert {r.data.tags.get(T.JOB_ID) for r in runs("smoke")} == {"4242.pbs"}


KILL_MID_MIGRATION = """
import os, signal, sqlalchemy
from mlflow.store.db.base_sql_model import Base
import mlflow.store.model_registry.dbmodels.models, mlflow.store.tracking.dbmodels.models
created = set()

@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def term(conn, cursor, statement, *args):
    if created >= set(Base.metadata.tables):  # every table made, the schema's revision not yet stamped:
        os.kill(os.getpid(), signal.SIGTERM)  # what a store killed here looks like to MLflow's next open
    if statement.lstrip().startswith("CREATE TABLE"):
        created.add(statement.split()[2].strip('"'))

from kd.tracking.store import get_client
get_client()
"""


def test_a_sigterm_while_the_store_is_created_leaves_a_usable_store(tmp_path, monkeypatch, capsys):
    """Killed after MLflow made every table and before it stamped the schema's revision (an older kd
    left such a store, and every later command printed a traceback): no store or a whole one."""
    db = tmp_path / "mlflow.db"
    killed = subprocess.run([sys.executable, "-c", KILL_MID_MIGRATION],
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGTERM, killed.stderr
    half = tmp_path / "half.db"  # what the killed process was building: a half-made store, as an older kd left it
    shutil.copyfile(db.with_name("mlflow.db.creating"), half)
    os.utime(half, (time.time() - 3600,) * 2)  # left an hour ago: not a creation still under way
    monkeypatch.setattr(store_module, "_reachable", set())
    for uri in (f"sqlite:///{db}", f"sqlite:///{half}"):  # the next command: a whole store
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert get_client().search_experiments()
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: ")]
    assert len(said) == 1 and "was left half-made" in said[0] and str(half) in said[0], said
    (set_aside,) = tmp_path.glob("half.db.half-made-*")

    # a half-made store still being written (`mlflow ui` creating it in place) is waited for, not moved
    growing = tmp_path / "growing.db"
    shutil.copyfile(set_aside, growing)
    finisher = threading.Timer(2.0, shutil.copyfile, (db, growing))
    finisher.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{growing}")
    assert get_client().search_experiments()
    finisher.join()
    assert not list(tmp_path.glob("growing.db.half-made-*")) and "half-made" not in capsys.readouterr().err


def journal(folder: Path, *lines: str, shipped: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / JOURNAL).write_text("".join(line + "\n" for line in lines))
    if shipped is not None:
        (folder / "shipped").write_text(str(shipped))
    return folder


def tag_record(seq: int, value: str) -> str:
    return json.dumps({"seq": seq, "op": "log", "ts": 1, "tags": {"kd.note": value}})


def test_a_malformed_journal_is_set_aside_in_one_line_and_the_others_ship(store, tmp_path, capsys):
    client = get_client()
    exp = client.create_experiment("j")
    run_ids = [client.create_run(exp).info.run_id for _ in range(5)]
    root = tmp_path / "kd-journal"  # where `kd status` looks, beside the store
    good = journal(root / run_ids[0], tag_record(1, "shipped"))
    bad = [
        journal(root / run_ids[1], tag_record(1, "first"), "42"),
        journal(root / run_ids[2], json.dumps({"seq": 1, "ts": 1, "tags": {"kd.note": "no op"}})),
        journal(root / run_ids[3], json.dumps({"seq": 1, "op": "log", "ts": 1, "step": 1, "metrics": {"acc": "high"}})),
        journal(root / run_ids[4], tag_record(1, "cut"), shipped=7),
    ]
    local = journal(root / "local-0123", json.dumps({"seq": 1, "op": "create", "ts": 1, "experiment": "j"}))
    (local / "config.json").write_text("{not json")
    assert sync_journals([root]) is False
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if line.startswith("kd: ")]
    assert len(said) == 5, err
    for folder, line in zip(bad[:3], (2, 1, 1), strict=True):
        assert any(f"{folder / JOURNAL} line {line} " in s for s in said), (folder, said)
    assert any(f"{bad[3] / 'shipped'} says record 7 was shipped" in s for s in said)
    assert any(f"{local / 'config.json'} is not a run's spec" in s for s in said)
    assert client.get_run(run_ids[0]).data.tags["kd.note"] == "shipped" and f"synced run {run_ids[0]}" in out
    assert all("kd.note" not in client.get_run(r).data.tags for r in run_ids[1:4])  # nothing half-shipped
    assert pending(good) == []
    assert main(["status", "--experiment", "j"]) == 0  # status lists the runs and names each bad journal
    assert capsys.readouterr().out.count("unreadable: ") == 4


def test_a_run_resumed_from_another_journal_folder_is_shipped_once(store, tmp_path, monkeypatch, capsys):
    """Issue 19's repro on sqlite: folder `first` trains while the store is away from epoch 3 on and
    ends unsynced; its process is gone; folder `other` resumes the run from the store and finishes it;
    then `kd sync` of `first` sets its records aside: one FINISHED run, every step once."""
    away = threading.Event()
    real_ship = kd.tracking.sender.ship

    def ship(client, folder, ledger=None):
        if away.is_set():
            raise ConnectionError("store away")
        return real_ship(client, folder, ledger)

    def store_goes_away(student, epoch, metrics):
        if epoch == 2:  # the store has epochs 1 and 2, then is away
            tracker, deadline = student.tracker, time.monotonic() + 30
            while shipped_seq(tracker.journal.folder) < tracker.journal.seq and time.monotonic() < deadline:
                tracker.sender.poke()
                time.sleep(0.05)
            away.set()

    monkeypatch.setattr(kd.tracking.sender, "ship", ship)
    first, other = tmp_path / "first", tmp_path / "other"
    (outcome,) = kd.engine.job.run_specs([PURE], options=CPU, progress=False, journal_dir=first,
                                         on_epoch=store_goes_away, sync_timeout=0.2)
    assert outcome.unsynced
    run_id = outcome.run_id
    client = MlflowClient()
    client.log_batch(run_id, tags=[RunTag(T.HEARTBEAT, f"{time.time() - 600:.0f}")])  # as a process gone for 10 min
    away.clear()
    kd.engine.job.run_specs([PURE], options=CPU, progress=False, journal_dir=other)
    assert "resuming run" in capsys.readouterr().out
    print_unsynced(client, [first])
    assert "taken over: " in capsys.readouterr().out
    assert sync_journals([first]) is True
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("kd sync: set aside ") and "lease generation 1" in said[0], said
    assert (first / SET_ASIDE / f"{run_id}.g1" / JOURNAL).exists()  # kept on disk
    (run,) = runs()
    assert run.info.status == "FINISHED"
    for key, got in steps(run_id).items():
        assert got == ([0] if key in ("best_test_acc", "final_test_acc", "best_epoch", "train_time") else [1, 2, 3]), key
    assert sync_journals([first]) is True and capsys.readouterr().out == ""  # nothing twice


def test_an_in_memory_store_is_refused_before_training(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://")
    monkeypatch.setattr(kd.engine.job, "load_dataset", lambda name: pytest.fail("data loaded"))
    with pytest.raises(SpecError, match="not a sqlite file") as refused:
        kd.engine.job.run_specs([PURE], options=CPU, progress=False)
    assert "\n" not in str(refused.value) and "sqlite:///mlflow.db" in str(refused.value)


def test_a_read_only_store_is_viewed_and_synced_without_lock_files(store, tmp_path, monkeypatch, capsys):
    get_client()
    for lock in tmp_path.glob("*.lock"):
        lock.unlink()
    monkeypatch.setattr(store_module, "_reachable", set())  # a new process
    (tmp_path / "mlflow.db").chmod(0o444)
    tmp_path.chmod(0o555)  # (root may write all the same: the lock files are checked below)
    try:
        assert main(["status"]) == 0
        assert main(["sync"]) == 0
    finally:
        tmp_path.chmod(0o755)
    assert list(tmp_path.glob("*.lock")) == []


class HangingApi(BaseHTTPRequestHandler):
    """A server whose /health answers and whose API hangs (its database is stuck)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            time.sleep(60)

    def log_message(self, *args: object) -> None:
        pass


def test_a_hanging_api_is_one_line_within_15_s_before_data_loads(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HangingApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(kd.engine.job, "load_dataset", lambda name: pytest.fail("data loaded"))
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnreachable, match="does not answer") as refused:
            kd.engine.job.run_specs([PURE], options=CPU, progress=False)
    finally:
        server.shutdown()
    assert time.monotonic() - started < 15 and "\n" not in str(refused.value)


def test_an_unwritable_journal_dir_stops_before_a_run_is_created(store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(JournalError, match="cannot write the run journal"):
        kd.engine.job.run_specs([PURE], options=CPU, progress=False, journal_dir=blocker / "journals")
    assert runs() == []


def test_a_sigterm_while_the_data_loads_creates_no_run(store, monkeypatch):
    real_load = kd.engine.job.load_dataset

    def load_then_term(name: str):
        os.kill(os.getpid(), signal.SIGTERM)  # kd's handler is installed: it only sets the stop flag
        return real_load(name)

    monkeypatch.setattr(kd.engine.job, "load_dataset", load_then_term)
    with pytest.raises(Stopped, match="before training began"):
        kd.engine.job.run_specs([PURE], options=CPU, progress=False)
    assert runs() == []


def test_unreadable_local_checkpoints_resume_from_the_stores_mirror(store, tmp_path, capsys):
    def stop_after_2(student, epoch, metrics):
        if epoch == 2:
            raise RuntimeError("stopped for the test")

    with pytest.raises(RuntimeError):
        kd.engine.job.run_specs([PURE], options=CPU, progress=False, on_epoch=stop_after_2)
    (run,) = runs()
    for name in ("checkpoint.pth", "previous.pth"):
        path = tmp_path / "kd-journal" / run.info.run_id / "checkpoint" / name
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="resuming from the store's checkpoint/checkpoint.pth"):
        kd.engine.job.run_specs([PURE], options=CPU, progress=False)
    assert f"resuming run {run.info.run_id} after epoch 2" in capsys.readouterr().out
    assert steps(run.info.run_id)["test_acc"] == [1, 2, 3]


def test_a_pack_error_after_a_run_finished_leaves_that_run_finished(store, monkeypatch):
    """The second student's finish raises: the first, already FINISHED (a teacher would be registered),
    is not marked KILLED after it; only the run still open ends FAILED."""
    real_finish, finished = kd.engine.job.finish, []

    def finish_once(s, shape):
        if finished:
            raise ValueError("the second finish broke")
        finished.append(real_finish(s, shape))
        return finished[-1]

    monkeypatch.setattr(kd.engine.job, "finish", finish_once)
    pack = [PURE, dataclasses.replace(PURE, label_smoothing=0.0)]
    with pytest.raises(ValueError, match="the second finish broke"):
        kd.engine.job.run_specs(pack, options=CPU, progress=False)
    status = {r.info.run_id: r.info.status for r in runs()}
    assert status.pop(finished[0].run_id) == "FINISHED" and list(status.values()) == ["FAILED"], status


def test_a_run_made_between_looking_and_claiming_is_resumed_not_made_twice(store):
    """Two identical starts: B looks (no run), A creates the spec's run, then B claims. B must go back
    to A's run, not claim attempt 2 and train a second run (seen once in 4 starts on a server store)."""
    client = get_client()
    b = SpecRuns(client, Ledger(client), PURE, "kd", None, "process-b")
    assert b.to_resume(force=False) is None  # B looked: nothing yet
    a = SpecRuns(client, Ledger(client), PURE, "kd", None, "process-a")
    made_by_a, _ = a.create(None, new_attempt=False)
    assert made_by_a is not None
    assert b.create(None, new_attempt=False)[0] is None  # B's claim: A's run is there now
    assert [r.info.run_id for r in runs()] == [made_by_a]
    assert b.to_resume(force=False).info.run_id == made_by_a
