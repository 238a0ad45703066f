"""The cluster submitter without a cluster: grids, plans, parsers on recorded outputs, job scripts
(quoting and injection), cron entries, the server guard, and the `local` scheduler end to end.

The real Slurm (qsub and sbatch) is exercised in test_cluster_slurm.py, PostgreSQL in
test_cluster_server.py.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from kd.cli import main as kd_main
from kd.cluster.cron import entry, schedule, set_entry
from kd.cluster.grids import load_grid
from kd.cluster.planner import (
    RESUME,
    SKIP_FAILED,
    SKIP_FINISHED,
    SKIP_RUNNING,
    SUBMIT,
    WAIT_SLOT,
    WAIT_TEACHER,
    Observed,
    observe,
    plan,
)
from kd.cluster.schedulers import SCHEDULERS, Local, Pbs, SchedulerError, Slurm
from kd.cluster.server import server_argv
from kd.cluster.templates import JobSettings
from kd.engine.job import run_specs
from kd.spec import RunSpec, SpecError
from kd.tracking.registry import teacher_uri, teacher_version
from kd.tracking.runs import create_spec_run
from kd.tracking.store import get_client
from tests.conftest import CPU, run_kd


def kd(*argv: str) -> tuple[int, str]:
    """`kd ARGV` in this process (no import cost per call): exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kd_main(list(argv))
    return code, out.getvalue()


