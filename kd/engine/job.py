"""One training job: RunSpecs in, finished MLflow runs out.

CLI / MLproject params -> RunSpec -> data, teacher, models and methods resolved (before any run is
touched, so bad input leaves nothing half-written) -> find-or-create each spec's run (resume if unfinished)
-> Trainer -> best.pth, metrics.json, FINISHED, and for teachers the registry alias.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

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
from kd.tracking.journal import JournalError, check_root, journal_root, prune
from kd.tracking.logged_models import model_shape
from kd.tracking.presentation import SUMMARY_STEP, provenance_tags, summary_values
from kd.tracking.registry import FoundTeacher, resolve_teacher
from kd.tracking.runs import DIRECT, JOURNAL_ONLY, RunTracker, local_run_folder, read_json, runs_by_key
from kd.tracking.sender import REGISTERED, Sender
from kd.tracking.store import DEFAULT_EXPERIMENT, check_writable, get_client
from kd.tracking.system import SystemSampler, pick_device

DEFAULT_SYNC_TIMEOUT_S = 180.0  # how long a job's end waits for an away store before exiting unsynced


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


def started_with(client: MlflowClient, spec: RunSpec, experiment: str) -> str | None:
    """The teacher run an unfinished run of this spec started with (None for a new run)."""
    if client.get_experiment_by_name(experiment) is None:
        return None
    runs = runs_by_key(client, spec.key(), experiment)
    if not runs or runs[0].info.status == "FINISHED":
        return None
    return runs[0].data.tags.get(T.TEACHER_RUN)


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


def journal_teacher(folder: Path) -> FoundTeacher:
    """A journal-only student's teacher: the weights the submitter put in its folder."""
    path = folder / "teacher.pth"
    if not path.exists():
        raise SpecError(f"{path} is missing: journal-only students get their teacher from the submitter; "
                        "submit them again with kd submit")
    return FoundTeacher(path, **read_json(folder / "teacher.json"))


def infrastructure_failure(err: BaseException) -> bool:
    """The store, the filesystem or the scheduler stopped the run: it would not fail again, so it
    ends KILLED (the next submit round resumes it), not FAILED."""
    return isinstance(err, (OSError, MlflowException, JournalError)) or type(err).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy"))


