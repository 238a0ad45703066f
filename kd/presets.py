"""Recipes by name: the lab plan's (docs/lab.md: `kd train --preset cnn-teacher`, `kd distill --preset
cnn-student`) and the field's CIFAR-100 recipe (`--preset field`, the `field` grid).

A preset is a set of defaults for RunSpec fields: explicit flags, and a grid's `spec:` block, override
it. The plan writes its KD loss as alpha * CE + (1 - alpha) * T^2 * KL, the suite as
(1 - alpha) * CE + alpha * KD, so the presets hold the suite's alpha, translated by `suite_alpha`
(at the plan's 0.5 the two agree). The plan's loss is plain cross-entropy, so label smoothing is off
for teachers and baselines too (the suite's default smooths pure runs), keeping the baseline
comparable with the KD student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kd.errors import TIMM_HUB, SpecError

PLAN_ALPHA = 0.5  # the plan's weight of the hard-label CE
PLAN_TEMPERATURE = 4.0
# Fields only a distillation run takes: a pure run (`kd train --preset cnn-student`, the baseline) drops them.
DISTILL_FIELDS = ("teacher", "method", "alpha", "temperature")


def suite_alpha(plan_alpha: float) -> float:
    """The suite's alpha for the plan's: the plan weighs CE by alpha, the suite weighs the KD term by it."""
    return 1.0 - plan_alpha


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    values: dict[str, Any]
    teacher_preset: str | None = None  # a student preset's teacher: the recipe that teaches it

    def defaults(self, distilling: bool) -> dict[str, Any]:
        """The preset's spec values; without distillation (a pure baseline) the KD fields are left out."""
        return {k: v for k, v in self.values.items() if distilling or k not in DISTILL_FIELDS}


CNN = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
       "schedule": "multistep", "label_smoothing": 0.0}
VIT = {"dataset": "cifar10", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine",
       "label_smoothing": 0.0}
KD = {"method": "logit", "alpha": suite_alpha(PLAN_ALPHA), "temperature": PLAN_TEMPERATURE}
VIT_TEACHER = {**VIT, "model": "ViTTiny", "role": "teacher", "epochs": 100}

# The field's CIFAR-100 recipe (RepDistiller's train_student.py, reused by mdistiller and the papers since
# 2020): random crop (pad 4) + flip are CIFAR's augmentation in kd too.
FIELD = {"dataset": "cifar100", "epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "weight_decay": 5e-4, "schedule": "multistep", "milestones": (150, 180, 210), "label_smoothing": 0.0,
         "temperature": 4.0}
FIELD_LIGHT_LR = 0.01  # the field's lr for MobileNetV2 and the ShuffleNets

PRESETS = {p.name: p for p in (
    Preset("cnn-teacher", "the plan's ResNet-18 teacher",
           {**CNN, "model": "ResNet18", "role": "teacher", "epochs": 300, "milestones": (150, 225, 275)}),
    Preset("cnn-student", "the plan's ResNet-8 student (ResNet8w); with kd train, its baseline",
           {**CNN, **KD, "model": "ResNet8w", "teacher": "ResNet18", "role": "student", "epochs": 200,
            "milestones": (100, 150, 180)}, teacher_preset="cnn-teacher"),
    Preset("vit-teacher", "the plan's ViT-Tiny teacher, from scratch at 32x32 (patch 4)", VIT_TEACHER),
    Preset("vit-teacher-timm", "the plan's ViT-Tiny teacher from timm's pretrained weights (patch 16 at 224)",
           {**VIT_TEACHER, "model": "ViTTiny224", "init_weights": TIMM_HUB}),
    Preset("vit-student", "the plan's 6-layer ViT student; with kd train, its baseline",
           {**VIT, **KD, "model": "ViTStudent", "teacher": "ViTTiny", "role": "student", "epochs": 150},
           teacher_preset="vit-teacher"),
    Preset("field", "the field's CIFAR-100 recipe (RepDistiller, mdistiller): lr x0.1 at 150, 180, 210", FIELD),
    Preset("field-light", "the field's recipe for MobileNetV2 and the ShuffleNets (lr 0.01), taught by a "
           "teacher of the field's recipe", {**FIELD, "lr": FIELD_LIGHT_LR}, teacher_preset="field"),
)}


def preset_defaults(name: str, distilling: bool, epochs: Any = None) -> dict[str, Any]:
    """The preset's values; given `epochs` of one's own, the preset's milestones past them (which would
    never be reached) are left out, so `--preset cnn-teacher --epochs 10` is a valid spec."""
    if not isinstance(name, str) or name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (see kd presets)")
    values = PRESETS[name].defaults(distilling)
    if "milestones" in values and isinstance(epochs, int):
        values["milestones"] = tuple(m for m in values["milestones"] if m <= epochs)
    return values


def with_preset(name: str | None, values: dict[str, Any]) -> dict[str, Any]:
    """The given values (None counts as not given) over a preset's defaults; a run fixed to method
    'pure' (`kd train`) takes no KD fields from it, any other (`kd distill`) takes them all."""
    given = {k: v for k, v in values.items() if v is not None}
    if name is None:
        return given
    return {**preset_defaults(name, given.get("method") != "pure", given.get("epochs")), **given}


def teacher_values(name: str | None, given: dict[str, Any], shared: tuple[str, ...]) -> dict[str, Any] | None:
    """The spec values of a student preset's teacher: its teacher preset, under the `shared` fields the
    user gave (as a grid's `spec:` and `--set` apply to both); None when the preset names no teacher."""
    teacher_preset = PRESETS[name].teacher_preset if name in PRESETS else None
    if teacher_preset is None:
        return None
    mine = {k: v for k, v in given.items() if k in shared and v is not None}
    return {**preset_defaults(teacher_preset, False, mine.get("epochs")), **mine}


def describe(preset: Preset) -> str:
    """One listing line per preset for `kd presets`."""
    shown = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in preset.values.items())
    return f"{preset.name}: {preset.summary}\n    {shown}"
