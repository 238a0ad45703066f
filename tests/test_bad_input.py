"""Bad input through the real `kd` command: one line on stderr naming the problem and the fix, exit 2,
and nothing half-written. Then property tests: any values of any `kd train` / `kd distill` flags, and
any grid `spec:` block, give a RunSpec or one such line, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from kd.cli import build_parser, distill_spec, train_spec
from kd.cluster.grids import load_grid, method_options, spec_fields
from kd.models import create_model
from kd.spec import RunSpec, SpecError
from kd.tracking.ledger import LEDGER_EXPERIMENT
from kd.tracking.runs import RunTracker
from kd.tracking.sender import ship
from kd.tracking.store import experiment_id, get_client
from tests.conftest import DIGITS_FAST, mlflow_run, run_kd

DISTILL = ("distill", "--teacher", "ResNet8", "--student", "ResNet8", *DIGITS_FAST, "--epochs", "1")
TRAIN = ("train", "--model", "ResNet8", *DIGITS_FAST, "--epochs", "1")


def one_line(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that refused its input."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def all_runs() -> list:
    """Every run of the store but kd's claim ledger's."""
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments() if e.name != LEDGER_EXPERIMENT])


# ----------------------------------------------------------------------------------- weights files

class RunsCode:
    """Unpickling this creates a file: proof that a checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def digits_resnet8(classes: int = 10) -> dict[str, torch.Tensor]:
    return create_model("ResNet8", classes, 1, 8).state_dict()


def first_other_shape(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    key = next(k for k in b if a[k].shape != b[k].shape)
    return f"{key} is {tuple(a[key].shape)} there, {tuple(b[key].shape)} in ResNet8"


@pytest.mark.parametrize("case", ["text", "code", "shape", "missing", "unexpected"])
def test_teacher_weights_that_are_not_a_fitting_state_dict_give_one_line(store, tmp_path, case):
    path, marker = tmp_path / "teacher.pth", tmp_path / "code-ran"
    good = digits_resnet8()
    first = next(iter(good))
    wanted = {
        "text": ("not a checkpoint\n", "PyTorch checkpoint ("),
        "code": ({"weights": RunsCode(marker)}, "is not a weights-only PyTorch checkpoint"),
        "shape": ({"weights": digits_resnet8(100)}, first_other_shape(digits_resnet8(100), good)),
        "missing": ({k: v for k, v in good.items() if k != first}, f"it lacks {first}"),
        "unexpected": ({**good, "extra.weight": torch.zeros(1)}, "ResNet8 has no extra.weight"),
    }
    content, needle = wanted[case]
    path.write_text(content) if isinstance(content, str) else torch.save(content, path)
    line = one_line(run_kd(*DISTILL, "--teacher-weights", str(path)))
    assert line.startswith(f"kd: teacher weights {path} ") and needle in line
    assert ("holds code" in line) is (case == "code")
    assert not marker.exists() and all_runs() == []


def test_a_plain_state_dict_is_a_teacher_too(store, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(digits_resnet8(), path)  # no {'weights': ...} around it
    done = run_kd(*DISTILL, "--teacher-weights", str(path))
    assert done.returncode == 0, done.stderr
    assert [r.info.status for r in all_runs()] == ["FINISHED"]


# ----------------------------------------------------------------------------------- flags and specs

@pytest.mark.parametrize(("argv", "line"), [
    (("distill", "--alpha", "abc"), "kd distill: argument --alpha: invalid float value: 'abc' (see kd distill --help)"),
    (("tune", "--method", "rkd", "--dataset", "digits", "--trials", "0"),
     "kd: --trials 0: a study needs at least one trial: pass --trials 1 or more"),
    ((*TRAIN, "--schedule", "multistep", "--epochs", "2", "--milestones", "5,1"),
     "kd: milestones 5,1 must be strictly increasing epochs from 1 to epochs (2): pass --milestones like 60,120 "
     "within --epochs"),
    ((*TRAIN, "--batch-size", "100000"),
     "kd: batch_size 100000 is larger than the training set of digits (1437 images): pass --batch-size 1437 or less"),
    ((*TRAIN, "--device", "gpu0"), "kd: --device 'gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
])  # fmt: skip
def test_bad_flags_give_one_line_and_no_run(store, argv, line):
    assert one_line(run_kd(*argv)) == line
    assert all_runs() == []


def write_grid(path: Path, spec: dict, methods: list) -> str:
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "seeds": [0], "teacher": "ResNet8", "student": "ResNet8",
                                    "methods": methods, "spec": spec}))
    return str(path)


