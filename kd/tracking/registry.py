"""Teachers in the MLflow Model Registry: registration is teacher readiness.

A teacher run that trained every epoch is registered as a version of model `{dataset}-{model}`,
tagged with its spec's key. A student is taught by exactly the teacher its spec determines
(`RunSpec.teacher_spec`: same dataset, seed and recipe), found by that key, never by a name alone:
a pilot grid's 2-epoch teacher never teaches the full grid's students. Aliases are for people and
plain MLflow: `seed{k}` (`models:/cifar100-ResNet112@seed0`) is only ever the teacher of the default
recipe; a teacher of any other recipe gets `seed{k}-r{recipe}` (its `kd.recipe`, 8 hex), so an alias
never moves to another recipe's teacher. A version is the run's logged model
(`kd.tracking.logged_models`: pt2, logits out), so `mlflow.pytorch.load_model` on an alias works;
students download the run's best.pth. Nothing else is ever registered.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kd.data import load_dataset
from kd.errors import SpecError
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.ledger import PROCESS, Ledger
from kd.tracking.logged_models import (
    log_trained_model,
    model_description,
    model_shape,
    note_registered_version,
    run_model_id,
)
from kd.tracking.presentation import describe_run
from kd.tracking.runs import read_config

TAKEOVER_S = 120  # a registration claimed this long ago without a version: its claimant died


class MissingTeacher(SpecError):
    pass


def registered_name(dataset: str, model: str) -> str:
    return f"{dataset}-{model}"


def default_teacher(dataset: str, model: str, seed: int) -> RunSpec:
    """The teacher of the default recipe, the one alias `seed{k}` names."""
    return RunSpec.create(dataset=dataset, model=model, seed=seed, role="teacher")


def alias(teacher: RunSpec) -> str:
    """`seed{k}` for the default recipe's teacher, `seed{k}-r{recipe}` for any other."""
    if teacher.key() == default_teacher(teacher.dataset, teacher.model, teacher.seed).key():
        return f"seed{teacher.seed}"
    return f"seed{teacher.seed}-r{teacher.recipe()[:8]}"


def teacher_uri(teacher: RunSpec) -> str:
    return f"models:/{registered_name(teacher.dataset, teacher.model)}@{alias(teacher)}"


def recipe_note(teacher: RunSpec) -> str:
    """How a teacher's recipe differs from the default one, for people (`epochs=40`)."""
    return teacher.differences(default_teacher(teacher.dataset, teacher.model, teacher.seed))


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
        client.create_registered_model(name, description=model_description(client, model_id))
    except MlflowException:  # it exists already
        pass
    tags = {"dataset": spec.dataset, "model": spec.model, "seed": str(spec.seed), "test_acc": f"{test_acc:.2f}",
            T.KEY: spec.key(), T.RECIPE: spec.recipe(), "recipe": recipe_note(spec)}
    version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id,
                                          description=model_description(client, model_id))
    note_registered_version(client, model_id, name, version.version)  # the logged model's page links the version
    client.set_registered_model_alias(name, alias(spec), version.version)
    ledger.claim(f"{prefix}/{generation}/done", str(version.version))
    return f"{name}@{alias(spec)} (version {version.version})"


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
        data = load_dataset(spec.dataset)  # its mean, std and test images make the model usable without kd
        with tempfile.TemporaryDirectory(prefix="kd-") as tmp:
            weights = client.download_artifacts(run.info.run_id, "best.pth", tmp)
            model_id = log_trained_model(client, run.info.run_id, spec.to_dict(), weights,
                                         model_shape(spec.dataset, data.mean, data.std, data.test_images))
    registered = register_teacher(client, run.info.run_id, spec, run.data.metrics.get("best_test_acc", float("nan")),
                                  model_id)
    if registered:
        describe_run(client, run.info.run_id, spec.to_dict())
    return registered


def teacher_version(client: MlflowClient, teacher: RunSpec) -> ModelVersion | None:
    """The newest registered version of exactly this teacher spec (by its key), or None."""
    found = versions(client, teacher.dataset, teacher.model, f"tags.`{T.KEY}` = '{teacher.key()}'")
    return max(found, key=lambda v: int(v.version), default=None)


def registered_teachers(client: MlflowClient, dataset: str, model: str, seed: int) -> list[ModelVersion]:
    """Every registered teacher of (dataset, model, seed), whatever its recipe, oldest first."""
    return sorted(versions(client, dataset, model, f"tags.seed = '{seed}'"), key=lambda v: int(v.version))


def versions(client: MlflowClient, dataset: str, model: str, condition: str) -> list[ModelVersion]:
    """The versions of `{dataset}-{model}` that meet `condition`, with their aliases (a search leaves them out)."""
    try:
        found = client.search_model_versions(f"name = '{registered_name(dataset, model)}' and {condition}")
    except MlflowException:  # no such registered model yet
        return []
    return [client.get_model_version(v.name, v.version) for v in found]


