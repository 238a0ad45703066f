"""The `kd` command. Every RunSpec field is a flag named after the field, with the recipe's default.

Bad input (a `SpecError`) prints one line and exits 2, before any run is created.

The top of the layers (docs/architecture.md): the parser is built from light modules only
(`kd.flags` and each command group's `cli`), so `kd --help` loads neither torch nor mlflow; a
command's handler imports what it runs when it runs. That deferral is the command line's alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.analysis.cli import register as register_analysis
from kd.cluster.cli import register as register_cluster
from kd.errors import SpecError, first_line
from kd.flags import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_KILLED,
    EXIT_STORE,
    BadFlags,
    Parser,
    add_preset_flag,
    add_run_flags,
    add_spec_flags,
    add_teacher_version_flag,
    experiment_name,
    positive_int,
    spec_from_args,
)
from kd.spec import RunOptions, RunSpec
from kd.tuning.cli import register as register_tune

# What each command fills in below the flags (and shows in --help); RunSpec.create does the rest.
TRAIN_DEFAULTS = {"role": "teacher"}
DISTILL_DEFAULTS = {"teacher": RunSpec.TEACHER_MODEL, "method": RunSpec.DISTILL_METHOD}


def train_spec(args: argparse.Namespace) -> RunSpec:
    """The spec of `kd train ARGS`."""
    role = args.role or TRAIN_DEFAULTS["role"]
    model = RunSpec.TEACHER_MODEL if role == "teacher" else RunSpec.model
    return spec_from_args(args, {**TRAIN_DEFAULTS, "model": model}, method="pure")


def distill_spec(args: argparse.Namespace) -> RunSpec:
    """The spec of `kd distill ARGS`."""
    return spec_from_args(args, DISTILL_DEFAULTS, model=args.student, role="student")


def cmd_train(args: argparse.Namespace) -> int:
    return train_and_report([train_spec(args)], args)


def cmd_distill(args: argparse.Namespace) -> int:
    from kd.tracking.registry import with_teacher_version
    from kd.tracking.store import get_client

    spec = distill_spec(args)
    if args.teacher_version is not None:
        spec = with_teacher_version(get_client(), spec, args.teacher_version)
    return train_and_report([spec], args)


def train_and_report(specs: list[RunSpec], args: argparse.Namespace, journal_runs: list[Path] | None = None) -> int:
    from kd.engine.job import run_specs
    from kd.tracking.presentation import point_to_spec_run
    from kd.tracking.registry import register_if_missing
    from kd.tracking.runs import AlreadyFinished
    from kd.tracking.store import MLFLOW_DEFAULT_EXPERIMENT, experiment_id, get_client, ui_hint

    if args.data_root:
        os.environ["KD_DATA_ROOT"] = args.data_root
    attach = os.environ.get("MLFLOW_RUN_ID")
    experiment = attached_experiment(attach) if attach else args.experiment
    launcher = attach if experiment == MLFLOW_DEFAULT_EXPERIMENT else None  # `mlflow run` without --experiment-name
    if launcher:  # the spec's run lives in kd's experiment; MLflow's run there only points to it
        attach, experiment = None, args.experiment
    try:
        outcomes = run_specs(specs, experiment=experiment, options=RunOptions.from_values(args), force=args.force,
                             attach_run_id=attach,
                             journal_dir=Path(args.journal_dir).absolute() if args.journal_dir else None,
                             journal_runs=journal_runs, **sync_timeout(args))
    except AlreadyFinished as done:
        print(done)
        if launcher and done.run:
            point_to_spec_run(get_client(), launcher, done.run.info.run_id)
        repaired = register_if_missing(get_client(), done.run, done.spec) if done.run else None
        if repaired:
            print(f"registered {repaired}: the run had finished without its registry entry")
        return 0
    if launcher:
        point_to_spec_run(get_client(), launcher, outcomes[0].run_id)
    for o in outcomes:
        print(f"{o.spec.name()}: FINISHED run {o.run_id}, best test acc {o.best_acc:.2f} %, final {o.final_acc:.2f} %"
              + (f", registered {o.registered}" if o.registered else "")
              + (f", unsynced ({o.unsynced} records wait in its journal)" if o.unsynced else ""))
    if args.tracking == "direct" and not any(o.unsynced for o in outcomes):  # unsynced: the store is away
        print(ui_hint(experiment_id(get_client(), experiment)))
    return 0


def sync_timeout(args: argparse.Namespace) -> dict[str, float]:
    return {} if args.sync_timeout is None else {"sync_timeout": args.sync_timeout}


def cmd_job(args: argparse.Namespace) -> int:
    """Train runs the submitter created: each run's config.json is its spec (a pack if several)."""
    from kd.tracking.runs import read_config, read_json
    from kd.tracking.store import get_client

    if args.tracking == "journal":  # never opens the store: the submitter prepared each run's folder
        if not args.journal_dir:
            raise SpecError("kd job --tracking journal needs --journal-dir (the submitter passes it)")
        folders = [Path(args.journal_dir).absolute() / run_id for run_id in args.run_id]
        for folder in folders:
            if not (folder / "config.json").exists():
                raise SpecError(f"{folder / 'config.json'} is missing: submit the run again with kd submit")
        specs = [RunSpec.from_dict(read_json(folder / "config.json")) for folder in folders]
        return train_and_report(specs, args, journal_runs=folders)
    client = get_client()
    for run_id in args.run_id:
        check_run_exists(client, run_id)
    specs = [RunSpec.from_dict(read_config(client, run_id)) for run_id in args.run_id]
    args.experiment = attached_experiment(args.run_id[0])
    return train_and_report(specs, args)


