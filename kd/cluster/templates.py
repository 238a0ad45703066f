"""Job settings and the body every job script shares (pbs_templates/job.sh.tmpl): settings
validated, every value shell-quoted. Each scheduler's header is its class's (kd/cluster/schedulers.py).

The templates ship inside the package, in kd/cluster/job_templates/: in git a symlink to the
top-level pbs_templates/, which stays the one copy; a wheel holds the files themselves. They are
read with importlib.resources, so `pip install .` and a built wheel find them as an editable
install does.

Settings come from grid YAML files and `--set`, i.e. from text a user (or a colleague's grid)
wrote; a job script is run by a shell on the cluster. So every value is first checked against
what it can legitimately be (a walltime is HH:MM:SS, a queue a plain word, a path has no shell
syntax) and rejected with a one-line SpecError otherwise, then written with `shlex.quote`.
Scheduler directives (`#PBS`, `#SBATCH`) are not shell, so only plain words go there.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import shlex
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.errors import SpecError
from kd.spec import RunOptions

TEMPLATES = "job_templates"  # package data of kd.cluster; kd/cluster/job_templates -> ../../pbs_templates

_ALNUM = string.ascii_letters + string.digits
WORD_CHARS = set(_ALNUM + "_.:+=/@,%-")  # queue, project, partition, gres, constraint, job names
MODULE_CHARS = set(_ALNUM + "_.+/@-")
SHELL_SPECIAL = set("`$;&|<>(){}[]\\\"'!*?#~\n\r\t\0")  # paths may hold spaces, never these
URI_SPECIAL = set("`$;|<>\\\"'\n\r\t\0")  # URIs, env values, arguments: & ? # ( ) and spaces are quoted
WALLTIME = re.compile(r"\d{1,4}:[0-5]\d:[0-5]\d")
MEM = re.compile(r"(\d+)([kmgt])b?", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass(frozen=True)
class JobSettings:
    """Resources and environment of one job; a grid's `job:` block, overridable with `--set`."""

    walltime: str = "02:00:00"  # HH:MM:SS
    ncpus: int = 8
    gpus: int = 1  # PBS: ngpus in the select; Slurm: --gres=gpu:N unless gres is given
    mem: str = "16gb"
    queue: str | None = None  # PBS -q
    project: str | None = None  # PBS -P, Slurm --account
    partition: str | None = None  # Slurm --partition
    gres: str | None = None  # Slurm --gres
    constraint: str | None = None  # Slurm --constraint
    modules: tuple[str, ...] = ()  # `module load` before the environment is activated
    venv: str | None = None  # a venv (e.g. $HOME/kd-venv), activated in place, never copied
    conda_env: str | None = None  # a conda env name or prefix, instead of venv
    scratch: bool = False  # work in the node's $TMPDIR instead of workdir
    workdir: str | None = None  # default: where `kd submit` runs
    data_root: str | None = None  # KD_DATA_ROOT of the job; default $KD_DATA_ROOT or workdir/data
    jobs_dir: str | None = None  # job scripts and logs; default kd-jobs/ beside the sqlite store
    # RunOptions, handed to kd job as its flags (RunOptions.argv)
    device: str = RunOptions.device
    precision: str = RunOptions.precision  # auto is bf16 on recent GPUs, fp16 on a V100
    compile: bool = RunOptions.compile  # fused kernels (docs/performance.md)
    collapse_after: int = RunOptions.collapse_after  # epochs at chance before FAILED
    cudnn_deterministic: bool = RunOptions.cudnn_deterministic  # false: kd job --no-cudnn-deterministic
    tracking: str = RunOptions.tracking  # journal: jobs never open the store; kd submit ingests their journals

    def options(self) -> RunOptions:
        """The RunOptions its jobs train with (device ... tracking are RunOptions' fields)."""
        return RunOptions.from_values(self)

    @classmethod
    def create(cls, values: dict[str, Any]) -> JobSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SpecError(f"unknown job setting(s) {', '.join(unknown)}: use {', '.join(sorted(names))}")
        modules = values.get("modules")
        if isinstance(modules, (str, list)):  # YAML gives a list, or one comma-separated string
            values = {**values, "modules": tuple(modules.split(",") if isinstance(modules, str) else modules)}
        values = {k: home_expanded(v) if k in PATH_SETTINGS and isinstance(v, str) else v for k, v in values.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and "None" in kind:
                continue
            expected = {"int": int, "bool": bool, "tuple": tuple}.get(kind.split("[")[0].split(" ")[0], str)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                fix = 'quote it in YAML: "2:00:00"' if f.name == "walltime" else "fix the grid's job: block or --set"
                raise SpecError(f"job setting {f.name}={value!r} must be {expected.__name__}: {fix}")
        if not WALLTIME.fullmatch(self.walltime):
            raise SpecError(f"job setting walltime={self.walltime!r} is not HH:MM:SS: write it like 02:00:00")
        if not MEM.fullmatch(self.mem):
            raise SpecError(f"job setting mem={self.mem!r} is not a size: write it like 16gb or 500mb")
        try:
            self.options()
        except SpecError as err:  # "--collapse-after -1 ..." named as the grid's `job:` block names it
            name, _, rest = str(err).removeprefix("--").partition(" ")
            raise SpecError(f"job setting {name.replace('-', '_')} {rest}") from None
        if self.ncpus < 1 or self.gpus < 0:
            raise SpecError(f"job settings ncpus={self.ncpus}, gpus={self.gpus}: pass ncpus 1 or more, gpus 0 or more")
        if self.venv and self.conda_env:
            raise SpecError("job settings venv and conda_env are both set: keep one")
        for name in ("queue", "project", "partition", "gres", "constraint"):
            if getattr(self, name) is not None:
                check_chars(name, getattr(self, name), allowed=WORD_CHARS)
        for module in self.modules:
            check_chars("modules", module, allowed=MODULE_CHARS)
        for name in ("venv", "conda_env", "workdir", "data_root", "jobs_dir"):
            if getattr(self, name) is not None:
                check_chars(name, getattr(self, name), forbidden=SHELL_SPECIAL)

    def resolved(self) -> JobSettings:
        """Defaults from the submitting shell, paths absolute: jobs start elsewhere, maybe on scratch.

        With neither venv nor conda_env, the job activates the environment `kd submit` runs in.
        """
        workdir = absolute(self.workdir or os.getcwd())
        data_root = absolute(self.data_root or os.environ.get("KD_DATA_ROOT") or f"{workdir}/data")
        venv, conda = self.venv, self.conda_env
        if venv is None and conda is None:
            if sys.prefix != sys.base_prefix:
                venv = sys.prefix
            else:
                conda = os.environ.get("CONDA_PREFIX")
        return dataclasses.replace(self, workdir=workdir, data_root=data_root,
                                   venv=absolute(venv) if venv else None, conda_env=conda,
                                   jobs_dir=absolute(self.jobs_dir or default_jobs_dir()))


PATH_SETTINGS = ("venv", "workdir", "data_root", "jobs_dir")


def home_expanded(path: str) -> str:
    """`~/kd-venv` and `$HOME/kd-venv` as the submitting user's home (shared by the nodes): the only
    expansions a path setting gets; any other `~` or `$` is rejected as shell syntax."""
    for home in ("$HOME", "${HOME}", "~"):
        if path == home or path.startswith(home + "/"):
            return str(Path.home()) + path[len(home):]
    return path


def default_jobs_dir() -> str:
    from kd.tracking.store import sqlite_path  # late: mlflow; `kd --help` loads this module via schedulers

    db = sqlite_path()
    folder = db.parent if db else Path.cwd()
    return str(folder / "kd-jobs")


def absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def check_chars(name: str, value: str, *, allowed: set[str] | None = None, forbidden: set[str] = frozenset()) -> str:
    """Reject a value holding shell syntax, naming the characters, in one line."""
    if not isinstance(value, str):  # `modules: [1]` or `[[a, b]]` in a grid
        raise SpecError(f"job setting {name}={value!r} is rejected: it must be text: use a plain value (letters, "
                        "digits, . _ - /)")
    bad = sorted({c for c in value if (allowed is not None and c not in allowed) or c in forbidden
                  or not c.isprintable()})
    if bad or not value:
        shown = "".join(bad).encode("unicode_escape").decode()
        raise SpecError(f"job setting {name}={value!r} is rejected: "
                        + (f"it contains '{shown}', which a shell would interpret; " if bad else "it is empty; ")
                        + "use a plain value (letters, digits, . _ - /)")
    return value


def quote_command(argv: list[str]) -> str:
    for arg in argv:
        check_chars("command argument", arg, forbidden=URI_SPECIAL)
    return shlex.join(argv)


def job_body(s: JobSettings, command: list[str], env: dict[str, str], job_id: str) -> str:
    """The body every job script shares (job.sh.tmpl), from resolved settings; its scheduler's
    template puts a header around it. job_id: the shell text of the job's id (its scheduler's)."""
    exports = []
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            raise SpecError(f"environment variable name {key!r} is not a plain NAME")
        exports.append(f"export {key}={shlex.quote(check_chars(key, value, forbidden=URI_SPECIAL))}")
    activate = []
    if s.venv:
        activate.append(f"source {shlex.quote(s.venv + '/bin/activate')}")
    elif s.conda_env:
        activate += ['eval "$(conda shell.bash hook)"', f"conda activate {shlex.quote(s.conda_env)}"]
    modules = []
    if s.modules:
        modules = ["type module >/dev/null 2>&1 || . /etc/profile || true  # batch shells may lack `module`",
                   "module load " + " ".join(shlex.quote(m) for m in s.modules)]
    return load_template("job.sh.tmpl").substitute(
        job_id=job_id,
        modules="\n".join(modules),
        activate="\n".join(activate),
        workdir='"${TMPDIR:-/tmp}"' if s.scratch else shlex.quote(s.workdir),
        exports="\n".join(exports),
        command=quote_command(command),
    )


def load_template(name: str) -> string.Template:
    return string.Template((importlib.resources.files("kd.cluster") / TEMPLATES / name).read_text())
