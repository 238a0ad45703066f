"""`kd demo`: the whole suite in minutes, offline, on a CPU.

A ResNet-20 teacher, then a ResNet-8 student with and without logit KD, on scikit-learn's digits;
the teacher is registered and the student finds it through the registry alias, exactly as on the
cluster. Re-running the demo reuses its finished runs.
"""

from __future__ import annotations

from kd.engine.job import run_specs
from kd.spec import RunOptions, RunSpec
from kd.tracking import tags as T
from kd.tracking.runs import runs_by_key
from kd.tracking.store import experiment_id, get_client, tracking_uri, ui_hint

DEMO_EPOCHS = 15


def demo_specs(epochs: int) -> dict[str, RunSpec]:
    common = dict(dataset="digits", seed=0, epochs=epochs, batch_size=64, lr=0.05)
    return {
        "teacher (ResNet20)": RunSpec.create(model="ResNet20", role="teacher", **common),
        "student, no KD (ResNet8)": RunSpec.create(model="ResNet8", role="student", **common),
        "student, logit KD (ResNet8)": RunSpec.create(
            model="ResNet8", teacher="ResNet20", method="logit", alpha=0.5, **common
        ),
    }


def best_acc(spec: RunSpec, experiment: str) -> tuple[float, str] | None:
    """(best test accuracy, run id) of the spec's FINISHED run, if there is one."""
    for run in runs_by_key(get_client(), spec.key(), experiment):
        if run.info.status == "FINISHED":
            return run.data.metrics["best_test_acc"], run.info.run_id
    return None


def run_demo(experiment: str = "demo", device: str = "auto", epochs: int | None = None,
             parent_run_id: str | None = None) -> int:
    """`parent_run_id`: the run `mlflow run -e demo` created; the three runs nest under it, and it
    keeps the table as `demo.md`."""
    print(f"kd demo: tracking store {tracking_uri()}, experiment '{experiment}'")
    nested = {T.PARENT_RUN: parent_run_id} if parent_run_id else None
    rows = []
    for label, spec in demo_specs(epochs or DEMO_EPOCHS).items():
        done = best_acc(spec, experiment)
        if done is None:
            outcome = run_specs([spec], experiment=experiment, options=RunOptions(device=device), extra_tags=nested)[0]
            done = outcome.best_acc, outcome.run_id
        else:
            print(f"{label}: reusing finished run {done[1]}")
        rows.append((label, *done))
    table = "| run | best test accuracy | MLflow run |\n|---|---:|---|\n" + "".join(
        f"| {label} | {acc:.2f} % | {run_id} |\n" for label, acc, run_id in rows)
    print("\n" + table)
    if parent_run_id:
        get_client().log_text(parent_run_id, table, "demo.md")
    print(ui_hint(experiment_id(get_client(), experiment)))
    return 0
