"""System metrics (CPU, memory, GPU) sampled into each run's journal, like MLflow's own names.

MLflow's monitor samples every 10 s and writes straight to the store: a 2-minute run got one
point, and an away store lost them. Here the interval grows with the run's age (a point every
second at first, then about 200 points over any length of run, at most one a minute), and the
points go through the journal like every other record.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import psutil
import torch

from kd.errors import SpecError
from kd.spec import check_device

if TYPE_CHECKING:
    from kd.tracking.runs import RunTracker

POINTS = 200
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 60.0


def pick_device(name: str = "auto") -> torch.device:
    """The device `--device` names (auto: the GPU if one is visible); here, below the engine and
    the analysis, which both compute on it."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError("--device cuda but no CUDA GPU is visible: pass --device cpu or run on a GPU node")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SpecError("--device mps but this machine has no Apple GPU (MPS): pass --device cpu or auto")
    return torch.device(name)


def sample() -> dict[str, float]:
    memory = psutil.virtual_memory()
    values = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(),
        "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
        "system/system_memory_usage_percentage": memory.percent,
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            values[f"system/gpu_{i}_memory_usage_megabytes"] = (total - free) / 2**20
            values[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total
    return values


def interval(age_s: float) -> float:
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, age_s / POINTS))


class SystemSampler:
    """A daemon thread sampling while the `with` block runs; steps continue after a resume."""

    def __init__(self, trackers: list[RunTracker]) -> None:
        self.trackers = trackers
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="kd-system-metrics", daemon=True)

    def loop(self) -> None:
        key = "system/cpu_utilization_percentage"
        steps = {t.run_id: max(t.logged_steps(key), default=-1) + 1 for t in self.trackers}
        started = time.monotonic()
        psutil.cpu_percent()  # the first call has no interval to measure
        while not self.stop.wait(interval(time.monotonic() - started)):
            values = sample()
            for t in self.trackers:
                t.record("log", step=steps[t.run_id], metrics=values)
                steps[t.run_id] += 1

    def __enter__(self) -> SystemSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
