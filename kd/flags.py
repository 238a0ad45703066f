"""What every `kd` command's parser shares: RunSpec fields and method options as flags, run flags,
and `spec_from_args`, the spec a command's flags name.

The command line's own layer (docs/architecture.md, "Layers"): light, so that `kd --help` and
`kd <command> --help` load neither torch nor mlflow. The method options come from the method files
read as text (`method_options`), not from importing them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from kd.errors import SpecError
from kd.presets import teacher_values, with_preset
from kd.spec import COLLAPSE_FACTOR, TEACHER_SHARED, TRACKING_MODES, RunOptions, RunSpec

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3
EXIT_KILLED = 143
EXIT_STORE = 4  # the tracking store failed during the command (infrastructure, not input)

# Spec fields that are set by the command itself rather than by a flag (a student's teacher_recipe
# comes from --teacher-version, or from a grid's teacher row).
NOT_FLAGS = {"options", "teacher_recipe"}


def flag(name: str) -> list[str]:
    """`--batch-size` and `--batch_size` (the second is what `mlflow run -P` appends)."""
    dashed = "--" + name.replace("_", "-")
    return [dashed] if "_" not in name else [dashed, "--" + name]


def milestones(text: str) -> tuple[int, ...]:
    """`--milestones 60,120`: comma-separated epochs."""
    return tuple(int(x) for x in text.split(",") if x.strip())


def text_or_none(text: str) -> str | None:
    """A name or path; empty or `none` means the default."""
    return None if text in ("", "None", "none") else text


def boolean(text: str) -> bool:
    """`--logit-standardize true`: true/false, yes/no, on/off or 1/0."""
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _parser_for(name: str, default: Any) -> Callable[[str], Any]:
    """How to read a flag's text, from the field's default value (argparse names the function in errors)."""
    if name == "milestones":
        return milestones
    if isinstance(default, bool):  # before int: a bool is an int
        return boolean
    if isinstance(default, int):
        return int
    if isinstance(default, float) or name in ("label_smoothing", "ce_weight"):
        return float
    return text_or_none


def experiment_name(text: str) -> str:
    """`--experiment`: MLflow refuses an empty name, which would read as a failed store."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an experiment needs a name: pass --experiment NAME")
    return text


