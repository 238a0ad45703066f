"""`kd import-legacy`: the thesis tree (experiment beta) as MLflow runs, beside the new ones.

Layout: `experiments/{Dataset}/{method}[/alpha_{a}]/{model | Teacher_to_Student}/{seed}/` holding
`metrics.json` (train/test loss and accuracy lists + `config`), `status.json` (`status`
completed | in_progress, `epoch`, `max_acc`, `config`) and `best.pth` (`{'weights': state_dict}`).

Each seed directory becomes one run with the tags of a native run (key from a RunSpec built
from the path and the config), per-epoch metrics, params, `best.pth`, and `kd.source=legacy`.
Every directory is validated completely before its run is created; a run whose writing fails
is deleted, and its identity tags (`kd.key`, `kd.source`) are written last, so a killed import
leaves no run that counts. Importing again skips keys already imported.
"""

from __future__ import annotations

import json
import pickle
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from kd.analysis import LEGACY_EXPERIMENT
from kd.analysis.collect import search_all
from kd.data import DATASETS
from kd.errors import SpecError, first_line
from kd.methods.base import LOSS_TOTAL
from kd.models import MODELS, create_model
from kd.models.weights import load_weights_only
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP, summary_values
from kd.tracking.runs import spec_tags
from kd.tracking.store import experiment_id

SOURCE = "legacy"
LAYOUT = "{Dataset}/{method}[/alpha_{a}]/{model or Teacher_to_Student}/{seed}"
DATASET_NAMES = {"Cifar10": "cifar10", "Cifar100": "cifar100", "SVHN": "svhn", "TinyImageNet": "tinyimagenet"}
STATUSES = {"completed": "FINISHED", "in_progress": "KILLED"}  # an unfinished legacy run never resumes
CURVES = ("train_loss", "train_acc", "test_loss", "test_acc")
METRIC_NAMES = {"train_loss": LOSS_TOTAL}  # the thesis's train_loss was the loss it optimised
FILES = ("metrics.json", "status.json", "best.pth")
# config keys that are RunSpec fields, read with the field's type; the rest are RunSpec defaults
CONFIG_FIELDS = {"epochs": int, "batch_size": int, "lr": float, "momentum": float, "weight_decay": float,
                 "temperature": float, "label_smoothing": float, "optimizer": str, "schedule": str}
BATCH = 1000  # MLflow's limit of metrics per log_batch


class Malformed(ValueError):
    """A legacy directory that cannot become a run; the message says what is wrong."""


@dataclass
class LegacyRun:
    path: Path  # relative to the tree's root
    directory: Path
    spec: RunSpec
    status: str  # completed | in_progress
    curves: dict[str, list[float]]
    has_best: bool


@dataclass
class ImportResult:
    imported: list[tuple[Path, str]] = field(default_factory=list)  # (path, run id)
    present: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)


def find_root(path: Path) -> Path:
    """The directory that holds the `{Dataset}` folders: PATH/experiments if there is one, else PATH."""
    if not path.is_dir():
        raise SpecError(f"{path} is not a directory: pass the thesis tree (the folder holding experiments/)")
    return path / "experiments" if (path / "experiments").is_dir() else path


def candidates(root: Path) -> list[Path]:
    """Directories that hold a run's files, and bare seed-named leaves (runs that left nothing)."""
    found = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        leaf = not any(c.is_dir() for c in d.iterdir())
        if any((d / f).exists() for f in FILES) or (leaf and d.name.isdigit()):
            found.append(d)
    return found


