"""The fast step: a pack's whole training step (teacher forward, each student's forward, loss,
backward and optimiser step) captured in one CUDA graph and replayed for every full batch.

At batch 128 the thin CIFAR ResNets are bound by kernel launches, not arithmetic; replaying one
graph per batch removes the launches. The capture follows PyTorch's whole-network recipe (CUDA
semantics, "CUDA Graphs: whole-network capture"): static input buffers that each batch is
copied into, warm-up iterations on a side stream before capture, gradients set to None before
capture so that backward allocates them from the graph's private pool, and an optimiser whose
step needs no host sync (fused SGD; capturable fused AdamW). Beyond the recipe:

- the learning rate is a device tensor that the captured optimiser reads, refilled from the
  param group at each epoch, so the cosine schedule never needs a re-capture;
- loss terms, accuracy and the guard's state accumulate in device tensors (no `.item()` per
  step); the guard reads them every GUARD_EVERY steps and when the epoch ends, and names the
  method, epoch and first bad step exactly as the eager guard does;
- fp16: the GradScaler's scale, unscale and update are captured too (with a fused optimiser the
  scaler needs no host sync) and the skipped-step streak is counted on the device;
- each student steps on its own CUDA stream inside the graph, so the students of a pack run
  concurrently instead of one after the other;
- models and the input buffer are channels_last; autocast runs without its weight-cast cache;
- the shorter last batch of an epoch runs eagerly, so the batches are those of the eager path;
- a method whose forward depends on the epoch (DKD's warm-up ramp) is re-captured when it changes.

Where capture is impossible (no GPU, a method with host syncs, a capture that fails) students
train eagerly, and each run's tag `kd.step_mode` says `cuda_graph` or `eager: <why>`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kd.engine.trainer import (
    MAX_SKIPPED_STEPS,
    NON_FINITE,
    SKIPPED,
    Student,
    Trainer,
    TrainingDiverged,
    diverged,
    student_losses,
    teacher_forward,
)
from kd.faults import crash_point
from kd.methods.base import Method
from kd.spec import RunSpec
from kd.tracking import tags as T

GRAPH = "cuda_graph"
WARMUP_STEPS = 3  # eager steps on a side stream before each capture (PyTorch's recipe uses 3)
GUARD_EVERY = 100  # graphed steps between reads of the guard's device state (each read is a sync)

# Methods whose step cannot be captured, and why (they train eagerly, the rest of the pack graphed).
NOT_CAPTURABLE = {"tucker": "torch.linalg.eigh checks its result on the host"}
# Methods whose forward ignores the epoch, so one capture serves every epoch. Any other method
# is re-captured whenever `epoch_key` changes: always correct, at worst one capture per epoch.
EPOCH_FREE = frozenset({"pure", "logit", "fitnets", "attention_transfer", "factor_transfer", "rkd", "nst"})


def epoch_key(method: Method, epoch: int) -> int | None:
    """What a captured forward bakes in of the epoch; a new value means a new capture."""
    if method.name in EPOCH_FREE:
        return None
    if method.name == "dkd":
        return min(epoch, method.dkd_warmup)  # its ramp is flat after the warm-up
    return epoch


def step_modes(device: torch.device, specs: list[RunSpec]) -> list[str]:
    """Each spec's `kd.step_mode`: GRAPH, or `eager: <why>`."""
    if device.type != "cuda":
        return [f"eager: no CUDA device ({device.type})"] * len(specs)
    return [f"eager: method '{s.method}' is not capturable ({NOT_CAPTURABLE[s.method]})"
            if s.method in NOT_CAPTURABLE else GRAPH for s in specs]


class Graphs(Protocol):
    """How a step is warmed up and captured: CudaGraphs on the GPU; tests stand in a fake."""

    def warmup(self) -> Any: ...

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]: ...


class CudaGraphs:
    """PyTorch's whole-network recipe: warm-up on a side stream, then one `torch.cuda.graph`."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()

    @contextmanager
    def warmup(self) -> Iterator[None]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        """Record `step` (not run: capture launches nothing); the replay returns its static outputs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

        def replay() -> Any:
            graph.replay()
            return out

        return replay


