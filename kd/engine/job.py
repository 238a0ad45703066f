"""One training job: RunSpecs in, finished MLflow runs out.

resolve -> open the session -> train -> finish: the data, the teacher, the models and methods are
resolved first (so bad input leaves no run behind); the pack's tracking session
(kd/tracking/session.py) then claims each spec's run, creating or resuming it; the Trainer trains
the pack, recording through the runs' trackers; each finished student writes best.pth and its run
is finished (metrics.json, FINISHED, and for teachers the registry alias); closing the session ships
what is left. The engine never talks to the store itself.
"""

from __future__ import annotations

import dataclasses
import signal
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd.cpus import cpu_threads
from kd.data import load_dataset
from kd.data.inputs import dataset_inputs
from kd.data.loader import DeviceData
from kd.engine import compiled, fast
from kd.engine.checkpoint import CheckpointStore, save_atomic
from kd.engine.trainer import (
    EpochCallback,
    Precision,
    Stopped,
    Student,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    build_scheduler,
    set_cudnn_deterministic,
)
from kd.errors import SpecError
from kd.faults import crash_point
from kd.methods import Method, build_method
from kd.models import create_model
from kd.models.vit import start_weights
from kd.models.weights import fit_state_dict, load_state_dict_file, load_weights_only
from kd.spec import PACK_FIELDS, RunOptions, RunSpec
from kd.tracking import tags as T
from kd.tracking.logged_models import model_shape
from kd.tracking.presentation import provenance_tags
from kd.tracking.registry import FoundTeacher
from kd.tracking.runs import RunTracker
from kd.tracking.session import DEFAULT_SYNC_TIMEOUT_S, TrackingSession
from kd.tracking.store import DEFAULT_EXPERIMENT
from kd.tracking.system import SystemSampler, pick_device


@dataclass
class Outcome:
    spec: RunSpec
    run_id: str
    best_acc: float
    final_acc: float
    registered: str | None = None
    unsynced: int = 0  # records still in the journal when the job ended (the store was away)


def check_pack(specs: list[RunSpec]) -> None:
    """Packed students share one batch stream and at most one teacher (pure students ignore it)."""
    for name in PACK_FIELDS:
        values = {s.pack_value(name) for s in specs}
        if name in ("teacher", "teacher_weights", "teacher_recipe"):
            values.discard(None)
        if len(values) > 1:
            raise SpecError(f"packed students must share {name} (got {sorted(map(str, values))}): split the pack")


def seeded_build(seed: int, build: Any) -> Any:
    """Build a module from a fixed RNG state, so a student's init is the same solo or packed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def output_shapes(model: torch.nn.Module, data: DeviceData) -> list[torch.Size]:
    x = torch.zeros(2, data.in_channels, data.image_size, data.image_size, device=data.train.images.device)
    model.eval()
    with torch.no_grad():
        return [o.shape[1:] for o in model(x)]


def load_teacher(spec: RunSpec, data: DeviceData, device: torch.device, found: FoundTeacher) -> torch.nn.Module:
    """The frozen teacher from the weights `found`."""
    teacher = create_model(spec.teacher, data.num_classes, data.in_channels, data.image_size)
    fit_state_dict(teacher, load_state_dict_file(found.path, "teacher weights"), f"teacher weights {found.path}",
                   spec.teacher)
    return teacher.to(device).eval().requires_grad_(False)


@contextmanager
def sigterm_flag():
    """SIGTERM (walltime, qdel, scancel) sets a flag the trainer checks at the next batch."""
    state = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        state["stop"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: state["stop"]
    finally:
        signal.signal(signal.SIGTERM, previous)


class StoppedBeforeRun(Stopped):
    """SIGTERM before any run was created or claimed: nothing to checkpoint, nothing to resume."""

    runs_started = False


@dataclass(frozen=True)
class Compute:
    """How this process computes: the device, the precision and torch's CPU threads."""

    device: torch.device
    precision: Precision
    threads: int

    @classmethod
    def set_up(cls, options: RunOptions) -> Compute:
        """The device and precision the options ask for; cuDNN's determinism and torch's threads set."""
        device = pick_device(options.device)
        precision = Precision.for_device(device, options.precision)
        set_cudnn_deterministic(options.cudnn_deterministic)
        torch.set_num_threads(threads := cpu_threads())  # the job's CPUs, not every core of the node
        return cls(device, precision, threads)


