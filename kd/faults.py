"""Crash points for the crash-safety tests: `KD_CRASH_AT=point:n` kills the process with SIGKILL
the n-th time it reaches `point` (1-based), exactly as a node failure would, mid-operation;
`KD_CRASH_AT=point:n:term` sends SIGTERM instead, as a walltime or `qdel` does.

Points: `step` (after an optimiser step), `pretrain_step` (before a pre-training step), `eval`
(inside evaluation), `checkpoint_write` (half a checkpoint file written), `checkpoint_upload`
(between the two artifact uploads), `metrics_log` (checkpoint committed, metrics not yet
logged), `finished` (the runs FINISHED in the journal, not yet shipped). Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def crash_point(point: str) -> None:
    target = os.environ.get("KD_CRASH_AT")
    if not target:
        return
    name, _, rest = target.partition(":")
    if name != point:
        return
    count, _, how = rest.partition(":")
    _reached[point] += 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)
