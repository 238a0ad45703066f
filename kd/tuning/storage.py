"""Where studies live, and how a killed worker's trial is noticed and retried.

- default: `optuna.db`, a sqlite file beside the MLflow sqlite store (or in the working directory);
- any SQLAlchemy URL Optuna accepts (`postgresql://...`, `sqlite:///...`);
- `journal:PATH`: Optuna's journal file, for NFS / Lustre where sqlite locking is unreliable.

Every worker records a heartbeat for the trial it runs; the next worker to ask for a trial marks
a trial whose heartbeat is older than the grace period FAIL and queues a copy of it (same
params) as WAITING, which the next free worker runs. RDBStorage does this natively; Optuna 5's
JournalStorage has no heartbeat, so `HeartbeatJournalStorage` adds one through Optuna's own
heartbeat interface, with the beat kept as a trial system attribute.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from kd.tracking.store import sqlite_path

JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "kd:heartbeat"
SQLITE_TIMEOUT_S = 60  # several workers write one sqlite file; wait for the lock instead of failing
SCHEMA_ATTEMPTS = 3

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def default_storage() -> str:
    """`optuna.db` beside the MLflow sqlite store, so one folder holds both."""
    db = sqlite_path()
    folder = db.parent if db else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def absolute(url: str) -> str:
    """Relative sqlite / journal paths made absolute: cluster jobs start in other folders."""
    if url.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str(Path(url.removeprefix(JOURNAL_PREFIX)).resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(sqlite_path(url).resolve())
    return url


def display(url: str) -> str:
    """The URL without its password, for MLflow params and printed messages."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with RDBStorage's stale-trial detection (Optuna's BaseHeartbeat interface).

    Any worker may fail another's RUNNING trial in the journal, so the optimize loop's own
    `fail_stale_trials` and `RetryHeartbeatStaleTrialCallback` work unchanged.
    """

    def __init__(self, backend: BaseJournalBackend, heartbeat_interval: int, grace_period: int,
                 stale_callback: StaleCallback) -> None:
        super().__init__(backend)
        self._interval, self._grace, self._stale_callback = heartbeat_interval, grace_period, stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another worker declared it stale meanwhile
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        # A retried trial inherits the system attributes, old beat included: count from its start.
        return [t._trial_id for t in running
                if now - max(t.system_attrs.get(HEARTBEAT_ATTR, 0.0), t.datetime_start.timestamp()) > self._grace]

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback:
        return self._stale_callback


def open_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int) -> BaseStorage:
    """An Optuna storage with heartbeats on and stale trials retried up to `max_retry` times."""
    with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" in Optuna
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        if url.startswith(JOURNAL_PREFIX):
            path = Path(url.removeprefix(JOURNAL_PREFIX))
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_interval, grace_period, retry)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}

        def rdb() -> RDBStorage:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period, heartbeat_stale_trial_callback=retry)

        for attempt in range(SCHEMA_ATTEMPTS - 1):
            try:
                return rdb()
            except SQLAlchemyError:  # workers started together all create the schema of a new database
                time.sleep(1 + attempt)
        return rdb()