@dataclass
class Tally:
    """A graphed student's sums and guard state for the epoch, kept on the device.

    `sums` carries the host's `Student.sums` (loaded before, stored back after), so the values
    are added in the eager order: on the CPU the result is bit-identical to the eager step's.
    """

    keys: list[str]  # loss_total, loss_ce, loss_distill, the method's terms
    sums: Tensor  # float64 (K,): sum over steps of value * batch size
    correct: Tensor  # float64 ()
    streak: Tensor  # int64 (): fp16 steps skipped in a row
    first: Tensor  # int64 (2,): first step with a non-finite value / at which the streak tripped (0: none)
    first_values: Tensor  # float64 (2, K): the logged values at those steps

    @classmethod
    def create(cls, keys: list[str], device: torch.device) -> Tally:
        k = len(keys)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        return cls(keys, torch.zeros(k, **f64), torch.zeros((), **f64), torch.zeros((), **i64),
                   torch.zeros(2, **i64), torch.zeros(2, k, **f64))

    def load(self, s: Student) -> None:
        self.sums.copy_(torch.tensor([s.sums.get(k, 0.0) for k in self.keys], dtype=torch.float64))
        self.correct.fill_(s.sums.get("correct", 0.0))
        self.streak.fill_(s.skipped_in_a_row)
        self.first.zero_()

    def store(self, s: Student) -> None:
        for k, v in zip(self.keys, self.sums.tolist(), strict=True):
            s.sums[k] = v
        s.sums["correct"] = self.correct.item()
        s.skipped_in_a_row = int(self.streak.item())

    def record(self, logged: dict[str, Tensor], logits: Tensor, y: Tensor, step: Tensor, skipped: Tensor) -> None:
        """Device-only bookkeeping of one step (capturable: no host reads)."""
        values = torch.stack([t.detach().double() for t in logged.values()])
        self.sums.add_(values * len(y))
        self.correct.add_((logits.argmax(1) == y).sum())
        self.streak.copy_(torch.where(skipped, self.streak + 1, 0))
        happened = torch.stack([~torch.isfinite(values).all(), self.streak >= MAX_SKIPPED_STEPS])
        new = happened & (self.first == 0)
        self.first.copy_(torch.where(new, step, self.first))
        self.first_values.copy_(torch.where(new[:, None], values, self.first_values))

    def check(self, method: str, epoch: int) -> None:
        """Raise the eager guard's error for the earliest event of the epoch, if any (a host read)."""
        first = self.first.tolist()
        events = [(step, i) for i, step in enumerate(first) if step]
        if events:
            step, i = min(events)
            values = dict(zip(self.keys, self.first_values[i].tolist(), strict=True))
            raise diverged((NON_FINITE, SKIPPED)[i], method, epoch, step, values)


