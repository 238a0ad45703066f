"""The `kd` command. Every RunSpec field is a flag named after the field, with the recipe's default.

Bad input (a `SpecError`) prints one line and exits 2, before any run is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kd.errors import SpecError
from kd.spec import COLLAPSE_FACTOR, DEFAULT_COLLAPSE_AFTER, RunSpec

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3
EXIT_KILLED = 143
EXIT_STORE = 4  # the tracking store failed during the command (infrastructure, not input)

# Spec fields that are set by the command itself rather than by a flag.
NOT_FLAGS = {"options"}


def _flag(name: str) -> list[str]:
    """`--batch-size` and `--batch_size` (the second is what `mlflow run -P` appends)."""
    dashed = "--" + name.replace("_", "-")
    return [dashed] if "_" not in name else [dashed, "--" + name]


def milestones(text: str) -> tuple[int, ...]:
    """`--milestones 60,120`: comma-separated epochs."""
    return tuple(int(x) for x in text.split(",") if x.strip())


def text_or_none(text: str) -> str | None:
    """A name or path; empty or `none` means the default."""
    return None if text in ("", "None", "none") else text


def _parser_for(name: str, default: Any) -> Callable[[str], Any]:
    """How to read a flag's text, from the field's default value (argparse names the function in errors)."""
    if name == "milestones":
        return milestones
    if isinstance(default, int):
        return int
    if isinstance(default, float) or name == "label_smoothing":
        return float
    return text_or_none


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line with a `--help` hint (exit 2), not the usage block;
    its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


# What each command fills in below the flags (and shows in --help); RunSpec.create does the rest.
TEACHER_MODEL, STUDENT_MODEL = "ResNet112", "ResNet56"
TRAIN_DEFAULTS = {"role": "teacher"}
DISTILL_DEFAULTS = {"teacher": TEACHER_MODEL, "method": "logit"}
# Defaults that depend on other values, as --help states them.
DEPENDENT_DEFAULTS = {"alpha": "0.5 with a teacher, 0 for pure runs",
                      "label_smoothing": "0.1 for pure runs, 0 with a teacher",
                      "model": f"{TEACHER_MODEL} for a teacher, {STUDENT_MODEL} for a pure student"}


def add_spec_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                   defaults: dict[str, Any] | None = None) -> None:
    """One flag per RunSpec field, plus one per method option (names as in `kd methods`);
    `defaults`: the command's own, shown in --help instead of RunSpec's."""
    from kd.methods import METHODS

    group = parser.add_argument_group("run spec (defaults: the Charlie recipe)")
    for f in dataclasses.fields(RunSpec):
        if f.name in NOT_FLAGS | skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = (defaults or {}).get(f.name, DEPENDENT_DEFAULTS.get(f.name, default))
        group.add_argument(*_flag(f.name), dest=f.name, type=_parser_for(f.name, default), default=None,
                           help=f"default: {shown if shown not in (None, ()) else 'none'}")
    options = parser.add_argument_group("method options (see `kd methods`)")
    seen: set[str] = set()
    for method in METHODS.values():
        for name, (default, meaning) in method.options.items():
            if name not in seen:
                seen.add(name)
                options.add_argument(*_flag(name), dest=f"opt.{name}", type=_parser_for(name, default), default=None,
                                     help=f"{method.name}: {meaning} (default {default})")


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="a recipe of the lab plan (see kd presets); explicit flags override its values")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "kd"),
                        help="MLflow experiment (default kd)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--precision", default="auto",
                        help="auto (bf16 on recent GPUs, fp16 + GradScaler on V100, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--collapse-after", "--collapse_after", type=int, default=DEFAULT_COLLAPSE_AFTER,
                        help=f"stop a run as FAILED when no test accuracy of this many epochs in a row reaches "
                             f"{COLLAPSE_FACTOR:g}x chance (default {DEFAULT_COLLAPSE_AFTER}; 0: never)")
    parser.add_argument("--cudnn-deterministic", "--cudnn_deterministic", action=argparse.BooleanOptionalAction,
                        default=True, help="deterministic cuDNN kernels (default on; off: ~10 %% faster, "
                                           "not bit-reproducible)")
    parser.add_argument("--compile", action="store_true",
                        help="fuse the models' kernels with torch.compile (slower start; see docs/performance.md)")
    parser.add_argument("--data-root", "--data_root", default=None, help="datasets folder (default $KD_DATA_ROOT or ./data)")
    parser.add_argument("--force", action="store_true", help="train a new attempt even if the spec is FINISHED")
    add_tracking_flags(parser)


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking", choices=("direct", "journal"), default="direct",
                        help="direct: ship the run's journal to the store while training (default); journal: "
                             "never open the store (kd job: the submitter ingests it; kd train: kd sync does)")
    parser.add_argument("--journal-dir", "--journal_dir", default=None,
                        help="where runs keep their journals (default $KD_JOURNAL_DIR, else kd-journal/ beside "
                             "a sqlite store or in the working directory)")
    parser.add_argument("--sync-timeout", "--sync_timeout", type=float, default=None,
                        help="seconds the end of a job waits for an away store before it exits with its runs "
                             "unsynced, for kd sync (default 180)")


def spec_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None, **fixed: Any) -> RunSpec:
    """Layers, lowest first: RunSpec defaults, the command's `defaults`, `--preset`, flags, `fixed` (if not None)."""
    from kd.methods import METHODS
    from kd.presets import with_preset

    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RunSpec) if f.name not in NOT_FLAGS}
    values.update({k: v for k, v in fixed.items() if v is not None})
    values = {**(defaults or {}), **with_preset(getattr(args, "preset", None), values)}
    given = {k.removeprefix("opt."): v for k, v in vars(args).items() if k.startswith("opt.") and v is not None}
    method = values.get("method") or "pure"
    if method in METHODS:
        foreign = sorted(set(given) - set(METHODS[method].options))
        if foreign:
            raise SpecError(f"option {', '.join(foreign)} does not belong to method '{method}': "
                            f"drop it (see kd methods)")
    values["options"] = given
    return RunSpec.create(**values)


