"""The command line of one tuning worker: what `kd submit --tune STUDY --workers K` puts in a job."""

from __future__ import annotations

import sys

from kd.spec import RunOptions
from kd.tuning.storage import absolute


def tune_worker_command(study: str, storage: str, worker: int, *, options: RunOptions | None = None,
                        python: str = sys.executable, heartbeat_interval: int | None = None,
                        grace_period: int | None = None) -> list[str]:
    """The argv of one worker job on an existing study (`kd submit --tune STUDY --workers K`).

    The job needs the same MLFLOW_TRACKING_URI as the study's creator; the storage must be
    reachable from the node (PostgreSQL, or journal:PATH on a shared filesystem).
    """
    argv = [python, "-m", "kd.cli", "tune", "--join", "--study", study, "--storage", absolute(storage),
            "--worker", str(worker), *(options or RunOptions()).argv(tracking=False)]
    if heartbeat_interval is not None:
        argv += ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        argv += ["--grace-period", str(grace_period)]
    return argv