@dataclass
class Pack:
    """What a pack trains with, resolved before any run is touched (bad input leaves nothing behind)."""

    specs: list[RunSpec]
    compute: Compute
    data: DeviceData
    taught: list[RunSpec]  # the specs with a teacher (pure students ride along)
    teacher: torch.nn.Module | None
    found: FoundTeacher | None  # where the teacher's weights came from
    teacher_tags: dict[str, str]  # what a taught student records of its teacher (its weights' digest: read once)
    parts: list[tuple[torch.nn.Module, Method, str | None]]  # each spec's model, method, init weights' source
    modes: list[str]  # each student's step mode (kd/engine/fast.py)
    inputs: Any  # the dataset inputs every run logs
    shape: dict[str, int]  # the logged model's input shape and normalisation
    provenance: dict[str, str]


def run_specs(specs: list[RunSpec], *, experiment: str = DEFAULT_EXPERIMENT, options: RunOptions | None = None,
              force: bool = False, attach_run_id: str | None = None, progress: bool | None = None,
              extra_tags: dict[str, str] | None = None, on_epoch: EpochCallback | None = None,
              journal_dir: Path | None = None, journal_runs: list[Path] | None = None,
              sync_timeout: float = DEFAULT_SYNC_TIMEOUT_S) -> list[Outcome]:
    """Train a pack of specs (usually one) to completion as MLflow runs: resolve, open the pack's
    tracking session, train, finish.

    `options`: how to compute and how to track, as one RunOptions (default: its defaults).
    `extra_tags` go on newly created runs (e.g. `mlflow.parentRunId` for tuning trials);
    `on_epoch(student, epoch, metrics)` runs after each logged epoch and may raise to stop
    (Optuna's pruning), which ends the runs as FAILED with the exception as `kd.error`.
    A student that diverges, or collapses (no accuracy of `options.collapse_after` epochs in a row
    reaches 2x chance; 0: never), ends FAILED at once while the rest of the pack trains on; the first
    such error is raised once the others have finished. Tracking (the store; or, journal-only, the
    `journal_runs` a submitter prepared or new folders under `journal_dir`; the end waits
    `sync_timeout` s for an away store): kd/tracking/session.py.
    """
    options = options or RunOptions()
    check_pack(specs)
    compute = Compute.set_up(options)
    session = TrackingSession(specs, experiment, options.tracking, journal_dir=journal_dir, journal_runs=journal_runs,
                              force=force, attach_run_id=attach_run_id, extra_tags=extra_tags, sync_timeout=sync_timeout)
    with tempfile.TemporaryDirectory(prefix="kd-") as tmp, sigterm_flag() as should_stop:
        pack = resolve(specs, compute, session, Path(tmp))
        if should_stop():  # a SIGTERM while all that loaded: no run to create only to mark it KILLED
            raise StoppedBeforeRun("it arrived before training began")
        trackers = session.open()
        try:
            students = [start_student(pack, i, tracker, options) for i, tracker in enumerate(trackers)]
            trainer = train(pack, students, options, should_stop, progress, on_epoch)
            outcomes = [finish(s, pack.shape) for s in students if trainer.alive(s)]
            crash_point("finished")
        except BaseException as err:  # the runs still open end KILLED (to resume) or FAILED
            session.close(err, stopped=isinstance(err, Stopped))
            raise
        shipped = session.close()
    if trainer.failed:
        first = next(iter(trainer.failed.values()))
        others = f" ({len(outcomes)} other run(s) of the pack finished)" if outcomes else ""
        raise TrainingDiverged(f"{first}{others}")
    return [dataclasses.replace(o, **dataclasses.asdict(shipped[o.run_id])) for o in outcomes]


