"""Field-proof tracking with real processes: a real `mlflow server` stopped mid-run and started
again, a job killed while it is away, jobs that end before it is back, journal-only grids, N
identical commands at once, and the bad inputs of the journal.

The server's backend is sqlite here; with KD_TEST_POSTGRES_URI (CI) the outage test runs on
PostgreSQL behind the server instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from kd.cluster.planner import RESUME, observe, plan
from kd.cluster.server import SERVER_SETTINGS
from kd.engine.job import run_specs
from kd.spec import RunSpec
from kd.tracking.journal import JOURNAL, local_state, read_records
from kd.tracking.presentation import SUMMARY_STEP, summary_values
from kd.tracking.store import get_client
from tests.conftest import CPU, registered_teacher, run_kd
from tests.test_cluster import kd

TEACHER = ("train", "--dataset", "digits", "--model", "ResNet8", "--role", "teacher", "--batch-size", "64",
           "--train-limit", "640", "--device", "cpu")
STUDENT = ("distill", "--dataset", "digits", "--teacher", "ResNet8", "--student", "ResNet8", "--method", "logit",
           "--alpha", "0.5", "--epochs", "2", "--batch-size", "64", "--train-limit", "640", "--device", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` subprocess that can be stopped and started again on the same port."""

    def __init__(self, folder: Path, backend: str | None = None) -> None:
        self.folder, self.port = folder, free_port()
        self.backend = backend or f"sqlite:///{folder}/server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 - the server's for its life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **SERVER_SETTINGS})
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # as a reaped login-node daemon goes: no goodbye
        self.proc.wait()


POSTGRES = os.environ.get("KD_TEST_POSTGRES_URI")


def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str | None = None):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    srv = Server(tmp_path, backend)
    srv.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.setenv("KD_JOURNAL_DIR", str(tmp_path / "journals"))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real `mlflow server` on a sqlite file of its own."""
    yield from serve(tmp_path, monkeypatch)


@pytest.fixture
def any_server(tmp_path, monkeypatch):
    """The server on PostgreSQL where there is one (CI; its database outlives the test: experiments get
    names of their own there), else on sqlite: the outage is the server's, whatever its backend."""
    yield from serve(tmp_path, monkeypatch, POSTGRES)


def start_kd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kd.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def runs(experiment: str, query: str = "") -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], query) if exp else []


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every training metric's (step, value) points, in step order (not the timings or system ones)."""
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics
            if k not in ("epoch_time", "train_time") and not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def journal_epochs(folder: Path) -> list[dict]:
    return [r for r in read_records(folder / JOURNAL) if r["op"] == "log" and r.get("epoch")]


def wait_until(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.mark.slow
def test_a_store_outage_does_not_stop_training_and_loses_nothing(any_server, tmp_path):
    """The server is killed at epoch 2 and started again only after the job has trained 4 more epochs
    (far past MLflow's retry window as kd sets it, 3 requests in about 3 s): the run finishes, and its
    history equals an uninterrupted run's, every step once."""
    epochs = ("--epochs", "14")
    ours, reference_exp = f"outage-{uuid.uuid4().hex[:8]}", f"reference-{uuid.uuid4().hex[:8]}"
    reference = run_kd(*TEACHER, *epochs, "--experiment", reference_exp)
    assert reference.returncode == 0, reference.stderr
    (ref,) = runs(reference_exp)
    proc = start_kd(*TEACHER, *epochs, "--experiment", ours)
    wait_until(lambda: runs(ours) and int(runs(ours)[0].data.tags.get("kd.epoch", 0)) >= 2, what="epoch 2")
    run_id = runs(ours)[0].info.run_id
    folder = tmp_path / "journals" / run_id
    any_server.stop()
    down = time.time() * 1000
    outage_start_epoch = len(journal_epochs(folder))
    wait_until(lambda: len(journal_epochs(folder)) >= outage_start_epoch + 4, what="4 epochs in the outage")
    any_server.start()
    up = time.time() * 1000
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "tracking store unreachable" in err and "tracking store back" in err
    trained_down = [r["step"] for r in journal_epochs(folder) if down < r["ts"] < up]
    assert len(trained_down) >= 4, trained_down  # epochs went on while the store was away
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    got, want = histories(run_id), histories(ref.info.run_id)
    assert set(got) == set(want)
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], f"{key}: a step lost or logged twice"
        assert got[key] == want[key], f"{key} differs from the uninterrupted run"
    print(f"outage {(up - down) / 1000:.1f} s, epochs trained during it: {trained_down}")


