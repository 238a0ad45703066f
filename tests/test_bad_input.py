"""Bad input through the real `kd` command: one line on stderr naming the problem and the fix, exit 2,
and nothing half-written. Then property tests: any values of any `kd train` / `kd distill` flags, and
any grid `spec:` block, give a RunSpec or one such line, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
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

from kd.analysis import legacy
from kd.cli import build_parser, distill_spec, main, train_spec
from kd.cluster.grids import load_grid, method_options, spec_fields
from kd.cluster.schedulers import SCHEDULERS, Pbs, SchedulerError
from kd.cluster.templates import JobSettings
from kd.flags import NOT_FLAGS
from kd.models import create_model
from kd.spec import RunSpec, SpecError
from kd.tracking.ledger import LEDGER_EXPERIMENT
from kd.tracking.runs import RunTracker
from kd.tracking.sender import ship
from kd.tracking.store import experiment_id, get_client
from tests.conftest import DIGITS_FAST, mlflow_run, run_kd
from tests.test_analysis import legacy_dir
from tests.test_data import write_cifar

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
        assert {f.name for f in dataclasses.fields(RunSpec)} - skipped - NOT_FLAGS <= dests
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


# ----------------------------------------------------------------------------------- one line, not a traceback (issue 25)

def refused(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The one stderr line of `kd ARGV` run in this process (torch and mlflow load once for all cases)."""
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, out + err
    assert len(err.splitlines()) == 1, err
    return err.strip()


def not_utf8(path: Path) -> str:
    path.write_bytes(b"datasets: [digits]\n\xff\xfe\n")
    return str(path)


def grid_with_job(path: Path, job: dict) -> str:
    path.write_text(yaml.safe_dump({"datasets": ["digits"], "seeds": [0], "teacher": "ResNet8", "student": "ResNet8",
                                    "methods": ["logit"], "job": job}))
    return str(path)


def tinyimagenet_with_bad_wnids(root: Path) -> str:
    tree = root / "tiny-imagenet-200"
    (tree / "train").mkdir(parents=True)
    (tree / "val").mkdir()
    (tree / "val" / "val_annotations.txt").write_text("")
    (tree / "wnids.txt").write_bytes(b"n01443537\n\xe9\n")
    return str(root)


# (argv or a function of tmp_path giving it, environment, what the line must say); each fails before any run
BEFORE_ANY_RUN = {
    "mps": ((*TRAIN, "--device", "mps"), {}, "kd: --device mps but this machine has no Apple GPU (MPS): pass --device"),
    "ft-rate": ((*DISTILL, "--method", "factor_transfer", "--ft-rate", "1e6"), {},
                "kd: factor_transfer option ft_rate=1000000.0 is out of range: pass --ft-rate in (0, 8]"),
    "ipv6-uri": (TRAIN, {"MLFLOW_TRACKING_URI": "http://[::1"},
                 "kd: MLFLOW_TRACKING_URI=http://[::1 is not a valid URL (Invalid IPv6 URL): fix it"),
    "experiment": ((*TRAIN, "--experiment", ""), {}, "argument --experiment: an experiment needs a name"),
    "demo-epochs": (("demo", "--epochs", "0"), {}, "argument --epochs: '0' is not a whole number of 1 or more"),
    "sync-timeout": ((*TRAIN, "--sync-timeout", "nan"), {}, "'nan' is not a number of seconds (0 or more)"),
    "grid-modules": (lambda tmp: ("submit", "--grid", grid_with_job(tmp / "g.yaml", {"modules": [1]}), "--dry-run",
                                  "--scheduler", "local"), {}, "kd: job setting modules=1 is rejected: it must be text"),
    "grid-module-list": (lambda tmp: ("submit", "--grid", grid_with_job(tmp / "g.yaml", {"modules": [["a", "b"]]}),
                                      "--dry-run", "--scheduler", "local"), {}, "job setting modules=['a', 'b']"),
    "grid-not-utf8": (lambda tmp: ("submit", "--grid", not_utf8(tmp / "g.yaml"), "--dry-run", "--scheduler", "local"),
                      {}, "is not UTF-8 text (byte 19): save it as UTF-8"),
    "crontab-not-utf8": (lambda tmp: ("cron", "on", "--grid", "smoke", "--crontab-file", not_utf8(tmp / "crontab")),
                         {}, "kd: --crontab-file"),
    "report-out": (lambda tmp: ("report", "--out", str(tmp / "config.json" / "report")), {},
                   "cannot be made a folder (Not a directory): pass --out a folder you can write"),
}
AFTER_THE_STORE = {  # these need the store (or the data) first: an empty store may be left, never a run
    "val-fraction": ((*TRAIN, "--val-fraction", "0.999"), "kd: val_fraction 0.999 holds out 1436 of 1437 training "
                     "images and leaves 1: each side needs an image of each of the 10 classes: pass --val-fraction "
                     "from 0.007 to 0.993"),
    "unknown-run-id": (("job", "--run-id", "nosuch"), "kd: --run-id 'nosuch': no such run in the tracking store"),
    "wnids-not-utf8": (lambda tmp: ("train", "--dataset", "tinyimagenet", "--model", "ResNet8", "--device", "cpu",
                                    "--data-root", tinyimagenet_with_bad_wnids(tmp / "data")),
                       "wnids.txt is malformed (not UTF-8 text: byte 10)"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_ANY_RUN))
