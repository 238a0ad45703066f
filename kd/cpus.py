"""How many CPU threads this process was given, so torch uses those and not every core of the node.

torch starts one thread per core of the machine. On a shared cluster node (64 cores, a job given 4)
or a loaded laptop that oversubscribes: ResNet-20 on digits took 21.6 s an epoch with torch's
default threads on a loaded 2-core machine and 4.5 s with one. The job's share is the smallest of
what the process may run on (its CPU affinity, the cgroup's CPU quota) and what the scheduler
granted (`SLURM_CPUS_PER_TASK`, PBS's `NCPUS`); a user's `OMP_NUM_THREADS` wins over all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
GRANTED = ("SLURM_CPUS_PER_TASK", "NCPUS")  # what Slurm and PBS say the job was given


def cgroup_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The CPUs a cgroup's quota allows, rounded up (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def whole_number(name: str, environ: dict[str, str]) -> int | None:
    text = environ.get(name, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def cpu_threads(environ: dict[str, str] | None = None, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The threads this process should compute with (see the module's docstring)."""
    environ = dict(os.environ) if environ is None else environ
    chosen = whole_number("OMP_NUM_THREADS", environ)
    if chosen is not None:
        return chosen
    limits = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
              cgroup_quota(cgroup_root), *(whole_number(name, environ) for name in GRANTED)]
    return min(n for n in limits if n is not None)