def chosen_teacher(client: MlflowClient, dataset: str, model: str, version_or_alias: str) -> RunSpec:
    """The spec of the registered teacher a user named (`--teacher-version 3` or an alias)."""
    name = registered_name(dataset, model)
    try:
        found = (client.get_model_version(name, version_or_alias) if version_or_alias.isdigit()
                 else client.get_model_version_by_alias(name, version_or_alias))
    except MlflowException:
        listed = ", ".join(describe_version(v) for v in versions(client, dataset, model, "tags.seed != ''"))
        raise MissingTeacher(f"--teacher-version {version_or_alias}: {name} has no such version or alias "
                             f"(registered: {listed or 'none'})") from None
    return RunSpec.from_dict(read_config(client, found.run_id))


def with_teacher_version(client: MlflowClient, spec: RunSpec, version_or_alias: str) -> RunSpec:
    """`spec` taught by the registered teacher the user named with --teacher-version (recorded in its
    `teacher_recipe`, so the choice is part of the student's identity)."""
    if spec.teacher is None or spec.teacher_weights is not None:
        raise SpecError("--teacher-version chooses a registered teacher: drop it, or pass --teacher MODEL "
                        "without --teacher-weights")
    return spec.taught_by(chosen_teacher(client, spec.dataset, spec.teacher, version_or_alias))


def describe_version(version: ModelVersion) -> str:
    """`version 3 (seed0-r1a2b3c4d: epochs=40)`: a registered teacher as messages and listings name it."""
    aliases = ", ".join(version.aliases) or "no alias"
    return f"version {version.version} ({aliases}: {version.tags.get('recipe', '?')})"


def teachers_by_recipe(client: MlflowClient, specs: list[RunSpec]) -> list[str]:
    """For `kd status`: per (dataset, teacher model, seed) the specs name, every registered teacher with
    its alias and recipe, and whether the specs' students are taught by it or still wait for theirs."""
    needed: dict[tuple[str, str, int], set[str]] = {}
    for spec in specs:
        teacher = spec if spec.role == "teacher" else spec.teacher_spec()
        if teacher is not None:
            needed.setdefault((teacher.dataset, teacher.model, teacher.seed), set()).add(teacher.key())
    lines = []
    for (dataset, model, seed), keys in sorted(needed.items()):
        found = registered_teachers(client, dataset, model, seed)
        for version in found:
            used = "  <- this grid's" if version.tags.get(T.KEY) in keys else ""
            lines.append(f"  {registered_name(dataset, model)} {describe_version(version)}{used}")
        waiting = len(keys - {v.tags.get(T.KEY) for v in found})
        if waiting:
            lines.append(f"  {registered_name(dataset, model)} seed {seed}: {waiting} recipe(s) not registered yet")
    return lines


@dataclass(frozen=True)
class FoundTeacher:
    """A student's teacher weights and where they came from, recorded on the student as tags."""

    path: Path
    source: str  # kd.teacher_source: the registry URI, the --teacher-weights path, or the submitter's copy
    run_id: str | None = None
    version: str | None = None
    key: str | None = None

    def tags(self) -> dict[str, str]:
        """What the student records of its teacher: run, registered version, key and the weights' digest."""
        found = {T.TEACHER_SOURCE: self.source, T.TEACHER_SHA256: hashlib.sha256(self.path.read_bytes()).hexdigest()}
        for tag, value in ((T.TEACHER_RUN, self.run_id), (T.TEACHER_VERSION, self.version), (T.TEACHER_KEY, self.key)):
            if value:
                found[tag] = str(value)  # MLflow refuses a non-string tag (a version may be an int)
        return found

    def to_json(self) -> dict[str, str | None]:
        return {"source": self.source, "run_id": self.run_id, "version": self.version, "key": self.key}


def missing_teacher(client: MlflowClient, spec: RunSpec) -> MissingTeacher:
    """No registered teacher of this student's recipe: one line naming the others and how to choose one."""
    teacher = spec.teacher_spec()
    others = registered_teachers(client, spec.dataset, spec.teacher, spec.seed)
    listed = "; ".join(describe_version(v) for v in others)
    choose = (f"; or choose one of the registered teachers of other recipes ({listed}) with "
              "--teacher-version VERSION") if others else ""
    return MissingTeacher(f"no registered teacher of this student's recipe ({alias(teacher)}: "
                          f"{recipe_note(teacher)}): train it first with `{teacher.command()}`{choose}")


def resolve_teacher(client: MlflowClient, spec: RunSpec, dst: Path, pinned_run: str | None = None) -> FoundTeacher:
    """A student's teacher: `--teacher-weights` if given, else the registered teacher of exactly
    `spec.teacher_spec()`; for a student resumed, the teacher run it started with (`pinned_run`, its tag
    `kd.teacher_run`): a teacher re-trained meanwhile (`--force`) must not change a student mid-run."""
    if spec.teacher_weights:
        path = Path(spec.teacher_weights)
        if not path.is_file():
            raise MissingTeacher(f"--teacher-weights {path} does not exist: pass the path of a best.pth")
        return FoundTeacher(path, str(path))
    teacher = spec.teacher_spec()
    found = teacher_version(client, teacher)
    run_id = pinned_run or (found.run_id if found else None)
    if run_id is None:
        raise missing_teacher(client, spec)
    path = Path(client.download_artifacts(run_id, "best.pth", str(dst)))
    version = str(found.version) if found and found.run_id == run_id else None
    return FoundTeacher(path, f"{teacher_uri(teacher)} (run {run_id})", run_id, version, teacher.key())
