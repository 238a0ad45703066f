"""How long a plan would take, from the speed `kd bench` measured on this cluster's GPU.

`kd bench` keeps its newest measurement per device (`$KD_BENCH_FILE`, default
~/.cache/kd/bench.json); `kd submit --dry-run` turns it into GPU-hours for the runs still to train:
each run's remaining epochs times its training images over one solo run's measured images per
second. The benchmark's pair is not every run's, so the figure is labelled with what it rests on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kd.cluster.planner import RESUME, SUBMIT, WAIT_SLOT, WAIT_TEACHER
from kd.data import DATASETS
from kd.spec import RunSpec

TO_TRAIN = (SUBMIT, RESUME, WAIT_TEACHER, WAIT_SLOT)  # the planner's actions of runs still to train


def measurement_path() -> Path:
    return Path(os.environ.get("KD_BENCH_FILE") or Path.home() / ".cache" / "kd" / "bench.json")


def save_measurement(summary: dict[str, Any]) -> Path:
    """Keep a bench summary as the newest measurement of its device (a GPU's name, or the CPU)."""
    path = measurement_path()
    kept = load_measurements()
    kept[summary["device_name"]] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept, indent=2) + "\n")
    return path


def load_measurements() -> dict[str, dict[str, Any]]:
    try:
        kept = json.loads(measurement_path().read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def solo_rate(summary: dict[str, Any]) -> float | None:
    """One run's images per second: the engine's solo pipeline, without torch.compile."""
    solo = [r for r in summary.get("results", []) if r.get("pipeline") == "solo" and r.get("compile", "off") == "off"]
    return max((float(r["images_per_s"]) for r in solo), default=None)


def remaining_images(spec: RunSpec, epochs_done: int) -> int:
    per_epoch = spec.train_limit or DATASETS[spec.dataset].train_images
    return max(0, spec.epochs - epochs_done) * per_epoch


def gpu_hours_line(left: list[tuple[RunSpec, int]]) -> str | None:
    """`left`: (spec, epochs done) of the runs still to train. One line per measured GPU, or None
    when kd bench has measured none or a dataset's size is unknown."""
    gpus = {name: s for name, s in load_measurements().items() if s.get("device") == "cuda" and solo_rate(s)}
    if not gpus or not left or any(not (s.train_limit or DATASETS[s.dataset].train_images) for s, _ in left):
        return None
    images = sum(remaining_images(spec, done) for spec, done in left)
    return "\n".join(
        f"at kd bench's speed on {name} ({s['teacher']} -> {s['student']}, {s['method']}, batch {s['batch_size']}: "
        f"{solo_rate(s):,.0f} img/s per run, solo), the {len(left)} runs to train take about "
        f"{images / solo_rate(s) / 3600:,.1f} GPU-hours (other models train at other speeds; packs are faster)"
        for name, s in gpus.items())
