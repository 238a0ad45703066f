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
- the step body, its device tally of loss terms and accuracy, and the divergence guard are the
  eager Trainer's (`Trainer.step`, `Trainer.check`); here the guard reads the tallies every
  GUARD_EVERY steps and when the epoch ends instead of after every step;
- fp16: the GradScaler's scale, unscale and update are captured too (with a fused optimiser the
  scaler needs no host sync) and the skipped-step streak is counted on the device;
- each student steps on its own CUDA stream inside the graph, so the students of a pack run
  concurrently instead of one after the other;
- models and the input buffer are channels_last; autocast runs without its weight-cast cache;
- the shorter last batch of an epoch runs eagerly, so the batches are those of the eager path;
- a method whose forward depends on the epoch (DKD's warm-up ramp) is re-captured when its
  `Method.epoch_key` changes;
- a batch's extra inputs (`Method.inputs`: indices, a strong view) have static buffers like x and
  y, and the teacher's forward on the strong view is captured with the rest.

Where capture is impossible (no GPU, a method that says `not_capturable`, a capture that fails)
students train eagerly, and each run's tag `kd.step_mode` says `cuda_graph` or `eager: <why>`.
`make_trainer` is the one place that chooses between the two trainers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kd.data.loader import DeviceData, Extras
from kd.engine.callbacks import standard_callbacks
from kd.engine.trainer import EpochCallback, Student, Trainer, teacher_forward
from kd.methods import METHODS
from kd.spec import DEFAULT_COLLAPSE_AFTER, RunSpec
from kd.tracking import tags as T

GRAPH = "cuda_graph"
WARMUP_STEPS = 3  # eager steps on a side stream before each capture (PyTorch's recipe uses 3)
GUARD_EVERY = 100  # graphed steps between reads of the guard's device state (each read is a sync)


def step_modes(device: torch.device, specs: list[RunSpec]) -> list[str]:
    """Each spec's `kd.step_mode`: GRAPH, or `eager: <why>`."""
    if device.type != "cuda":
        return [f"eager: no CUDA device ({device.type})"] * len(specs)
    return [GRAPH if METHODS[s.method].not_capturable is None
            else f"eager: method '{s.method}' is not capturable ({METHODS[s.method].not_capturable})" for s in specs]


def make_trainer(students: list[Student], data: DeviceData, modes: list[str], *,
                 on_epoch: EpochCallback | None = None, collapse_after: int = DEFAULT_COLLAPSE_AFTER,
                 **options: Any) -> Trainer:
    """The one choice of trainer: graphed if any student's step mode (`step_modes`) is GRAPH, with the
    standard epoch-end callbacks (`on_epoch`, the caller's, among them; `collapse_after`: the collapse
    guard's window). `options`: the Trainer's other keyword arguments."""
    callbacks = standard_callbacks(on_epoch, collapse_after)
    return (GraphedTrainer if GRAPH in modes else Trainer)(students, data, callbacks=callbacks, **options)


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

    The graph records the Trainer's own step body (`Trainer.step`) for each capturable student.
    Students whose method is not capturable step eagerly after the replay, from the graph's
    teacher outputs. Everything else (epochs, evaluation, checkpoints, logging, the guard) is the
    Trainer's.
    """

    def __init__(self, students: list[Student], data: DeviceData, *, graphs: Graphs | None = None,
                 **options: Any) -> None:
        super().__init__(students, data, **options)
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
        self.static_extras: Extras = {}  # the batch's extra inputs, by name
        self.lrs: dict[int, list[Tensor]] = {}  # by trainee index: one lr tensor per param group
        self.lrs_for: tuple | None = None  # (epoch, trainee indices) the lr tensors were filled for
        self.streams: dict[int, torch.cuda.Stream] = {}  # by trainee index: its branch of the graph
        self.since_check = 0

    def capturable(self, s: Student) -> bool:
        return self.failure is None and s.method.not_capturable is None

    def train_batch(self, stepping: list[Student], x: Tensor, y: Tensor, epoch: int, b: int,
                    extras: Extras | None = None) -> None:
        self.epoch = epoch
        graphed = self.graphed_students(stepping, epoch) if len(y) == self.spec.batch_size else []
        stepping = [s for s in stepping if self.alive(s)]
        if not graphed:  # nothing to replay, or the short last batch
            super().train_batch(stepping, x, y, epoch, b, extras)
        else:
            self.graphed_batch(graphed, stepping, x, y, epoch, b, extras)

    def graphed_students(self, stepping: list[Student], epoch: int) -> list[Student]:
        """The students a full batch replays: the capturable ones. When they or their epoch keys
        differ from the captured graph's, the guard reads first (a diverged one leaves the pack)
        and a new warm-up and capture follow."""
        graphed = [s for s in stepping if self.capturable(s)]
        if not graphed or self.capture_key(graphed, epoch) == self.key:
            return graphed
        self.check()
        graphed = [s for s in graphed if self.alive(s)]
        if graphed and self.capture_key(graphed, epoch) != self.key:
            self.key, self.replay, self.warmups_left = self.capture_key(graphed, epoch), None, WARMUP_STEPS
        return graphed

    def capture_key(self, graphed: list[Student], epoch: int) -> tuple:
        """What a captured graph is for: its students (by index) and their methods' epoch keys."""
        return tuple(map(self.index, graphed)), tuple(s.method.epoch_key(epoch) for s in graphed)

    def graphed_batch(self, graphed: list[Student], stepping: list[Student], x: Tensor, y: Tensor, epoch: int,
                      b: int, extras: Extras | None) -> None:
        """A full batch: the graphed students' steps warmed up or replayed, then the others' eager steps
        on the graph's teacher outputs; the guard reads every GUARD_EVERY batches."""
        self.hold(graphed, epoch)
        static_x, static_y, static_step = self.buffers(x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        static_step.fill_(b + 1)
        self.copy_extras(extras or {})
        if self.warmups_left:
            self.full_batch_forwards(static_x, static_y, self.capture_precision)  # compiled first, if asked
            self.warmups_left -= 1
            with self.graphs.warmup(), self.tensor_lrs(graphed):
                teacher_out, views = self.whole_step(graphed, epoch)
        else:
            if self.replay is None and not self.capture(graphed, epoch):
                super().train_batch(stepping, x, y, epoch, b, extras)
                return
            teacher_out, views = self.replay()
        graphed_indices = set(map(self.index, graphed))
        for s in stepping:
            if self.index(s) in graphed_indices:
                self.stepped(s, b)
            else:  # not capturable: steps eagerly on the graph's teacher outputs
                self.eager_step(s, x, y, teacher_out, epoch, b, extras=views)
        self.since_check += 1
        if self.since_check >= GUARD_EVERY:
            self.since_check = 0
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

    def whole_step(self, graphed: list[Student], epoch: int) -> tuple[list[Tensor] | None, Extras]:
        """What the graph captures: the teacher once (and on the strong view, if any), then each
        student's `step` (no host reads). Returns the teacher's outputs and the batch's extras."""
        x, y, step = self.static
        teacher_out = teacher_forward(self.forwards(self.teacher), x, self.capture_precision)
        views = self.teacher_views(self.static_extras, self.forwards, self.capture_precision)
        for s in self.side_by_side(graphed):
            self.step(s, x, y, teacher_out, epoch, step, self.forwards(s.model), self.capture_precision, views)
        return teacher_out, views

    def side_by_side(self, graphed: list[Student]) -> Iterator[Student]:
        """Each student's step on its own CUDA stream, forked after the teacher and joined at the
        end, so that the graph runs the students concurrently: one thin ResNet at batch 128 leaves
        most of a big GPU idle. (Backward runs on its forward's stream; the CPU has no streams.)"""
        if self.precision.device.type != "cuda":
            yield from graphed
            return
        indices = list(map(self.index, graphed))
        for i in indices:
            if i not in self.streams:  # made in the warm-up: never inside a capture
                self.streams[i] = torch.cuda.Stream()
        origin = torch.cuda.current_stream()
        streams = [self.streams[i] for i in indices]
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

    def copy_extras(self, extras: Extras) -> None:
        """The batch's extra inputs into their static buffers (made at the first batch that has them;
        a pack's extras are the same every batch, as its students are)."""
        for name, value in extras.items():
            if name not in self.static_extras:
                memory = self.format if value.dim() == 4 else torch.preserve_format
                self.static_extras[name] = torch.empty_like(value, memory_format=memory)
            self.static_extras[name].copy_(value)

    def hold(self, graphed: list[Student], epoch: int) -> None:
        """Before the steps to come: the students' sums in their tallies, their learning rates in
        the lr tensors (refilled each epoch; outside any capture)."""
        for s in graphed:
            self.running_sums.hold(self.index(s))
        if self.lrs_for == (epoch, self.key[0]):
            return
        for s in graphed:
            lrs = self.lrs.setdefault(self.index(s), [torch.zeros((), device=self.precision.device)
                                                      for _ in s.optimizer.param_groups])
            for group, lr in zip(s.optimizer.param_groups, lrs, strict=True):
                lr.fill_(group["lr"])
        self.lrs_for = (epoch, self.key[0])

    @contextmanager
    def tensor_lrs(self, graphed: list[Student]) -> Iterator[None]:
        """param_group['lr'] is the device tensor while the step is warmed up or captured; the
        float stays the group's value otherwise (schedulers, metrics and checkpoints use it)."""
        groups = [(g, lr) for s in graphed
                  for g, lr in zip(s.optimizer.param_groups, self.lrs[self.index(s)], strict=True)]
        floats = [g["lr"] for g, _ in groups]
        for g, lr in groups:
            g["lr"] = lr
        try:
            yield
        finally:
            for (g, _), value in zip(groups, floats, strict=True):
                g["lr"] = value

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
        print(f"kd: CUDA graph capture failed, training eagerly: {reason}", file=sys.stderr, flush=True)
