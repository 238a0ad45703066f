"""What people read: reasons cut at a word, never mid-number; heartbeats as a time, not epoch seconds;
kd status with the store away; kd sync with nothing to do."""

from __future__ import annotations

import time

from kd.errors import first_line
from kd.tracking.journal import Journal
from kd.tracking.runs import HEARTBEAT_FORMAT, heartbeat_now, heartbeat_time
from tests.conftest import run_kd


def test_a_long_reason_is_cut_at_a_word_and_says_so() -> None:
    reason = "HTTPConnectionPool(host='127.0.0.1', port=5055): Max retries exceeded with url: /api\nsecond line"
    cut = first_line(reason, 50)
    assert cut == "HTTPConnectionPool(host='127.0.0.1', port=5055): ..."
    assert first_line(reason, 45) == "HTTPConnectionPool(host='127.0.0.1', ..."  # never 'port=505'
    assert first_line("short\nmore") == "short" and first_line("") == ""
    assert first_line("x" * 30, 10) == "x" * 10 + " ..."  # one long word: cut where it must, and said


def test_the_heartbeat_is_a_readable_time_and_old_numeric_ones_still_count() -> None:
    stamp = heartbeat_now()
    assert time.strptime(stamp, HEARTBEAT_FORMAT) and stamp.endswith(" UTC")
    assert abs(heartbeat_time(stamp) - time.time()) < 2
    assert heartbeat_time("1796558149") == 1796558149.0  # written by kd before this change
    assert heartbeat_time("garbage") == 0.0  # long past: never keeps a lease alive


def test_status_with_the_store_away_lists_the_local_journals_and_sync_says_when_idle(store, tmp_path) -> None:
    journal = Journal(tmp_path / "kd-journal" / "0123456789abcdef")
    for epoch in (1, 2):
        journal.append("log", step=epoch, epoch=True, metrics={"test_acc": 50.0})
    journal.append("status", status="FINISHED")
    away = run_kd("status", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # nothing listens on port 9
    assert away.returncode == 4 and len(away.stderr.strip().splitlines()) == 1, away.stderr
    assert "does not answer" in away.stderr
    assert away.stdout.strip() == (f"unsynced: run 0123456789abcdef (FINISHED at epoch 2 in its journal): 3 record(s) "
                                   f"in {journal.folder}; kd sync ships them")
    empty = tmp_path / "empty"
    empty.mkdir()
    idle = run_kd("sync", str(empty))
    assert idle.returncode == 0 and idle.stdout.startswith("kd sync: nothing to ship"), idle.stdout
