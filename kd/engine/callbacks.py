"""The standard epoch-end callbacks (`kd.engine.trainer.Callback`): what happens to each trainee after
an epoch is trained, evaluated and committed to its checkpoint, in order: the epoch's time is
measured, the metrics are logged, the caller's own callback runs (tuning's pruning), the progress
line is printed, and the collapse guard looks at the accuracies. A new logged quantity is one
callback more here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kd.engine.trainer import Callback, EpochCallback, EpochEnd, Student, TrainingDiverged
from kd.faults import crash_point
from kd.methods.base import LOSS_TOTAL
from kd.spec import COLLAPSE_FACTOR


def standard_callbacks(on_epoch: EpochCallback | None, collapse_after: int) -> list[Callback]:
    """The callbacks of a run's trainer: `on_epoch` (the caller's) after the metrics are logged;
    the collapse guard watches `collapse_after` epochs (0: no guard)."""
    callers = [] if on_epoch is None else [on_epoch if isinstance(on_epoch, Callback) else EpochFunction(on_epoch)]
    guard = [CollapseGuard(collapse_after)] if collapse_after else []
    return [EpochTime(), LogMetrics(), *callers, ProgressLine(), *guard]


class EpochTime(Callback):
    """`epoch_time`: the epoch's wall time in seconds."""

    def measure(self, end: EpochEnd) -> None:
        end.metrics["epoch_time"] = end.seconds


class LogMetrics(Callback):
    """The epoch's metrics to the run (`step=epoch`), unless it has them: an epoch re-trained after
    falling back to an older checkpoint. The checkpoint is committed first, so a kill between the
    two is caught up on resume (`Student.catch_up_metrics`)."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        crash_point("metrics_log")
        if end.epoch not in end.trainee.logged_epochs:
            end.trainee.tracker.log_epoch(end.epoch, end.metrics)


@dataclass
class EpochFunction(Callback):
    """A plain function of (trainee, epoch, metrics) as a callback (`run_specs(on_epoch=...)` takes either)."""

    function: Callable[[Student, int, dict[str, float]], None]

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.function(end.trainee, end.epoch, end.metrics)


class ProgressLine(Callback):
    """One line per trainee and epoch on stdout, unless a lone trainee's progress bar shows it."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.trainer.progress and len(end.trainer.students) == 1:
            return
        spec, metrics = end.trainee.spec, end.metrics
        print(
            f"[{spec.name()}] epoch {end.epoch}/{spec.epochs} loss_total {metrics[LOSS_TOTAL]:.4f} "
            f"train_acc {metrics['train_acc']:.2f} test_acc {metrics['test_acc']:.2f} "
            f"lr {metrics['lr']:.4g} ({end.seconds:.1f}s)",
            flush=True,
        )


@dataclass
class CollapseGuard(Callback):
    """Not learning: no accuracy of the last `window` epochs reached COLLAPSE_FACTOR x chance (the
    beta RKD runs sat at chance for 150 epochs and nobody was told): the trainee leaves the pack, its
    run FAILED. Measured on the validation split where there is one, so that the test set never
    decides a tuning trial."""

    window: int

    def on_epoch_end(self, end: EpochEnd) -> None:
        data = end.trainer.data
        split = "val_acc" if len(data.val) else "test_acc"
        recent = end.trainee.history[split][-self.window:]
        chance = 100.0 / data.num_classes
        if end.epoch < self.window or max(recent) >= COLLAPSE_FACTOR * chance:
            return
        end.trainer.drop(end.trainee, TrainingDiverged(
            f"collapsed: method '{end.trainee.spec.method}' stayed at {max(recent):.2f} % {split} or less for "
            f"{self.window} epochs (epoch {end.epoch}), below {COLLAPSE_FACTOR:g}x chance ({chance:.2f} %); "
            f"stopped (--collapse-after 0 trains on regardless)"))