def positive_int(text: str) -> int:
    """A count of 1 or more (`kd demo --epochs`)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (`--sync-timeout`): nan or inf would never end a wait."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


class BadFlags(SystemExit):
    """The command line was refused (exit 2); `line` is what was printed, for the run `mlflow run` made."""

    def __init__(self, line: str) -> None:
        super().__init__(EXIT_BAD_INPUT)
        self.line = line


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line with a `--help` hint (exit 2), not the usage block;
    its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)"
        self._print_message(line + "\n", sys.stderr)
        raise BadFlags(line)


# Defaults that depend on other values, as --help states them (the values are RunSpec's).
DEPENDENT_DEFAULTS = {"alpha": f"{RunSpec.DISTILL_ALPHA:g} with a teacher, 0 for pure runs",
                      "label_smoothing": "0.1 for pure runs, 0 with a teacher",
                      "ce_weight": "1 - alpha (the field's feature methods: 1)",
                      "model": f"{RunSpec.TEACHER_MODEL} for a teacher, {RunSpec.model} for a pure student"}


def add_spec_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                   defaults: dict[str, Any] | None = None) -> None:
    """One flag per RunSpec field, plus one per method option (names as in `kd methods`);
    `defaults`: the command's own, shown in --help instead of RunSpec's."""
    group = parser.add_argument_group("run spec (defaults: the Charlie recipe)")
    for f in dataclasses.fields(RunSpec):
        if f.name in NOT_FLAGS | skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = (defaults or {}).get(f.name, DEPENDENT_DEFAULTS.get(f.name, default))
        group.add_argument(*flag(f.name), dest=f.name, type=_parser_for(f.name, default), default=None,
                           help=f"default: {shown if shown not in (None, ()) else 'none'}")
    options = parser.add_argument_group("method options (see `kd methods`)")
    seen: set[str] = set()
    for method, declared in method_options().items():
        for name, (default, meaning) in declared.items():
            if name not in seen:
                seen.add(name)
                options.add_argument(*flag(name), dest=f"opt.{name}", type=_parser_for(name, default), default=None,
                                     help=f"{method}: {meaning} (default {default})")


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="a recipe of the lab plan (see kd presets); explicit flags override its values")


def add_teacher_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(*flag("teacher_version"), default=None,
                        help="the registered teacher (a version number or an alias such as seed0) that teaches "
                             "this student although its recipe differs; default: the teacher of the student's "
                             "own recipe")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", type=experiment_name,
                        default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "kd"), help="MLflow experiment (default kd)")
    add_option_flags(parser)
    parser.add_argument("--data-root", "--data_root", default=None, help="datasets folder (default $KD_DATA_ROOT or ./data)")
    parser.add_argument("--force", action="store_true", help="train a new attempt even if the spec is FINISHED")
    add_tracking_flags(parser)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of RunOptions but `--tracking` (kd.spec): how runs compute, for training and tuning alike."""
    defaults = RunOptions()
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--precision", default=defaults.precision,
                        help="auto (bf16 on recent GPUs, fp16 + GradScaler on V100, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--collapse-after", "--collapse_after", type=int, default=defaults.collapse_after,
                        help=f"stop a run as FAILED when no test accuracy of this many epochs in a row reaches "
                             f"{COLLAPSE_FACTOR:g}x chance (default {defaults.collapse_after}; 0: never)")
    parser.add_argument("--cudnn-deterministic", "--cudnn_deterministic", action=argparse.BooleanOptionalAction,
                        default=defaults.cudnn_deterministic, help="deterministic cuDNN kernels (default on; off: ~10 %% faster, "
                                           "not bit-reproducible)")
    parser.add_argument("--compile", action="store_true",
                        help="fuse the models' kernels with torch.compile (slower start; see docs/performance.md)")


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking", choices=TRACKING_MODES, default=RunOptions.tracking,
                        help="direct: ship the run's journal to the store while training (default); journal: "
                             "never open the store (kd job: the submitter ingests it; kd train: kd sync does)")
    parser.add_argument("--journal-dir", "--journal_dir", default=None,
                        help="where runs keep their journals (default $KD_JOURNAL_DIR, else kd-journal/ beside "
                             "a sqlite store or in the working directory)")
    parser.add_argument("--sync-timeout", "--sync_timeout", type=seconds, default=None,
                        help="seconds the end of a job waits for an away store before it exits with its runs "
                             "unsynced, for kd sync (default 180)")


def spec_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None, **fixed: Any) -> RunSpec:
    """Layers, lowest first: RunSpec defaults, the command's `defaults`, `--preset`, flags, `fixed` (if not None).
    A student preset's students are taught by its teacher preset's teacher (RunSpec.taught_by)."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RunSpec) if f.name not in NOT_FLAGS}
    values = {**flags, **{k: v for k, v in fixed.items() if v is not None}}
    values = {**(defaults or {}), **with_preset(getattr(args, "preset", None), values)}
    given = {k.removeprefix("opt."): v for k, v in vars(args).items() if k.startswith("opt.") and v is not None}
    method = values.get("method") or "pure"
    declared = method_options()
    if method in declared:
        foreign = sorted(set(given) - set(declared[method]))
        if foreign:
            raise SpecError(f"option {', '.join(foreign)} does not belong to method '{method}': "
                            f"drop it (see kd methods)")
    values["options"] = given
    spec = RunSpec.create(**values)
    teacher = teacher_values(getattr(args, "preset", None), flags, TEACHER_SHARED)
    if teacher is None or spec.teacher_spec() is None:
        return spec
    return spec.taught_by(RunSpec.create(**{**teacher, "dataset": spec.dataset, "seed": spec.seed,
                                            "model": spec.teacher, "role": "teacher", "method": "pure"}))


METHODS_DIR = Path(__file__).parent / "methods"


@functools.cache
def method_options() -> dict[str, dict[str, tuple[Any, str]]]:
    """Each registered method's `options` (name -> (default, meaning)) by method name, in kd.methods'
    order, read from the literals of its file: importing the methods would load torch. The facts stay
    in the method's file; tests/test_layers.py checks that this equals `kd.methods.METHODS`."""
    found: dict[str, dict[str, tuple[Any, str]]] = {}
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ClassDef)
                    and any(isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list)):
                continue
            values = {target.id: stmt.value for stmt in node.body if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                      for target in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                      if isinstance(target, ast.Name) and stmt.value is not None}
            found[ast.literal_eval(values["name"])] = ast.literal_eval(values["options"]) if "options" in values else {}
    return found
