"""PBS, Slurm and local processes behind one interface: submit a script, ask which jobs are alive.

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

from kd.errors import SpecError

PBS_DEAD = {"C", "F", "X"}  # completed (Torque / Slurm's wrapper), finished (PBS Pro -x), expired subjob
SLURM_DEAD = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
              "BOOT_FAIL", "DEADLINE"}
# `qstat ID` of a job the server no longer shows: exit PBSE_UNKJOBID (15001) & 0xff = 153 ("Unknown
# Job Id"; Slurm's wrapper: no output), or with PBS Pro job history PBSE_HISTJOBID (15139) & 0xff = 35.
PBS_GONE_EXITS = (153, 35)
PBS_GONE_MESSAGES = ("Unknown Job Id", "Job has finished")
PBS_JOB_ID = re.compile(r"\d+(\.[A-Za-z0-9_.-]+)?")
SLURM_JOB_ID = re.compile(r"\d+")


class SchedulerError(SpecError):
    """The scheduler refused a submission or could not be asked; the message says what it printed."""


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


class Scheduler(ABC):
    name: str
    commands: tuple[str, ...]  # what submitting, asking and cancelling run

    def check_available(self) -> None:
        """Refuse before anything is created when the scheduler's commands are not on PATH."""
        missing = [c for c in self.commands if shutil.which(c) is None]
        if missing:
            raise SchedulerError(f"--scheduler {self.name} needs {', '.join(missing)}, not found on PATH: run kd "
                                 f"submit on a login node of a {self.name} cluster, or pass --scheduler local")

    @abstractmethod
    def submit(self, script: Path, log: Path) -> str:
        """Submit a job script writing stdout+stderr to log; the job id."""

    @abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, str]:
        """The scheduler's state word per job id it still knows; a gone job is absent."""

    @abstractmethod
    def is_live(self, state: str) -> bool: ...

    @abstractmethod
    def cancel(self, job_id: str) -> None: ...

    def live(self, job_ids: Iterable[str]) -> set[str]:
        ids = sorted(set(job_ids))
        if not ids:
            return set()
        states = self.states(ids)
        return {i for i in ids if i in states and self.is_live(states[i])}


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]} not found: run kd submit on a login node of the cluster, "
                             f"or pick another --scheduler") from None


def parse_submit(stdout: str, returncode: int, pattern: re.Pattern[str], command: str) -> str:
    """qsub prints the id ('12345' or '12345.server'), sbatch --parsable '12345[;cluster]'."""
    job_id = stdout.strip().split(";")[0]
    if returncode != 0 or not pattern.fullmatch(job_id):
        raise SchedulerError(f"{command} failed (exit {returncode}): {first_line(stdout)}")
    return job_id


def parse_qstat(stdout: str, stderr: str, returncode: int) -> dict[str, str]:
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
                    if line.strip() and not any(m in line for m in PBS_GONE_MESSAGES)]
    if returncode not in (0, *PBS_GONE_EXITS) or other_errors:
        raise SchedulerError(f"qstat failed (exit {returncode}): {first_line(stderr + stdout)}")
    return states


def parse_squeue(stdout: str, stderr: str, returncode: int) -> dict[str, str]:
    """`squeue -h -t all -j A,B -o '%i %T'` -> {id: STATE}; all ids gone: 'Invalid job id', exit 1."""
    if returncode != 0:
        if "Invalid job id specified" in stderr:
            return {}
        raise SchedulerError(f"squeue failed (exit {returncode}): {first_line(stderr + stdout)}")
    return dict(line.split()[:2] for line in stdout.splitlines() if line.strip())


def job_number(job_id: str) -> str:
    return job_id.split(".")[0].rstrip("*")


class Pbs(Scheduler):
    """PBS Pro / OpenPBS / Torque, and Slurm's PBS wrappers (slurm-wlm-torque)."""

    name = "pbs"
    commands = ("qsub", "qstat", "qdel")

    def submit(self, script: Path, log: Path) -> str:
        # -o on the command line (Slurm's wrapper ignores #PBS -o); names relative to the jobs
        # folder because the wrapper pastes them into a shell command unquoted.
        done = run(["qsub", "-j", "oe", "-o", log.name, script.name], cwd=script.parent)
        return parse_submit(done.stdout, done.returncode, PBS_JOB_ID, "qsub")

    def states(self, job_ids: list[str]) -> dict[str, str]:
        done = run(["qstat", *job_ids])
        by_number = parse_qstat(done.stdout, done.stderr, done.returncode)
        return {i: by_number[job_number(i)] for i in job_ids if job_number(i) in by_number}

    def is_live(self, state: str) -> bool:
        return state not in PBS_DEAD

    def cancel(self, job_id: str) -> None:
        run(["qdel", job_id])


class Slurm(Scheduler):
    name = "slurm"
    commands = ("sbatch", "squeue", "scancel")

    def submit(self, script: Path, log: Path) -> str:
        done = run(["sbatch", "--parsable", "-o", log.name, script.name], cwd=script.parent)
        return parse_submit(done.stdout, done.returncode, SLURM_JOB_ID, "sbatch")

    def states(self, job_ids: list[str]) -> dict[str, str]:
        done = run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"])
        return parse_squeue(done.stdout, done.stderr, done.returncode)

    def is_live(self, state: str) -> bool:
        return state.rstrip("+") not in SLURM_DEAD

    def cancel(self, job_id: str) -> None:
        run(["scancel", job_id])


class Local(Scheduler):
    """Detached processes on this machine (a workstation without a scheduler); no walltime.

    The id is PID.START (the process start time in centiseconds), so a reused PID is not mistaken
    for the job.
    """

    name = "local"
    commands = ("bash",)

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

    def is_live(self, state: str) -> bool:
        return state not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)

    def cancel(self, job_id: str) -> None:
        if job_id in self.live([job_id]):
            os.killpg(int(job_id.split(".")[0]), signal.SIGTERM)


SCHEDULERS: dict[str, type[Scheduler]] = {"pbs": Pbs, "slurm": Slurm, "local": Local}


def get_scheduler(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise SpecError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]()
