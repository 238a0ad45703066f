"""The lab track (docs/lab.md): presets and their alpha translation, the lab grid and its Slurm script,
both model pairs training with logit KD and the feature methods, a ViT teacher's starting weights,
methods that cannot apply stopping before any run, and report.json from the track's runs.

Model shapes, feature taps and parameter counts are in tests/test_models.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import Tensor, nn

from kd import cli
from kd.analysis.report import REPORT_KEYS
from kd.cluster.grids import load_grid
from kd.cluster.schedulers import Slurm
from kd.data import load_dataset
from kd.data.loader import DeviceData
from kd.engine.job import build_parts, run_specs
from kd.engine.trainer import Precision, Student, Trainer
from kd.methods import build_method
from kd.methods.logit import kd_loss
from kd.models import create_model
from kd.models.vit import NO_WEIGHTS, build_vit, start_weights
from kd.presets import PLAN_ALPHA, PLAN_TEMPERATURE, PRESETS, preset_defaults, suite_alpha
from kd.spec import TIMM_HUB, RunSpec, SpecError
from tests.conftest import CPU as CPU_RUNS

# one worker: its module fixtures train once, not once per xdist worker
pytestmark = pytest.mark.xdist_group("lab")

CPU = torch.device("cpu")
SMALL = {"dataset": "digits", "epochs": 1, "batch_size": 64, "train_limit": 64, "milestones": ()}  # one step
RUN = {"experiment": "lab", "options": CPU_RUNS, "progress": False}
PAIRS = {"cnn": ("cnn-teacher", "cnn-student"), "vit": ("vit-teacher", "vit-student")}
KD_TERMS = {"logit": "loss_kd", "fitnets": "loss_fitnets", "attention_transfer": "loss_at", "nst": "loss_nst"}


def lab_spec(preset: str, distilling: bool = False, **values) -> RunSpec:
    """A preset's run shrunk to one step on digits."""
    return RunSpec.create(**{**preset_defaults(preset, distilling), **SMALL, **values})


def test_presets_hold_the_plans_recipes() -> None:
    sgd = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep"}
    adamw = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine"}
    kd = {"method": "logit", "alpha": 0.5, "temperature": 4.0}
    expected = {
        "cnn-teacher": {**sgd, "model": "ResNet18", "role": "teacher", "epochs": 300, "milestones": (150, 225, 275)},
        "cnn-student": {**sgd, **kd, "model": "ResNet8w", "teacher": "ResNet18", "role": "student", "epochs": 200,
                        "milestones": (100, 150, 180)},
        "vit-teacher": {**adamw, "model": "ViTTiny", "role": "teacher", "epochs": 100},
        "vit-teacher-timm": {**adamw, "model": "ViTTiny224", "role": "teacher", "epochs": 100,
                             "init_weights": TIMM_HUB},
        "vit-student": {**adamw, **kd, "model": "ViTStudent", "teacher": "ViTTiny", "role": "student",
                        "epochs": 150},
        "field": {**sgd, "dataset": "cifar100", "epochs": 240, "batch_size": 64, "lr": 0.05,
                  "milestones": (150, 180, 210), "label_smoothing": 0.0, "temperature": 4.0},
        "field-light": {**sgd, "dataset": "cifar100", "epochs": 240, "batch_size": 64, "lr": 0.01,
                        "milestones": (150, 180, 210), "label_smoothing": 0.0, "temperature": 4.0},
    }
    assert set(PRESETS) == set(expected)
    for name, fields in expected.items():
        values = PRESETS[name].values
        assert {k: values[k] for k in fields} == fields, name
        assert values["dataset"] == ("cifar100" if name.startswith("field") else "cifar10"), name
        assert values["label_smoothing"] == 0.0, name  # the plan's and the field's loss: plain CE


