"""What people read: reasons cut at a word, never mid-number; heartbeats as a time, not epoch seconds."""

from __future__ import annotations

import time

from kd.errors import first_line
from kd.tracking.runs import HEARTBEAT_FORMAT, heartbeat_now, heartbeat_time


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
