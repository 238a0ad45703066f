"""One Optuna study = one MLflow parent run; one trial = one RunSpec = one MLflow child run.

The objective is the validation accuracy (a stratified split held out of the training set,
`RunSpec.val_fraction`) at the last epoch; the pruner sees it after every epoch. The test set is
never used to choose: the best trial's test accuracy is read once, at the end, for the report.

A trial's spec is the base spec with the trial's values. Trials of different studies (or a
retry of a killed trial) can produce the same spec, hence the same `kd.key`, so every trial is
trained with `force=True`: a new child run each time, never a resume of another trial's run.
The runs are told apart by the tags `kd.study` and `kd.trial`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kd.engine.job import run_specs
from kd.engine.trainer import Callback, EpochEnd, Stopped, TrainingDiverged
from kd.errors import SpecError
from kd.spec import RunOptions, RunSpec
from kd.tracking.registry import alias, missing_teacher, teacher_version
from kd.tracking.runs import RunRefused
from kd.tracking.store import experiment_id, get_client
from kd.tuning import PRUNERS, SAMPLERS
from kd.tuning.space import Dim, trial_spec
from kd.tuning.storage import display, open_storage

STUDY_ATTR = "kd"  # study user attribute: the config and the parent run, written once by the creator
JOIN_WAIT_S = 60  # how long a joining worker waits for the creator to write STUDY_ATTR
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class StudyConfig:
    """What a study is: stored in the study so that workers can join it by name alone."""

    base: RunSpec
    space: tuple[Dim, ...]
    trials: int = 40  # COMPLETE + PRUNED trials the study aims for, over all workers
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int | None = None  # None: a fifth of the epochs

    def __post_init__(self) -> None:
        if self.base.val_fraction <= 0:
            raise SpecError("tuning needs a validation split: pass --val-fraction 0.1 or so (never the test set)")
        if self.sampler not in SAMPLERS:
            raise SpecError(f"unknown sampler '{self.sampler}': choose one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise SpecError(f"unknown pruner '{self.pruner}': choose one of {', '.join(PRUNERS)}")
        if self.trials < 1:
            raise SpecError(f"--trials {self.trials}: a study needs at least one trial: pass --trials 1 or more")

    @property
    def warmup(self) -> int:
        return self.base.epochs // 5 if self.pruner_warmup_epochs is None else self.pruner_warmup_epochs

    def identity(self) -> str:
        """What workers of one study must agree on: the base spec and the search space."""
        return json.dumps([self.base.to_dict(), [d.to_dict() for d in self.space]], sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["base"], d["space"] = self.base.to_dict(), [dim.to_dict() for dim in self.space]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        return cls(**{**d, "base": RunSpec.from_dict(d["base"]), "space": tuple(Dim(**x) for x in d["space"])})

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.pruner_startup_trials,
                                               n_warmup_steps=self.warmup)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=max(1, self.warmup), max_resource=self.base.epochs)
        return optuna.pruners.NopPruner()

    def describe_pruner(self) -> str:
        if self.pruner == "median":
            return f"median (n_startup_trials={self.pruner_startup_trials}, n_warmup_steps={self.warmup})"
        if self.pruner == "hyperband":
            return f"hyperband (min_resource={max(1, self.warmup)}, max_resource={self.base.epochs})"
        return "none"


@dataclass(frozen=True)
class Worker:
    """How this process works on a study; each worker chooses its own."""

    study: str
    storage: str
    experiment: str = "kd"
    options: RunOptions = dataclasses.field(default_factory=RunOptions)  # how its trials compute
    worker: int | None = None  # distinct sampler seeds for workers started together
    heartbeat_interval: int = 60
    grace_period: int = 300
    max_retry: int = 2
    attach_run_id: str | None = None  # MLFLOW_RUN_ID under `mlflow run`: the parent, if this creates the study

    def __post_init__(self) -> None:
        if "'" in self.study or '"' in self.study:
            raise SpecError(f"study name {self.study!r} contains a quote: choose another --study")


@dataclass
class Summary:
    study: str
    parent_run_id: str
    counts: dict[str, int]
    finished: bool  # the study reached its trials and no trial is running or waiting
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    best_run_id: str | None = None
    best_test_acc: float | None = None
    command: str | None = None


def sampler_seed(seed: int, worker: int | None, others_running: bool) -> int | None:
    """The spec's seed for a lone worker (reproducible); distinct seeds for numbered workers.

    Two workers with one seed would suggest the same trials; an unnumbered worker that joins a
    study already being worked on therefore draws fresh entropy.
    """
    if worker is not None:
        return seed * 1000 + worker + 1
    return None if others_running else seed


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def stored_config(storage: BaseStorage, name: str, wait: bool) -> dict[str, Any] | None:
    """The creator's STUDY_ATTR, or None if there is no such study; waits while it is being written."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    deadline = time.monotonic() + (JOIN_WAIT_S if wait else 0)
    while True:
        attrs = storage.get_study_user_attrs(study_id)
        if STUDY_ATTR in attrs:
            return attrs[STUDY_ATTR]
        if time.monotonic() >= deadline:
            raise SpecError(f"study '{name}' exists but was not created by `kd tune` (no '{STUDY_ATTR}' "
                            f"attribute): choose another --study")
        time.sleep(1)