def train_spec(args: argparse.Namespace) -> RunSpec:
    """The spec of `kd train ARGS`."""
    role = args.role or TRAIN_DEFAULTS["role"]
    model = TEACHER_MODEL if role == "teacher" else STUDENT_MODEL
    return spec_from_args(args, {**TRAIN_DEFAULTS, "model": model}, method="pure")


def distill_spec(args: argparse.Namespace) -> RunSpec:
    """The spec of `kd distill ARGS`."""
    return spec_from_args(args, DISTILL_DEFAULTS, model=args.student, role="student")


def cmd_train(args: argparse.Namespace) -> int:
    return train_and_report([train_spec(args)], args)


def cmd_distill(args: argparse.Namespace) -> int:
    return train_and_report([distill_spec(args)], args)


def train_and_report(specs: list[RunSpec], args: argparse.Namespace, journal_runs: list[Path] | None = None) -> int:
    from kd.engine.job import run_specs
    from kd.tracking.registry import register_if_missing
    from kd.tracking.runs import AlreadyFinished
    from kd.tracking.store import experiment_id, get_client, ui_hint

    if args.data_root:
        os.environ["KD_DATA_ROOT"] = args.data_root
    attach = os.environ.get("MLFLOW_RUN_ID")
    experiment = attached_experiment(attach) if attach else args.experiment
    try:
        outcomes = run_specs(specs, experiment=experiment, device=args.device, precision=args.precision,
                             compile=args.compile, collapse_after=args.collapse_after,
                             cudnn_deterministic=args.cudnn_deterministic, force=args.force, attach_run_id=attach,
                             journal_dir=Path(args.journal_dir).absolute() if args.journal_dir else None,
                             journal_runs=journal_runs, tracking=args.tracking, **sync_timeout(args))
    except AlreadyFinished as done:
        print(done)
        repaired = register_if_missing(get_client(), done.run, done.spec) if done.run else None
        if repaired:
            print(f"registered {repaired}: the run had finished without its registry entry")
        return 0
    for o in outcomes:
        print(f"{o.spec.name()}: FINISHED run {o.run_id}, best test acc {o.best_acc:.2f} %, final {o.final_acc:.2f} %"
              + (f", registered {o.registered}" if o.registered else "")
              + (f", unsynced ({o.unsynced} records wait in its journal)" if o.unsynced else ""))
    if args.tracking == "direct":
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
    specs = [RunSpec.from_dict(read_config(client, run_id)) for run_id in args.run_id]
    args.experiment = attached_experiment(args.run_id[0])
    return train_and_report(specs, args)


def cmd_sync(args: argparse.Namespace) -> int:
    """Ship what journals hold and the store lacks (a job that ended while the store was away)."""
    from kd.cluster.submit import submit_lock
    from kd.tracking.journal import journal_root
    from kd.tracking.sender import sync_journals

    roots = [Path(p).absolute() for p in args.paths] or [journal_root()]
    with submit_lock():
        return 0 if sync_journals(roots) else 1


def attached_experiment(run_id: str) -> str:
    """Under `mlflow run`, the spec's run lives in the experiment of the run mlflow created."""
    from kd.tracking.store import get_client

    client = get_client()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def cmd_list(kind: str) -> int:
    if kind == "models":
        from kd.models import MODELS

        for info in MODELS.values():
            print(f"{info.name:12s} {info.description}")
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
    p.add_argument("--student", default=None, help="student model (default ResNet56)")
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
    p.add_argument("--experiment", default="demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's own)")
    p.set_defaults(func=cmd_demo)

    from kd.analysis.cli import register as register_analysis
    from kd.bench import register as register_bench
    from kd.cluster.cli import register as register_cluster
    from kd.tune import register as register_tune

    for register in (register_analysis, register_tune, register_cluster, register_bench):
        register(sub)

    for kind in ("models", "datasets", "methods", "presets"):
        p = sub.add_parser(kind, help=f"list the registered {kind} (and their options)")
        p.set_defaults(func=lambda args, kind=kind: cmd_list(kind))
    return parser


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
    from kd.engine.trainer import Stopped, TrainingDiverged
    from kd.tracking.runs import RunRefused

    args = build_parser().parse_args(argv)
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
        print(f"kd: SIGTERM: checkpoint written, run marked KILLED ({stop})", file=sys.stderr)
        return EXIT_KILLED
    except Exception as err:  # the store failed mid-command (it answered at the start): one line, not a traceback
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        print(f"kd: the tracking store failed: {str(err).splitlines()[0][:300]}; run the same command again "
              "when it answers (a run resumes where it stopped)", file=sys.stderr)
        return EXIT_STORE


if __name__ == "__main__":
    sys.exit(main())