def to_channels_last(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None = None) -> None:
    """channels_last in place (parameters keep their identity); optimiser state (a resumed run's
    momentum) is re-laid like its parameter, as fused kernels walk both in memory order."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
    if optimizer is None:
        return
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class GraphedTrainer(Trainer):
    """The Trainer with each full batch's step replayed from one CUDA graph for the whole pack.

    Students whose method is not capturable step eagerly after the replay, from the graph's
    teacher outputs. Everything else (epochs, evaluation, checkpoints, logging) is the Trainer's.
    """

    def __init__(self, *args: Any, graphs: Graphs | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        device = self.precision.device
        self.graphs = graphs or CudaGraphs()
        self.capture_precision = replace(self.precision, cache=False)
        self.format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        if device.type == "cuda":
            to_channels_last([self.teacher] if self.teacher is not None else [])
            for s in self.students:
                to_channels_last([s.model, s.method], s.optimizer)
        self.failure: str | None = None  # set when a capture failed: eager from then on
        self.key: tuple | None = None  # the captured students and their epoch keys
        self.replay: Callable[[], Any] | None = None
        self.warmups_left = 0
        self.static: tuple[Tensor, Tensor, Tensor] | None = None  # x, y, 1-based step number
        self.tallies: dict[int, Tally] = {}
        self.lrs: dict[int, list[Tensor]] = {}  # per student, one lr tensor per param group
        self.streams: dict[int, torch.cuda.Stream] = {}  # per student: its branch of the graph
        self.held: list[Student] = []  # students whose sums live in their tally right now
        self.epoch = 0
        self.since_check = 0

    def capturable(self, s: Student) -> bool:
        return self.failure is None and s.spec.method not in NOT_CAPTURABLE

    def train_batch(self, stepping: list[Student], x: Tensor, y: Tensor, epoch: int, b: int) -> None:
        self.epoch = epoch
        graphed = [s for s in stepping if self.capturable(s)]
        if not graphed or len(y) != self.spec.batch_size:  # nothing to replay, or the short last batch
            self.settle()
            super().train_batch([s for s in stepping if self.alive(s)], x, y, epoch, b)
            return
        key = (tuple(map(id, graphed)), tuple(epoch_key(s.method, epoch) for s in graphed))
        if key != self.key:
            self.settle()
            if not all(map(self.alive, graphed)):  # the guard's read found one diverged: again without it
                self.train_batch([s for s in stepping if self.alive(s)], x, y, epoch, b)
                return
            self.key, self.replay, self.warmups_left = key, None, WARMUP_STEPS
        self.hold(graphed)
        static_x, static_y, static_step = self.buffers(x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        static_step.fill_(b + 1)
        if self.warmups_left:
            self.full_batch_forwards(static_x, static_y, self.capture_precision)  # compiled first, if asked
            self.warmups_left -= 1
            with self.graphs.warmup(), self.tensor_lrs(graphed):
                teacher_out = self.whole_step(graphed, epoch)
        else:
            if self.replay is None and not self.capture(graphed, epoch):
                super().train_batch(stepping, x, y, epoch, b)
                return
            teacher_out = self.replay()
        graphed_ids = set(map(id, graphed))
        for s in stepping:
            if id(s) in graphed_ids:
                s.sums["seen"] += len(y)
                s.batch = b + 1
                crash_point("step")
            else:  # not capturable: steps eagerly on the graph's teacher outputs
                self.guarded_step(s, x, y, teacher_out, epoch, b)
        self.since_check += 1
        if self.since_check >= GUARD_EVERY:
            self.check()

    def capture(self, graphed: list[Student], epoch: int) -> bool:
        """Capture the pack's step; False (and eager from now on) if that fails."""
        for s in graphed:  # as the recipe: backward inside the capture allocates .grad from the graph's pool
            s.optimizer.zero_grad(set_to_none=True)
        try:
            with self.tensor_lrs(graphed):
                self.replay = self.graphs.capture(lambda: self.whole_step(graphed, epoch))
        except Exception as err:  # whatever stops a capture, the eager step still works
            self.fall_back(graphed, err)
            return False
        return True

    def whole_step(self, graphed: list[Student], epoch: int) -> list[Tensor] | None:
        """What the graph captures: the teacher once, then each student's full step (no host reads)."""
        x, y, step = self.static
        teacher_out = teacher_forward(self.forwards(self.teacher), x, self.capture_precision)
        for s in self.side_by_side(graphed):
            out, loss, logged = student_losses(s, x, y, teacher_out, epoch, self.capture_precision,
                                               self.forwards(s.model))
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
                skipped = s.scaler._get_scale_async() < before
            if id(s) not in self.tallies:  # first warm-up step: the method's term names are known now
                self.tallies[id(s)] = Tally.create(list(logged), x.device)
                self.tallies[id(s)].load(s)
            self.tallies[id(s)].record(logged, out[-1], y, step, skipped)
        return teacher_out

    def side_by_side(self, graphed: list[Student]) -> Iterator[Student]:
        """Each student's step on its own CUDA stream, forked after the teacher and joined at the
        end, so that the graph runs the students concurrently: one thin ResNet at batch 128 leaves
        most of a big GPU idle. (Backward runs on its forward's stream; the CPU has no streams.)"""
        if self.precision.device.type != "cuda":
            yield from graphed
            return
        for s in graphed:
            if id(s) not in self.streams:  # made in the warm-up: never inside a capture
                self.streams[id(s)] = torch.cuda.Stream()
        origin = torch.cuda.current_stream()
        streams = [self.streams[id(s)] for s in graphed]
        for stream in streams:
            stream.wait_stream(origin)
        for s, stream in zip(graphed, streams, strict=True):
            with torch.cuda.stream(stream):
                yield s
        for stream in streams:
            origin.wait_stream(stream)

    def buffers(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.static is None:
            step = torch.zeros((), dtype=torch.int64, device=x.device)
            self.static = (torch.empty_like(x, memory_format=self.format), torch.empty_like(y), step)
        return self.static

    def hold(self, graphed: list[Student]) -> None:
        """Move the students' sums and learning rates onto the device for the steps to come."""
        if [id(s) for s in self.held] == [id(s) for s in graphed]:
            return
        self.settle()
        for s in graphed:
            if id(s) in self.tallies:
                self.tallies[id(s)].load(s)
            lrs = self.lrs.setdefault(id(s), [torch.zeros((), device=self.precision.device)
                                               for _ in s.optimizer.param_groups])
            for group, lr in zip(s.optimizer.param_groups, lrs, strict=True):
                lr.fill_(group["lr"])
        self.held = graphed

    @contextmanager
    def tensor_lrs(self, graphed: list[Student]) -> Iterator[None]:
        """param_group['lr'] is the device tensor while the step is warmed up or captured; the
        float stays the group's value otherwise (schedulers, metrics and checkpoints use it)."""
        groups = [(g, lr) for s in graphed for g, lr in zip(s.optimizer.param_groups, self.lrs[id(s)], strict=True)]
        floats = [g["lr"] for g, _ in groups]
        for g, lr in groups:
            g["lr"] = lr
        try:
            yield
        finally:
            for (g, _), value in zip(groups, floats, strict=True):
                g["lr"] = value

    def check(self) -> None:
        """Read the guard's device state; a diverged student leaves the pack (the next batch
        captures the others again without it)."""
        self.since_check = 0
        for s in self.held:
            if not self.alive(s):
                continue
            try:
                self.tallies[id(s)].check(s.spec.method, self.epoch)
            except TrainingDiverged as err:
                self.drop(s, err)

    def settle(self) -> None:
        """Guard check, then the device sums back into the students (before eager steps and reads)."""
        self.check()
        for s in self.held:
            self.tallies[id(s)].store(s)
        self.held = []

    def fall_back(self, graphed: list[Student], err: Exception) -> None:
        """A failed capture ran nothing: drop its gradients and half-done scaler state, go eager."""
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        self.failure = f"eager: capture failed: {reason}"
        self.key, self.replay = None, None
        for s in graphed:
            s.optimizer.zero_grad(set_to_none=True)
            if s.scaler is not None:
                s.scaler._per_optimizer_states.clear()  # what update() resets; a capture may stop midway
            s.tag({T.STEP_MODE: self.failure})
        self.settle()
        print(f"kd: CUDA graph capture failed, training eagerly: {reason}", file=sys.stderr, flush=True)