def experiment_name(client: MlflowClient, run_id: str) -> str:
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def create_parent_run(client: MlflowClient, config: StudyConfig, w: Worker) -> str:
    """The study's MLflow run: search space, sampler, pruner, storage and the base spec as params."""
    base = config.base
    if w.attach_run_id:
        run_id = w.attach_run_id
    else:
        run_id = client.create_run(experiment_id(client, w.experiment), run_name=w.study).info.run_id
    tuned = {d.name for d in config.space}
    params = {k: v for k, v in base.params().items() if k not in tuned}
    params.update({f"space.{d.name}": d.describe() for d in config.space})
    params.update({"study": w.study, "storage": display(w.storage), "sampler": config.sampler,
                   "pruner": config.describe_pruner(), "trials": str(config.trials),
                   "objective": "val_acc at the last epoch, maximised"})
    tags = {"kd.study": w.study, "kd.tuning": "study", "kd.dataset": base.dataset, "kd.model": base.model,
            "kd.method": base.method, "mlflow.runName": w.study}
    if base.teacher:
        tags["kd.teacher"] = base.teacher
    given = client.get_run(run_id).data.params  # `mlflow run` logged the -P values; MLflow params never change
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in given],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.update_run(run_id, status="RUNNING")
    return run_id


def open_study(config: StudyConfig | None, w: Worker) -> tuple[optuna.Study, StudyConfig, str]:
    """Create the study (and its parent run) or join it; `config=None` joins by name alone."""
    storage = open_storage(w.storage, w.heartbeat_interval, w.grace_period, w.max_retry)
    stored = stored_config(storage, w.study, wait=True)
    if stored is None:
        if config is None:
            raise SpecError(f"no study '{w.study}' in {display(w.storage)}: create it with `kd tune ... "
                            f"--study {w.study}` first")
        sampler = make_sampler(config.sampler, sampler_seed(config.base.seed, w.worker, False))
        try:
            study = optuna.create_study(storage=storage, study_name=w.study, direction="maximize",
                                        sampler=sampler, pruner=config.make_pruner())
        except DuplicatedStudyError:  # another worker created it a moment ago
            stored = stored_config(storage, w.study, wait=True)
        else:
            parent = create_parent_run(get_client(), config, w)
            study.set_user_attr(STUDY_ATTR, {"config": config.to_dict(), "parent_run_id": parent})
            return study, config, parent
    existing = StudyConfig.from_dict(stored["config"])
    if config is None:
        config = existing
    elif config.identity() != existing.identity():
        raise SpecError(f"study '{w.study}' was created with another spec or search space "
                        f"({', '.join(d.name for d in existing.space)}): pass the same flags, or a new --study")
    study_id = storage.get_study_id_from_name(w.study)
    running = bool(storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)))
    sampler = make_sampler(config.sampler, sampler_seed(config.base.seed, w.worker, running))
    study = optuna.load_study(study_name=w.study, storage=storage, sampler=sampler, pruner=config.make_pruner())
    return study, config, stored["parent_run_id"]


