"""Experiment grids: a YAML file (shipped in kd/cluster/grids/ or any path) -> RunSpecs + job settings.

A grid is a product, not a list, because that is how the thesis rounds are designed: for every
dataset and seed, a teacher, optionally a pure student, and every (KD method, alpha) student.
Teachers come first so that a limited queue fills with what the students wait for. Model pairs
with recipes of their own (the lab's CNN and ViT pairs) are `tracks:`, each with its `presets:`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd.cluster.templates import JobSettings
from kd.errors import SpecError, read_text
from kd.methods import METHODS
from kd.presets import preset_defaults
from kd.spec import RunSpec

GRIDS_DIR = Path(__file__).parent / "grids"
GRID_KEYS = {"experiment", "datasets", "seeds", "teacher", "student", "pure_student", "methods", "alphas",
             "spec", "job", "presets", "tracks"}
TRACK_KEYS = GRID_KEYS - {"experiment", "spec", "job", "tracks"}
PRESET_ROLES = ("teacher", "student")


@dataclass(frozen=True)
class Grid:
    name: str
    experiment: str
    specs: tuple[RunSpec, ...]
    job: JobSettings


def grid_names() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(name_or_path: str) -> Path:
    """A shipped grid by name, else a YAML file by path."""
    shipped = GRIDS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise SpecError(f"no grid '{name_or_path}': pass one of {', '.join(grid_names())} or the path of a YAML file")


def load_grid(name_or_path: str, overrides: Sequence[str] = ()) -> Grid:
    """Read a grid; `overrides` are KEY=VALUE pairs for a spec field (e.g. epochs) or a job setting."""
    path = grid_path(name_or_path)
    try:
        raw = mapping(yaml.safe_load(read_text(path, "grid")), f"grid {path}")
    except yaml.YAMLError as err:
        raise SpecError(f"grid {path} is not valid YAML ({str(err).splitlines()[0]}): fix the file") from None
    unknown = sorted(map(str, set(raw) - GRID_KEYS))
    if unknown:
        raise SpecError(f"grid {path} has unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(GRID_KEYS))}")
    spec_values = dict(mapping(raw.get("spec"), f"grid {path}: spec"))
    check_spec_keys(spec_values, path)
    job_values = dict(mapping(raw.get("job"), f"grid {path}: job"))
    for pair in overrides:
        key, value = split_override(pair)
        if key in spec_fields():
            spec_values[key] = coerce(key, value, spec_fields()[key])
        elif key in job_fields():
            job_values[key] = coerce(key, value, job_fields()[key])
        else:
            raise SpecError(f"--set {key}: not a spec field or job setting; job settings are "
                            f"{', '.join(job_fields())}")
    name = path.stem
    return Grid(name, str(raw.get("experiment") or name), expand(raw, spec_values), JobSettings.create(job_values))


def expand(raw: dict[str, Any], base: dict[str, Any]) -> tuple[RunSpec, ...]:
    """Teachers of every track, dataset and seed first, then the students; duplicates dropped.

    Each entry of `tracks:` is a grid of its own whose keys override the top level's (one track
    if there are none).
    """
    teachers, students = [], []
    for track in listed(raw.get("tracks"), "tracks") or [{}]:
        track = mapping(track, "a grid track")
        unknown = sorted(map(str, set(track) - TRACK_KEYS))
        if unknown:
            raise SpecError(f"grid track has unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(TRACK_KEYS))}")
        track_teachers, track_students = expand_track({**raw, **track}, base)
        teachers += track_teachers
        students += track_students
    unique = {s.key(): s for s in [*teachers, *students]}
    return tuple(unique.values())


def expand_track(raw: dict[str, Any], base: dict[str, Any]) -> tuple[list[RunSpec], list[RunSpec]]:
    """One pair's runs. `presets: {teacher: NAME, student: NAME}` (kd presets) give defaults under
    `spec:` and `--set`, and the models when `teacher` / `student` are not given."""
    presets = mapping(raw.get("presets"), "grid presets")
    unknown = sorted(map(str, set(presets) - set(PRESET_ROLES)))
    if unknown:
        raise SpecError(f"grid presets for {', '.join(unknown)}: presets are given for teacher and student")
    fields = {k: v for k, v in base.items() if k in spec_fields()}
    methods, own = method_entries(raw.get("methods"))
    options = track_options(base, methods)

    def values(role: str, distilling: bool) -> dict[str, Any]:
        preset = preset_defaults(presets[role], distilling, fields.get("epochs")) if role in presets else {}
        return {**preset, **fields}

    teacher = raw.get("teacher") or values("teacher", False).get("model")
    student = raw.get("student") or values("student", False).get("model")
    for key, value in (("datasets", raw.get("datasets")), ("seeds", raw.get("seeds")), ("teacher", teacher),
                       ("student", student)):
        if value is None:
            raise SpecError(f"grid needs '{key}': see docs/cluster.md for the grid format")
    teachers, students = [], []
    for dataset in listed(raw["datasets"], "datasets"):
        for seed in listed(raw["seeds"], "seeds"):
            where = {"dataset": dataset, "seed": seed}
            teachers.append(RunSpec.create(**{**values("teacher", False), **where, "model": teacher,
                                              "role": "teacher", "method": "pure"}))
            taught_by = teachers[-1]  # the track's teacher row teaches its students, whatever their own recipe
            if raw.get("pure_student", True):
                students.append(RunSpec.create(**{**values("student", False), **where, "model": student,
                                                  "role": "student", "method": "pure"}))
            for method in methods:
                alphas = [None] if "alpha" in own[method] else listed(raw.get("alphas"), "alphas") or [None]
                for alpha in alphas:  # None: the method's own, the preset's, else RunSpec's
                    given = {} if alpha is None else {"alpha": as_float(alpha)}
                    fixed = {k: as_float(v) for k, v in own[method].items() if k in spec_fields()}
                    method_options = {**options.get(method, {}),
                                      **{k: v for k, v in own[method].items() if k not in spec_fields()}}
                    students.append(RunSpec.create(**{**values("student", True), **where, "model": student,
                                                      "teacher": teacher, "method": method, **given, **fixed,
                                                      "role": "student", "options": method_options}
                                                   ).taught_by(taught_by))
    return teachers, students


def method_entries(value: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """A grid's `methods`: names (`[logit, rkd]`), or names with values of their own, such as the
    field's loss weights (`{logit: {alpha: 0.9}, fitnets: {alpha: 1, ce_weight: 1}}`), which win over
    `alphas` and `spec:`; an option there must be the method's own."""
    names = list(value) if isinstance(value, dict) else listed(value, "methods")
    for method in names:  # before they key a dict or a message: `methods: [[]]` or a newline is no name
        if not isinstance(method, str) or method not in METHODS:
            raise SpecError(f"grid methods are names like [logit, rkd], not {method!r}: choose from "
                            f"{', '.join(METHODS)} (see kd methods)")
    entries = dict(value) if isinstance(value, dict) else dict.fromkeys(names)
    for method, own in entries.items():
        entries[method] = dict(mapping(own, f"grid method {method}"))
        foreign = [k for k in entries[method] if k not in spec_fields() and k not in METHODS[method].options]
        if foreign:
            raise SpecError(f"grid method {method}: {', '.join(map(str, foreign))} is neither a spec field nor "
                            f"an option of {method} (see kd methods)")
    return list(entries), entries


