"""Teachers in the MLflow Model Registry: registration is teacher readiness.

A teacher run that trained every epoch is registered as model `{dataset}-{model}` with alias
`seed{seed}` (e.g. `models:/cifar100-ResNet112@seed0`); students resolve theirs by
(dataset, teacher model, seed). A version is the run's logged model (`kd.tracking.logged_models`:
pt2, logits out), so `mlflow.pytorch.load_model` on the alias works; students still download the
run's best.pth. Nothing else is ever registered.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from kd.data import DATASETS
from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.ledger import PROCESS, Ledger
from kd.tracking.logged_models import log_trained_model, model_shape, run_model_id
from kd.tracking.presentation import describe_run

TAKEOVER_S = 120  # a registration claimed this long ago without a version: its claimant died


class MissingTeacher(SpecError):
    pass


def registered_name(dataset: str, model: str) -> str:
    return f"{dataset}-{model}"


def alias(seed: int) -> str:
    return f"seed{seed}"


def teacher_uri(dataset: str, model: str, seed: int) -> str:
    return f"models:/{registered_name(dataset, model)}@{alias(seed)}"


def register_teacher(client: MlflowClient, run_id: str, spec: RunSpec, test_acc: float, model_id: str) -> str | None:
    """Register a finished teacher's logged model and point its seed alias at the new version, exactly once.

    The job's sender, `kd sync` and the submitter's repair may all try at the same moment: the
    ledger's claim `<run id>/register/<n>` decides who registers; the others return None. A claim
    that never got its `/done` (the claimant died) is taken over after TAKEOVER_S; a done one whose
    version was deleted since is registered again."""
    name = registered_name(spec.dataset, spec.model)
    if registered_version(client, name, run_id) is not None:
        return None
    ledger = Ledger(client)
    prefix = f"{run_id}/register"
    claims = ledger.claims(prefix + "/")  # one read: the generations and whether the latest is done
    holders = ledger.generations(prefix, claims)
    latest = max(holders, default=0)
    holder, _, stamp = holders.get(latest, "").rpartition("@")
    done = f"{prefix}/{latest}/done" in claims
    if holder == PROCESS and not done:
        generation = latest  # our own claim, from an attempt the store failed: retry it
    else:  # claimed before: in progress elsewhere, unless done (and the entry deleted since) or abandoned
        if latest and not done and time.time() - float(stamp) < TAKEOVER_S:
            return None
        generation = latest + 1
        if ledger.claim(f"{prefix}/{generation}", value := f"{PROCESS}@{time.time():.0f}") != value:
            return None
    try:
        client.create_registered_model(name, description=f"kd teachers: {spec.model} on {spec.dataset}")
    except MlflowException:  # it exists already
        pass
    tags = {"dataset": spec.dataset, "model": spec.model, "seed": str(spec.seed), "test_acc": f"{test_acc:.2f}",
            T.KEY: spec.key()}
    version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, alias(spec.seed), version.version)
    ledger.claim(f"{prefix}/{generation}/done", str(version.version))
    return f"{name}@{alias(spec.seed)} (version {version.version})"


def registered_version(client: MlflowClient, name: str, run_id: str) -> str | None:
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return found[0].version if found else None


def register_if_missing(client: MlflowClient, run: Run, spec: RunSpec) -> str | None:
    """Register a FINISHED teacher run that has no model version: a kill (or a store error) between
    marking it FINISHED and registering it would otherwise hold its students back forever."""
    if spec.role != "teacher" or run.info.status != "FINISHED":
        return None
    if registered_version(client, registered_name(spec.dataset, spec.model), run.info.run_id) is not None:
        return None
    model_id = run_model_id(client, run.info.run_id)
    if model_id is None:  # killed before its model was logged
        info = DATASETS[spec.dataset]
        with tempfile.TemporaryDirectory(prefix="kd-") as tmp:
            weights = client.download_artifacts(run.info.run_id, "best.pth", tmp)
            model_id = log_trained_model(client, run.info.run_id, spec.to_dict(), weights,
                                         model_shape(info.num_classes, info.channels, info.image_size))
    registered = register_teacher(client, run.info.run_id, spec, run.data.metrics.get("best_test_acc", float("nan")),
                                  model_id)
    if registered:
        describe_run(client, run.info.run_id, spec.to_dict())
    return registered


def teacher_run_id(client: MlflowClient, dataset: str, model: str, seed: int) -> str | None:
    """The run of the registered teacher for (dataset, model, seed), or None."""
    try:
        return client.get_model_version_by_alias(registered_name(dataset, model), alias(seed)).run_id
    except MlflowException:
        return None


def resolve_teacher(client: MlflowClient, spec: RunSpec, dst: Path,
                    pinned_run: str | None = None) -> tuple[Path, str, str | None]:
    """A student's teacher weights: `--teacher-weights` if given, else the registry alias, or, for
    a student resumed, the teacher run it started with (`pinned_run`, its tag `kd.teacher_run`):
    a teacher re-trained meanwhile (`--force`) must not change a student mid-run.

    Returns the local best.pth, where it came from (the tag `kd.teacher_source`) and the teacher's
    run, if from the registry (the tag `kd.teacher_run`).
    """
    if spec.teacher_weights:
        path = Path(spec.teacher_weights)
        if not path.is_file():
            raise MissingTeacher(f"--teacher-weights {path} does not exist: pass the path of a best.pth")
        return path, str(path), None
    uri = teacher_uri(spec.dataset, spec.teacher, spec.seed)
    run_id = pinned_run or teacher_run_id(client, spec.dataset, spec.teacher, spec.seed)
    if run_id is None:
        raise MissingTeacher(f"no registered teacher {uri}: train it first with `{spec.teacher_spec_hint()}`")
    return Path(client.download_artifacts(run_id, "best.pth", str(dst))), f"{uri} (run {run_id})", run_id
