"""PBS, Slurm and local processes behind one interface: write a job script, submit it, ask which
jobs are alive, cancel one.

A scheduler is one class: its commands, its job script template (`pbs_templates/NAME.sh.tmpl`, a
header around the shared body `job.sh.tmpl`), the variable holding a job's id inside the job, and
its state query. Adding one (LSF: bsub, bjobs, bkill, LSB_JOBID) is one class here and one template.

The submitter needs one fact per job: is it alive (queued, running, suspended, exiting) or dead
(finished, failed, cancelled, timed out, or forgotten by the scheduler). A state a parser does
not know counts as alive: a wrong 'alive' costs one cron round, a wrong 'dead' a second job.
A query that fails for another reason raises, so that nothing is submitted on a guess.

Parsers are pure functions of the commands' recorded outputs (tests/test_cluster.py holds PBS
Pro, OpenPBS, Slurm's qsub wrapper and squeue samples).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import psutil

from kd.cluster.templates import MEM, WORD_CHARS, JobSettings, check_chars, job_body, load_template
from kd.errors import SpecError


class SchedulerError(SpecError):
    """The scheduler refused a submission or could not be asked; the message says what it printed."""


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]} not found: run kd submit on a login node of the cluster, "
                             f"or pick another --scheduler") from None


class Scheduler(ABC):
    """One scheduler: the script a job is, how it is submitted, asked about and cancelled."""

    name: str
    commands: tuple[str, ...]  # what submitting, asking and cancelling run
    template: str  # in pbs_templates/: this scheduler's header around the shared body, job.sh.tmpl
    job_id_variable: str | None  # holds the job's id inside the job; None: the job has no scheduler id
    dead_states: frozenset[str]  # state words of a job that will not run again; any other is alive

    def check_available(self) -> None:
        """Refuse before anything is created when the scheduler's commands are not on PATH."""
        missing = [c for c in self.commands if shutil.which(c) is None]
        if missing:
            raise SchedulerError(f"--scheduler {self.name} needs {', '.join(missing)}, not found on PATH: run kd "
                                 f"submit on a login node of a {self.name} cluster, or pass --scheduler local")

    def script(self, settings: JobSettings, name: str, command: list[str], env: dict[str, str]) -> str:
        """The job script from resolved settings: the shared body in this scheduler's template."""
        check_chars("job name", name, allowed=WORD_CHARS)
        job_id = f"${{{self.job_id_variable}}}" if self.job_id_variable else self.name
        values = {"name": name, "walltime": settings.walltime, "ncpus": str(settings.ncpus),
                  "body": job_body(settings, command, env, job_id)}
        return load_template(self.template).substitute({**values, **self.header(settings)})

    def header(self, settings: JobSettings) -> dict[str, str]:
        """What its template's header needs beyond name, walltime and ncpus; only plain words: a
        directive (`#PBS`, `#SBATCH`) is not shell, so it cannot be quoted."""
        return {}

    @abstractmethod
    def submit(self, script: Path, log: Path) -> str:
        """Submit a job script writing stdout+stderr to log; the job id."""

    @abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, str]:
        """The scheduler's state word per job id it still knows; a gone job is absent."""

    @abstractmethod
    def cancel(self, job_id: str) -> None: ...

    def is_live(self, state: str) -> bool:
        return state.rstrip("+") not in self.dead_states  # Slurm's CANCELLED+: cancelled by someone else

    def live(self, job_ids: Iterable[str]) -> set[str]:
        ids = sorted(set(job_ids))
        if not ids:
            return set()
        states = self.states(ids)
        return {i for i in ids if i in states and self.is_live(states[i])}


class BatchScheduler(Scheduler):
    """A scheduler of a cluster: submitting prints the job's id, cancelling takes it."""

    job_id_pattern: re.Pattern[str]  # what the submit command prints on success

    @abstractmethod
    def submit_argv(self, script: Path, log: Path) -> list[str]:
        """The submit command, run in the script's folder; names relative to it (see Pbs)."""

    def submit(self, script: Path, log: Path) -> str:
        done = run(self.submit_argv(script, log), cwd=script.parent)
        return self.parse_submit(done.stdout, done.returncode, done.stderr)

    def parse_submit(self, stdout: str, returncode: int, stderr: str = "") -> str:
        """qsub prints the id ('12345' or '12345.server'), sbatch --parsable '12345[;cluster]'; a refusal
        says why on stderr."""
        job_id = stdout.strip().split(";")[0]
        if returncode != 0 or not self.job_id_pattern.fullmatch(job_id):
            said = first_line(f"{stderr}\n{stdout}")
            raise SchedulerError(f"{self.commands[0]} failed (exit {returncode}): {said}")
        return job_id

    def cancel(self, job_id: str) -> None:
        run([self.commands[-1], job_id])


def memory(settings: JobSettings) -> tuple[str, str]:
    """The mem setting as (amount, unit letter in lower case): '16gb' -> ('16', 'g')."""
    amount, unit = MEM.fullmatch(settings.mem).groups()
    return amount, unit.lower()


def directives(prefix: str, flags: dict[str, str | None]) -> str:
    return "\n".join(f"{prefix} {flag}{value}" for flag, value in flags.items() if value)


