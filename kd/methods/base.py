"""What every distillation method is: pure loss functions in its file, plus one thin module.

The module owns the method's learnable parts (connectors, paraphraser, translator); they are
optimised with the student, saved in checkpoints and restored on resume because they are
ordinary parameters and buffers of an `nn.Module`. The trainer adds the terms up as
`(1 - alpha) * CE + alpha * sum(terms)` and logs every term per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd.errors import SpecError

Features = list[Tensor]  # a model's outputs: stage features, then logits last
Shapes = list[torch.Size]  # the same without the batch dimension
Rule = tuple[Callable[[Any], bool], str]  # a test of an option's value, and what to pass instead


def at_least(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low:g}"


def positive() -> Rule:
    return (lambda v: v > 0), "> 0"


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


NOT_NEGATIVE = at_least(0)  # every *_weight: a negative weight turns distillation into its opposite

# What a method may ask of a step beyond (student, teacher, targets, epoch) (`Method.inputs`); the
# data path (kd/data/loader.py) supplies each batch's, the trainer hands them to `forward`.
INDEX = "index"  # forward(..., index=): int64 (N,), each sample's position in the training split
# forward(..., student_strong=, teacher_strong=): both networks' outputs on a strongly augmented
# second view of the batch (kd/data/augment.py)
STRONG_VIEW = "strong_view"

# The loss metrics every method's runs log (docs/methods.md), beside each method's own terms; here,
# below the engine that computes them, so that analysis can name them without importing the engine.
LOSS_TOTAL, LOSS_CE, LOSS_DISTILL = "loss_total", "loss_ce", "loss_distill"


class Method(nn.Module):
    """Base of every method. What a method says of itself, as class attributes and hooks:

    - `options`: option name -> (default, one-line meaning), the only place a default is written;
      each option becomes an attribute of the instance (declare its type, without a value, in the
      class body: `dkd_warmup: int`);
    - `options_added_later`: options added after runs of the method existed; while at their default
      they are left out of a spec's key, so those runs keep their keys (and are not trained again);
    - `not_capturable`: None if its step can be captured in a CUDA graph, else why not (it then
      trains eagerly beside the graph; kd/engine/fast.py);
    - `epoch_key(epoch)`: what its forward makes of the epoch (a graph is captured again when it
      changes); None, the default, for a forward that ignores the epoch;
    - `inputs`: what its forward takes beyond the outputs (INDEX, STRONG_VIEW); the data path and
      the trainer do that work only for a method that asks.

    A method built for a run also gets `train_labels`, the training split's labels in INDEX order
    (None outside a run): what a method whose state spans the dataset (CRD's memory bank) is sized by.
    """

    name: ClassVar[str]
    # The run name's spelling (kd.spec.RunSpec.name), short enough that method, alpha and seed fit
    # in the 24 characters MLflow's runs table and chart legends show; the tag kd.method keeps `name`.
    label: ClassVar[str | None] = None
    options: ClassVar[dict[str, tuple[Any, str]]] = {}
    options_added_later: ClassVar[tuple[str, ...]] = ()
    rules: ClassVar[dict[str, Rule]] = {}  # option -> the values it may take (every *_weight: >= 0)
    reference: ClassVar[str] = ""
    # Set by methods with a pre-training stage: the artifact that stores its result in the run,
    # so a resumed run loads it instead of pre-training again.
    pretrain_artifact: ClassVar[str | None] = None
    # None: the step can be captured in a CUDA graph; else why it cannot (the method trains eagerly).
    not_capturable: ClassVar[str | None] = None
    # Extra inputs of `forward` (INDEX, STRONG_VIEW); empty: none, and the step does no extra work.
    inputs: ClassVar[frozenset[str]] = frozenset()
    temperature: float  # the spec's shared temperature (build_method passes it), not an option

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes | None, train_labels: Tensor | None = None,
                 **options: Any) -> None:
        super().__init__()
        self.student_shapes = student_shapes
        self.teacher_shapes = teacher_shapes
        for key, value in {**self.option_defaults(), **options}.items():
            setattr(self, key, value)

    def epoch_key(self, epoch: int) -> int | None:
        """What `forward` makes of `epoch`: a CUDA graph captured at one epoch is replayed at any
        other with the same key, and captured again when it changes. None (the default): the
        forward ignores the epoch, so one capture serves every epoch. A method whose forward
        reads `epoch` must override this (returning `epoch` is always correct)."""
        return None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {k: default for k, (default, _) in cls.options.items()}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Each value has its default's type and obeys its rule. Run when a spec is made, so a bad
        value stops before any run exists; what depends on the models (stages) is checked when
        the method is built for them."""
        for name, value in options.items():
            default = cls.options[name][0]
            flag = "--" + name.replace("_", "-")
            kind = (int, float) if type(default) is float else type(default)
            if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, kind):
                kind_name = type(default).__name__
                article = "an" if kind_name[0] in "aeiou" else "a"
                raise SpecError(f"{cls.name} option {name}={value!r} is not {article} {kind_name}: "
                                f"pass {flag} like {default!r}")
            test, wanted = cls.rules.get(name) or (NOT_NEGATIVE if name.endswith("_weight") else (None, ""))
            if test is not None and not test(value):
                raise SpecError(f"{cls.name} option {name}={value!r} is out of range: pass {flag} {wanted}")

    def forward(
        self, student: Features, teacher: Features | None, targets: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        """Distillation loss terms by name (`loss_kd`, ...); empty for runs without a teacher."""
        raise NotImplementedError

    def pretrain(
        self,
        teacher: nn.Module,
        batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
        log_metric: Callable[[str, float, int], None],
    ) -> bool:
        """Train parts that must exist before the student starts (factor transfer's paraphraser).

        `batches()` yields one epoch of augmented, normalised training batches on the device.
        Returns True if it did any work; the trainer then saves `pretrained_module()` as the
        artifact `pretrain_artifact` ({'weights': state_dict}). Most methods have nothing to
        pre-train.
        """
        return False

    def pretrained_module(self) -> nn.Module | None:
        """The part that `pretrain` trains (saved / restored by the trainer), if any."""
        return None


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` (CLI, specs, grids)."""
    METHODS[cls.name] = cls
    return cls
