"""`kd cron on|off`: one crontab entry per grid that runs `kd submit` every N minutes.

The entry is found again by its marker comment (`# kd cron: grid NAME`), so `on` replaces it
and `off` removes it without touching the rest of the crontab. Cron starts commands with an
almost empty environment, so the entry carries what `kd submit` needs: the working directory,
PATH (qsub / sbatch), the tracking URI and the data root, all shell-quoted.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from kd.cluster import CRONTAB_ENV
from kd.cluster.templates import URI_SPECIAL, check_chars
from kd.errors import SpecError, read_text


def marker(grid: str) -> str:
    return f"# kd cron: grid {grid}"


def schedule(every: int) -> str:
    """Every N minutes as cron fields: N in 1..59, or whole hours up to 23."""
    if 1 <= every <= 59:
        return f"*/{every} * * * *"
    if every % 60 == 0 and 1 <= every // 60 <= 23:
        return f"0 */{every // 60} * * *"
    raise SpecError(f"--every {every}: use 1 to 59 minutes or a whole number of hours up to 23 (60, 120, ...)")


def entry(grid: str, every: int, submit_args: list[str], log: Path, env: dict[str, str]) -> str:
    """The crontab line: cd, environment, `python -m kd.cli submit ...`, appended to log."""
    for key, value in env.items():
        check_chars(key, value, forbidden=URI_SPECIAL)
    check_chars("grid", grid, forbidden=URI_SPECIAL)
    words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    command = (f"cd {shlex.quote(os.getcwd())} && " + " ".join(words) + " "
               + shlex.join([sys.executable, "-m", "kd.cli", *submit_args])
               + f" >> {shlex.quote(str(log))} 2>&1")
    return f"{schedule(every)} {command.replace('%', chr(92) + '%')} {marker(grid)}"


def read_crontab(path: str | None) -> str:
    if path:
        return read_text(Path(path), "--crontab-file") if Path(path).exists() else ""
    try:
        done = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise SpecError(f"crontab not found: install cron, or pass --crontab-file (or set {CRONTAB_ENV})") from None
    if done.returncode != 0 and "no crontab" not in done.stderr:
        raise SpecError(f"crontab -l failed: {done.stderr.strip()}")
    return done.stdout if done.returncode == 0 else ""


def write_crontab(path: str | None, text: str) -> None:
    if path:
        Path(path).write_text(text)
        return
    done = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise SpecError(f"crontab - failed: {done.stderr.strip()}")


def set_entry(grid: str, line: str | None, path: str | None) -> bool:
    """Replace (line) or remove (None) the grid's entry; True if an entry was there before."""
    lines = read_crontab(path).splitlines()
    kept = [existing for existing in lines if not existing.endswith(marker(grid))]
    existed = len(kept) < len(lines)
    if line is not None:
        kept.append(line)
    write_crontab(path, "".join(f"{existing}\n" for existing in kept))
    return existed