def mapping(value: Any, what: str) -> dict[Any, Any]:
    """A YAML block that must be `key: value` lines (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be a mapping of key: value lines, not {type(value).__name__}: fix the grid")
    return value


def listed(value: Any, what: str) -> list[Any]:
    """A YAML list; a single value is a list of one (absent: empty)."""
    if value is None:
        return []
    if isinstance(value, dict):
        raise SpecError(f"grid {what} must be a list like [a, b], not a mapping: fix the grid")
    return value if isinstance(value, list) else [value]


def as_float(value: Any) -> Any:
    """A YAML `1` for a float field is 1.0 (the CLI's value, so the same key); other values are left to RunSpec."""
    return float(value) if type(value) is int else value


def method_options() -> dict[str, list[str]]:
    """Every method option -> the methods that have it."""
    owners: dict[str, list[str]] = {}
    for method in METHODS.values():
        for name in method.options:
            owners.setdefault(name, []).append(method.name)
    return owners


def check_spec_keys(values: dict[Any, Any], path: Path) -> None:
    """A grid's `spec:` keys are RunSpec fields, `options`, or method options (a typo is named, with a guess)."""
    valid = [*spec_fields(), "options", *method_options()]
    for key in values:
        if key not in valid:
            guess = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            raise SpecError(f"grid {path}: spec has unknown key {key!r}: {hint}use a RunSpec field "
                            f"({', '.join(spec_fields())}) or a method option (kd methods)")


def track_options(base: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
    """The method options of `spec:` (under `options:` or by name) for each of the track's methods;
    an option that none of its methods has is refused, naming the methods."""
    given = {**mapping(base.get("options"), "grid spec options"),
             **{k: v for k, v in base.items() if k in method_options()}}
    known = [m for m in methods if m in METHODS]
    for name in given:
        if not any(name in METHODS[m].options for m in known):
            owners = method_options().get(name)
            owned = f"belongs to {', '.join(owners)}" if owners else "belongs to no method"
            raise SpecError(f"grid spec option {name!r} {owned}, not to the grid's methods "
                            f"({', '.join(methods) or 'none'}): drop it, or add its method to methods")
    return {m: {k: v for k, v in given.items() if k in METHODS[m].options} for m in known}


def job_settings(overrides: Sequence[str]) -> JobSettings:
    """Job settings from --set pairs alone (jobs that are not a grid's: tuning workers)."""
    values = {}
    for pair in overrides:
        key, value = split_override(pair)
        if key not in job_fields():
            raise SpecError(f"--set {key}: not a job setting; job settings are {', '.join(job_fields())}")
        values[key] = coerce(key, value, job_fields()[key])
    return JobSettings.create(values)


def split_override(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {pair!r}: write KEY=VALUE, e.g. --set epochs=2 or --set walltime=01:00:00")
    return key.strip(), value


def spec_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunSpec) if f.name != "options"}


def job_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(JobSettings)}


def coerce(name: str, text: str, f: dataclasses.Field) -> Any:
    """A --set value typed like the field it sets (read from its annotation)."""
    kind = str(f.type)
    if text.strip().lower() in ("", "none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("tuple"):
            items = [t.strip() for t in text.split(",") if t.strip()]
            return tuple(int(t) for t in items) if "int" in kind else tuple(items)
    except ValueError:
        raise SpecError(f"--set {name}={text!r}: expected {kind.split(' ')[0]}") from None
    return text