@pytest.mark.slow
def test_kill_9_while_the_store_is_away_resumes_from_the_journal(server, tmp_path):
    epochs = ("--epochs", "8")
    reference = run_kd(*TEACHER, *epochs, "--experiment", "reference")
    assert reference.returncode == 0, reference.stderr
    (ref,) = runs("reference")
    proc = start_kd(*TEACHER, *epochs)
    wait_until(lambda: runs("kd") and int(runs("kd")[0].data.tags.get("kd.epoch", 0)) >= 1, what="epoch 1")
    run_id = runs("kd")[0].info.run_id
    folder = tmp_path / "journals" / run_id
    server.stop()
    wait_until(lambda: len(journal_epochs(folder)) >= 4, what="epoch 4 in the journal")
    proc.kill()
    proc.wait()
    server.start()
    resumed = run_kd(*TEACHER, *epochs)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id} after epoch" in resumed.stdout
    assert histories(run_id) == histories(ref.info.run_id)
    assert registered_teacher("digits-ResNet8").run_id in (run_id, ref.info.run_id)


@pytest.mark.slow
def test_a_job_that_ends_while_the_store_is_away_is_synced_later(server, tmp_path):
    """Exit 0 with the run unsynced; `kd sync` makes it FINISHED with every epoch and registers the
    teacher; a second job's journal is shipped by one `kd submit` round instead."""
    proc = start_kd(*TEACHER, "--epochs", "3", "--sync-timeout", "2")
    wait_until(lambda: runs("kd") and int(runs("kd")[0].data.tags.get("kd.epoch", 0)) >= 1, what="epoch 1")
    run_id = runs("kd")[0].info.run_id
    server.stop()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"run {run_id} is unsynced" in err and "unsynced (" in out
    state = local_state(tmp_path / "journals" / run_id)
    assert state["status"] == "FINISHED" and state["epoch"] == 3 and state["pending"] > 0
    server.start()
    assert MlflowClient().get_run(run_id).info.status != "FINISHED"
    status = run_kd("status")
    assert f"unsynced: run {run_id} (FINISHED at epoch 3" in status.stdout, status.stdout
    again = run_kd(*TEACHER, "--epochs", "3")  # the same command, before anyone syncs: nothing trains again
    assert again.returncode == 0 and "FINISHED in its journal" in again.stdout, again.stderr
    synced = run_kd("sync")
    assert synced.returncode == 0, synced.stderr
    assert f"synced run {run_id}" in synced.stdout and "registered digits-ResNet8@seed0" in synced.stdout
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in histories(run_id)["test_acc"]] == [1, 2, 3]
    assert registered_teacher("digits-ResNet8").run_id == run_id
    # the same through one submit round, for a student whose job ended while the store was away
    proc = start_kd(*STUDENT, "--epochs", "3", "--sync-timeout", "2")
    wait_until(lambda: [r for r in runs("kd", "tags.`kd.role` = 'student'") if r.data.tags.get("kd.epoch")],
               what="the student's first epoch")
    (student,) = runs("kd", "tags.`kd.role` = 'student'")
    server.stop()
    assert proc.wait(timeout=600) == 0
    server.start()
    grid = tmp_path / "grid.yaml"
    grid.write_text("experiment: kd\ndatasets: [digits]\nseeds: [0]\nteacher: ResNet8\nstudent: ResNet8\n"
                    "pure_student: false\nmethods: [logit]\nalphas: [0.5]\n"
                    "spec: {epochs: 3, batch_size: 64, train_limit: 640}\n")
    submitted = run_kd("submit", "--grid", str(grid), "--scheduler", "local")
    assert submitted.returncode == 0, submitted.stderr
    assert f"synced run {student.info.run_id}" in submitted.stdout
    assert MlflowClient().get_run(student.info.run_id).info.status == "FINISHED"
    assert "skip-finished 2" in submitted.stdout  # the teacher and the student, both synced


