"""`kd tune`: an Optuna study over a method's options, every trial an MLflow child run.

`kd.cli` adds the subcommand with `register(sub)`; `python -m kd.cli tune ARGS` is the same command
without the console script, what cluster workers run (`kd.tuning.workers.tune_worker_command`).
A command-line module: `register` is light, `tune` imports the tuning machinery when it runs
(kd/tuning/study.py, space.py, storage.py); docs/tuning.md explains the choices.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from kd.errors import SpecError
from kd.flags import add_option_flags, add_spec_flags, add_teacher_version_flag, flag, spec_from_args
from kd.spec import RunOptions, RunSpec
from kd.tuning import PRUNERS, SAMPLERS

DEFAULT_TRIALS = 40
DEFAULT_VAL_FRACTION = 0.1


def register(sub: Any) -> None:
    """Add `tune` to an argparse subparsers object."""
    p = sub.add_parser("tune", help="Optuna search over a method's options on a validation split",
                       description="Tune a method's options with Optuna. The objective is the accuracy on a "
                                   "validation split held out of the training set; every trial is an MLflow "
                                   "child run of the study's run. See docs/tuning.md.")
    add_spec_flags(p, skip={"model", "role"})
    add_teacher_version_flag(p)
    p.add_argument("--student", default=None, help=f"student model (default {RunSpec.model})")
    g = p.add_argument_group("study")
    g.add_argument(*flag("trials"), type=int, default=None,
                   help=f"COMPLETE + PRUNED trials the study aims for, over all workers (default {DEFAULT_TRIALS})")
    g.add_argument(*flag("params"), default=None,
                   help="comma-separated names to tune (spec fields or method options; default: the method's space)")
    g.add_argument(*flag("range"), dest="ranges", default=None,
                   help="NAME=LOW:HIGH[:log|:linear],... overrides a range (and tunes NAME)")
    g.add_argument(*flag("sampler"), choices=SAMPLERS, default="tpe", help="default tpe (seeded by --seed)")
    g.add_argument(*flag("pruner"), choices=PRUNERS, default="median", help="default median")
    g.add_argument(*flag("pruner_startup_trials"), type=int, default=5,
                   help="finished trials before the median pruner prunes (default 5)")
    g.add_argument(*flag("pruner_warmup_epochs"), type=int, default=None,
                   help="epochs before a trial can be pruned (default: a fifth of --epochs)")
    g.add_argument(*flag("study"), default=None, help="study name (default: dataset-teacher-to-student-method-eE-sS)")
    g.add_argument(*flag("storage"), default=None,
                   help="Optuna storage URL (sqlite:///..., postgresql://...) or journal:PATH "
                        "(default: optuna.db beside the MLflow sqlite store)")
    g.add_argument("--join", action="store_true",
                   help="join the existing --study: spec, search space and trials come from the storage")
    g.add_argument(*flag("create_only"), action="store_true",
                   help="create the study and its MLflow run, run no trial (workers join later)")
    w = p.add_argument_group("worker")
    w.add_argument(*flag("worker"), type=int, default=None,
                   help="this worker's number: workers started together get distinct sampler seeds")
    w.add_argument(*flag("heartbeat_interval"), type=int, default=60,
                   help="seconds between a running trial's heartbeats (default 60)")
    w.add_argument(*flag("grace_period"), type=int, default=300,
                   help="seconds without a heartbeat before a trial counts as lost and is retried (default 300)")
    w.add_argument(*flag("max_retry"), type=int, default=2, help="retries of a lost trial (default 2)")
    w.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "kd"),
                   help="MLflow experiment of a new study (default kd)")
    add_option_flags(w)
    w.add_argument(*flag("data_root"), default=None, help="datasets folder (default $KD_DATA_ROOT or ./data)")
    p.set_defaults(func=tune)


def tune(args: argparse.Namespace) -> int:
    from kd.tracking.store import check_writable, experiment_id, get_client, ui_hint
    from kd.tuning.storage import JOURNAL_PREFIX, absolute, default_storage, display
    from kd.tuning.study import Worker, check_teacher, default_study_name, open_study, run_study
    from kd.tuning.workers import tune_worker_command

    check_writable()
    if args.data_root:
        os.environ["KD_DATA_ROOT"] = args.data_root
    config = None if args.join else study_config(args)
    if config is None and not args.study:
        raise SpecError("--join needs the study's name: pass --study NAME (and its --storage)")
    if config is not None:
        check_teacher(config.base)
    storage = absolute(args.storage or default_storage())
    worker = Worker(study=args.study or default_study_name(config.base), storage=storage,
                    experiment=args.experiment, options=RunOptions.from_values(args), worker=args.worker,
                    heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                    max_retry=args.max_retry, attach_run_id=os.environ.get("MLFLOW_RUN_ID"))
    if args.create_only:
        _, config, parent = open_study(config, worker)
        print(f"kd tune: study '{worker.study}' ready in {display(storage)}, parent run {parent}; "
              f"start workers with: {' '.join(tune_worker_command(worker.study, storage, 0))}")
        return 0
    summary = run_study(config, worker)
    print_summary(summary)
    print(ui_hint(experiment_id(get_client(), args.experiment)))
    print(f"watch the study: optuna-dashboard '{display(storage).removeprefix(JOURNAL_PREFIX)}'")
    return 0


def study_config(args: argparse.Namespace) -> Any:
    """The study's base spec and search space from the flags; a tuned value may not also be fixed."""
    from kd.tuning.space import build_space
    from kd.tuning.study import StudyConfig

    if args.val_fraction is None:
        args.val_fraction = DEFAULT_VAL_FRACTION
    if args.method not in (None, "pure") and args.teacher is None and args.teacher_weights is None:
        args.teacher = RunSpec.TEACHER_MODEL
    base = taught_on_all_images(spec_from_args(args, model=args.student, role="student"), args.teacher_version)
    space = build_space(base.method, args.params, args.ranges)
    fixed = [d.name for d in space
             if getattr(args, d.name, None) is not None or getattr(args, f"opt.{d.name}", None) is not None]
    if fixed:
        raise SpecError(f"{', '.join(fixed)}: both fixed by a flag and tuned: drop the flag or leave it out of --params")
    return StudyConfig(base, tuple(space), trials=DEFAULT_TRIALS if args.trials is None else args.trials,
                       sampler=args.sampler, pruner=args.pruner, pruner_startup_trials=args.pruner_startup_trials,
                       pruner_warmup_epochs=args.pruner_warmup_epochs)