def run_specs(
    specs: list[RunSpec],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    options: RunOptions | None = None,
    force: bool = False,
    attach_run_id: str | None = None,
    progress: bool | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch: EpochCallback | None = None,
    journal_dir: Path | None = None,
    journal_runs: list[Path] | None = None,
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT_S,
) -> list[Outcome]:
    """Train a pack of specs (usually one) to completion as MLflow runs.

    `extra_tags` go on newly created runs (e.g. `mlflow.parentRunId` for tuning trials);
    `on_epoch(student, epoch, metrics)` runs after each logged epoch and may raise to stop
    (Optuna's pruning), which ends the runs as FAILED with the exception as `kd.error`.
    `options`: device, precision, compile (`kd/engine/compiled.py`), the collapse watch, cuDNN
    determinism and the tracking mode, as one RunOptions (default: its defaults).
    A student that diverges, or collapses (no accuracy of `collapse_after` epochs in a row reaches
    2x chance, on the validation split if there is one; 0: never), ends FAILED at once while the rest of the pack trains on; the
    first such error is raised once the others have finished.

    Tracking: by default each run is found or created in the store, and its journal (under
    `journal_dir`, default kd/tracking/journal.py's root) is shipped by a background sender; the
    end waits `sync_timeout` s for an away store, then returns with the runs unsynced.
    `options.tracking="journal"`: the store is never opened; the runs are `journal_runs`, the folders the
    submitter prepared, or else new local folders that `kd sync` creates in the store later.
    """
    options = options or RunOptions()
    check_pack(specs)
    first = specs[0]
    dev = pick_device(options.device)
    amp = Precision.for_device(dev, options.precision)
    set_cudnn_deterministic(options.cudnn_deterministic)
    torch.set_num_threads(threads := cpu_threads())  # the job's CPUs, not every core of the node
    root = journal_dir or journal_root()
    local = options.tracking == JOURNAL_ONLY and not journal_runs  # started by hand, without the store
    if local and any(s.teacher and not s.teacher_weights for s in specs):
        raise SpecError("a student trained without the store (--tracking journal) needs --teacher-weights: "
                        "its registered teacher is in the store")
    client = None
    if options.tracking == DIRECT:
        check_writable()
        client = get_client()
    if not journal_runs:
        check_root(root)
    sender = Sender(client) if client is not None else None
    with tempfile.TemporaryDirectory(prefix="kd-") as tmp_name, sigterm_flag() as should_stop:
        tmp = Path(tmp_name)
        data = DeviceData(load_dataset(first.dataset), first.dataset, dev, first.seed, first.val_fraction,
                          first.train_limit)
        if first.batch_size > len(data.train):  # a typo, not a recipe: refused before any run
            raise SpecError(f"batch_size {first.batch_size} is larger than the training set of {first.dataset} "
                            f"({len(data.train)} images): pass --batch-size {len(data.train)} or less")
        taught = [s for s in specs if s.teacher or s.teacher_weights]
        teacher, found = pack_teacher(taught, specs, data, dev, client, tmp, experiment, journal_runs)
        teacher_tags = found.tags() if found else {}  # its weights' digest: read once for the pack
        parts = [build_parts(s, data, dev) for s in specs]  # what cannot apply stops here, before any run
        inputs = dataset_inputs(data, first.dataset, first.val_fraction, first.train_limit)
        shape = model_shape(first.dataset, data.mean, data.std, data.test.images)
        provenance = provenance_tags(dev)
        if should_stop():  # a SIGTERM while all that loaded: no run to create only to mark it KILLED
            raise StoppedBeforeRun("it arrived before training began")
        if local:
            journal_runs = [local_run_folder(root, s, experiment, force) for s in specs]
        if journal_runs:
            trackers = open_journal_runs(journal_runs)
        else:
            sender.start()
            trackers = open_runs(specs, experiment, journal_root=root, force=force, attach_run_id=attach_run_id,
                                 extra_tags=extra_tags, sender=sender)
        students: list[Student] = []
        trainer: Trainer | None = None
        modes = fast.step_modes(dev, specs)
        try:
            for spec, tracker, (model, method, init_source), mode in zip(specs, trackers, parts, modes, strict=True):
                if spec in taught:  # kd.teacher_run: the teacher this student keeps after a resume
                    tracker.set_tags(teacher_tags)
                if init_source:
                    print(f"[{spec.name()}] {init_source}", flush=True)
                    tracker.set_tags({T.INIT_SOURCE: init_source})
                students.append(make_student(spec, tracker, model, method, amp, graphed=mode == fast.GRAPH))
                students[-1].tag({T.STEP_MODE: mode, T.COMPILE: compiled.ON if options.compile else compiled.OFF,
                                  T.PRECISION: amp.name, T.CUDNN_DETERMINISTIC: str(options.cudnn_deterministic).lower(),
                                  T.CPU_THREADS: str(threads), **provenance})
                tracker.record("inputs", inputs=inputs)
                tracker.record("describe", spec=spec.to_dict(), teacher_run=found.run_id if spec in taught else None)
            with SystemSampler(trackers):
                for student in students:
                    pretrain_once(student, teacher, data, should_stop)
                trainer = fast.make_trainer(students, data, modes, teacher=teacher, precision=amp,
                                            should_stop=should_stop, progress=progress, on_epoch=on_epoch,
                                            forwards=compiled.CompiledForwards(options.compile),
                                            collapse_after=options.collapse_after)
                trainer.run()
            outcomes = [finish(s, shape) for s in students if trainer.alive(s)]
            crash_point("finished")
        except BaseException as err:
            dropped = {s.tracker.run_id for s in students if trainer is not None and not trainer.alive(s)}
            end_stopped([t for t in trackers if t.run_id not in dropped], err)  # dropped: FAILED when they left
            close(trackers, sender, sync_timeout)
            raise
        close(trackers, sender, sync_timeout, outcomes)
    if trainer.failed:
        first = next(iter(trainer.failed.values()))
        others = f" ({len(outcomes)} other run(s) of the pack finished)" if outcomes else ""
        raise TrainingDiverged(f"{first}{others}")
    return outcomes


def pack_teacher(taught: list[RunSpec], specs: list[RunSpec], data: DeviceData, dev: torch.device,
                 client: MlflowClient | None, tmp: Path, experiment: str, journal_runs: list[Path] | None,
                 ) -> tuple[torch.nn.Module | None, FoundTeacher | None]:
    """The teacher of the pack's taught students and where it was found; Nones when none is taught.
    A journal-only student takes the copy in its folder, any other the registry's (or its weights file)."""
    if not taught:
        return None, None
    spec = taught[0]
    found = (journal_teacher(journal_runs[specs.index(spec)]) if journal_runs and not spec.teacher_weights
             else resolve_teacher(client, spec, tmp, started_with(client, spec, experiment) if client else None))
    return load_teacher(spec, data, dev, found), found