class Pbs(BatchScheduler):
    """PBS Pro / OpenPBS / Torque, and Slurm's PBS wrappers (slurm-wlm-torque)."""

    name = "pbs"
    commands = ("qsub", "qstat", "qdel")
    template = "pbs.sh.tmpl"
    job_id_variable = "PBS_JOBID"  # Slurm's wrapper: its spank_pbs plugin sets it too
    job_id_pattern = re.compile(r"\d+(\.[A-Za-z0-9_.-]+)?")
    # completed (Torque / Slurm's wrapper), finished (PBS Pro -x), expired subjob
    dead_states = frozenset({"C", "F", "X"})
    # `qstat ID` of a job the server no longer shows: exit PBSE_UNKJOBID (15001) & 0xff = 153 ("Unknown
    # Job Id"; Slurm's wrapper: no output), or with PBS Pro job history PBSE_HISTJOBID (15139) & 0xff = 35.
    gone_exits = (153, 35)
    gone_messages = ("Unknown Job Id", "Job has finished")

    def submit_argv(self, script: Path, log: Path) -> list[str]:
        # -o on the command line (Slurm's wrapper ignores #PBS -o); names relative to the jobs
        # folder because the wrapper pastes them into a shell command unquoted.
        return ["qsub", "-j", "oe", "-o", log.name, script.name]

    def header(self, settings: JobSettings) -> dict[str, str]:
        amount, unit = memory(settings)
        return {"mem": f"{amount}{unit}b", "ngpus": f":ngpus={settings.gpus}" if settings.gpus else "",
                "directives": directives("#PBS", {"-q ": settings.queue, "-P ": settings.project})}

    def states(self, job_ids: list[str]) -> dict[str, str]:
        done = run(["qstat", *job_ids])
        by_number = self.parse_qstat(done.stdout, done.stderr, done.returncode)
        return {i: by_number[job_number(i)] for i in job_ids if job_number(i) in by_number}

    @classmethod
    def parse_qstat(cls, stdout: str, stderr: str, returncode: int) -> dict[str, str]:
        """`qstat ID...` in both dialects -> {job number: S column}.

        Table rows follow the dashed line: `ID NAME USER TIME S QUEUE`. PBS Pro/OpenPBS ids carry a
        server suffix and may be cut to fit the column ('12345.pbs-ser*'), so rows are keyed by the
        job number. A finished job is absent: PBS prints 'Unknown Job Id' (or, with job history, 'Job
        has finished, use -x') on stderr, Slurm's wrapper prints nothing. Anything else is an error.
        """
        states: dict[str, str] = {}
        in_table = False
        for line in stdout.splitlines():
            if line.startswith("---"):
                in_table = True
            elif in_table and line.strip():
                fields = line.split()
                states[job_number(fields[0])] = fields[-2]
        other_errors = [line for line in stderr.splitlines()
                        if line.strip() and not any(m in line for m in cls.gone_messages)]
        if returncode not in (0, *cls.gone_exits) or other_errors:
            raise SchedulerError(f"qstat failed (exit {returncode}): {first_line(stderr + stdout)}")
        return states


def job_number(job_id: str) -> str:
    return job_id.split(".")[0].rstrip("*")


class Slurm(BatchScheduler):
    name = "slurm"
    commands = ("sbatch", "squeue", "scancel")
    template = "slurm.sh.tmpl"
    job_id_variable = "SLURM_JOB_ID"
    job_id_pattern = re.compile(r"\d+")
    dead_states = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})

    def submit_argv(self, script: Path, log: Path) -> list[str]:
        return ["sbatch", "--parsable", "-o", log.name, script.name]

    def header(self, settings: JobSettings) -> dict[str, str]:
        amount, unit = memory(settings)
        gres = settings.gres or (f"gpu:{settings.gpus}" if settings.gpus else None)
        flags = {"--partition=": settings.partition, "--account=": settings.project, "--gres=": gres,
                 "--constraint=": settings.constraint}
        return {"mem": f"{amount}{unit.upper()}", "directives": directives("#SBATCH", flags)}

    def states(self, job_ids: list[str]) -> dict[str, str]:
        done = run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"])
        return self.parse_squeue(done.stdout, done.stderr, done.returncode)

    @staticmethod
    def parse_squeue(stdout: str, stderr: str, returncode: int) -> dict[str, str]:
        """`squeue -h -t all -j A,B -o '%i %T'` -> {id: STATE}; all ids gone: 'Invalid job id', exit 1."""
        if returncode != 0:
            if "Invalid job id specified" in stderr:
                return {}
            raise SchedulerError(f"squeue failed (exit {returncode}): {first_line(stderr + stdout)}")
        return dict(line.split()[:2] for line in stdout.splitlines() if line.strip())


class Local(Scheduler):
    """Detached processes on this machine (a workstation without a scheduler); no walltime.

    The id is PID.START (the process start time in centiseconds), so a reused PID is not mistaken
    for the job.
    """

    name = "local"
    commands = ("bash",)
    template = "local.sh.tmpl"
    job_id_variable = None  # the job's output says `kd job local`
    dead_states = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})

    def submit(self, script: Path, log: Path) -> str:
        with open(log, "ab") as out:
            proc = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=script.parent, start_new_session=True)
        return f"{proc.pid}.{int(psutil.Process(proc.pid).create_time() * 100)}"

    def states(self, job_ids: list[str]) -> dict[str, str]:
        states = {}
        for job_id in job_ids:
            pid, _, start = job_id.partition(".")
            try:
                proc = psutil.Process(int(pid))
                if str(int(proc.create_time() * 100)) == start:
                    states[job_id] = proc.status()
            except (psutil.NoSuchProcess, ValueError):
                pass
        return states

    def cancel(self, job_id: str) -> None:
        if job_id in self.live([job_id]):
            os.killpg(int(job_id.split(".")[0]), signal.SIGTERM)


SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (Pbs, Slurm, Local)}


def get_scheduler(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise SpecError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]()