def identical_at_once(*args: str, n: int = 4) -> list[subprocess.CompletedProcess]:
    procs = [start_kd(*args) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


def assert_one_trained(results: list[subprocess.CompletedProcess], experiment: str = "kd") -> None:
    trained = [r for r in results if r.returncode == 0 and "FINISHED run" in r.stdout]
    assert len(trained) == 1, [(r.returncode, r.stdout[-300:], r.stderr[-300:]) for r in results]
    for r in results:
        assert r in trained or (r.returncode == 3 and "being trained right now" in r.stderr) \
            or (r.returncode == 0 and "already trained" in r.stdout), (r.returncode, r.stderr[-500:])


def four_teachers_and_four_students() -> None:
    assert_one_trained(identical_at_once(*TEACHER, "--epochs", "2"))
    assert len(runs("kd", "tags.`kd.role` = 'teacher'")) == 1
    assert len(MlflowClient().search_model_versions("name = 'digits-ResNet8'")) == 1
    assert_one_trained(identical_at_once(*STUDENT))
    assert len(runs("kd", "tags.`kd.role` = 'student'")) == 1


def test_identical_commands_at_once_train_one_run_on_a_server_store(server):
    four_teachers_and_four_students()


def test_identical_commands_at_once_train_one_run_on_sqlite(store):
    four_teachers_and_four_students()


def test_a_run_stopped_by_the_store_is_killed_and_resubmitted(store):
    """A store error is not the run's fault: KILLED with the reason, and the next round resumes it."""
    spec = RunSpec.create(dataset="digits", model="ResNet8", role="student", epochs=3, batch_size=64,
                          train_limit=320)

    def store_gone(student, epoch, metrics):
        requests.get(f"http://127.0.0.1:{free_port()}/api/2.0/mlflow/runs/get", timeout=2)  # nobody listens

    with pytest.raises(requests.ConnectionError):
        run_specs([spec], options=CPU, progress=False, on_epoch=store_gone)
    (run,) = runs("kd")
    assert run.info.status == "KILLED" and run.data.tags["kd.error"].startswith("ConnectionError")
    (item,) = plan([spec], observe(get_client(), "kd"), max_queued=5).items
    assert item.action == RESUME
    status = run_kd("status")
    assert " killed " in status.stdout and "\n    ConnectionError" in status.stdout


def test_an_unreachable_store_is_one_line_within_seconds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    done = run_kd(*STUDENT, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert time.monotonic() - started < 15 + 10  # 10 s for Python and torch to start on a loaded machine
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "does not answer" in done.stderr and "MLFLOW_TRACKING_URI" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "kd-journal").exists()


def test_journal_bad_inputs_are_one_line_and_lose_nothing_else(store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_kd(*TEACHER, "--epochs", "1", "--journal-dir", str(blocker / "journals"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write the run journal" in done.stderr and "--journal-dir" in done.stderr
    # a torn last record (kill -9 mid-append) is dropped alone; the rest still ships
    ok = run_kd(*TEACHER, "--epochs", "2")
    assert ok.returncode == 0, ok.stderr
    (run,) = runs("kd", "attributes.status = 'FINISHED'")
    folder = tmp_path / "kd-journal" / run.info.run_id
    records = read_records(folder / JOURNAL)
    with open(folder / JOURNAL, "ab") as f:
        f.write(b'{"seq": 999, "op": "log", "metr')
    assert read_records(folder / JOURNAL) == records
    # a journal whose run was deleted from the store: one line for it, the other journal is shipped
    client = MlflowClient()
    alive = client.create_run(run.info.experiment_id).info.run_id
    other = tmp_path / "kd-journal" / alive
    other.mkdir()
    (other / JOURNAL).write_text(json.dumps({"seq": 1, "op": "log", "ts": 1, "tags": {"kd.note": "shipped"}}) + "\n")
    client.delete_run(run.info.run_id)
    (folder / "shipped").write_text("0")
    synced = run_kd("sync")
    assert synced.returncode == 1
    assert synced.stderr.strip().splitlines() == [
        f"kd: run {run.info.run_id} of journal {folder} is not in the store {store} (deleted?): nothing to ship "
        "it to; remove the folder if the run is not wanted"]
    assert client.get_run(alive).data.tags["kd.note"] == "shipped"


SUMMARY = set(summary_values({"test_acc": [1.0], "epoch_time": [1.0]}))  # the run's one-point metrics
JOURNAL_GRID = """\
experiment: journal
datasets: [digits]
seeds: [0]
teacher: ResNet8
student: ResNet8
pure_student: true
methods: [logit, rkd]
alphas: [0.5]
spec: {epochs: 2, batch_size: 64, train_limit: 256}
job: {walltime: "00:10:00", ncpus: 1, gpus: 0, mem: 1gb, device: cpu, tracking: journal}
"""
SLURM = pytest.mark.skipif(not (shutil.which("sinfo") and os.environ.get("KD_TEST_SLURM")),
                           reason="needs the local Slurm started by .ci/run (sinfo on PATH and KD_TEST_SLURM=1)")


@pytest.mark.parametrize("scheduler", ["local", pytest.param("slurm", marks=[pytest.mark.slurm, pytest.mark.xdist_group("slurm"), SLURM])])
def test_a_journal_only_grid_trains_without_the_store_and_is_ingested(store, tmp_path, scheduler):
    """4 runs (a teacher and a pure student, then 2 KD students) whose jobs never open the store: their environment
    points MLFLOW_TRACKING_URI at nothing. Submit rounds ingest the journals: every run FINISHED, every
    epoch's points there once."""
    grid = tmp_path / "journal.yaml"
    grid.write_text(JOURNAL_GRID)
    outputs = []
    deadline = time.time() + 600
    while True:
        code, out = kd("submit", "--grid", str(grid), "--scheduler", scheduler)  # in this process: no interpreter start a round
        assert code == 0, out
        outputs.append(out)
        finished = runs("journal", "attributes.status = 'FINISHED'")
        if len(finished) == 4:
            break
        assert time.time() < deadline, "\n".join(outputs[-2:])
        time.sleep(3)
    assert "wait-for-teacher 2" in outputs[0]  # the pure student goes with the teacher
    scripts = list((tmp_path / "kd-jobs" / "journal").glob("*.sh"))
    assert scripts and all("export MLFLOW_TRACKING_URI=journal-only" in s.read_text() for s in scripts)
    for run in finished:
        assert run.data.tags["ops.tracking"] == "journal"
        for key, points in histories(run.info.run_id).items():
            if not key.startswith("pretrain"):  # per-epoch points at steps 1 and 2, the summary at 0, each once
                want = [SUMMARY_STEP] if key in SUMMARY else [1, 2]
                assert [s for s, _ in points] == want, (run.info.run_name, key, points)
    teacher = registered_teacher("digits-ResNet8")
    students = [r for r in finished if r.data.tags["kd.role"] == "student" and r.data.tags.get("kd.teacher")]
    assert len(students) == 2 and all(r.data.tags["kd.teacher_run"] == teacher.run_id for r in students)


def test_a_teacher_trains_without_any_store_and_kd_sync_creates_its_run(tmp_path, monkeypatch):
    """`kd train --tracking journal` with no store reachable: it trains; `kd sync` where the store is
    creates the run (FINISHED, every epoch once) and registers the teacher."""
    monkeypatch.chdir(tmp_path)
    away = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "KD_JOURNAL_DIR": str(tmp_path / "j")}
    done = run_kd(*TEACHER, "--epochs", "2", "--tracking", "journal", env=away)
    assert done.returncode == 0, done.stderr
    assert "kd sync" in done.stdout
    again = run_kd(*TEACHER, "--epochs", "2", "--tracking", "journal", env=away)
    assert again.returncode == 0 and "is FINISHED in its journal" in again.stdout
    (folder,) = (tmp_path / "j").iterdir()
    assert folder.name.startswith("local-")
    here = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    synced = run_kd("sync", str(tmp_path / "j"), env=here)
    assert synced.returncode == 0, synced.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", here["MLFLOW_TRACKING_URI"])
    (run,) = runs("kd")
    assert run.info.status == "FINISHED" and run.data.tags["ops.tracking"] == "journal"
    assert [s for s, _ in histories(run.info.run_id)["test_acc"]] == [1, 2]
    assert registered_teacher("digits-ResNet8").run_id == run.info.run_id
    twice = run_kd("sync", str(tmp_path / "j"), env=here)
    assert twice.stdout.startswith("kd sync: nothing to ship"), twice.stdout  # nothing twice
    assert [r.info.run_id for r in runs("kd")] == [run.info.run_id]