def end_stopped(trackers: list[RunTracker], err: BaseException) -> None:
    """End runs that `err` stopped: KILLED for a stop (SIGTERM) or the infrastructure, to be resumed;
    FAILED for what would fail again."""
    for t in trackers:
        try:
            if isinstance(err, Stopped) or infrastructure_failure(err):
                t.end("KILLED", str(err) if isinstance(err, Stopped) else f"{type(err).__name__}: {err}")
            else:
                t.end("FAILED", f"{type(err).__name__}: {err}")
        except JournalError:  # the journal's own filesystem failed: the run stays stale, then resumed
            pass


def close(trackers: list[RunTracker], sender: Sender | None, timeout: float,
          outcomes: list[Outcome] | None = None) -> None:
    """Wait (at most `timeout` s) for the sender to ship every journal, then let the runs go: a run
    whose store is away ends unsynced, to be shipped by `kd sync` or the next `kd submit` round.
    A SIGTERM here (the runs are over) waits too: a scheduler's SIGKILL after its grace loses
    nothing, the journal keeps what was not shipped."""
    if sender is not None:
        sender.drain(timeout)
        sender.stop()
    for t in trackers:
        t.release()
        left = len(t.journal.pending())
        if sender is not None:
            prune(t.journal.folder)
        if sender is None:
            print(f"kd: run {t.run_id} recorded in its journal {t.journal.folder} (journal-only): the next "
                  "`kd submit` round or `kd sync` ships it", flush=True)
        elif left:
            print(f"kd: run {t.run_id} is unsynced: {left} record(s) wait in {t.journal.folder}; "
                  f"`kd sync {t.journal.folder}` ships them (every kd submit round does)", file=sys.stderr, flush=True)
        for o in outcomes or []:
            if o.run_id == t.run_id:
                o.unsynced = left
                registered = t.journal.folder / REGISTERED
                o.registered = registered.read_text() if registered.exists() else None


def open_journal_runs(folders: list[Path]) -> list[RunTracker]:
    """Journal-only runs (no store): claimed on this host by a lock on each folder."""
    trackers: list[RunTracker] = []
    try:
        for folder in folders:
            trackers.append(RunTracker.open_journal_only(folder))
    except BaseException:
        for t in trackers:
            t.release()
        raise
    return trackers


def open_runs(specs: list[RunSpec], experiment: str, **how: Any) -> list[RunTracker]:
    """Every spec's run, claimed; if one is refused (finished, or trained elsewhere), the runs
    claimed before it are released as KILLED, so that the submitter resubmits them."""
    trackers: list[RunTracker] = []
    try:
        for spec in specs:
            trackers.append(RunTracker.open(spec, experiment, **how))
    except BaseException as err:
        for t in trackers:
            t.end("KILLED", f"not trained: another run of its pack was refused ({err})")
        close(trackers, how["sender"], DEFAULT_SYNC_TIMEOUT_S)
        raise
    return trackers


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


def new_student(spec: RunSpec, model: torch.nn.Module, method: Method, amp: Precision, graphed: bool = False,
                tracker: RunTracker | None = None, checkpoints: CheckpointStore | None = None) -> Student:
    """A student at its start, its optimiser fit for its step mode (`kd bench`'s have no run)."""
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = build_optimizer(spec, params, graphed)
    return Student(spec, tracker, checkpoints, model, method, optimizer, build_scheduler(spec, optimizer), amp.scaler())


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
    """best.pth, metrics.json, the summary metrics and the logged model, FINISHED, then (teachers)
    the registry alias and the description that names it: in this order in the journal, so the
    teacher is registered only once all of its epochs are in the store."""
    best = s.tracker.journal.folder / "files" / "best.pth"
    best.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"weights": s.best_weights}, best)
    s.tracker.log_file(best)
    history = {k: list(v) for k, v in s.history.items()}
    s.tracker.log_json("metrics.json", {**history, "config": s.spec.to_dict()})
    final_acc = history["test_acc"][-1]
    s.tracker.record("log", step=SUMMARY_STEP, metrics=summary_values(history))
    s.tracker.record("model", spec=s.spec.to_dict(), path=str(best.relative_to(s.tracker.journal.folder)),
                     shape=shape)
    s.tracker.end("FINISHED")
    if s.spec.role == "teacher":
        s.tracker.record("register", sync=True, spec=s.spec.to_dict(), best_acc=s.best_acc)
    return Outcome(s.spec, s.tracker.run_id, s.best_acc, final_acc)
