"""A student is taught by the teacher of its own recipe (issue: "Right teacher, exactly once", item 1).

The user's earlier code trained students from whatever teacher a name pointed to; here a pilot
grid's short teacher must never teach the full grid, `kd distill` with another recipe must refuse
rather than pick one, and the alias `seed{k}` must only ever name the default recipe's teacher.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow import MlflowClient

from kd.cluster.grids import load_grid
from kd.cluster.planner import SUBMIT, WAIT_TEACHER, observe, plan
from kd.engine.job import run_specs
from kd.spec import RunSpec
from kd.tracking.registry import alias, default_teacher, teacher_version, teachers_by_recipe
from tests.conftest import CPU, run_kd

PILOT = """experiment: {experiment}
datasets: [digits]
seeds: [0]
teacher: ResNet8
student: ResNet8
pure_student: false
methods: [logit]
spec: {{epochs: {epochs}, batch_size: 64, train_limit: 256}}
job: {{ncpus: 1, gpus: 0, device: cpu}}
"""
SMALL = ("--dataset", "digits", "--batch-size", "64", "--train-limit", "256", "--device", "cpu")


def test_a_student_implies_its_teachers_spec_and_a_grid_row_its_own_teacher(tmp_path: Path) -> None:
    student = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet20", method="logit", epochs=40)
    teacher = student.teacher_spec()
    assert (teacher.model, teacher.role, teacher.epochs, teacher.seed) == ("ResNet20", "teacher", 40, 0)
    assert teacher.label_smoothing == 0.1  # the teacher's own role default, not the KD student's 0
    assert student.teacher_recipe is None and student.key() != student.replace(epochs=41).key()
    other = RunSpec.create(dataset="digits", model="ResNet20", role="teacher", epochs=2)
    chosen = student.taught_by(other)
    assert chosen.teacher_recipe == {"epochs": 2} and chosen.teacher_spec().key() == other.key()
    assert chosen.key() != student.key() and RunSpec.from_dict(chosen.to_dict()) == chosen
    assert alias(default_teacher("digits", "ResNet20", 0)) == "seed0"
    assert alias(other).startswith("seed0-r") and alias(other) != alias(teacher)
    # a grid whose teacher and students have presets of their own: each student names the grid's teacher
    grid = tmp_path / "lab.yaml"
    grid.write_text("datasets: [digits]\nseeds: [0, 1]\nmethods: [logit]\nspec: {epochs: 3}\n"
                    "presets: {teacher: cnn-teacher, student: cnn-student}\n")
    specs = load_grid(str(grid)).specs
    teachers = {s.key() for s in specs if s.role == "teacher"}
    taught = [s for s in specs if s.teacher]
    assert len(teachers) == 2 and {s.teacher_spec().key() for s in taught} == teachers


def test_a_pilot_grids_teacher_never_satisfies_the_full_grid(store: str, tmp_path: Path) -> None:
    pilot, full = tmp_path / "pilot.yaml", tmp_path / "full.yaml"
    pilot.write_text(PILOT.format(experiment="pilot", epochs=1))
    full.write_text(PILOT.format(experiment="full", epochs=2))
    pilot_teacher = load_grid(str(pilot)).specs[0]
    run_specs([pilot_teacher], experiment="pilot", options=CPU, progress=False)
    client = MlflowClient()

    def actions() -> dict[str, str]:
        grid = load_grid(str(full))
        return {i.spec.role: i.action for i in plan(grid.specs, observe(client, grid.experiment), max_queued=9).items}

    assert actions() == {"teacher": SUBMIT, "student": WAIT_TEACHER}
    full_teacher = load_grid(str(full)).specs[0]
    run_specs([full_teacher], experiment="full", options=CPU, progress=False)
    assert actions()["student"] == SUBMIT
    # each recipe has its own alias; neither took the default recipe's `seed0`
    versions = {alias(t): teacher_version(client, t) for t in (pilot_teacher, full_teacher)}
    assert len(versions) == 2 and all(v is not None and alias_ in v.aliases for alias_, v in versions.items())
    assert all("seed0" not in v.aliases for v in versions.values())
    listed = teachers_by_recipe(client, list(load_grid(str(full)).specs))  # what kd status shows
    assert [alias(full_teacher) in line for line in listed if "this grid's" in line] == [True]
    assert any(alias(pilot_teacher) in line and "epochs=1" in line for line in listed)


def test_distill_with_another_recipe_refuses_then_records_the_teacher_it_was_told(store: str) -> None:
    trained = run_kd("train", *SMALL, "--model", "ResNet8", "--role", "teacher", "--epochs", "1")
    assert trained.returncode == 0, trained.stderr
    refused = run_kd("distill", *SMALL, "--teacher", "ResNet8", "--student", "ResNet8", "--epochs", "2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    teacher = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=1, batch_size=64,
                             train_limit=256)
    assert "no registered teacher of this student's recipe" in refused.stderr
    assert f"version 1 ({alias(teacher)}: " in refused.stderr and "--teacher-version" in refused.stderr
    client = MlflowClient()
    assert client.search_runs([client.get_experiment_by_name("kd").experiment_id],
                              "tags.`kd.role` = 'student'") == []  # nothing half-made
    told = run_kd("distill", *SMALL, "--teacher", "ResNet8", "--student", "ResNet8", "--epochs", "2",
                  "--teacher-version", alias(teacher))
    assert told.returncode == 0, told.stderr
    [student] = client.search_runs([client.get_experiment_by_name("kd").experiment_id], "tags.`kd.role` = 'student'")
    version = teacher_version(client, teacher)
    weights = Path(client.download_artifacts(version.run_id, "best.pth"))
    tags = student.data.tags
    assert (tags["kd.teacher_run"], tags["kd.teacher_version"], tags["kd.teacher_key"]) == (
        version.run_id, str(version.version), teacher.key())
    assert tags["kd.teacher_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert student.data.params["teacher_recipe"] == '{"epochs": 1}'
