"""The epoch loop: 1..N students against one teacher and one batch stream.

Per batch the teacher runs once; each student takes its own step with
`loss_total = (1 - alpha) * loss_ce + alpha * loss_distill`, where `loss_distill` is the sum
of the method's terms. Per epoch each student is evaluated,
checkpointed (committed first) and then its metrics are logged, so a kill at any moment
leaves no metric step logged twice or missing: on resume, the steps the checkpoint knows and
MLflow lacks are logged from the checkpoint's history. A student whose loss diverges, or whose
test accuracy stays at chance for `collapse_after` epochs, leaves the pack with its run FAILED;
the others train on.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.data.loader import DeviceData, Extras, Split
from kd.engine.checkpoint import CheckpointStore
from kd.engine.compiled import CompiledForwards
from kd.faults import crash_point
from kd.methods.base import INDEX, LOSS_CE, LOSS_DISTILL, LOSS_TOTAL, STRONG_VIEW, Method
from kd.spec import RunSpec
from kd.tracking import tags as T

MAX_SKIPPED_STEPS = 100  # consecutive GradScaler skips before a run is declared broken


class TrainingDiverged(RuntimeError):
    """A non-finite loss or a run of skipped optimiser steps: the run stops as FAILED."""


NON_FINITE = "non-finite loss"
SKIPPED = f"{MAX_SKIPPED_STEPS} optimiser steps in a row skipped (non-finite gradients)"


def diverged(what: str, method: str, epoch: int, step: int, values: dict[str, float]) -> TrainingDiverged:
    """The guard's one message (eager or graphed): what, in which method, epoch and 1-based step."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    return TrainingDiverged(f"{what} in method '{method}' at epoch {epoch}, step {step}: {shown}")


class Stopped(Exception):
    """SIGTERM arrived; checkpoints were written and the runs are to be marked KILLED."""


