"""Kernel fusion: the models' forwards (and, through AOTAutograd, their backwards) compiled by
`torch.compile`, for the full-batch training step.

A whole-step CUDA graph removes the launch overhead but keeps every kernel: a thin ResNet block
is conv, BN, ReLU, conv, BN, add, ReLU, each a kernel forward and more backward. Inductor fuses
the BN, ReLU and residual arithmetic around cuDNN's convolutions into a few Triton kernels (C++
on the CPU); the graph then replays those. It is opt-in (`--compile`): the first step pays the
compilation (tens of seconds to minutes), and the fused kernels round differently from the eager
ones, so a compiled run equals its eager twin to float tolerance, not bit for bit.

Compiled forwards serve only full batches; the shorter last batch and evaluation run the plain
modules, so no second shape is compiled. Before the first full step every compiled forward is
tried once on that batch (students with their backward), with buffers, gradients and the RNG
put back: a compiler that fails then fails before any step, and the run trains uncompiled with
the reason in its `kd.compile` tag.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

OFF = "off"
ON = "inductor"


class CompiledForwards:
    """The compiled stand-ins of a pack's models, by module; `state` is the `kd.compile` tag."""

    def __init__(self, enabled: bool, backend: str | Callable[..., Any] = "inductor") -> None:
        self.enabled, self.backend = enabled, backend
        self.state = ON if enabled else OFF
        self.tried = False
        self.compiled: dict[nn.Module, Callable[[Tensor], Any]] = {}  # modules hash by identity

    def __call__(self, module: nn.Module) -> Callable[[Tensor], Any]:
        """What the full-batch step calls: the compiled forward, or the module if compilation is off."""
        if not self.enabled or module is None:
            return module
        if module not in self.compiled:
            self.compiled[module] = torch.compile(module, backend=self.backend)
        return self.compiled[module]

    def prepare(self, teacher: nn.Module | None, students: Iterable[nn.Module], x: Tensor, y: Tensor,
                autocast: Callable[[], Any]) -> None:
        """Compile every forward on the first full batch, leaving no trace of the trial; on failure,
        say why once and train uncompiled."""
        if not self.enabled or self.tried:
            return
        self.tried = True
        models = [m for m in [teacher, *students] if m is not None]
        try:
            for model in models:
                trial(self(model), model, x, y, autocast, backward=model is not teacher)
        except Exception as err:  # a missing compiler or an unsupported op: the plain modules still train
            message = " ".join(str(err).strip().split("\n\n")[0].split())  # dynamo appends debugging hints
            reason = f"{type(err).__name__}: {message}"[:300]
            self.enabled, self.state, self.compiled = False, f"failed, trained uncompiled: {reason}", {}
            print(f"kd: torch.compile failed, training uncompiled: {reason}", file=sys.stderr, flush=True)


def trial(forward: Callable[[Tensor], Any], model: nn.Module, x: Tensor, y: Tensor, autocast: Callable[[], Any],
          backward: bool) -> None:
    """One forward (and backward) through `forward`, then the model's buffers (BatchNorm's running
    statistics), gradients and the RNG are as they were."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        if backward:
            with autocast():
                logits = forward(x)[-1]
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
        else:
            with torch.no_grad(), autocast():
                forward(x)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for p, grad in grads:
        p.grad = grad