def test_bad_input_stops_before_the_store_in_one_line(store, tmp_path, monkeypatch, capsys, case):
    argv, env, needle = BEFORE_ANY_RUN[case]
    (tmp_path / "config.json").write_text("{}")  # a file that --out cannot be a folder under
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = refused(capsys, *(argv(tmp_path) if callable(argv) else argv))
    assert needle in line, line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("case", sorted(AFTER_THE_STORE))
def test_bad_input_found_with_the_data_is_one_line_and_no_run(store, tmp_path, monkeypatch, capsys, case):
    argv, needle = AFTER_THE_STORE[case]
    monkeypatch.delenv("KD_DATA_ROOT", raising=False)  # kd train --data-root sets it for the process
    line = refused(capsys, *(argv(tmp_path) if callable(argv) else argv))
    assert needle in line, line
    assert all_runs() == []


def test_offline_timm_weights_are_one_line_before_timm_asks_the_hub(store, tmp_path, monkeypatch, capsys):
    """The hub is probed once before timm's download, whose retries print dozens of warnings."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = refused(capsys, "train", "--model", "ViTTiny224", "--init-weights", "timm", *DIGITS_FAST, "--epochs", "1",
                   "--tracking", "journal", "--journal-dir", str(tmp_path / "journals"))
    assert line.startswith("kd: cannot fetch timm's vit_tiny_patch16_224.augreg_in21k_ft_in1k: http://127.0.0.1:9 "
                           "does not answer (Connection refused) and the hub cache lacks it: on an offline machine "
                           "pass --teacher-weights FILE"), line
    assert not list(tmp_path.glob("journals/*"))  # no run's folder


@pytest.mark.parametrize("argv", [("distill", "--epochs", "abc"), ("distill", "--no-such-option", "1")])
def test_bad_flags_under_mlflow_run_tag_its_run(store, monkeypatch, capsys, argv):
    """`mlflow run -P epochs=abc` (or an unknown -P name) reaches the entry point as these flags, with
    MLFLOW_RUN_ID set to the run it will mark FAILED: that run says why in kd.error."""
    client = get_client()
    run_id = client.create_run(experiment_id(client, "kd")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    line = refused(capsys, *argv)
    assert client.get_run(run_id).data.tags["kd.error"] == line
    assert "'abc'" in line or "unrecognized arguments: --no-such-option 1" in line


def test_a_refused_submission_shows_what_the_scheduler_said(tmp_path, monkeypatch):
    (tmp_path / "qsub").write_text("#!/bin/sh\necho 'qsub: Job rejected by all possible destinations' >&2\nexit 1\n")
    (tmp_path / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SchedulerError) as refusal:
        Pbs().submit(tmp_path / "job.sh", tmp_path / "job.log")
    assert str(refusal.value) == "qsub failed (exit 1): qsub: Job rejected by all possible destinations"


def unreadable_cifar_root(root: Path) -> Path:
    write_cifar(root, "cifar10")
    root.chmod(0)
    return root


def unreadable_cifar_batch(root: Path) -> Path:
    write_cifar(root, "cifar10")
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.chmod(0)
    return batch


@pytest.mark.parametrize("make", [unreadable_cifar_root, unreadable_cifar_batch])
def test_unreadable_data_is_one_line(tmp_path, make):
    root = tmp_path / "data"
    named = make(root)
    try:
        line = one_line(run_kd("train", "--dataset", "cifar10", "--model", "ResNet8", "--device", "cpu", "--data-root",
                               str(root), "--tracking", "journal", "--journal-dir", str(tmp_path / "journals"),
                               wrapper=without_root_powers()))
    finally:
        root.chmod(0o755)
    assert line.startswith(f"kd: {named}") and "cannot be used (Permission denied): make the data root" in line, line


def test_a_malformed_legacy_folder_is_skipped_and_the_rest_import(store, tmp_path, capsys):
    seeds = tmp_path / "beta" / "experiments" / "Cifar10" / "pure" / "ResNet8"
    for seed in range(4):
        legacy_dir(tmp_path / "beta", f"Cifar10/pure/ResNet8/{seed}", "ResNet8", [40.0, 60.0, 65.0])
    (seeds / "0" / "status.json").write_text(json.dumps({"status": ["completed"]}))
    (seeds / "1" / "best.pth").write_bytes(b"")
    (seeds / "2" / "best.pth").write_bytes(pickle.dumps({"weights": {"conv1.weight": [1.0]}}))
    assert main(["import-legacy", str(tmp_path / "beta")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "skipped Cifar10/pure/ResNet8/0: status.json status is ['completed']: expected one of completed, in_progress",
        "skipped Cifar10/pure/ResNet8/1: best.pth is empty (a save that was interrupted)",
        "skipped Cifar10/pure/ResNet8/2: best.pth is not a weights-only PyTorch checkpoint (a plain pickle or another "
        "file)"]
    assert "imported 1 runs" in out and [r.data.tags["kd.legacy_path"] for r in all_runs()] == ["Cifar10/pure/ResNet8/3"]


JOB_BLOCKS = st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(JobSettings)]),
                             st.one_of(VALUES, st.sampled_from(["02:00:00", "16gb", "cpu", "cuda:0", "journal"])),
                             max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=JOB_BLOCKS)
def test_any_grid_job_block_gives_job_scripts_or_one_line(tmp_path, job):
    """What passes the dry run also makes every scheduler's script (`modules: [[a, b]]` once failed only at qsub)."""
    try:
        settings_ = load_grid(grid_with_job(tmp_path / "grid.yaml", job)).job.resolved()
    except SpecError as bad:
        assert "\n" not in str(bad) and ": " in str(bad)
    else:
        for scheduler in SCHEDULERS.values():
            assert scheduler().script(settings_, "teacher-s0", ["kd", "job", "--run-id", "r"], {}).startswith("#!")


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3)),
                    max_leaves=6)
LEGACY_CONFIGS = st.dictionaries(st.sampled_from([*legacy.CONFIG_FIELDS, "alpha"]), JSON, max_size=3)
CURVE = st.one_of(st.lists(st.floats(0, 100), min_size=1, max_size=3), JSON)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.one_of(st.fixed_dictionaries({"status": st.one_of(st.sampled_from(list(legacy.STATUSES)), JSON)},
                                              optional={"config": st.one_of(LEGACY_CONFIGS, JSON)}), JSON),
       metrics=st.fixed_dictionaries({name: CURVE for name in legacy.CURVES},
                                     optional={"config": st.one_of(LEGACY_CONFIGS, JSON)}))
def test_any_legacy_json_gives_a_run_or_a_reason(tmp_path, status, metrics):
    """import-legacy reads status.json and metrics.json of any content as a run or one reason to skip the folder."""
    folder = tmp_path / "Cifar10" / "logit" / "ResNet20_to_ResNet8" / "0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    try:
        run = legacy.read_run(folder, tmp_path, set())
    except legacy.Malformed as bad:
        assert "\n" not in str(bad)
    else:
        assert run.status in legacy.STATUSES and run.spec.dataset == "cifar10"