def set_cudnn_deterministic(on: bool) -> None:
    """Deterministic cuDNN kernels (the user's default: same seed, same run) or, off, the fastest
    ones cuDNN benchmarks for each shape (about 10 % faster on an H100; docs/performance.md)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, not on


@dataclass
class Precision:
    """Autocast settings: bf16 on GPUs that have it, fp16 + GradScaler on older ones, fp32 on CPU."""

    device: torch.device
    dtype: torch.dtype | None
    cache: bool = True  # autocast's weight-cast cache; off inside a captured CUDA graph (PyTorch's advice)

    @classmethod
    def for_device(cls, device: torch.device, choice: str = "auto") -> Precision:
        """`auto`: bf16 on GPUs that support it, fp16 on older GPUs (V100), fp32 on the CPU."""
        if choice == "auto":
            if device.type != "cuda":
                return cls(device, None)
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return cls(device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice])

    @property
    def name(self) -> str:
        """What `auto` resolved to, as `--precision` spells it (the run's `kd.precision` tag)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=self.cache)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None


class RunRecorder(Protocol):
    """What the trainer records a trainee's run through: tracking's run (`RunTracker`), or the bench's
    `NoRun`. The engine knows only this, not where the records go."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def logged_steps(self, key: str) -> set[int]: ...

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def end(self, status: str, error: str | None = None) -> None: ...


@dataclass
class Student:
    """One run being trained: its model, method, optimiser and progress."""

    spec: RunSpec
    tracker: RunRecorder
    checkpoints: CheckpointStore
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed of epoch + 1 (non-zero only after a mid-epoch stop)
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    history: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    best_acc: float = -1.0
    best_weights: dict[str, Tensor] | None = None
    logged_epochs: set[int] = field(default_factory=set)  # epochs MLflow already has (after a fallback)

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (loads with weights_only=True)."""
        return {
            "spec": self.spec.to_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "sums": dict(self.sums),
            "history": dict(self.history),
            "best_acc": self.best_acc,
            "best_weights": self.best_weights,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.sums = defaultdict(float, state["sums"])
        self.history = defaultdict(list, {k: list(v) for k, v in state["history"].items()})
        self.best_acc, self.best_weights = state["best_acc"], state["best_weights"]
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # how to step (fused for a CUDA graph) is this process's choice
            group.update({k: v for k, v in self.optimizer.defaults.items() if k in ("foreach", "fused", "capturable")})
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def tag(self, tags: dict[str, str]) -> None:
        """Tags on the run, in one request."""
        self.tracker.set_tags(tags)

    def catch_up_metrics(self) -> None:
        """Log the epochs the checkpoint holds but MLflow lacks (a kill between commit and log)."""
        self.logged_epochs = self.tracker.logged_steps("test_acc")
        for epoch in range(1, self.epoch + 1):
            if epoch not in self.logged_epochs:
                self.tracker.log_epoch(epoch, {k: v[epoch - 1] for k, v in self.history.items()})


@dataclass
class EpochEnd:
    """What the epoch-end callbacks see: one trainee's finished epoch (composer's `State`, for one run)."""

    trainer: Trainer
    trainee: Student
    epoch: int
    metrics: dict[str, float]  # logged with `step=epoch`; in the trainee's history once committed
    seconds: float  # the epoch's wall time (the pack's)


class Callback:
    """Per-epoch work beyond training, in the manner of composer's callbacks: the trainer calls each of
    its callbacks in order, for each trainee that finished the epoch. So a new logged quantity is one
    callback whose `measure` adds it; `kd/engine/callbacks.py` holds the standard ones."""

    def measure(self, end: EpochEnd) -> None:
        """Add quantities to `end.metrics` before the checkpoint commits them (so a kill loses none)."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        """After the commit: log, report, guard. A raise stops the training (Optuna's pruning)."""


# What `run_specs(on_epoch=...)` takes: a callback, or a function of (trainee, epoch, metrics) called
# where a callback's `on_epoch_end` is.
EpochCallback = Callback | Callable[[Student, int, dict[str, float]], None]


def build_optimizer(spec: RunSpec, params: list[nn.Parameter], graphed: bool = False) -> torch.optim.Optimizer:
    """`graphed`: a CUDA graph will capture the step, which needs one without host syncs and with
    a tensor learning rate: fused SGD, capturable fused AdamW (on the GPU; the CPU has no graphs)."""
    gpu = graphed and params[0].is_cuda
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, capturable=gpu, fused=gpu or None)
    sgd = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                          fused=gpu or None)
    if gpu and spec.momentum:
        # Fused SGD makes its momentum with empty_like on the first step and leaves it uninitialised
        # when a GradScaler skips that step (fp16 overflow): start from zeros, which the first step
        # turns into exactly the gradient, as the eager SGD's clone does.
        for p in params:
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return sgd


def build_scheduler(spec: RunSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: cosine over all epochs (the recipe), multistep, or constant."""
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    if spec.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(spec.milestones), gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, split: Split, precision: Precision) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) on a split, in eval mode."""
    model.eval()
    loss, correct = torch.zeros((), device=precision.device), torch.zeros((), device=precision.device)
    for x, y in data.eval_batches(split, 1024):
        with precision.autocast():
            logits = model(x)[-1].float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        crash_point("eval")
    return loss.item() / len(split), 100.0 * correct.item() / len(split)


def teacher_forward(teacher: nn.Module | None, x: Tensor, precision: Precision) -> list[Tensor] | None:
    if teacher is None:
        return None
    with torch.no_grad(), precision.autocast():
        return teacher(x)


def method_inputs(method: Method, model: Callable[[Tensor], list[Tensor]], extras: Extras) -> dict[str, Any]:
    """The keyword arguments of `method.forward` that its `inputs` ask for (kd/methods/base.py): the
    batch's indices; the student's (forward here) and the teacher's outputs on the strong view."""
    given: dict[str, Any] = {}
    if INDEX in method.inputs:
        given["index"] = extras[INDEX]
    if STRONG_VIEW in method.inputs:
        given["student_strong"] = model(extras[STRONG_VIEW])
        given["teacher_strong"] = extras[TEACHER_STRONG]
    return given


def student_losses(
    s: Student, x: Tensor, y: Tensor, teacher_out: list[Tensor] | None, epoch: int, precision: Precision,
    forward: Callable[[Tensor], list[Tensor]] | None = None, extras: Extras | None = None,
) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
    """A student's outputs, its loss, and what is logged of it, one meaning per name in every method:
    `loss_total` (what is optimised), `loss_ce`, and for KD `loss_distill` (the sum of the method's
    terms, before alpha) and the terms themselves. `forward`: the model's compiled stand-in, if any;
    `extras`: the batch's extra inputs, for a method that asks (`Method.inputs`)."""
    spec = s.spec
    model = s.model if forward is None else forward
    with precision.autocast():
        out = model(x)
        ce = F.cross_entropy(out[-1].float(), y, label_smoothing=spec.label_smoothing)
        given = method_inputs(s.method, model, extras) if s.method.inputs else {}
        terms = s.method(out, teacher_out, y, epoch, **given)
        if not terms:
            return out, ce, {LOSS_TOTAL: ce, LOSS_CE: ce}
        distill = sum(terms.values())
        ce_weight, distill_weight = spec.loss_weights()
        loss = ce_weight * ce + distill_weight * distill
    return out, loss, {LOSS_TOTAL: loss, LOSS_CE: ce, LOSS_DISTILL: distill, **terms}


@dataclass
class Tally:
    """A trainee's sums and guard state for the epoch, kept on the device (no host read per step).

    `load` takes the host's `Student.sums` (`store` puts them back), and each step adds
    `value * batch size` in float64 in the order the values come, so the sums are those of Python
    floats added step by step (bit-identical on the CPU, eager or graphed). The skipped-step streak
    stays here across epochs.
    """

    keys: list[str]  # loss_total, loss_ce, loss_distill, the method's terms
    sums: Tensor  # float64 (K,): sum over steps of value * batch size
    correct: Tensor  # float64 ()
    seen: Tensor  # float64 (): images stepped on
    streak: Tensor  # int64 (): fp16 steps skipped in a row
    first: Tensor  # int64 (2,): first step with a non-finite value / at which the streak tripped (0: none)
    first_values: Tensor  # float64 (2, K): the logged values at those steps

    @classmethod
    def create(cls, keys: list[str], device: torch.device) -> Tally:
        k = len(keys)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        return cls(keys, torch.zeros(k, **f64), torch.zeros((), **f64), torch.zeros((), **f64),
                   torch.zeros((), **i64), torch.zeros(2, **i64), torch.zeros(2, k, **f64))

    def load(self, sums: dict[str, float]) -> None:
        self.sums.copy_(torch.tensor([sums.get(k, 0.0) for k in self.keys], dtype=torch.float64))
        self.correct.fill_(sums.get("correct", 0.0))
        self.seen.fill_(sums.get("seen", 0.0))
        self.first.zero_()

    def store(self, sums: dict[str, float]) -> None:
        """The device sums into `sums` (one host read), `seen` first as the host counted it before."""
        seen, *values, correct = torch.cat([self.seen[None], self.sums, self.correct[None]]).tolist()
        sums["seen"] = seen
        sums.update(zip(self.keys, values, strict=True))
        sums["correct"] = correct

    def record(self, logged: dict[str, Tensor], logits: Tensor, y: Tensor, step: Tensor | int,
               skipped: Tensor) -> None:
        """Device-only bookkeeping of one step (capturable: no host reads)."""
        values = torch.stack([t.detach().double() for t in logged.values()])
        self.sums.add_(values * len(y))
        self.correct.add_((logits.argmax(1) == y).sum())
        self.seen.add_(len(y))
        self.streak.copy_(torch.where(skipped, self.streak + 1, 0))
        happened = torch.stack([~torch.isfinite(values).all(), self.streak >= MAX_SKIPPED_STEPS])
        new = happened & (self.first == 0)
        self.first.copy_(torch.where(new, step, self.first))
        self.first_values.copy_(torch.where(new[:, None], values, self.first_values))

    def check(self, method: str, epoch: int) -> None:
        """The guard: raise for the earliest event of the epoch, if any (a host read)."""
        first = self.first.tolist()
        events = [(step, i) for i, step in enumerate(first) if step]
        if events:
            step, i = min(events)
            values = dict(zip(self.keys, self.first_values[i].tolist(), strict=True))
            raise diverged((NON_FINITE, SKIPPED)[i], method, epoch, step, values)


class RunningSums:
    """The one home of a pack's running sums: each trainee's device `Tally`, by its index in the pack.

    A trainee's sums move onto the device at its first step of an epoch (`record`, or `hold` before a
    capture) and back into `Student.sums`, their host form that checkpoints and the epoch's end read,
    at `settle`: so no step reads the host, and the sums are never in two places at once.
    """

    def __init__(self, trainees: list[Student]) -> None:
        self.trainees = trainees
        self.tallies: dict[int, Tally] = {}  # made at a trainee's first step, when its term names are known
        self.held: dict[int, Tally] = {}  # the tallies holding their trainee's sums now, in the order held

    def record(self, i: int, logged: dict[str, Tensor], logits: Tensor, y: Tensor, step: Tensor | int,
               skipped: Tensor) -> None:
        """Trainee `i`'s step (capturable once held: the graphed trainer holds its trainees first)."""
        if i not in self.tallies:  # its first step (eager, or a graph's warm-up)
            self.tallies[i] = Tally.create(list(logged), y.device)
        self.hold(i)
        self.tallies[i].record(logged, logits, y, step, skipped)

    def hold(self, i: int) -> None:
        """Trainee `i`'s sums onto the device, unless they are there or it has not stepped yet."""
        if i in self.tallies and i not in self.held:
            self.tallies[i].load(self.trainees[i].sums)
            self.held[i] = self.tallies[i]

    def settle(self) -> None:
        """Every held trainee's sums back into its `Student.sums`."""
        for i, tally in self.held.items():
            tally.store(self.trainees[i].sums)
        self.held = {}


Forward = Callable[[Tensor], list[Tensor]]
TEACHER_STRONG = "teacher_strong"  # the batch's extra: the teacher's outputs on the STRONG_VIEW


class Trainer:
    """Runs the epochs of a pack of students that share data, seed, teacher and batch size, each
    step eagerly. Every step, eager or captured in a CUDA graph (kd/engine/fast.py), is `step`;
    its sums and the guard's state are in `running_sums`, read by `check` (the guard: after each
    eager step here) and stored back into `Student.sums` by `settle`. What happens after an epoch
    is trained (logging, the progress line, the collapse guard, tuning's pruning) is `callbacks`."""

    def __init__(
        self,
        students: list[Student],
        data: DeviceData,
        *,
        teacher: nn.Module | None,
        precision: Precision,
        should_stop: Callable[[], bool] = lambda: False,
        progress: bool | None = None,
        forwards: CompiledForwards | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.students, self.data, self.teacher, self.precision = students, data, teacher, precision
        self.forwards = forwards or CompiledForwards(enabled=False)
        self.callbacks = list(callbacks)
        self.failed: dict[int, TrainingDiverged] = {}  # by trainee index: dropped from the pack, run FAILED
        self.should_stop = should_stop
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.spec = students[0].spec
        self.running_sums = RunningSums(students)
        self.epoch = 0  # of the batch being trained (the guard's messages name it)

    def run(self) -> None:
        for s in self.students:
            s.catch_up_metrics()
        for epoch in range(min(s.epoch for s in self.students) + 1, self.spec.epochs + 1):
            active = [s for s in self.students if s.epoch < epoch and self.alive(s)]
            if not active:
                break
            started = time.perf_counter()
            self.train_epoch(epoch, active)
            for s in active:
                if self.alive(s):
                    self.finish_epoch(s, epoch, time.perf_counter() - started)

    def index(self, s: Student) -> int:
        """The trainee's place in the pack: what the trainer's per-trainee state is keyed by."""
        return next(i for i, trainee in enumerate(self.students) if trainee is s)

    def alive(self, s: Student) -> bool:
        return self.index(s) not in self.failed

    def drop(self, s: Student, err: TrainingDiverged) -> None:
        """One student diverged or collapsed: its run ends FAILED now, the rest of the pack trains on
        (the bench's students, which have no run, raise it at once)."""
        self.failed[self.index(s)] = err
        s.tracker.end("FAILED", f"TrainingDiverged: {err}")
        print(f"kd: [{s.spec.name()}] run FAILED: {err}", file=sys.stderr, flush=True)

    def train_epoch(self, epoch: int, active: list[Student]) -> None:
        bs = self.spec.batch_size
        steps = self.data.steps_per_epoch(bs)
        start = min(s.batch for s in active)
        for s in active:
            s.model.train()
            s.method.train()
        wants = frozenset().union(*(s.method.inputs for s in active))  # empty for most packs: no extra work
        batches = self.data.train_batches_with(epoch, bs, start, wants)
        if self.progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps - start, desc=f"epoch {epoch}/{self.spec.epochs}", leave=False)
        for b, (x, y, extras) in enumerate(batches, start):
            self.train_batch([s for s in active if s.batch <= b and self.alive(s)], x, y, epoch, b, extras)
            if self.should_stop() and b + 1 < steps:
                self.settle()
                for s in active:
                    if self.alive(s):
                        s.checkpoints.save(s.state())
                raise Stopped(f"stopped at epoch {epoch}, batch {b + 1}/{steps}")
        self.settle()

    def train_batch(self, stepping: list[Student], x: Tensor, y: Tensor, epoch: int, b: int,
                    extras: Extras | None = None) -> None:
        """One batch: the teacher once (and once on the strong view, if asked), then each student's step."""
        self.epoch = epoch
        forwards = self.full_batch_forwards(x, y, self.precision)
        teacher_out = teacher_forward(forwards(self.teacher), x, self.precision)
        extras = self.teacher_views(extras, forwards, self.precision)
        for s in stepping:
            self.eager_step(s, x, y, teacher_out, epoch, b, forwards(s.model), extras)

    def teacher_views(self, extras: Extras | None, forwards: Callable[[nn.Module], Any],
                      precision: Precision) -> Extras:
        """The batch's extras, with the teacher's outputs on the strong view where there is one."""
        if not extras or STRONG_VIEW not in extras:
            return extras or {}
        return {**extras, TEACHER_STRONG: teacher_forward(forwards(self.teacher), extras[STRONG_VIEW], precision)}

    def eager_step(self, s: Student, x: Tensor, y: Tensor, teacher_out: list[Tensor] | None, epoch: int, b: int,
                   forward: Forward | None = None, extras: Extras | None = None) -> None:
        """A student's step, then the guard's read of it: a diverged student leaves the pack."""
        self.step(s, x, y, teacher_out, epoch, b + 1, forward, extras=extras)
        self.check([s])
        if self.alive(s):
            self.stepped(s, b)

    def stepped(self, s: Student, b: int) -> None:
        """A student's batch `b` is done."""
        s.batch = b + 1
        crash_point("step")

    def full_batch_forwards(self, x: Tensor, y: Tensor, precision: Precision) -> Callable[[nn.Module], Any]:
        """The compiled forwards for a full batch (compiled on the first), the plain modules otherwise."""
        if len(y) != self.spec.batch_size:
            return lambda module: module
        before = self.forwards.state
        self.forwards.prepare(self.teacher, [s.model for s in self.students], x, y, precision.autocast)
        if self.forwards.state != before:  # compilation failed: the runs say so
            for s in self.students:
                s.tag({T.COMPILE: self.forwards.state})
        return self.forwards

    def step(self, s: Student, x: Tensor, y: Tensor, teacher_out: list[Tensor] | None, epoch: int,
             step: Tensor | int, forward: Forward | None = None, precision: Precision | None = None,
             extras: Extras | None = None) -> None:
        """The one step body, eager or captured in a CUDA graph: loss, backward, optimiser step (fp16:
        through the GradScaler) and the tally of what is logged, with no host read. `step` is the
        1-based step number the guard reports (a device tensor inside a graph)."""
        out, loss, logged = student_losses(s, x, y, teacher_out, epoch, precision or self.precision, forward,
                                           extras)
        s.optimizer.zero_grad(set_to_none=True)
        if s.scaler is None:
            loss.backward()
            s.optimizer.step()
            skipped = torch.zeros((), dtype=torch.bool, device=x.device)
        else:
            scaled = s.scaler.scale(loss)
            before = s.scaler._get_scale_async().clone()  # the device scale; get_scale() would sync
            scaled.backward()
            s.scaler.step(s.optimizer)
            s.scaler.update()
            skipped = s.scaler._get_scale_async() < before  # a skipped step backs the scale off
        self.running_sums.record(self.index(s), logged, out[-1], y, step, skipped)

    def check(self, students: list[Student] | None = None) -> None:
        """The guard (every divergence, eager or graphed): read the tallies of `students` (default:
        all held); a student with a non-finite loss or MAX_SKIPPED_STEPS skipped steps in a row
        leaves the pack, its run FAILED naming the method, epoch, first bad step and its values."""
        held = self.running_sums.held
        for i in list(held) if students is None else map(self.index, students):
            if i not in self.failed and i in held:
                try:
                    held[i].check(self.students[i].spec.method, self.epoch)
                except TrainingDiverged as err:
                    self.drop(self.students[i], err)

    def settle(self) -> None:
        """The guard's read, then the device sums back into the students (before they are read)."""
        self.check()
        self.running_sums.settle()

    def finish_epoch(self, s: Student, epoch: int, seconds: float) -> None:
        """Measure the epoch, commit it with the checkpoint, then the callbacks' epoch end (logging...)."""
        end = EpochEnd(self, s, epoch, self.measure(s), seconds)
        for callback in self.callbacks:
            callback.measure(end)
        s.scheduler.step()
        if end.metrics["test_acc"] > s.best_acc:
            s.best_acc = end.metrics["test_acc"]
            s.best_weights = {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()}
        for k, v in end.metrics.items():
            s.history[k].append(v)
        s.epoch, s.batch, s.sums = epoch, 0, defaultdict(float)
        s.checkpoints.save(s.state())
        for callback in self.callbacks:
            callback.on_epoch_end(end)

    def measure(self, s: Student) -> dict[str, float]:
        """The epoch's training means (of the settled sums) and accuracy, its learning rate, and the
        test (and validation) loss and accuracy."""
        seen = s.sums.pop("seen")
        correct = s.sums.pop("correct")
        metrics = {k: v / seen for k, v in s.sums.items()}
        metrics["train_acc"] = 100.0 * correct / seen
        metrics["lr"] = s.optimizer.param_groups[0]["lr"]
        metrics["test_loss"], metrics["test_acc"] = evaluate(s.model, self.data, self.data.test, self.precision)
        if len(self.data.val):
            metrics["val_loss"], metrics["val_acc"] = evaluate(s.model, self.data, self.data.val, self.precision)
        return metrics
