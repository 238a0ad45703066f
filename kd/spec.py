"""RunSpec: the identity of one training run.

Every CLI command, MLproject entry point, grid row and Optuna trial becomes a RunSpec first.
Its `key()` names the one MLflow run that trains it (tag `kd.key`), so a re-run of the same
spec resumes that run instead of starting another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kd.errors import TIMM_HUB, SpecError

ROLES = ("teacher", "student")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
# Fields added after runs existed: left out of the key while unset, so those runs keep their keys.
KEY_OPTIONAL = ("init_weights", "teacher_recipe", "ce_weight")
# What the students of one pack share (`kd job` trains them with one data stream and teacher).
PACK_FIELDS = ("dataset", "seed", "teacher", "batch_size", "epochs", "val_fraction", "train_limit", "teacher_weights",
               "teacher_recipe")
# What a student's teacher shares with it: its teacher is trained on the same data with the same recipe
# (docs/architecture.md, "Teachers"), unless the student's `teacher_recipe` says where the teacher's differs.
TEACHER_SHARED = ("dataset", "seed", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                  "milestones", "train_limit", "val_fraction")
# What no teacher_recipe may change: the teacher's identity beside its recipe.
NOT_TEACHER_RECIPE = ("dataset", "seed", "model", "teacher", "method", "role", "alpha", "ce_weight", "options",
                      "teacher_weights", "teacher_recipe")


# A run whose accuracy stays below this many times chance (100 / classes) has collapsed: the beta
# RKD runs ended at 18.13 % on CIFAR-10 (chance 10 %) and 1 % on CIFAR-100. The trainer stops such
# a run after `--collapse-after` epochs; the analysis flags it in the tables (best accuracy).
COLLAPSE_FACTOR = 2.0
DEFAULT_COLLAPSE_AFTER = 10  # epochs; 0: never stop a run for not learning

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # how a run computes, not what it is: not in the spec's key
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # --device, the job setting device


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SpecError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")


def check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise SpecError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N")


TRACKING_MODES = ("direct", "journal")  # the job ships its journal to the store | never opens the store


@dataclass(frozen=True)
class RunOptions:
    """How runs compute and record, not what they are (not in a spec's key): built once, from the
    flags, a grid's job settings or a study's worker flags, and passed whole to jobs, packs and
    trials; `argv()` is how a job script hands it on to `kd job` or `kd tune`."""

    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on recent GPUs, fp16 + GradScaler on a V100, fp32 on the CPU
    compile: bool = False  # fuse the models' kernels with torch.compile (docs/performance.md)
    collapse_after: int = DEFAULT_COLLAPSE_AFTER  # epochs below COLLAPSE_FACTOR x chance before FAILED; 0: never
    cudnn_deterministic: bool = True
    tracking: str = "direct"  # one of TRACKING_MODES

    def __post_init__(self) -> None:
        check_device(self.device)
        check_precision(self.precision)
        if self.collapse_after < 0:
            raise SpecError(f"--collapse-after {self.collapse_after} is negative: pass 0 (never) or more")
        if self.tracking not in TRACKING_MODES:
            raise SpecError(f"--tracking {self.tracking!r}: use direct (jobs ship to the store) or journal "
                            "(jobs never open it; kd submit ingests their journals)")

    @classmethod
    def from_values(cls, values: Any) -> RunOptions:
        """From anything with these names as attributes (parsed flags, job settings)."""
        return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls) if hasattr(values, f.name)})

    def argv(self, *, tracking: bool = True) -> list[str]:
        """The flags that give these options to `kd job` (`kd tune` takes all but `--tracking`)."""
        return ["--device", self.device, "--precision", self.precision, "--collapse-after", str(self.collapse_after),
                *(["--tracking", self.tracking] if tracking else []), *(["--compile"] if self.compile else []),
                *([] if self.cudnn_deterministic else ["--no-cudnn-deterministic"])]


@dataclass(frozen=True)
class RunSpec:
    """Every field that defines a run; defaults are the user's recipe (Experiment Charlie).

    The recipe's defaults live here and nowhere else: the commands, MLproject, the tuner, the
    benchmark and the grids leave a value unset (None) and `create` fills it in."""

    TEACHER_MODEL: ClassVar[str] = "ResNet112"  # the recipe's teacher (`model` is its student)
    DISTILL_METHOD: ClassVar[str] = "logit"  # kd distill's method when none is given
    DISTILL_ALPHA: ClassVar[float] = 0.5  # alpha of a distillation run when none is given (pure runs: 0)

    dataset: str = "cifar100"
    model: str = "ResNet56"
    teacher: str | None = None  # teacher model name; None for teachers and pure students
    method: str = "pure"
    role: str = "student"
    alpha: float = 0.0  # loss = (1 - alpha) * CE + alpha * distill; 0 for pure runs
    # The CE term's weight when it is not 1 - alpha: the field's recipes weigh CE by 1 beside a feature
    # term weighted by alpha (FitNets' 1 * CE + 100 * hint: ce_weight 1, the method's own weight 100).
    ce_weight: float | None = None
    temperature: float = 4.0
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options, defaults filled
    seed: int = 0
    epochs: int = 150
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()  # epochs where a multistep schedule divides lr by 10
    label_smoothing: float | None = None  # None -> 0.1 for pure runs, 0.0 for KD runs
    train_limit: int = 0  # use only the first N training images (0: all); demos and tests
    val_fraction: float = 0.0  # stratified validation split held out of training (tuning)
    teacher_weights: str | None = None  # a best.pth that overrides the registry's teacher
    init_weights: str | None = None  # a teacher's starting weights: a timm ViT-Tiny file, or "timm" (hub)
    # Where this student's teacher's recipe differs from the one the student implies (`teacher_spec`):
    # a grid's teacher preset, or the teacher a user chose with --teacher-version. None: the same recipe.
    teacher_recipe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.label_smoothing is None:
            object.__setattr__(self, "label_smoothing", 0.1 if self.method == "pure" else 0.0)
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "options", dict(sorted(_as_declared(self.method, self.options).items())))
        if self.init_weights not in (None, TIMM_HUB):  # absolute: cluster jobs start in another folder
            object.__setattr__(self, "init_weights", _absolute(self.init_weights))
        if self.teacher_recipe is not None:
            object.__setattr__(self, "teacher_recipe", dict(sorted(self.teacher_recipe.items())) or None)
        self._check()
        if self.teacher_recipe is not None:  # as the teacher's spec holds them (a JSON list is a tuple there)
            teacher = self.teacher_spec()
            object.__setattr__(self, "teacher_recipe", {k: getattr(teacher, k) for k in self.teacher_recipe})

    def _check_types(self) -> None:
        """Each field has its annotated type (a YAML grid or a config.json can hold anything)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _fits(f.type, value):
                kind = f.type.split(" |")[0].split("[")[0]
                example = f.default if f.default not in (None, (), dataclasses.MISSING) else EXAMPLES[kind]
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise SpecError(f"{f.name} {shown} is not {KINDS[kind]}: pass {_flag_of(f.name)} like {example}")

    def _check(self) -> None:
        """Every field's value, in the order a user fixes them: names, roles, numbers, options."""
        DATASETS, MODELS, METHODS = registries()
        _one_of("dataset", self.dataset, DATASETS, "kd datasets")
        _one_of("model", self.model, MODELS, "kd models")
        _one_of("method", self.method, METHODS, "kd methods")
        _one_of("role", self.role, ROLES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        self._check_teaching(MODELS)
        self._check_loss()
        self._check_training()
        self._check_method_options(METHODS)
        self._check_teacher_recipe()

    def _check_teaching(self, models: dict[str, Any]) -> None:
        """Who teaches whom: a pure run has no teacher, a distillation run is a student with one."""
        if self.method == "pure":
            if self.teacher is not None:
                raise SpecError("method 'pure' takes no teacher: drop --teacher or choose a KD --method")
            if self.alpha != 0.0:
                raise SpecError("method 'pure' has no distillation term: drop --alpha (it must be 0)")
        else:
            if self.teacher is None and self.teacher_weights is None:
                raise SpecError(f"method '{self.method}' needs a teacher: pass --teacher MODEL")
            if self.role != "student":
                raise SpecError("a distillation run is a student: drop --role teacher")
        if self.init_weights is not None and self.role != "teacher":
            raise SpecError("init_weights starts a teacher from pretrained weights: drop it, or pass --role teacher")
        if self.teacher is not None:
            _one_of("teacher", self.teacher, models, "kd models")

    def _check_loss(self) -> None:
        """The loss's numbers: alpha, the CE weight, the temperature, and every float finite."""
        if not 0.0 <= self.alpha <= 1.0:
            raise SpecError(f"alpha {self.alpha} is outside [0, 1]: pass --alpha between 0 and 1")
        if self.ce_weight is not None and (self.method == "pure" or not 0.0 <= self.ce_weight <= 10.0):
            raise SpecError(f"ce_weight {self.ce_weight}: the CE weight of a distillation run is between 0 and "
                            "10 (pure runs have CE alone): drop --ce-weight, or pass one such as 1")
        if not self.temperature > 0:
            raise SpecError(f"temperature {self.temperature} must be positive: pass --temperature > 0")
        for name, value in [*((f, getattr(self, f)) for f in FLOAT_FIELDS), *self.options.items()]:
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(f"{name} {value} is not a finite number: pass {_flag_of(name)} a number")

    def _check_training(self) -> None:
        """The recipe's numbers: epochs, batch size, seed, schedule, optimiser and data split."""
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name} must be at least 1: pass --{name.replace('_', '-')} >= 1")
        if not 0 <= self.seed < MAX_SEED:
            raise SpecError(f"seed {self.seed} is outside [0, {MAX_SEED}): pass --seed 0, 1, 2, ...")
        ms = self.milestones
        if ms and not (ms[0] >= 1 and ms[-1] <= self.epochs and all(a < b for a, b in zip(ms, ms[1:], strict=False))):
            raise SpecError(f"milestones {','.join(map(str, ms))} must be strictly increasing epochs "
                            f"from 1 to epochs ({self.epochs}): pass --milestones like 60,120 within --epochs")
        if self.lr <= 0:
            raise SpecError(f"lr {self.lr} must be positive: pass --lr > 0")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} {getattr(self, name)} is negative: pass {_flag_of(name)} >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise SpecError("label_smoothing must be in [0, 1): pass --label-smoothing 0.1 or so")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SpecError("val_fraction must be in [0, 1): pass --val-fraction 0.1 or so")
        if self.train_limit < 0:
            raise SpecError("train_limit must be >= 0 (0 means the whole training set)")

    def _check_method_options(self, methods: dict[str, Any]) -> None:
        """The options are the method's own, with values it accepts."""
        known = methods[self.method].option_defaults()
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise SpecError(
                f"method '{self.method}' has no option {', '.join(unknown)}: "
                f"its options are {', '.join(known) or 'none'} (see kd methods)"
            )
        methods[self.method].check_options(self.options)

    def _check_teacher_recipe(self) -> None:
        if self.teacher_recipe is None:
            return
        if self.teacher is None or self.teacher_weights is not None:
            raise SpecError("teacher_recipe describes a registered teacher: drop it (no --teacher, or "
                            "--teacher-weights names the weights)")
        names = {f.name for f in dataclasses.fields(RunSpec)} - set(NOT_TEACHER_RECIPE)
        wrong = sorted(set(self.teacher_recipe) - names)
        if wrong:
            raise SpecError(f"teacher_recipe cannot set {', '.join(wrong)}: it holds recipe fields "
                            f"({', '.join(sorted(names))})")
        try:
            self.teacher_spec()
        except SpecError as err:
            raise SpecError(f"teacher_recipe: {err}") from None

    @classmethod
    def create(cls, **fields: Any) -> RunSpec:
        """Build a spec from user values: None means 'the default', method options are filled in."""
        METHODS = registries()[2]
        given = {k: v for k, v in fields.items() if v is not None}
        method = given.get("method", "pure")
        if isinstance(method, str) and method in METHODS:
            options = METHODS[method].option_defaults()
            options.update(given.get("options", {}))
            given["options"] = options
        if method != "pure" and "alpha" not in given:
            given["alpha"] = cls.DISTILL_ALPHA
        if method != "pure":
            given.setdefault("role", "student")
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def canonical_json(self) -> str:
        """The JSON the key hashes: fields and options added after runs existed are left out while
        unset or at their default, so those runs keep their keys."""
        d = {k: v for k, v in self.to_dict().items() if not (k in KEY_OPTIONAL and v is None)}
        method = registries()[2][self.method]
        defaults = method.option_defaults()
        d["options"] = {k: v for k, v in d["options"].items()
                        if not (k in method.options_added_later and v == defaults[k])}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """Short stable hash of the canonical JSON: the run's identity in MLflow (`kd.key`)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def params(self) -> dict[str, str]:
        """MLflow params: the spec flattened, method options under their own names."""
        d = self.to_dict()
        options = d.pop("options")
        d.update(options)
        d["teacher_recipe"] = "" if self.teacher_recipe is None else json.dumps(d["teacher_recipe"], sort_keys=True)
        return {k: "" if v is None else str(v) for k, v in d.items()}

    def name(self) -> str:
        """The MLflow run name: what tells runs apart first (method, alpha, seed; `teacher` for a
        teacher), then dataset and models. MLflow's runs table and chart legends cut names at
        about 24 characters, and every run of a study shares its dataset and models."""
        METHODS = registries()[2]
        if self.role == "teacher":
            return f"teacher-s{self.seed}-{self.dataset}-{self.model}"
        label = METHODS[self.method].label or self.method
        if self.method == "pure":
            return f"{label}-s{self.seed}-{self.dataset}-{self.model}"
        models = f"{self.teacher}-to-{self.model}" if self.teacher else self.model
        return f"{label}-a{self.alpha:g}-s{self.seed}-{self.dataset}-{models}"

    def pack_value(self, name: str) -> Any:
        """A PACK_FIELDS value students of one pack compare (a teacher_recipe as its canonical JSON)."""
        value = getattr(self, name)
        return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value

    def loss_weights(self) -> tuple[float, float]:
        """(CE weight, distillation weight): `loss_total = ce * loss_ce + distill * loss_distill`."""
        return (1.0 - self.alpha if self.ce_weight is None else self.ce_weight), self.alpha

    def recipe(self) -> str:
        """The key without the seed (tag `kd.recipe`): the runs of one recipe over seeds share it."""
        d = json.loads(self.canonical_json())
        del d["seed"]
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    def teacher_spec(self) -> RunSpec | None:
        """The spec of this student's teacher: its dataset, seed and recipe (TEACHER_SHARED), the
        teacher's own role defaults (a pure run's label smoothing), then `teacher_recipe`. A student is
        taught by exactly this teacher, found by its key; None without a registered teacher."""
        if self.teacher is None or self.teacher_weights is not None:
            return None
        shared = {name: getattr(self, name) for name in TEACHER_SHARED}
        return RunSpec.create(**{**shared, "model": self.teacher, "role": "teacher", "method": "pure",
                                 **(self.teacher_recipe or {})})

    def taught_by(self, teacher: RunSpec) -> RunSpec:
        """This student taught by `teacher` (a grid's teacher row, a registered teacher the user chose):
        `teacher_recipe` becomes where that teacher's recipe differs from the one this student implies."""
        if teacher.role != "teacher" or (teacher.dataset, teacher.seed) != (self.dataset, self.seed):
            raise SpecError(f"{teacher.name()} cannot teach {self.name()}: a student's teacher is a teacher "
                            "of its own dataset and seed")
        implied = self.replace(teacher=teacher.model, teacher_recipe=None).teacher_spec()
        names = [f.name for f in dataclasses.fields(RunSpec) if f.name not in NOT_TEACHER_RECIPE]
        differs = {k: getattr(teacher, k) for k in names if getattr(teacher, k) != getattr(implied, k)}
        return self.replace(teacher=teacher.model, teacher_recipe=differs or None)

    def differences(self, other: RunSpec) -> str:
        """`epochs=40, lr=0.05`: the fields where this spec differs from `other` (for recipes in messages)."""
        mine, theirs = self.to_dict(), other.to_dict()
        changed = [f"{k}={_shown(v)}" for k, v in mine.items() if v != theirs.get(k) and k != "options"]
        changed += [f"{k}={_shown(v)}" for k, v in self.options.items() if v != other.options.get(k)]
        return ", ".join(changed) or "the default recipe"

    def command(self, skip: tuple[str, ...] = (), teacher_version: str | None = None) -> str:
        """The `kd train` (pure runs) or `kd distill` command that trains this spec: the values that
        differ from the defaults (dataset, seed and epochs always); `skip`: fields to leave out;
        `teacher_version`: the registered teacher a student of another recipe's teacher names."""
        pure = self.method == "pure"
        ref = RunSpec.create(method=self.method, teacher=self.teacher, teacher_weights=self.teacher_weights,
                             role=self.role)
        words = ["kd", "train", "--model", self.model, "--role", self.role] if pure else \
            ["kd", "distill", "--method", self.method, "--student", self.model]
        always = {"dataset", "seed", "epochs", "teacher"}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunSpec)
                  if f.name not in {"model", "role", "method", "options", "teacher_recipe", *skip}}
        changed = {k: v for k, v in values.items() if v is not None and (k in always or v != getattr(ref, k))}
        changed.update({k: v for k, v in self.options.items() if v != ref.options[k]})
        for name, value in changed.items():
            words += ["--" + name.replace("_", "-"), _shown(value)]
        return shlex.join(words + (["--teacher-version", teacher_version] if teacher_version else []))