def taught_on_all_images(base: RunSpec, teacher_version: str | None) -> RunSpec:
    """Trials hold a validation split out of the student's training images; their teacher is the one
    of their recipe trained on all of them (or the registered teacher --teacher-version names)."""
    from kd.tracking.registry import with_teacher_version
    from kd.tracking.store import get_client

    if teacher_version is not None:
        return with_teacher_version(get_client(), base, teacher_version)
    teacher = base.teacher_spec()
    return base if teacher is None else base.taught_by(teacher.replace(val_fraction=0.0))


def print_summary(s: Any) -> None:
    states = ", ".join(f"{n} {k.lower()}" for k, n in s.counts.items())
    print(f"\nstudy '{s.study}': {states or 'no trials'}; parent run {s.parent_run_id}"
          + ("" if s.finished else " (not finished: other workers are still running or trials remain)"))
    if s.best_trial is None:
        print("no trial completed yet")
        return
    print(f"best trial #{s.best_trial}: val_acc {s.best_value:.2f} % (validation split: what chose it)")
    for name, value in s.best_params.items():
        print(f"    {name} = {value:.6g}" if isinstance(value, float) else f"    {name} = {value}")
    if s.best_test_acc is not None:
        print(f"TEST accuracy of the best trial, reported once and never used to choose: "
              f"{s.best_test_acc:.2f} % (run {s.best_run_id})")
    print(f"train it on the whole training set:\n    {s.command}")