def write_grid(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------- grids

def test_shipped_grids_expand_to_the_thesis_rounds():
    charlie, beta, smoke = load_grid("charlie"), load_grid("beta"), load_grid("smoke")
    assert len(charlie.specs) == 240 and len({s.key() for s in charlie.specs}) == 240
    students = [s for s in charlie.specs if s.teacher]
    assert len(students) == 216 and {s.alpha for s in students} == {0.25, 0.5, 0.75}
    assert sum(s.role == "teacher" for s in charlie.specs) == 12
    assert all(s.model == "ResNet56" and s.teacher == "ResNet112" for s in students)
    assert len(beta.specs) == 32 and {s.alpha for s in beta.specs if s.teacher} == {0.5}
    assert {s.dataset for s in smoke.specs} == {"digits"} and all(s.epochs == 2 for s in smoke.specs)
    assert charlie.job.walltime == "02:00:00" and charlie.job.ncpus == 8 and charlie.job.gpus == 1
    first_student = next(i for i, s in enumerate(charlie.specs) if s.role == "student")
    assert all(s.role == "teacher" for s in charlie.specs[:first_student])


def test_overrides_reach_specs_and_job_settings():
    grid = load_grid("smoke", ["epochs=5", "walltime=00:30:00", "modules=cuda/12.1,gcc/13", "scratch=yes"])
    assert {s.epochs for s in grid.specs} == {5}
    assert grid.job.walltime == "00:30:00" and grid.job.modules == ("cuda/12.1", "gcc/13") and grid.job.scratch
    with pytest.raises(SpecError, match="not a spec field or job setting"):
        load_grid("smoke", ["colour=blue"])
    with pytest.raises(SpecError, match="expected int"):
        load_grid("smoke", ["epochs=many"])
    grid = load_grid("smoke", ["precision=fp16", "compile=true", "cudnn_deterministic=false"])
    assert grid.job.precision == "fp16" and grid.job.compile and not grid.job.cudnn_deterministic
    with pytest.raises(SpecError, match="unknown precision 'fp8': choose one of auto, fp32, bf16, fp16"):
        load_grid("smoke", ["precision=fp8"])


def test_unquoted_yaml_walltime_is_a_clear_error(tmp_path):
    # YAML 1.1 reads 2:00:00 as the number 7200
    path = write_grid(tmp_path / "g.yaml", "datasets: [digits]\nseeds: [0]\nteacher: ResNet8\nstudent: ResNet8\n"
                                           "job:\n  walltime: 2:00:00\n")
    with pytest.raises(SpecError, match="quote it in YAML"):
        load_grid(path)


# ----------------------------------------------------------------------------------------- dry run

def test_charlie_dry_run_plans_240_runs_teachers_first_and_touches_nothing(store, tmp_path):
    done = run_kd("submit", "--grid", "charlie", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = [line.split()[:2] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 240 and len({name for _, name in lines}) == 240
    position = {name: i for i, (_, name) in enumerate(lines)}
    for action, name in lines:
        if "-to-" in name:  # logit-a0.25-s0-cifar10-ResNet112-to-ResNet56: its teacher comes first
            _, _, seed, dataset, teacher = name.split("-")[:5]
            assert position[f"teacher-{seed}-{dataset}-{teacher}"] < position[name]
            assert action == WAIT_TEACHER
    assert "plan: submit 10, resume 0, skip-finished 0, skip-running 0, skip-failed 0, wait-for-teacher 216, " \
           "wait-for-slot 14; 10 job(s) to submit" in done.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "kd-jobs").exists()
    get_client().search_experiments()  # now the store exists: a dry run must still not write to it
    assert kd("submit", "--grid", "charlie", "--dry-run") == (0, done.stdout)
    client = MlflowClient()
    assert client.get_experiment_by_name("charlie") is None and client.search_registered_models() == []


# ----------------------------------------------------------------------------------------- planner

def test_plan_rules(store):
    """finished / live job / lease / dead job / failed / teacher / max-queued / packs, on real runs.

    The jobs are `local` ones (PID.START), so `observe` asks a real scheduler without needing Slurm:
    this test process is the live job; the same PID with another start time is a gone one.
    """
    client = get_client()
    specs = list(load_grid("smoke", ["epochs=3"]).specs)  # teacher, pure, logit, attention_transfer, rkd
    teacher, pure, logit, at, rkd = specs
    live_job = f"{os.getpid()}.{int(psutil.Process().create_time() * 100)}"
    gone_job = f"{os.getpid()}.0"  # a reused PID is not the job
    finished = create_spec_run(client, teacher, "smoke")
    client.set_terminated(finished, "FINISHED")
    create_spec_run(client, pure, "smoke", {"ops.job_id": live_job, "ops.scheduler": "local"})
    killed = create_spec_run(client, logit, "smoke", {"ops.job_id": gone_job, "ops.scheduler": "local"})
    client.set_terminated(killed, "KILLED")
    failed = create_spec_run(client, at, "smoke", {"kd.error": "TrainingDiverged: loss nan\nmore"})
    client.set_terminated(failed, "FAILED")
    seen = observe(client, "smoke")
    assert seen.live_jobs == {("local", live_job)}
    seen.teacher_ready = lambda spec: True
    actions = {item.spec.key(): (item.action, item.note) for item in plan(specs, seen, max_queued=10).items}
    assert actions[teacher.key()][0] == SKIP_FINISHED
    assert actions[pure.key()] == (SKIP_RUNNING, f"local job {live_job}")
    assert actions[logit.key()][0] == RESUME and f"job {gone_job} gone" in actions[logit.key()][1]
    assert actions[at.key()] == (SKIP_FAILED, "TrainingDiverged: loss nan; --retry-failed resubmits")
    assert actions[rkd.key()][0] == SUBMIT
    retried = plan(specs, seen, max_queued=10, retry_failed=True)
    assert [i.action for i in retried.items].count(RESUME) == 2
    # one slot left (job 41 is live): logit resumes, the rest waits; with packs they share one job
    one = plan(specs, seen, max_queued=2, retry_failed=True)
    assert [[i.spec.method for i in job] for job in one.jobs] == [["logit"]]
    assert [i.action for i in one.items].count(WAIT_SLOT) == 2
    packed = plan(specs, seen, max_queued=2, pack=3, retry_failed=True)
    assert [[i.spec.method for i in job] for job in packed.jobs] == [["logit", "attention_transfer", "rkd"]]
    seen.teacher_ready = lambda spec: False
    waiting = plan(specs, seen, max_queued=10)
    assert {i.action for i in waiting.items if i.spec.teacher} == {WAIT_TEACHER}
    assert plan(specs, Observed(), max_queued=0).jobs == []


# ----------------------------------------------------------------------------------------- parsers

PBSPRO_QSTAT = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
12345.server      kd-cifar100-Res  alice             01:02:03 R gpu_1
12346.server      kd-cifar10-ResN  alice                    0 Q gpu_1
1234567.pbs-ser*  kd-svhn-ResNet1  alice             00:00:10 H gpu_1
"""
PBSPRO_QSTAT_X = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
12345.server      kd-cifar100-Res  alice             01:59:58 F gpu_1
"""
SLURM_QSTAT = (  # recorded from this CI's slurm-wlm-torque qstat, trailing blanks included
    "Job id              Name             Username        Time Use S Queue          \n"
    "------------------- ---------------- --------------- -------- - ---------------\n"
    "26                  kd-digits-ResNet root            00:00:00 C debug          \n"
    "27                  kd-digits-ResNet root            00:00:04 R debug          \n"
)


def test_pbs_pro_and_openpbs_qstat_dialects():
    pbs = Pbs()
    states = pbs.parse_qstat(PBSPRO_QSTAT, "qstat: Unknown Job Id 12347.server\n", 153)
    assert states == {"12345": "R", "12346": "Q", "1234567": "H"}
    assert all(pbs.is_live(s) for s in states.values())
    assert pbs.parse_qstat(PBSPRO_QSTAT_X, "", 0) == {"12345": "F"} and not pbs.is_live("F")
    assert pbs.parse_qstat("", "qstat: Unknown Job Id 12345.server\n", 153) == {}
    history = "qstat: 12345.server Job has finished, use -x or -H to obtain historical job information\n"
    assert pbs.parse_qstat("", history, 35) == {}
    with pytest.raises(SchedulerError, match="qstat failed .exit 1.: Connection refused"):
        pbs.parse_qstat("", "Connection refused\nqstat: cannot connect to server pbs01 (errno=15010)\n", 1)


def test_slurm_qstat_wrapper_and_squeue():
    assert Pbs.parse_qstat(SLURM_QSTAT, "", 0) == {"26": "C", "27": "R"}
    assert Pbs.parse_qstat("", "", 153) == {}  # the wrapper once the job is gone: nothing, exit 153
    assert Slurm.parse_squeue("26 COMPLETED\n27 RUNNING\n28 PENDING\n", "", 0) == {
        "26": "COMPLETED", "27": "RUNNING", "28": "PENDING"}
    assert Slurm.parse_squeue("", "slurm_load_jobs error: Invalid job id specified\n", 1) == {}
    with pytest.raises(SchedulerError, match="squeue failed"):
        Slurm.parse_squeue("", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", 1)
    slurm = Slurm()
    assert [slurm.is_live(s) for s in ("PENDING", "RUNNING", "COMPLETING", "SUSPENDED")] == [True] * 4
    assert [slurm.is_live(s) for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "CANCELLED+")] == [False] * 5


def test_submit_outputs():
    pbs, slurm = Pbs(), Slurm()
    assert pbs.parse_submit("12345.server\n", 0) == "12345.server"
    assert pbs.parse_submit("77\n", 0) == "77"
    assert slurm.parse_submit("77;kdci\n", 0) == "77"
    wrapper_error = "There was an error running the Slurm sbatch command.\nThe command was:\n'/usr/bin/sbatch x'\n"
    with pytest.raises(SchedulerError, match="qsub failed .exit 1.: There was an error running the Slurm sbatch"):
        pbs.parse_submit(wrapper_error, 1)
    with pytest.raises(SchedulerError):
        pbs.parse_submit("qsub: Job exceeds queue resource limits\n", 0)


# ----------------------------------------------------------------------------------------- job scripts

def settings(**values) -> JobSettings:
    base = {"workdir": "/scratch/alice/kd", "venv": "/home/alice/kd-venv", "data_root": "/data",
            "jobs_dir": "/scratch/alice/jobs"}
    return JobSettings.create({**base, **values}).resolved()


def test_pbs_and_slurm_scripts_carry_the_resources():
    s = settings(queue="gpu_1", project="CSCI1234", partition="gpu", constraint="v100", modules=["cuda/12.1"])
    env = {"MLFLOW_TRACKING_URI": "postgresql://kd:pw@db:5432/mlflow?sslmode=require&x=1"}
    pbs = Pbs().script(s, "kd-x", ["kd", "job", "--run-id", "ab" * 16], env)
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=16gb\n#PBS -l walltime=02:00:00\n#PBS -q gpu_1\n#PBS -P CSCI1234" in pbs
    slurm = Slurm().script(s, "kd-x", ["kd", "job"], env)
    for line in ("#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16G",
                 "#SBATCH --partition=gpu", "#SBATCH --account=CSCI1234", "#SBATCH --gres=gpu:1",
                 "#SBATCH --constraint=v100"):
        assert line in slurm
    for script in (pbs, slurm):
        assert "module load cuda/12.1" in script and "source /home/alice/kd-venv/bin/activate" in script
        assert "export MLFLOW_TRACKING_URI='postgresql://kd:pw@db:5432/mlflow?sslmode=require&x=1'" in script
        assert script.rstrip().endswith("exec kd job" + (" --run-id " + "ab" * 16 if script is pbs else ""))
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    scratch = Slurm().script(settings(scratch=True, gpus=0, venv=None, conda_env="kd"), "kd-x", ["kd"], {})
    assert 'cd "${TMPDIR:-/tmp}"' in scratch and "conda activate kd" in scratch and "gres" not in scratch


def test_job_templates_are_package_data_read_from_the_package_not_the_checkout(tmp_path):
    """pbs_templates/ is the one copy in git; kd/cluster/job_templates links to it, so a wheel ships
    the files as package data of kd.cluster (built and rendered in .ci/check_wheel.sh). Here: a copy
    of the package (the link followed, as in a wheel) with no pbs_templates/ beside it renders."""
    root = Path(__file__).resolve().parents[1]
    link = root / "kd" / "cluster" / "job_templates"
    assert link.is_symlink() and link.resolve() == (root / "pbs_templates").resolve()
    shipped = importlib.resources.files("kd.cluster") / "job_templates"
    for template in (root / "pbs_templates").glob("*.tmpl"):
        assert (shipped / template.name).read_text() == template.read_text()
    shutil.copytree(root / "kd", tmp_path / "site" / "kd", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, kd.cluster.templates as t\n"
            "from kd.cluster.schedulers import SCHEDULERS\n"
            "from kd.cluster.templates import JobSettings\n"
            "s = JobSettings(venv='/v', workdir='/w', data_root='/d', jobs_dir='/j').resolved()\n"
            "print(t.__file__)\n"
            "for scheduler in SCHEDULERS.values(): print(scheduler().script(s, 'kd-x', ['kd', 'job'], {}))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(tmp_path / "site" / "kd" / "cluster" / "templates.py"))
    assert not (tmp_path / "pbs_templates").exists() and not (tmp_path / "site" / "pbs_templates").exists()
    for header in ("#PBS -l walltime=02:00:00", "#SBATCH --time=02:00:00", "cd /w"):
        assert header in done.stdout


@pytest.mark.parametrize(("setting", "needle"), [
    ("queue=gpu; rm -rf ~", "queue='gpu; rm -rf ~' is rejected: it contains ' ;~'"),
    ("modules=$(reboot)", "modules='$(reboot)' is rejected: it contains '$()'"),
    ("walltime=1:00:00`id`", "walltime='1:00:00`id`' is not HH:MM:SS"),
    ("venv=/home/a/env\nrm -rf ~", "venv='/home/a/env\\nrm -rf ~' is rejected: it contains '\\n~'"),
    ("workdir=/tmp/$HOME", "workdir='/tmp/$HOME' is rejected: it contains '$'"),
    ("project=a|b", "project='a|b' is rejected: it contains '|'"),
    ("mem=16gb; reboot", "mem='16gb; reboot' is not a size"),
])
def test_injection_in_grid_values_is_rejected_in_one_line(store, tmp_path, capsys, setting, needle):
    assert kd_main(["submit", "--grid", "smoke", "--set", setting, "--scheduler", "slurm"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    key, value = setting.split("=", 1)
    grid = {"datasets": ["digits"], "seeds": [0], "teacher": "ResNet8", "student": "ResNet8",
            "job": {key: [value] if key == "modules" else value}}
    with pytest.raises(SpecError, match="rejected|not HH:MM:SS|not a size"):
        load_grid(write_grid(tmp_path / "evil.yaml", yaml.safe_dump(grid)))


def test_a_venv_in_home_may_be_written_as_in_a_shell():
    for written in ("~/kd-venv", "$HOME/kd-venv", "${HOME}/kd-venv"):
        assert JobSettings.create({"venv": written}).venv == str(Path.home() / "kd-venv")
    with pytest.raises(SpecError, match="rejected: it contains"):
        JobSettings.create({"venv": "~alice/kd-venv"})  # another user's home: not expanded, rejected


def fake_kd_venv(venv: Path) -> Path:
    """A venv whose `kd` prints where and how it was called instead of training."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "kd").write_text('#!/bin/bash\necho "cwd=$PWD args=$* uri=$MLFLOW_TRACKING_URI"\n')
    (venv / "bin" / "kd").chmod(stat.S_IRWXU)
    (venv / "bin" / "activate").write_text(f'export PATH={shlex.quote(str(venv / "bin"))}:"$PATH"\n')
    return venv


def test_values_with_spaces_are_quoted_and_work(tmp_path):
    """A venv and a work dir with spaces: the rendered script activates and cds into them."""
    venv, workdir = fake_kd_venv(tmp_path / "my env"), tmp_path / "work dir"
    workdir.mkdir()
    s = JobSettings.create({"venv": str(venv), "workdir": str(workdir), "jobs_dir": str(tmp_path)}).resolved()
    script = Local().script(s, "kd-x", ["kd", "job", "--run-id", "a b"], {"MLFLOW_TRACKING_URI": "sqlite:////x y/m.db"})
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"cwd={workdir} args=job --run-id a b uri=sqlite:////x y/m.db" in done.stdout


def test_each_scheduler_reads_the_job_id_from_its_own_variable(tmp_path):
    """A scheduler is one class with its template and job-id variable: its job says its own id,
    even where another scheduler's variable is set too (Slurm's PBS wrapper sets both)."""
    s = JobSettings.create({"venv": str(fake_kd_venv(tmp_path / "venv")), "workdir": str(tmp_path)}).resolved()
    env = {**os.environ, "PBS_JOBID": "12345.server", "SLURM_JOB_ID": "77"}
    said = {}
    for name, scheduler in SCHEDULERS.items():
        script = scheduler().script(s, "kd-x", ["kd", "job"], {})
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and f"cwd={tmp_path} args=job" in done.stdout, done.stderr
        said[name] = done.stdout.split()[2]  # kd job ID on HOST at TIME
    assert said == {"pbs": "12345.server", "slurm": "77", "local": "local"}


# ----------------------------------------------------------------------------------------- cron

def test_cron_installs_one_entry_per_grid_and_removes_it(store, tmp_path):
    crontab = tmp_path / "crontab"
    crontab.write_text("MAILTO=alice\n0 3 * * * backup.sh\n")
    args = ("--grid", "smoke", "--scheduler", "local", "--max-queued", "0", "--crontab-file", str(crontab))
    assert kd("cron", "on", *args, "--every", "15")[0] == 0
    code, out = kd("cron", "on", *args)  # again: replaced, not added
    assert code == 0 and out.startswith("replaced")
    lines = crontab.read_text().splitlines()
    ours = [line for line in lines if line.endswith("# kd cron: grid smoke")]
    assert lines[:2] == ["MAILTO=alice", "0 3 * * * backup.sh"] and len(ours) == 1
    assert ours[0].startswith("*/30 * * * * cd ") and " -m kd.cli submit --grid smoke --scheduler local" in ours[0]
    command = ours[0].split(" ", 5)[5]  # what cron hands to sh
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "kd-jobs" / "smoke" / "cron.log"
    assert "plan: submit 0" in log.read_text() and "wait-for-slot 2" in log.read_text()
    assert kd("cron", "off", "--grid", "smoke", "--crontab-file", str(crontab))[0] == 0
    assert crontab.read_text().splitlines() == ["MAILTO=alice", "0 3 * * * backup.sh"]


def test_cron_schedule_and_percent_escaping(tmp_path):
    assert schedule(30) == "*/30 * * * *" and schedule(120) == "0 */2 * * *"
    with pytest.raises(SpecError, match="--every 90"):
        schedule(90)
    line = entry("g", 5, ["submit", "--set", "lr=5%"], tmp_path / "log", {"PATH": "/usr/bin"})
    assert "lr=5\\%" in line  # cron turns a bare % into a newline
    crontab = tmp_path / "crontab"
    set_entry("g", line, str(crontab))
    assert set_entry("g", None, str(crontab)) and crontab.read_text() == ""


# ----------------------------------------------------------------------------------------- server

def test_server_refuses_to_listen_beyond_loopback_without_auth(tmp_path):
    uri = "postgresql://kd:kd@127.0.0.1:5432/mlflow"
    with pytest.raises(SpecError, match="refusing to serve MLflow on 0.0.0.0 without authentication"):
        server_argv(uri, str(tmp_path), host="0.0.0.0")
    argv = server_argv(uri, str(tmp_path), host="0.0.0.0", app_name="basic-auth")
    assert argv[1:4] == ["-m", "mlflow", "server"] and argv[-2:] == ["--app-name", "basic-auth"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    local = server_argv(uri, "shared/artifacts")
    assert local[local.index("--artifacts-destination") + 1] == str(Path("shared/artifacts").absolute())
    assert local[local.index("--host") + 1] == "127.0.0.1"
    assert kd_main(["server", "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path),
                    "--host", "0.0.0.0"]) == 2


def test_a_teacher_finished_but_never_registered_is_registered_by_submit_and_by_kd_train(store, tmp_path):
    """A kill between FINISHED and the registry entry must not hold the students back forever."""
    grid = write_grid(tmp_path / "rep.yaml", "experiment: rep\ndatasets: [digits]\nseeds: [0]\nteacher: ResNet8\n"
                                             "student: ResNet8\npure_student: false\nmethods: [logit]\n"
                                             "spec: {epochs: 1, batch_size: 64, train_limit: 256}\n"
                                             "job: {ncpus: 1, gpus: 0, device: cpu}\n")
    teacher = load_grid(grid).specs[0]
    [trained] = run_specs([teacher], experiment="rep", options=CPU, progress=False)
    client = MlflowClient()
    for route in ("submit", "train"):
        client.delete_registered_model("digits-ResNet8")  # what the kill leaves: FINISHED, no entry
        assert teacher_version(client, teacher) is None
        if route == "submit":
            code, out = kd("submit", "--grid", grid, "--scheduler", "local", "--max-queued", "0")
            assert "wait-for-slot     logit-a0.5-s0-digits-ResNet8-to-ResNet8" in out  # no longer waits for it
        else:
            code, out = kd("train", "--dataset", "digits", "--model", "ResNet8", "--epochs", "1", "--batch-size",
                           "64", "--train-limit", "256", "--experiment", "rep", "--device", "cpu")
            assert "already trained in run" in out
        assert code == 0 and f"registered {teacher_uri(teacher).removeprefix('models:/')} (version 1)" in out
        assert teacher_version(client, teacher).run_id == trained.run_id


# ----------------------------------------------------------------------------------------- local scheduler

def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_local_scheduler_sigterm_then_resume(store, tmp_path):
    """`--scheduler local` + SIGTERM (what qdel does): the next submit resumes the same run."""
    grid = write_grid(tmp_path / "one.yaml", "experiment: one\ndatasets: [digits]\nseeds: [0]\nteacher: ResNet8\n"
                                             "student: ResNet8\npure_student: false\n"
                                             "spec: {epochs: 12, batch_size: 16, train_limit: 512}\n"
                                             "job: {ncpus: 1, gpus: 0, device: cpu, precision: fp32}\n")
    code, out = kd("submit", "--grid", grid, "--scheduler", "local")
    assert code == 0 and "submit            teacher-s0-digits-ResNet8" in out
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("one").experiment_id])[0]
    run_id, job_id = run.info.run_id, run.data.tags["ops.job_id"]
    wait_for(lambda: int(client.get_run(run_id).data.tags.get("kd.epoch", 0)) >= 2, 120, "epoch 2")
    Local().cancel(job_id)
    wait_for(lambda: client.get_run(run_id).info.status == "KILLED", 60, "the run to be KILLED")
    wait_for(lambda: not Local().live([job_id]), 60, "the job to exit")
    code, out = kd("submit", "--grid", grid, "--scheduler", "local")
    assert code == 0 and "resume            teacher-s0-digits-ResNet8  (killed, epoch " in out
    wait_for(lambda: client.get_run(run_id).info.status == "FINISHED", 180, "the resumed run to finish")
    final = client.get_run(run_id)
    assert final.data.tags["ops.job_id"] != job_id and final.data.tags["kd.precision"] == "fp32"
    assert "--device cpu --precision fp32 --collapse-after 10 --tracking direct --journal-dir " in Path(final.data.tags["ops.job_log"]).with_suffix(".sh").read_text()
    assert f"resuming run {run_id}" in Path(final.data.tags["ops.job_log"]).read_text()
    steps = [m.step for m in client.get_metric_history(run_id, "loss_total")]
    assert sorted(steps) == list(range(1, 13))
    assert len(client.search_runs([final.info.experiment_id])) == 1
    code, out = kd("submit", "--grid", grid, "--scheduler", "local")
    assert "plan: submit 0, resume 0, skip-finished 1" in out
    for argv in (("--grid", grid), ("--experiment", "one")):  # kd status: from the grid, or every run
        code, out = kd("status", *argv)
        assert code == 0 and final.data.tags["ops.job_id"] in out and "1 finished (1 specs)" in out


def test_failed_submission_leaves_no_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # only these PBS commands, and qsub refuses
    for command in ("qsub", "qstat", "qdel"):
        (tmp_path / command).write_text("#!/bin/sh\necho 'qsub: Unauthorized Request'\nexit 1\n")
        (tmp_path / command).chmod(stat.S_IRWXU)
    code = kd_main(["submit", "--grid", "smoke"])
    assert code == 2
    client = MlflowClient()
    assert client.search_runs([client.get_experiment_by_name("smoke").experiment_id]) == []


def test_tune_workers_are_submitted_once_and_finish_the_study(store):
    """`kd submit --tune STUDY --workers 2`: two worker jobs, none while they live, none once done."""
    teacher = RunSpec.create(dataset="digits", model="ResNet8", role="teacher", epochs=1, batch_size=64,
                             train_limit=256)
    run_specs([teacher], experiment="tune", options=CPU, progress=False)  # registers digits-ResNet8@seed0
    code, _ = kd("tune", "--dataset", "digits", "--method", "logit", "--teacher", "ResNet8", "--student", "ResNet8",
                 "--epochs", "1", "--batch-size", "64", "--train-limit", "256", "--trials", "2", "--params", "alpha",
                 "--pruner", "none", "--study", "t", "--create-only", "--experiment", "tune", "--device", "cpu")
    assert code == 0
    argv = ("submit", "--tune", "t", "--workers", "2", "--scheduler", "local", "--experiment", "tune",
            "--set", "ncpus=1", "--set", "gpus=0", "--set", "device=cpu")
    code, out = kd(*argv)
    assert code == 0 and out.count("submitted local job") == 2, out
    code, out = kd(*argv)  # workers still importing torch: both alive
    assert out.count(": skip-running (local job") == 2 and "submitted" not in out, out
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("tune").experiment_id],
                                  "tags.`kd.study` = 't' AND tags.`kd.tuning` = 'study'")
    jobs = [parent.data.tags[f"kd.worker{i}.job_id"] for i in range(2)]
    wait_for(lambda: not Local().live(jobs), 300, "the workers to finish the study")
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    code, out = kd(*argv)
    assert out.count(": skip-finished") == 2 and "submitted" not in out