# What a field's annotation asks for, in words, and an example for fields without a default.
KINDS = {"str": "a text", "int": "a whole number", "float": "a number", "tuple": "a list of whole numbers",
         "dict": "a mapping of option names to values"}
EXAMPLES = {"str": "NAME", "float": 0.1, "tuple": "60,120", "dict": "those of kd methods"}
FLOAT_FIELDS = ("alpha", "ce_weight", "temperature", "lr", "momentum", "weight_decay", "label_smoothing", "val_fraction")
MAX_SEED = 2**31


def _shown(value: Any) -> str:
    """A value as a flag takes it: `60,120` for milestones, 6 significant digits for a float."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:.6g}" if isinstance(value, float) \
        else str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(annotation: str, value: Any) -> bool:
    """Whether `value` has the annotated type; a whole number is a float too (YAML `lr: 1`), a bool is no number."""
    if value is None:
        return "None" in annotation
    kind = annotation.split(" |")[0].split("[")[0]
    if kind == "tuple":
        return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
    if kind == "dict":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if kind == "str":
        return isinstance(value, str)
    return _is_int(value) or (kind == "float" and isinstance(value, float))


def _flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _absolute(path: str) -> str:
    try:
        return str(Path(path).expanduser().absolute())
    except RuntimeError:  # `~someone` who has no home here
        raise SpecError(f"init_weights {path}: no such home directory here: pass an absolute path") from None


def _one_of(what: str, value: str, valid: Any, listing: str | None = None) -> None:
    if value not in valid:
        hint = f" (see {listing})" if listing else ""
        raise SpecError(f"unknown {what} '{value}': choose one of {', '.join(sorted(valid))}{hint}")


def _as_declared(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Whole numbers given for float options (a YAML `25`) become floats, so the key is the same."""
    METHODS = registries()[2]
    declared = METHODS[method].option_defaults() if method in METHODS else {}
    return {k: float(v) if type(declared.get(k)) is float and type(v) is int else v for k, v in options.items()}


def registries() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """DATASETS, MODELS, METHODS: what a spec's names and options are checked against.

    Imported here, not at the top: the registries sit below the spec (docs/architecture.md,
    "Layers") but import torch, and `kd --help` reads RunSpec's fields without loading torch.
    The registries themselves never import the spec.
    """
    from kd.data import DATASETS  # lazy: torch; `kd --help` builds its flags from RunSpec without it
    from kd.methods import METHODS  # lazy: torch
    from kd.models import MODELS  # lazy: torch, timm

    return DATASETS, MODELS, METHODS