def check_run_exists(client: Any, run_id: str) -> None:
    """`kd job --run-id`: an id the store does not know is bad input, not a store that failed."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise SpecError(f"--run-id {run_id!r}: no such run in the tracking store: pass the id of a run kd submit "
                        "created (kd status lists them)") from None


def cmd_sync(args: argparse.Namespace) -> int:
    """Ship what journals hold and the store lacks (a job that ended while the store was away)."""
    from kd.cluster.submit import submit_lock
    from kd.tracking.journal import journal_root
    from kd.tracking.sender import sync_journals

    roots = [Path(p).absolute() for p in args.paths] or [journal_root()]
    return 0 if sync_journals(roots, lock=submit_lock, say_idle=True) else 1


def attached_experiment(run_id: str) -> str:
    """Under `mlflow run`, the spec's run lives in the experiment of the run mlflow created."""
    from kd.tracking.store import get_client

    client = get_client()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def cmd_list(kind: str) -> int:
    if kind == "models":
        from kd.models import MODELS

        print(f"{'model':13s} {'params@100':>11s}  family        what it is (reference: docs/models.md)")
        for info in sorted(MODELS.values(), key=lambda info: info.family):  # registration order within a family
            print(f"{info.name:13s} {info.parameter_count(100):>11,d}  {info.family:12s}  {info.description}")
    elif kind == "datasets":
        from kd.data import DATASETS

        for d in DATASETS.values():
            print(f"{d.name:14s} {d.num_classes:4d} classes  {d.channels}x{d.image_size}x{d.image_size}  {d.description}")
    elif kind == "presets":
        from kd.presets import PRESETS, describe

        for preset in PRESETS.values():
            print(describe(preset))
    else:
        from kd.methods import METHODS

        for m in METHODS.values():
            print(f"{m.name}: {m.reference}")
            for name, (default, meaning) in m.options.items():
                print(f"    --{name.replace('_', '-'):26s} {default!s:>10}  {meaning}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kd.demo import run_demo

    attach = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run -e demo`
    experiment = attached_experiment(attach) if attach else args.experiment
    return run_demo(experiment=experiment, device=args.device, epochs=args.epochs, parent_run_id=attach)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kd", description="Experiment-tracked knowledge distillation on MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a teacher or a pure student (no distillation)")
    add_spec_flags(p, skip={"method", "teacher", "alpha", "teacher_weights"}, defaults=TRAIN_DEFAULTS)
    p.add_argument("--teacher-weights", "--teacher_weights", dest="init_weights", default=None,
                   help="the same as --init-weights: a timm ViT-Tiny state_dict file, or 'timm' for the hub")
    add_preset_flag(p)
    add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a student from a registered teacher")
    add_spec_flags(p, skip={"model", "role", "init_weights"}, defaults=DISTILL_DEFAULTS)
    p.add_argument("--student", default=None, help=f"student model (default {RunSpec.model})")
    add_teacher_version_flag(p)
    add_preset_flag(p)
    add_run_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("job", help="train submitted runs by id (what cluster job scripts call)")
    p.add_argument("--run-id", "--run_id", action="append", required=True, help="repeat for a pack of students")
    add_run_flags(p)
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("sync", help="ship what run journals hold and the tracking store lacks")
    p.add_argument("paths", nargs="*", help="journal folders, or folders of them (default: the journal root)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("demo", help="teacher, pure and KD student on digits, offline, in minutes")
    p.add_argument("--experiment", type=experiment_name, default="demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default: the demo's own)")
    p.set_defaults(func=cmd_demo)

    for register in (register_analysis, register_tune, register_cluster, register_bench):
        register(sub)

    for kind in ("models", "datasets", "methods", "presets"):
        p = sub.add_parser(kind, help=f"list the registered {kind} (and their options)")
        p.set_defaults(func=lambda args, kind=kind: cmd_list(kind))
    return parser


def register_bench(sub: Any) -> None:
    """`kd bench` (kd/bench.py runs it; its defaults are the recipe's, from RunSpec)."""
    p = sub.add_parser("bench", help="images/s of a thesis-style loop vs this engine, solo and packed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--teacher", default=RunSpec.TEACHER_MODEL, help="teacher model (default %(default)s)")
    p.add_argument("--student", default=RunSpec.model, help="student model (default %(default)s)")
    p.add_argument("--method", default=RunSpec.DISTILL_METHOD, help="distillation method (default %(default)s)")
    p.add_argument("--students", type=int, default=6, help="students in the packed pipeline (default 6)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per pipeline (default 200)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed steps first (default 20; the CUDA graph is captured after "
                        "kd.engine.fast.WARMUP_STEPS + 1)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=RunSpec.batch_size,
                   help="default %(default)s (the recipe's)")
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images (default 50000, CIFAR's)")
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default 8 on a GPU, 2 on the CPU)")
    p.add_argument("--precision", default="auto", help="the engine's: auto (bf16 / fp16 on GPUs, fp32 on the CPU) | "
                                                      "fp32 | bf16 | fp16; the reference is fp32")
    p.add_argument("--compile", action="store_true",
                   help="also run the engine with torch.compile's fused kernels (as kd job --compile)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from kd.bench import cmd_bench as run

    return run(args)


def quiet_store_logs() -> None:
    """MLflow's INFO lines (database migrations, artifact downloads) would bury kd's own messages."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tag_attached_run(message: str) -> None:
    """Under `mlflow run`, the run mlflow created (and marks FAILED) says why in `kd.error`. Best effort:
    the store itself may be what was refused, and the message is printed either way."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from kd.tracking.store import get_client

    try:
        get_client().set_tag(run_id, "kd.error", message)
    except Exception:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --help and bad flags end here, before torch and mlflow load
    except BadFlags as bad:
        tag_attached_run(bad.line)  # -P epochs=abc, an unknown -P name: mlflow's FAILED run says why
        raise
    from kd.engine.trainer import Stopped, TrainingDiverged
    from kd.tracking.runs import RunRefused

    quiet_store_logs()
    try:
        return args.func(args)
    except RunRefused as busy:
        print(f"kd: {busy}", file=sys.stderr)
        tag_attached_run(str(busy))
        return EXIT_BUSY
    except SpecError as bad:
        print(f"kd: {bad}", file=sys.stderr)
        tag_attached_run(str(bad))
        return EXIT_BAD_INPUT
    except TrainingDiverged as diverged:
        print(f"kd: run FAILED: {diverged}", file=sys.stderr)
        return 1
    except Stopped as stop:
        done = "checkpoint written, run marked KILLED" if getattr(stop, "runs_started", True) else "no run created"
        print(f"kd: SIGTERM: {done} ({stop})", file=sys.stderr)
        return EXIT_KILLED
    except Exception as err:  # the store failed mid-command (it answered at the start): one line, not a traceback
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        print(f"kd: the tracking store failed: {first_line(err, 300)}; run the same command again "
              "when it answers (a run resumes where it stopped)", file=sys.stderr)
        return EXIT_STORE


if __name__ == "__main__":
    sys.exit(main())