@pytest.mark.parametrize(("spec", "methods", "needle"), [
    ({"epoch": 2}, ["logit"], "spec has unknown key 'epoch': did you mean epochs?"),
    ({"rkd_distance_weight": 25}, ["logit"], "option 'rkd_distance_weight' belongs to rkd, not to the grid's "
                                             "methods (logit)"),
    ({"options": {"rkd_distance_weight": 25}}, ["logit"], "methods (logit)"),
])  # fmt: skip
def test_grid_spec_mistakes_give_one_line(store, tmp_path, spec, methods, needle):
    grid = write_grid(tmp_path / "g.yaml", spec, methods)
    assert needle in one_line(run_kd("submit", "--grid", grid, "--scheduler", "local", "--dry-run"))


def test_a_grid_gives_each_method_its_own_options(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"rkd_distance_weight": 20, "at_p": 3}, ["logit", "rkd",
                                                                                              "attention_transfer"]))
    options = {s.method: s.options for s in grid.specs}
    assert options["pure"] == {} and not {"rkd_distance_weight", "at_p"} & set(options["logit"])
    assert options["rkd"]["rkd_distance_weight"] == 20.0 and options["attention_transfer"]["at_p"] == 3.0


# ----------------------------------------------------------------------------------- the store

def without_root_powers() -> list[str]:
    """A command prefix under which this user obeys file permissions (root drops its override)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root writes a read-only store regardless")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def test_a_read_only_sqlite_store_is_refused_in_seconds(store, tmp_path):
    experiment_id(get_client(), "kd")  # an existing store
    db = tmp_path / "mlflow.db"
    before = db.read_bytes()
    db.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        start = time.monotonic()
        line = one_line(run_kd(*TRAIN, wrapper=without_root_powers()))
        took = time.monotonic() - start
    finally:
        tmp_path.chmod(0o755)
        db.chmod(0o644)
    assert line.startswith(f"kd: the MLflow store {db} is not writable (") and "MLFLOW_TRACKING_URI" in line
    assert took < 60 and db.read_bytes() == before


@pytest.mark.parametrize(("where", "reason"), [("missing/mlflow.db", "No such file or directory"),
                                               ("a-file/mlflow.db", "Not a directory")])
def test_a_store_that_cannot_be_created_is_refused(store, tmp_path, where, reason):
    (tmp_path / "a-file").write_text("")
    line = one_line(run_kd(*TRAIN, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / where}"}))
    assert line == (f"kd: the MLflow store {tmp_path / where} is not writable ({reason}): make it and its folder "
                    "writable, or set MLFLOW_TRACKING_URI=sqlite:///PATH to a writable place")


# ----------------------------------------------------------------------------------- nothing half-written

def test_submit_without_the_schedulers_commands_leaves_nothing(store, tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH without qsub, qstat, qdel
    line = one_line(run_kd("submit", "--grid", "smoke", "--scheduler", "pbs", env={"PATH": str(tmp_path / "bin")}))
    assert line == ("kd: --scheduler pbs needs qsub, qstat, qdel, not found on PATH: run kd submit on a login node "
                    "of a pbs cluster, or pass --scheduler local")
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]  # no store, experiment, run, lock or job script


def test_mlflow_run_with_bad_input_tags_its_run(store):
    done = mlflow_run("distill", dataset="digits", teacher="ResNet8", student="ResNet8", alpha=2, epochs=1)
    assert done.returncode != 0
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert run.data.tags["kd.error"] == "alpha 2.0 is outside [0, 1]: pass --alpha between 0 and 1"


def test_a_run_that_finishes_after_a_kill_keeps_no_error(store, tmp_path):
    spec = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=1)

    def open_end_ship(status: str, error: str | None = None) -> RunTracker:
        tracker = RunTracker.open(spec, "kd", journal_root=tmp_path / "journals")
        tracker.end(status, error)
        ship(tracker.client, tracker.journal.folder)
        tracker.release()
        return tracker

    killed = open_end_ship("KILLED", "SIGTERM: checkpoint written")
    assert killed.client.get_run(killed.run_id).data.tags["kd.error"] == "SIGTERM: checkpoint written"
    resumed = open_end_ship("FINISHED")
    assert resumed.resumed and resumed.run_id == killed.run_id
    run = resumed.client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and "kd.error" not in run.data.tags


# ----------------------------------------------------------------------------------- property tests

def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


NAMES = ["digits", "cifar10", "ResNet8", "ResNet20", "ViTTiny", "logit", "rkd", "nst", "pure", "teacher", "student",
         "sgd", "adamw", "multistep", "cosine", "cnn-student", "timm", "none", "~nobody/w.pth"]
WORDS = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
INTS = st.one_of(st.integers(-3, 300), st.integers(-2**40, 2**40)).map(str)
FLOATS = st.one_of(st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True)).map(repr)
EPOCH_LISTS = st.lists(st.integers(-3, 300), max_size=4).map(lambda xs: ",".join(map(str, xs)))


def spec_flags(command: str) -> dict[str, st.SearchStrategy[str]]:
    """Every flag of the command that feeds its spec (RunSpec fields, method options, --student, --preset),
    with values of its type half of the time and any text otherwise."""
    fields = {f.name for f in dataclasses.fields(RunSpec)} | {"student", "preset"}
    typed = {int: INTS, float: FLOATS}
    return {a.option_strings[0]: st.one_of(typed.get(a.type, WORDS), WORDS, INTS, FLOATS, EPOCH_LISTS)
            for a in subcommand(build_parser(), command)._actions
            if a.option_strings and (a.dest in fields or a.dest.startswith("opt."))}


FLAGS = {"train": spec_flags("train"), "distill": spec_flags("distill")}
SPEC = {"train": train_spec, "distill": distill_spec}


def test_every_spec_field_has_a_flag_in_the_property_test():
    for command, skipped in (("train", {"method", "teacher", "alpha", "teacher_weights"}),
                             ("distill", {"model", "role", "init_weights"})):
        dests = {a.dest for a in subcommand(build_parser(), command)._actions}
        assert {f.name for f in dataclasses.fields(RunSpec)} - skipped - {"options"} <= dests
        assert {f"opt.{name}" for name in method_options()} <= dests
    assert len(FLAGS["distill"]) > 30


@settings(max_examples=200, deadline=None)
@given(data=st.data(), command=st.sampled_from(sorted(SPEC)))
def test_any_flag_values_give_a_spec_or_one_line(data, command):
    flags = data.draw(st.lists(st.sampled_from(sorted(FLAGS[command])), max_size=6, unique=True))
    argv = [command, *[f"{flag}={data.draw(FLAGS[command][flag])}" for flag in flags]]  # `=`: values may start with -
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            spec = SPEC[command](build_parser().parse_args(argv))
    except SystemExit as stop:
        assert stop.code == 2 and len(err.getvalue().splitlines()) == 1, err.getvalue()
    except SpecError as bad:
        assert "\n" not in str(bad) and ": " in str(bad)
    else:
        assert RunSpec.from_dict(spec.to_dict()) == spec


VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(NAMES)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
SPEC_BLOCKS = st.tuples(
    st.dictionaries(st.sampled_from([*spec_fields(), "options", *method_options()]), VALUES, max_size=4),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=10), VALUES, max_size=1)),  # now and then a typo
).map(lambda known_and_any: {**known_and_any[0], **(known_and_any[1] or {})})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=SPEC_BLOCKS,
       methods=st.one_of(st.lists(st.sampled_from(["logit", "rkd", "attention_transfer", "magic"]), max_size=3),
                         VALUES),
       seeds=st.one_of(st.just([0]), VALUES))
def test_any_grid_spec_gives_specs_or_one_line(tmp_path, spec, methods, seeds):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "seeds": seeds, "teacher": "ResNet8",
                                    "student": "ResNet8", "methods": methods, "spec": spec}))
    try:
        grid = load_grid(str(path))
    except SpecError as bad:
        assert "\n" not in str(bad) and ": " in str(bad)
    else:
        assert all(isinstance(s, RunSpec) for s in grid.specs)
