"""Atomic claims in any MLflow store: which run is a spec's, who trains it, who registers it.

Two processes that search for a spec's run and then create one, with nothing between the two,
both create one (and two teachers both register). A file lock cannot help: a server store may be
shared by hosts that share no filesystem. What every MLflow store does atomically is refuse to
change a param: `log_param` of a key that exists with another value fails, with the same value it
succeeds. So a claim is a param of one ledger run (`kd-ledger` experiment): the first writer of a
key wins, everyone else reads the winner's value. Claim keys name what they arbitrate:
`<experiment id>/<spec key>/<attempt>` -> run id, `<run id>/lease/<n>` -> owner,
`<run id>/register/<n>` -> owner.

The ledger run itself is made by whoever wins the creation of the `kd-ledger` experiment
(experiment names are unique); the others wait for it to appear.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from kd.tracking import tags as T
from kd.tracking.store import TRAINING_KIND

LEDGER_EXPERIMENT = "kd-ledger"
LEDGER_TAG = "kd.ledger"
WAIT_S = 30.0


def owner_id() -> str:
    """A new claimant in this process, as claims and leases name it: host:pid:nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


PROCESS = owner_id()  # this process as one claimant (a retry of its own claim is no one else's)


def ledger_run(client: MlflowClient) -> str:
    """The store's one ledger run, created once by the process that created its experiment."""
    try:
        experiment = client.create_experiment(LEDGER_EXPERIMENT, tags={T.EXPERIMENT_KIND: TRAINING_KIND, T.NOTE: (
            "kd's claims, not training runs: its one run `claims` holds a param per claim: which run is each spec's "
            "(`<experiment id>/<spec key>/<attempt>`), who trains it (`<run id>/lease/<n>`), who registers a teacher "
            "(`<run id>/register/<n>`). Keep it: deleting it lets two processes train the same spec.")})
        run = client.create_run(experiment, run_name="claims", tags={LEDGER_TAG: "1"})
        client.set_terminated(run.info.run_id, "FINISHED")  # not a training: it takes params all the same
        return run.info.run_id
    except MlflowException:  # created by another process, maybe a moment ago
        pass
    deadline = time.monotonic() + WAIT_S
    while True:
        found = find_ledger(client)
        if found:
            return found
        if time.monotonic() > deadline:  # its creator died between experiment and run: oldest run wins
            exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
            client.create_run(exp.experiment_id, run_name="claims", tags={LEDGER_TAG: "1"})
            return find_ledger(client)
        time.sleep(0.2)


def find_ledger(client: MlflowClient) -> str | None:
    exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{LEDGER_TAG}` = '1'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


class Ledger:
    """Claims of one store; `claim` is the only write, and it is atomic."""

    def __init__(self, client: MlflowClient, run_id: str | None = None) -> None:
        """The store's ledger (`run_id` if already found: `find_ledger` only reads, never creates it)."""
        self.client = client
        self.run_id = run_id or ledger_run(client)

    def claim(self, key: str, value: str) -> str:
        """Set key to value if nobody has; the value that holds the key now (ours if we won).

        The loser of a race may get "changing param values is not allowed", or, when both
        transactions read before either wrote, the database's own unique-key error (a server
        store's threads race so): either way the key's holder is read back."""
        try:
            self.client.log_batch(self.run_id, params=[Param(key, value)])
            return value
        except MlflowException:
            holder = self.claims(key).get(key)
            if holder is None:  # the store failed, nobody holds the key
                raise
            return holder

    def claims(self, prefix: str) -> dict[str, str]:
        """Every claim whose key starts with prefix."""
        params = self.client.get_run(self.run_id).data.params
        return {k: v for k, v in params.items() if k.startswith(prefix)}

    def generations(self, prefix: str, claims: dict[str, str] | None = None) -> dict[int, str]:
        """The holders of `prefix/<n>`, by n (from `claims` if already read): a lease or a registration
        is taken over by claiming the generation after the latest, so of two successors at once one wins."""
        claims = self.claims(prefix + "/") if claims is None else claims
        found = {k.removeprefix(prefix + "/"): v for k, v in claims.items()}
        return {int(n): v for n, v in found.items() if n.isdigit()}