def resolve(specs: list[RunSpec], compute: Compute, session: TrackingSession, tmp: Path) -> Pack:
    """The data, the pack's exact teacher, every student's model and method: all that can refuse the
    pack (a typo, a missing teacher, a method that cannot serve its models), before any run."""
    first, device = specs[0], compute.device
    data = DeviceData(load_dataset(first.dataset), first.dataset, device, first.seed, first.val_fraction,
                      first.train_limit)
    if first.batch_size > len(data.train):  # a typo, not a recipe: refused before any run
        raise SpecError(f"batch_size {first.batch_size} is larger than the training set of {first.dataset} "
                        f"({len(data.train)} images): pass --batch-size {len(data.train)} or less")
    taught = [s for s in specs if s.teacher or s.teacher_weights]
    found = session.teacher(taught[0], tmp) if taught else None
    teacher = load_teacher(taught[0], data, device, found) if found else None
    teacher_tags = found.tags() if found else {}
    parts = [build_parts(s, data, device) for s in specs]
    return Pack(specs, compute, data, taught, teacher, found, teacher_tags, parts, fast.step_modes(device, specs),
                dataset_inputs(data, first.dataset, first.val_fraction, first.train_limit),
                model_shape(first.dataset, data.mean, data.std, data.test.images), provenance_tags(device))


def train(pack: Pack, students: list[Student], options: RunOptions, should_stop: Callable[[], bool],
          progress: bool | None, on_epoch: EpochCallback | None) -> Trainer:
    """The students, each pre-trained once, trained to their last epoch (or dropped), the system
    sampled into their runs meanwhile."""
    with SystemSampler([s.tracker for s in students]):
        for student in students:
            pretrain_once(student, pack.teacher, pack.data, should_stop)
        trainer = fast.make_trainer(students, pack.data, pack.modes, teacher=pack.teacher,
                                    precision=pack.compute.precision, should_stop=should_stop, progress=progress,
                                    on_epoch=on_epoch, forwards=compiled.CompiledForwards(options.compile),
                                    collapse_after=options.collapse_after)
        trainer.run()
    return trainer


def start_student(pack: Pack, index: int, tracker: RunTracker, options: RunOptions) -> Student:
    """The pack's `index`-th student in its run: tagged with its teacher, init weights and how this
    process computes, with the data it trains on and its description recorded."""
    spec, (model, method, init_source), mode = pack.specs[index], pack.parts[index], pack.modes[index]
    taught = spec in pack.taught
    if taught:  # kd.teacher_run: the teacher this student keeps after a resume
        tracker.set_tags(pack.teacher_tags)
    if init_source:
        print(f"[{spec.name()}] {init_source}", flush=True)
        tracker.set_tags({T.INIT_SOURCE: init_source})
    student = make_student(spec, tracker, model, method, pack.compute.precision, graphed=mode == fast.GRAPH)
    student.tag({T.STEP_MODE: mode, T.COMPILE: compiled.ON if options.compile else compiled.OFF,
                 T.PRECISION: pack.compute.precision.name,
                 T.CUDNN_DETERMINISTIC: str(options.cudnn_deterministic).lower(),
                 T.CPU_THREADS: str(pack.compute.threads), **pack.provenance})
    tracker.record("inputs", inputs=pack.inputs)
    tracker.record("describe", spec=spec.to_dict(), teacher_run=pack.found.run_id if taught else None)
    return student


def build_parts(spec: RunSpec, data: DeviceData, device: torch.device) -> tuple[torch.nn.Module, Method, str | None]:
    """The run's model (a teacher with its starting weights), its method, and where the weights came from.

    Built before the run is created, so a method that cannot serve this model pair, or init weights
    that do not fit, stop with a one-line SpecError and leave no run behind.
    """
    model = seeded_build(spec.seed, lambda: create_model(spec.model, data.num_classes, data.in_channels,
                                                         data.image_size))
    init_source = start_weights(model, spec.init_weights) if spec.role == "teacher" else None
    model = model.to(device)
    student_shapes = output_shapes(model, data)
    teacher_shapes = None
    if spec.teacher:
        probe = create_model(spec.teacher, data.num_classes, data.in_channels, data.image_size).to(device)
        teacher_shapes = output_shapes(probe, data)
    method = seeded_build(spec.seed + 1, lambda: build_method(spec, student_shapes, teacher_shapes,
                                                              data.train.labels.cpu())).to(device)
    return model, method, init_source