def teacher_models(root: Path) -> set[str]:
    """Models that some `Teacher_to_Student` directory names as a teacher."""
    return {d.name.split("_to_")[0] for d in root.rglob("*_to_*") if d.is_dir()}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Malformed(f"no {path.name}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Malformed(f"{path.name} is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise Malformed(f"{path.name} is not a JSON object")
    return value


def build_spec(rel: Path, config: dict[str, Any], teachers: set[str]) -> RunSpec:
    """The RunSpec of a directory: dataset, method, alpha, models and seed from the path; the
    recipe from the config's RunSpec fields; a pure model that is some pair's teacher is a teacher."""
    parts = rel.parts
    if len(parts) not in (4, 5):
        raise Malformed(f"not at {LAYOUT}")
    dataset, method, *level, who, seed = parts
    if dataset not in DATASET_NAMES:
        raise Malformed(f"unknown dataset folder {dataset}: expected one of {', '.join(DATASET_NAMES)}")
    alpha = None
    if level:
        match = re.fullmatch(r"alpha_(\d+(?:\.\d+)?)", level[0])
        if not match:
            raise Malformed(f"{level[0]} is not an alpha level (alpha_0.25)")
        alpha = float(match[1])
    if not seed.isdigit():
        raise Malformed(f"seed folder {seed} is not a number")
    teacher, _, student = who.rpartition("_to_")
    try:
        if alpha is None and method != "pure" and config.get("alpha") is not None:
            alpha = float(config["alpha"])
        recipe = {k: cast(config[k]) for k, cast in CONFIG_FIELDS.items() if config.get(k) is not None}
        return RunSpec.create(
            dataset=DATASET_NAMES[dataset], model=student, teacher=teacher or None, method=method, alpha=alpha,
            seed=int(seed), role="teacher" if method == "pure" and student in teachers else None, **recipe,
        )
    except (SpecError, TypeError, ValueError, OverflowError) as err:  # OverflowError: int(1e400)
        raise Malformed(str(err)) from None


def read_curves(metrics: dict[str, Any]) -> dict[str, list[float]]:
    curves = {}
    for name in CURVES:
        values = metrics.get(name)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise Malformed(f"metrics.json has no list of numbers '{name}'")
        curves[name] = [float(v) for v in values]
    lengths = {len(v) for v in curves.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise Malformed(f"metrics.json lists have lengths {sorted(lengths)}: expected one non-zero length")
    return curves


def check_weights(path: Path, spec: RunSpec) -> None:
    """best.pth loads safely and fits the spec's model."""
    info = DATASETS[spec.dataset]
    if path.stat().st_size == 0:
        raise Malformed("best.pth is empty (a save that was interrupted)")
    try:
        with warnings.catch_warnings():  # torch warns of a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            weights = load_weights_only(path)["weights"]
        create_model(spec.model, info.num_classes, info.channels, info.image_size).load_state_dict(weights)
    except Exception as err:  # unpicklable, no 'weights', or the wrong architecture
        lines = str(err).splitlines() or [type(err).__name__]
        # torch's weights-only unpickler names the callable it refused (nothing ran) in one of its lines
        refused = [line.strip() for line in lines if "GLOBAL" in line]
        if refused:
            raise Malformed(f"best.pth is refused, it asks to run code: {first_line(refused[0])}") from None
        if isinstance(err, pickle.UnpicklingError):
            raise Malformed("best.pth is not a weights-only PyTorch checkpoint (a plain pickle or another file)") from None
        raise Malformed(f"best.pth does not load into {spec.model}: {first_line(lines[0])}") from None


def read_run(directory: Path, root: Path, teachers: set[str]) -> LegacyRun:
    """Everything about one directory, validated; raises Malformed."""
    rel = directory.relative_to(root)
    status = read_json(directory / "status.json")
    metrics = read_json(directory / "metrics.json")
    state = status.get("status")
    if not isinstance(state, str) or state not in STATUSES:
        raise Malformed(f"status.json status is {state!r}: expected one of {', '.join(STATUSES)}")
    config = metrics.get("config", status.get("config", {}))
    if not isinstance(config, dict):
        raise Malformed("the config in metrics.json is not an object")
    spec = build_spec(rel, config, teachers)
    curves = read_curves(metrics)
    best = directory / "best.pth"
    if best.exists():
        check_weights(best, spec)
    elif state == "completed":
        raise Malformed("completed but no best.pth")
    return LegacyRun(rel, directory, spec, state, curves, best.exists())


def scan(root: Path, extra_teachers: Iterable[str] = ()) -> tuple[list[LegacyRun], list[tuple[Path, str]]]:
    """(valid runs, (path, reason) of malformed directories); two directories with one key: the
    second is malformed."""
    unknown = sorted(set(extra_teachers) - set(MODELS))
    if unknown:
        raise SpecError(f"--teacher-models {', '.join(unknown)}: unknown model; choose from {', '.join(sorted(MODELS))}")
    teachers = teacher_models(root) | set(extra_teachers)
    runs: dict[str, LegacyRun] = {}
    bad = []
    for directory in candidates(root):
        try:
            run = read_run(directory, root, teachers)
        except Malformed as err:
            bad.append((directory.relative_to(root), str(err)))
            continue
        first = runs.setdefault(run.spec.key(), run)
        if first is not run:
            bad.append((run.path, f"same spec as {first.path}"))
    return list(runs.values()), bad


def write_run(client: MlflowClient, exp_id: str, item: LegacyRun) -> str:
    """One legacy run, all or nothing: on any error the run is deleted."""
    spec = item.spec
    run_id = client.create_run(exp_id, run_name=spec.name()).info.run_id
    try:
        ts = int(time.time() * 1000)
        epochs = len(item.curves["test_acc"])
        points = [Metric(METRIC_NAMES.get(k, k), v, ts, i + 1) for k, values in item.curves.items()
                  for i, v in enumerate(values)]
        if item.status == "completed":
            points += [Metric(k, v, ts, SUMMARY_STEP) for k, v in summary_values(item.curves).items()
                       if k != "train_time"]  # the thesis code kept no epoch times
        for start in range(0, len(points), BATCH):
            client.log_batch(run_id, metrics=points[start : start + BATCH])
        identity = {T.KEY, T.SOURCE}
        tags = {**{k: v for k, v in spec_tags(spec).items() if k not in identity}, T.EPOCH: str(epochs),
                "kd.legacy_path": str(item.path), "kd.legacy_status": item.status}
        client.log_batch(run_id, params=[Param(k, v) for k, v in spec.params().items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_dict(run_id, spec.to_dict(), "config.json")
        client.log_artifact(run_id, str(item.directory / "metrics.json"))
        client.log_artifact(run_id, str(item.directory / "status.json"), "legacy")
        if item.has_best:
            client.log_artifact(run_id, str(item.directory / "best.pth"))
        client.set_terminated(run_id, STATUSES[item.status])
        client.log_batch(run_id, tags=[RunTag(T.KEY, spec.key()), RunTag(T.SOURCE, SOURCE)])
    except BaseException:
        client.delete_run(run_id)
        raise
    return run_id


def import_legacy(
    client: MlflowClient, path: Path, experiment: str = LEGACY_EXPERIMENT, teachers: Iterable[str] = ()
) -> ImportResult:
    """Import a thesis tree into `experiment`; `teachers` adds models to treat as teachers under pure/."""
    root = find_root(path)
    items, skipped = scan(root, teachers)
    result = ImportResult(skipped=skipped)
    exp_id = experiment_id(client, experiment)
    present = {r.data.tags[T.KEY] for r in search_all(client, experiment, f"tags.`{T.SOURCE}` = '{SOURCE}'")}
    for item in items:
        if item.spec.key() in present:
            result.present.append(item.path)
            continue
        try:
            result.imported.append((item.path, write_run(client, exp_id, item)))
        except Exception as err:  # the run is deleted; report it and go on with the others
            result.skipped.append((item.path, f"writing the run failed, nothing kept: {err}"))
    return result
