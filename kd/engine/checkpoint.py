"""Crash-safe checkpoints in the run's journal folder, mirrored to the store's artifacts.

A checkpoint is written to a temporary file, fsynced and renamed over `checkpoint/checkpoint.pth`
of the run's journal folder, after the one it replaces was kept as `checkpoint/previous.pth`; both
are journal artifacts, so the sender mirrors them to the store. A resume reads the journal
folder's copy first (no store needed) and the store's only when the folder is elsewhere (another
node's scratch). A damaged newest file falls back to the previous one with a warning.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kd.errors import SpecError
from kd.faults import crash_point
from kd.models.weights import load_weights_only
from kd.tracking.runs import RunTracker

NEWEST = "checkpoint/checkpoint.pth"
PREVIOUS = "checkpoint/previous.pth"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file, fsync, then rename over `path` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        crash_point("checkpoint_write")
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """The checkpoints of one run, in its journal folder (`checkpoint/`) and mirrored to the store."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.dir = tracker.journal.folder / "checkpoint"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict[str, Any]) -> None:
        newest, previous = self.dir / "checkpoint.pth", self.dir / "previous.pth"
        if newest.exists():
            tmp = previous.with_name(f".{previous.name}.tmp")
            shutil.copyfile(newest, tmp)
            os.replace(tmp, previous)
            self.tracker.log_file(previous, "checkpoint")
        save_atomic(state, newest)
        self.tracker.log_file(newest, "checkpoint")

    def candidates(self) -> Iterator[tuple[str, Path | None]]:
        """Where a resume may read the run's checkpoints, best first: the journal folder's newest and
        previous (or, if the folder has none, the store's), then the store's mirrors of both."""
        download_dir = self.dir / "download"
        for artifact in (NEWEST, PREVIOUS):
            yield artifact, self.tracker.download(artifact, download_dir)
        if (self.tracker.journal.folder / NEWEST).exists():  # the store's copies were not read above
            for artifact in (NEWEST, PREVIOUS):
                yield f"the store's {artifact}", self.tracker.mirror(artifact, download_dir / "store")

    def load(self) -> dict[str, Any] | None:
        """The newest loadable checkpoint of the run, or None if it has none."""
        unreadable = []
        for artifact, path in self.candidates():
            if path is None:
                continue
            try:
                state = load_weights_only(path)
            except Exception as err:  # truncated or corrupt: fall back to the previous one
                unreadable.append(f"{artifact} ({type(err).__name__})")
                continue
            if unreadable:  # said once it is known whether the fallback loads (if not: the one error line)
                warnings.warn(f"checkpoint {unreadable[0]} of run {self.tracker.run_id} is unreadable: resuming "
                              f"from {artifact}", stacklevel=2)
            if path != self.dir / "checkpoint.pth":
                save_atomic(state, self.dir / "checkpoint.pth")  # the base of the next `previous`
            return state
        if unreadable:  # the run trained epochs that no checkpoint can bring back: no silent restart
            raise SpecError(f"run {self.tracker.run_id} has no readable checkpoint ({', '.join(unreadable)} "
                            "unreadable): pass --force to train a new attempt from epoch 1")
        return None