def trial_runs(client: MlflowClient, experiment: str, study: str, *, number: int | None = None,
               status: str | None = None) -> list[Run]:
    query = f"tags.`kd.study` = '{study}' AND tags.`kd.tuning` = 'trial'"
    if number is not None:
        query += f" AND tags.`kd.trial` = '{number}'"
    if status is not None:
        query += f" AND attributes.status = '{status}'"
    return client.search_runs([experiment_id(client, experiment)], query, max_results=10_000,
                              order_by=["attributes.start_time DESC"])


def set_trial_state(client: MlflowClient, experiment: str, study: str, number: int, state: str) -> None:
    for run in trial_runs(client, experiment, study, number=number):
        client.set_tag(run.info.run_id, "kd.trial_state", state)


def reconcile(client: MlflowClient, experiment: str, study: optuna.Study) -> None:
    """End the runs of trials that Optuna failed for a stale heartbeat (their worker died).

    Their MLflow runs were left RUNNING with a live-looking lease, which would also refuse the
    retry (the same spec) if it were left alone.
    """
    finished = {t.number: t.state for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for run in trial_runs(client, experiment, study.study_name, status="RUNNING"):
        number = int(run.data.tags["kd.trial"])
        if number in finished:
            client.set_tag(run.info.run_id, "kd.trial_state", finished[number].name)
            client.set_tag(run.info.run_id, "kd.error", "worker lost: its Optuna heartbeat went stale")
            client.set_terminated(run.info.run_id, status="FAILED")


class PruneTrial(Callback):
    """Optuna's side of a trial's epochs: the first names the trial's MLflow run; each reports
    val_acc to the trial, and the pruner may stop it there (`optuna.TrialPruned`)."""

    def __init__(self, trial: optuna.Trial, pruner: str) -> None:
        self.trial, self.pruner = trial, pruner  # pruner: how the study's pruner is described
        self.val_acc: float | None = None  # the last epoch's: the objective

    def on_epoch_end(self, end: EpochEnd) -> None:
        if self.val_acc is None:
            self.trial.set_user_attr("mlflow_run_id", end.trainee.tracker.run_id)
        self.val_acc = end.metrics["val_acc"]
        self.trial.report(self.val_acc, end.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val_acc {self.val_acc:.2f} % at epoch {end.epoch}: pruned by {self.pruner}")


class Objective:
    """Train one trial's spec as a child run; report val_acc per epoch to the pruner."""

    def __init__(self, config: StudyConfig, w: Worker, parent: str, experiment: str) -> None:
        self.config, self.w, self.parent, self.experiment = config, w, parent, experiment
        self.client = get_client()
        self.current: int | None = None  # the trial this worker is running (for a SIGTERM retry)

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        reconcile(self.client, self.experiment, trial.study)
        spec = trial_spec(self.config.base, {d.name: d.suggest(trial) for d in self.config.space})
        trial.set_user_attr("kd_key", spec.key())
        tags = {"mlflow.parentRunId": self.parent, "kd.study": self.w.study, "kd.tuning": "trial",
                "kd.trial": str(trial.number)}
        pruning = PruneTrial(trial, self.config.describe_pruner())
        state = "FAIL"
        try:
            run_specs([spec], experiment=self.experiment, options=self.w.options, force=True, progress=False, extra_tags=tags, on_epoch=pruning)
            state = "COMPLETE"
            return pruning.val_acc
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            set_trial_state(self.client, self.experiment, self.w.study, trial.number, state)


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def run_study(config: StudyConfig | None, w: Worker) -> Summary:
    """Work on the study until it has `trials` COMPLETE + PRUNED trials, then report."""
    study, config, parent = open_study(config, w)
    client = get_client()
    experiment = experiment_name(client, parent)
    if w.attach_run_id and w.attach_run_id != parent:
        client.set_tag(w.attach_run_id, "kd.study_parent", parent)  # a joining `mlflow run` worker
    print(f"kd tune: study '{w.study}' in {display(w.storage)}, {len(study.trials)} trials so far, "
          f"parent run {parent} (experiment '{experiment}')", flush=True)
    objective = Objective(config, w, parent, experiment)
    if count(study, *FINISHED_STATES) < config.trials:
        try:
            study.optimize(objective, n_trials=config.trials, catch=(TrainingDiverged, RunRefused),
                           callbacks=[optuna.study.MaxTrialsCallback(config.trials, states=FINISHED_STATES)])
        except Stopped:
            retry_after_sigterm(study, objective.current, w.max_retry)
            raise
    return finalize(study, config, parent, experiment)


def retry_after_sigterm(study: optuna.Study, number: int | None, max_retry: int) -> None:
    """A trial stopped by SIGTERM (walltime, scancel) is queued again, like a stale one."""
    if number is None:
        return
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if trial.state == TrialState.FAIL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def finalize(study: optuna.Study, config: StudyConfig, parent: str, experiment: str) -> Summary:
    """Best params and value, trial counts and plots on the parent run; FINISHED when all is done."""
    client = get_client()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    active = counts["RUNNING"] + counts["WAITING"]
    finished = counts["COMPLETE"] + counts["PRUNED"] >= config.trials and active == 0
    summary = Summary(study.study_name, parent, {k: v for k, v in counts.items() if v}, finished)
    step, now = len(trials), int(time.time() * 1000)
    metrics = {f"trials_{k.lower()}": float(v) for k, v in counts.items() if k in ("COMPLETE", "PRUNED", "FAIL")}
    tags: dict[str, str] = {}
    if counts["COMPLETE"]:
        best = study.best_trial
        summary.best_trial, summary.best_value, summary.best_params = best.number, best.value, dict(best.params)
        runs = trial_runs(client, experiment, study.study_name, number=best.number, status="FINISHED")
        if runs:
            summary.best_run_id = runs[0].info.run_id
            summary.best_test_acc = runs[0].data.metrics.get("final_test_acc")
        best_spec = trial_spec(config.base, best.params).replace(val_fraction=0.0)
        teacher = best_spec.teacher_spec() if best_spec.teacher_recipe else None  # the study's, by name
        summary.command = best_spec.command(skip=("val_fraction",), teacher_version=teacher and alias(teacher))
        metrics["best_val_acc"] = best.value
        metrics.update({f"best_{k}": float(v) for k, v in best.params.items()})
        if summary.best_test_acc is not None:
            metrics["best_trial_test_acc"] = summary.best_test_acc
        tags = {"kd.best_trial": str(best.number), "kd.best_params": json.dumps(best.params),
                "kd.best_command": summary.command}
        if summary.best_run_id:
            tags["kd.best_run_id"] = summary.best_run_id
    client.log_batch(parent, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    log_plots(client, parent, study, counts["COMPLETE"])
    if finished:
        client.set_terminated(parent, status="FINISHED")
    return summary


def log_plots(client: MlflowClient, parent: str, study: optuna.Study, complete: int) -> None:
    """Optimisation history, per-epoch val_acc of every trial, parameter importances (PNG artifacts)."""
    if complete == 0:
        return
    import matplotlib

    matplotlib.use("Agg")  # headless cluster nodes
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    plots = {"optimization_history": oplt.plot_optimization_history,
             "intermediate_values": oplt.plot_intermediate_values}
    if complete >= 2:  # importances compare finished trials
        plots["param_importances"] = oplt.plot_param_importances
    with tempfile.TemporaryDirectory(prefix="kd-tune-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, plot in plots.items():
            ax = plot(study)
            path = Path(tmp) / f"{name}.png"
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            client.log_artifact(parent, str(path), "plots")


def check_teacher(spec: RunSpec) -> None:
    """Refuse before anything is created when the teacher of the study's recipe is not registered yet."""
    teacher = spec.teacher_spec()
    if teacher is not None and teacher_version(get_client(), teacher) is None:
        raise missing_teacher(get_client(), spec)


def default_study_name(base: RunSpec) -> str:
    """Names the command: running it again continues the same study."""
    models = f"{base.teacher}-to-{base.model}" if base.teacher else base.model
    return f"{base.dataset}-{models}-{base.method}-e{base.epochs}-s{base.seed}"