class NoRun:
    """The tracker of a student without a run (`kd bench`): it records nothing, and a failure, which no
    run would keep, is raised at once (a benchmark of a diverged step means nothing)."""

    run_id = "(no run)"
    resumed = False

    def set_tags(self, tags: dict[str, str]) -> None:
        """Nothing to tag."""

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Nothing to log."""

    def end(self, status: str, error: str | None = None) -> None:
        if status != "FINISHED":  # the trainer ends a diverged student's run with "TrainingDiverged: <why>"
            raise TrainingDiverged((error or status).removeprefix(f"{TrainingDiverged.__name__}: "))


def new_student(spec: RunSpec, model: torch.nn.Module, method: Method, amp: Precision, graphed: bool = False,
                tracker: RunTracker | NoRun | None = None, checkpoints: CheckpointStore | None = None) -> Student:
    """A student at its start, its optimiser fit for its step mode (`kd bench`'s have no run: NoRun)."""
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = build_optimizer(spec, params, graphed)
    return Student(spec, tracker or NoRun(), checkpoints, model, method, optimizer, build_scheduler(spec, optimizer),
                   amp.scaler())


def make_student(spec: RunSpec, tracker: RunTracker, model: torch.nn.Module, method: Method, amp: Precision,
                 graphed: bool = False) -> Student:
    student = new_student(spec, model, method, amp, graphed, tracker, CheckpointStore(tracker))
    state = student.checkpoints.load() if tracker.resumed else None
    if state is not None:
        student.restore(state)
        print(f"[{spec.name()}] resuming run {tracker.run_id} after epoch {student.epoch}"
              + (f", batch {student.batch}" if student.batch else ""), flush=True)
    return student


def pretrain_once(s: Student, teacher: torch.nn.Module | None, data: DeviceData,
                  should_stop: Callable[[], bool] = lambda: False) -> None:
    """Run a method's pre-training stage once per run; a resumed run restores it from the artifact.

    A SIGTERM stops it between batches (the run is KILLED; its resume pre-trains again, drawing the
    same batches, so the steps MLflow already has are not logged twice)."""
    artifact, module = s.method.pretrain_artifact, s.method.pretrained_module()
    if artifact is None or module is None or s.epoch > 0 or s.batch > 0:
        return  # nothing to pre-train, or the checkpoint already holds it
    saved = s.tracker.download(artifact, s.checkpoints.dir / "download")
    if saved is not None:
        module.load_state_dict(load_weights_only(saved)["weights"])
        return
    epochs = iter(range(-1, -(10**9), -1))  # pre-training epochs draw from their own seeds

    def batches() -> Any:
        for batch in data.train_batches(next(epochs), s.spec.batch_size):
            crash_point("pretrain_step")
            if should_stop():
                raise Stopped(f"stopped during the pre-training of method '{s.spec.method}'")
            yield batch

    logged: dict[str, set[int]] = {}

    def log_metric(key: str, value: float, step: int) -> None:
        if step not in logged.setdefault(key, s.tracker.logged_steps(key)):
            s.tracker.log_metric(key, value, step)

    if s.method.pretrain(teacher, batches, log_metric):
        path = s.tracker.journal.folder / artifact
        save_atomic({"weights": module.state_dict()}, path)
        s.tracker.log_file(path)


def finish(s: Student, shape: dict[str, int]) -> Outcome:
    """best.pth written (atomically) into the run's folder, then the run finished by its tracker:
    metrics.json, the summary and the logged model, FINISHED, and for a teacher its registration."""
    best = s.tracker.journal.folder / "files" / "best.pth"
    best.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"weights": s.best_weights}, best)
    history = {k: list(v) for k, v in s.history.items()}
    s.tracker.finish(best, history, shape, s.best_acc)
    return Outcome(s.spec, s.tracker.run_id, s.best_acc, history["test_acc"][-1])