class GivenLogits(nn.Module):
    """A 'model' whose logits are its input, so the trainer's loss is a function of chosen logits."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x * self.scale]


def test_preset_alpha_translates_the_plans_loss() -> None:
    """The plan: a * CE + (1 - a) * T^2 * KL(p_t || p_s); the suite trains (1 - s) * CE + s * KD, s = 1 - a."""
    plan_alpha, t = 0.3, PLAN_TEMPERATURE
    gen = torch.Generator().manual_seed(0)
    student_logits, teacher_logits = torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    p_teacher, log_p_student = (teacher_logits / t).softmax(1), (student_logits / t).log_softmax(1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(1).mean()
    ce = -student_logits.log_softmax(1)[torch.arange(8), labels].mean()
    plan = plan_alpha * ce + (1 - plan_alpha) * t**2 * kl

    assert suite_alpha(plan_alpha) == pytest.approx(0.7)
    assert suite_alpha(PLAN_ALPHA) == PLAN_ALPHA == PRESETS["cnn-student"].values["alpha"]
    spec = RunSpec.create(**{**preset_defaults("cnn-student", True), "alpha": suite_alpha(plan_alpha)})
    suite = (1 - spec.alpha) * F.cross_entropy(student_logits, labels) + spec.alpha * kd_loss(
        student_logits, teacher_logits, t)
    torch.testing.assert_close(suite, plan)
    # ... and the trainer's own step computes that loss (recorded before the optimiser moves anything)
    model = GivenLogits()
    method = build_method(spec, [torch.Size([10])], [torch.Size([10])])
    student = Student(spec, None, None, model, method, torch.optim.SGD(model.parameters(), lr=0.0), None, None)
    trainer = Trainer([student], None, teacher=None, precision=Precision.for_device(CPU))
    trainer.step(student, student_logits, labels, [teacher_logits], 1, 1)
    trainer.settle()
    assert student.sums["loss_total"] / 8 == pytest.approx(plan.item(), rel=1e-5)
    # taking the plan's alpha as the suite's would weigh the terms the other way round
    unswapped = (1 - plan_alpha) * ce + plan_alpha * t**2 * kl
    assert not math.isclose(unswapped.item(), plan.item(), rel_tol=1e-3)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch):
    """`kd ARGS` in-process up to the spec it would train."""
    specs: list[RunSpec] = []
    monkeypatch.setattr(cli, "train_and_report", lambda given, args: specs.extend(given) or 0)

    def parse(*argv: str) -> RunSpec:
        specs.clear()
        assert cli.main(list(argv)) == 0
        [spec] = specs
        return spec

    return parse


def test_cli_presets_are_defaults_that_flags_override(parsed, tmp_path, capsys) -> None:
    teacher = parsed("train", "--preset", "cnn-teacher", "--epochs", "3")  # milestones past epoch 3: none
    assert teacher == RunSpec.create(**{**preset_defaults("cnn-teacher", False), "epochs": 3, "method": "pure",
                                        "milestones": ()})
    assert parsed("train", "--preset", "cnn-teacher", "--epochs", "200").milestones == (150,)
    baseline = parsed("train", "--preset", "cnn-student")  # kd train: the pure baseline, a student
    assert (baseline.model, baseline.role, baseline.method, baseline.teacher, baseline.alpha) == (
        "ResNet8w", "student", "pure", None, 0.0)
    assert (baseline.epochs, baseline.milestones, baseline.label_smoothing) == (200, (100, 150, 180), 0.0)
    student = parsed("distill", "--preset", "vit-student", "--alpha", "0.3", "--method", "nst")
    vit_teacher = RunSpec.create(**{**preset_defaults("vit-teacher", False), "method": "pure"})
    assert student == RunSpec.create(**{**preset_defaults("vit-student", True), "alpha": 0.3, "method": "nst"}
                                     ).taught_by(vit_teacher)  # a student preset's teacher is its teacher preset's
    assert student.teacher_spec() == vit_teacher
    assert parsed("distill", "--preset", "cnn-student", "--student", "ResNet8").model == "ResNet8"
    pretrained = parsed("train", "--preset", "vit-teacher-timm", "--teacher-weights", str(tmp_path / "w.pth"))
    assert (pretrained.model, pretrained.init_weights) == ("ViTTiny224", str(tmp_path / "w.pth"))
    plain = parsed("distill", "--method", "logit")  # without a preset, the Charlie defaults as before
    assert (plain.model, plain.teacher, plain.epochs) == ("ResNet56", "ResNet112", 150)
    assert cli.main(["train", "--preset", "nope"]) == cli.EXIT_BAD_INPUT
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli.main(["presets"]) == 0
    assert "cnn-student: " in capsys.readouterr().out


def test_lab_grid_is_the_plans_six_runs_with_slurm_settings(tmp_path) -> None:
    grid = load_grid("lab")
    cifar = {"dataset": "cifar10", "seed": 0}
    expected = [
        RunSpec.create(**{**preset_defaults("cnn-teacher", False), **cifar, "method": "pure"}),
        RunSpec.create(**{**preset_defaults("vit-teacher", False), **cifar, "method": "pure"}),
        RunSpec.create(**{**preset_defaults("cnn-student", False), **cifar, "method": "pure"}),
        RunSpec.create(**{**preset_defaults("cnn-student", True), **cifar}),
        RunSpec.create(**{**preset_defaults("vit-student", False), **cifar, "method": "pure"}),
        RunSpec.create(**{**preset_defaults("vit-student", True), **cifar}),
    ]
    expected[3], expected[5] = expected[3].taught_by(expected[0]), expected[5].taught_by(expected[1])
    assert list(grid.specs) == expected
    assert {s.epochs for s in load_grid("lab", ["epochs=2"]).specs} == {2}

    venv = tmp_path / "venvs" / "edl"
    settings = dataclasses.replace(grid.job, venv=str(venv), workdir=str(tmp_path)).resolved()
    script = Slurm().script(settings, "kd-lab", ["kd", "job", "--run-id", "abc"], {"KD_DATA_ROOT": "/data"})
    lines = script.splitlines()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --time=24:00:00",
                 "module load Python/3.11.3-GCCcore-12.3.0 CUDA/12.1.1", f"source {venv}/bin/activate",
                 'cd "${TMPDIR:-/tmp}"', "exec kd job --run-id abc"):
        assert line in lines, line
    assert lines.index("module load Python/3.11.3-GCCcore-12.3.0 CUDA/12.1.1") < lines.index(
        f"source {venv}/bin/activate")
    assert not any(line.startswith(("cp ", "rsync ")) for line in lines)  # the venv is activated, never copied


@pytest.fixture(scope="module")
def lab_runs(tmp_path_factory: pytest.TempPathFactory):
    """Both pairs, one step each on digits: teacher, pure baseline, then a pack of KD students."""
    folder = tmp_path_factory.mktemp("lab")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(folder)
        runs = {}
        for family, (teacher, student) in PAIRS.items():
            [t] = run_specs([lab_spec(teacher)], **RUN)
            [pure] = run_specs([lab_spec(student)], **RUN)
            kd = run_specs([lab_spec(student, True, method=m).taught_by(t.spec) for m in KD_TERMS], **RUN)
            runs[family] = (t, pure, kd)
        yield folder, runs


@pytest.mark.parametrize("family", list(PAIRS))
def test_each_pair_trains_and_logs(lab_runs, family: str) -> None:
    _, runs = lab_runs
    teacher, pure, kd = runs[family]
    client = MlflowClient()
    assert teacher.registered.startswith(f"digits-{teacher.spec.model}@seed0")
    for outcome in (teacher, pure, *kd):
        run = client.get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["final_test_acc"] <= 100.0
    init_source = client.get_run(teacher.run_id).data.tags.get("kd.init_source")
    assert init_source == (NO_WEIGHTS if family == "vit" else None)  # a ViT teacher says it starts from scratch
    for outcome in kd:
        run = client.get_run(outcome.run_id)
        term = KD_TERMS[outcome.spec.method]
        assert math.isfinite(run.data.metrics[term]) and run.data.metrics[term] > 0, term
        assert run.data.tags["kd.teacher_source"].startswith(f"models:/digits-{teacher.spec.model}@seed0")


def test_report_json_of_the_track(lab_runs) -> None:
    folder, runs = lab_runs
    out = folder / "report"
    assert cli.main(["report", "--experiment", "lab", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == set(PAIRS)
    for family, (teacher, pure, kd) in runs.items():
        entry = report[family]
        assert entry["teacher"] == teacher.spec.model and entry["student"] == pure.spec.model
        expected = (teacher.final_acc, pure.final_acc, max(o.final_acc for o in kd))
        assert [entry[k] for k in REPORT_KEYS] == pytest.approx([acc / 100 for acc in expected], abs=1e-6)


def digits_data() -> DeviceData:
    return DeviceData(load_dataset("digits"), "digits", CPU, 0, 0.0, 64)


def test_vit_teacher_starts_from_a_local_file_or_says_it_trains_from_scratch(tmp_path) -> None:
    path = tmp_path / "vit_tiny.pth"
    pretrained = create_model("ViTTiny", 10, 1, 8)
    torch.save(pretrained.state_dict(), path)
    model, _, source = build_parts(lab_spec("vit-teacher", init_weights=str(path)), digits_data(), CPU)
    assert source == f"pretrained weights: {path}"
    torch.testing.assert_close(model.state_dict(), pretrained.state_dict())
    assert build_parts(lab_spec("vit-teacher"), digits_data(), CPU)[2] == NO_WEIGHTS
    assert build_parts(lab_spec("cnn-teacher"), digits_data(), CPU)[2] is None
    with pytest.raises(SpecError, match="does not exist"):
        build_parts(lab_spec("vit-teacher", init_weights=str(tmp_path / "missing.pth")), digits_data(), CPU)


def test_timm_checkpoint_fits_vit_tiny_224_which_resizes_cifar_inputs(tmp_path, monkeypatch) -> None:
    path = tmp_path / "vit_tiny_patch16_224.pth"
    imagenet = build_vit(1000, 3, 224, depth=12, embed_dim=192, heads=3, patch_size=16)  # timm's layout
    torch.save(imagenet.state_dict(), path)
    model = create_model("ViTTiny224", 10)
    assert start_weights(model, str(path)) == f"pretrained weights: {path}"
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, imagenet.blocks[11].mlp.fc2.weight)
    with torch.no_grad():
        *taps, logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert [tuple(t.shape) for t in taps] == [(2, 192, 14, 14)] * 3 and logits.shape == (2, 10)
    with pytest.raises(SpecError, match="--model ViTTiny224"):  # patch 4 at 32x32 cannot take patch-16 weights
        start_weights(create_model("ViTTiny", 10), str(path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpecError, match="cannot fetch timm's .* pass --teacher-weights FILE"):
        start_weights(model, TIMM_HUB)


def no_runs() -> bool:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("lab")
    return experiment is None or not client.search_runs([experiment.experiment_id])


def test_what_cannot_apply_stops_before_any_run(store, tmp_path) -> None:
    teacher = tmp_path / "teacher.pth"
    torch.save({"weights": create_model("ViTTiny", 10, 1, 8).state_dict()}, teacher)
    student = lab_spec("vit-student", True, method="fitnets", teacher_weights=str(teacher), options={"hint_stage": 4})
    with pytest.raises(SpecError, match=r"hint_stage 4 is not a stage of the teacher \(it has stages 1-3\)"):
        run_specs([student], **RUN)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(build_vit(1000, 3, 224, depth=12, embed_dim=192, heads=3, patch_size=16).state_dict(), imagenet)
    with pytest.raises(SpecError, match="patch embedding"):
        run_specs([lab_spec("vit-teacher", init_weights=str(imagenet))], **RUN)
    with pytest.raises(SpecError, match="not a ViT"):
        run_specs([lab_spec("cnn-teacher", init_weights=str(imagenet))], **RUN)
    assert no_runs()


def test_train_and_distill_fill_their_own_defaults_and_help_states_them(parsed, capsys):
    """`kd train` is a ResNet-112 teacher, `kd train --role student` a ResNet-56 pure student, and
    `kd distill` a logit KD ResNet-56 from ResNet-112 at alpha 0.5, as each --help says."""
    teacher, pure, student = parsed("train"), parsed("train", "--role", "student"), parsed("distill")
    assert (teacher.model, teacher.role, teacher.label_smoothing) == ("ResNet112", "teacher", 0.1)
    assert (pure.model, pure.role, pure.method) == ("ResNet56", "student", "pure")
    assert (student.model, student.teacher, student.method, student.alpha, student.label_smoothing) == (
        "ResNet56", "ResNet112", "logit", 0.5, 0.0)
    for command, shown in (("train", [r"--role ROLE\s+default: teacher"]),
                           ("distill", [r"--method METHOD\s+default: logit", r"--teacher TEACHER\s+default: ResNet112",
                                        r"--alpha ALPHA\s+default: 0.5 with a teacher"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert all(re.search(pattern, out) for pattern in shown), out
