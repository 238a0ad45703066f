"""The submitter against the real single-node Slurm of .ci/run: qsub/qstat/qdel (PBS wrappers)
and sbatch/squeue/scancel, real walltime kills, two submitters at once.

Jobs are told apart from other users' by their working directory (squeue %Z): the jobs folder
under this test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from kd.cluster.schedulers import Pbs
from tests.conftest import registered_teacher
from tests.test_cluster import kd, wait_for, write_grid

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(not (shutil.which("sinfo") and os.environ.get("KD_TEST_SLURM")),
                       reason="needs the local Slurm started by .ci/run (sinfo on PATH and KD_TEST_SLURM=1)"),
]
LIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}


def our_live_jobs(tmp_path: Path) -> list[str]:
    """Ids of live Slurm jobs submitted from this test's folders, straight from squeue."""
    done = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%Z"], capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in done.stdout.splitlines() if line.strip()]
    return [job for job, state, workdir in rows if state in LIVE and workdir.startswith(str(tmp_path))]


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def runs_of(client: MlflowClient, experiment: str) -> list[Run]:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def submit_until_finished(args: list[str], experiment: str, n_runs: int, tmp_path: Path, max_queued: int,
                          timeout: float = 300) -> list[str]:
    """`kd submit` every few seconds, like cron, until every run is FINISHED; the outputs."""
    client, outputs = MlflowClient(), []
    deadline = time.time() + timeout
    while True:
        code, out = kd("submit", *args)
        assert code == 0, out
        outputs.append(out)
        assert len(our_live_jobs(tmp_path)) <= max_queued, out
        runs = runs_of(client, experiment)
        if len(runs) == n_runs and all(r.info.status == "FINISHED" for r in runs):
            return outputs
        assert time.time() < deadline, "\n".join(outputs[-2:])
        time.sleep(3)


def steps(client: MlflowClient, run_id: str, key: str = "loss_total") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize(("scheduler", "extra", "max_queued"), [
    ("pbs", ["--max-queued", "2"], 2),  # qsub / qstat; students wait for slots
    ("slurm", ["--pack", "3"], 10),  # sbatch / squeue; the three KD students in one job
])
def test_smoke_grid_trains_every_run_after_its_teacher(store, tmp_path, scheduler, extra, max_queued):
    args = ["--grid", "smoke", "--scheduler", scheduler, "--set", "train_limit=256", *extra]
    outputs = submit_until_finished(args, "smoke", 5, tmp_path, max_queued)
    assert "wait-for-teacher 3" in outputs[0]
    client = MlflowClient()
    runs = runs_of(client, "smoke")
    assert len({r.data.tags["kd.key"] for r in runs}) == 5
    assert {r.data.tags["ops.scheduler"] for r in runs} == {scheduler}
    teacher = registered_teacher("digits-ResNet8")
    students = [r for r in runs if r.data.tags.get("kd.teacher")]
    assert len(students) == 3
    for run in students:  # created (start_time) only once the teacher was registered
        assert run.info.start_time >= teacher.creation_timestamp, run.info.run_name
    for run in runs:
        assert steps(client, run.info.run_id, "test_acc") == [1, 2]
        assert Path(run.data.tags["ops.job_log"]).is_file()
    if scheduler == "slurm":
        assert len({r.data.tags["ops.job_id"] for r in students}) == 1
    else:
        assert any("\n  wait-for-slot " in out for out in outputs)
        assert len({r.data.tags["ops.job_id"] for r in runs}) == 5


KILLS = """\
experiment: kills
datasets: [digits]
seeds: [0, 1, 2]
teacher: ResNet8
student: ResNet8
pure_student: false
spec: {epochs: 100, batch_size: 16}  # 90 s on one idle core: more than a 1-minute walltime trains of it
job: {walltime: "00:01:00", ncpus: 1, gpus: 0, mem: 1gb, device: cpu}
"""


def test_qdel_scancel_and_walltime_kills_resume_the_same_runs(store, tmp_path):
    """Three 1-minute jobs (qsub): qdel one, scancel one, let the walltime kill the third; the next
    rounds (sbatch, longer walltime) resume the same runs from their checkpoints to the end."""
    grid = write_grid(tmp_path / "kills.yaml", KILLS)
    code, out = kd("submit", "--grid", grid, "--scheduler", "pbs")
    assert code == 0 and out.count("submitted pbs job") == 3, out
    submitted = time.time()
    client = MlflowClient()
    first = {int(r.data.tags["kd.seed"]): r for r in runs_of(client, "kills")}
    ids = {seed: run.info.run_id for seed, run in first.items()}
    jobs = {seed: run.data.tags["ops.job_id"] for seed, run in first.items()}

    def epoch(seed: int) -> int:
        return int(client.get_run(ids[seed]).data.tags.get("kd.epoch", 0))

    # well into the run (so a resume has work behind it) but before the walltime
    wait_for(lambda: epoch(0) >= 2 and epoch(1) >= 2 and time.time() - submitted > 35, 55, "epoch 2 of seeds 0, 1")
    subprocess.run(["qdel", jobs[0]], check=True)
    subprocess.run(["scancel", jobs[1]], check=True)
    wait_for(lambda: all(client.get_run(ids[s]).info.status == "KILLED" for s in (0, 1)), 60, "KILLED runs")
    wait_for(lambda: job_state(jobs[0]) == job_state(jobs[1]) == "CANCELLED", 60, "CANCELLED jobs")
    assert Pbs().live([jobs[0], jobs[1]]) == set()  # qstat shows them as C

    longer = ["--grid", grid, "--scheduler", "slurm", "--set", "walltime=00:10:00"]
    code, out = kd("submit", *longer)
    assert out.count("\n  resume ") == 2 and f"skip-running      teacher-s2-digits-ResNet8  (pbs job {jobs[2]})" in out
    wait_for(lambda: job_state(jobs[2]) == "TIMEOUT", 150, "the walltime kill of seed 2")
    assert 0 < epoch(2) < 100

    submit_until_finished(longer, "kills", 3, tmp_path, max_queued=10, timeout=600)
    runs = runs_of(client, "kills")
    assert {r.info.run_id for r in runs} == set(ids.values())  # resumed, never recreated
    for run in runs:
        assert steps(client, run.info.run_id) == list(range(1, 101)), run.info.run_name
        assert run.data.tags["ops.scheduler"] == "slurm" and run.data.tags["ops.job_id"] not in jobs.values()
        assert f"resuming run {run.info.run_id}" in Path(run.data.tags["ops.job_log"]).read_text()


RACE = """\
experiment: race
datasets: [digits]
seeds: [0, 1, 2, 3, 4, 5]
teacher: ResNet8
student: ResNet8
pure_student: false
spec: {epochs: 200, batch_size: 16}
job: {ncpus: 1, gpus: 0, mem: 1gb, device: cpu}
"""


def test_two_submitters_at_once_never_give_a_spec_two_jobs(store, tmp_path):
    grid = write_grid(tmp_path / "race.yaml", RACE)
    argv = [sys.executable, "-m", "kd.cli", "submit", "--grid", grid, "--scheduler", "slurm", "--max-queued", "4"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    client = MlflowClient()
    try:
        assert [p.returncode for p in procs] == [0, 0], outs
        stdouts = [out for out, _ in outs]
        assert sorted(out.count("submitted slurm job") for out in stdouts) == [0, 4], stdouts
        assert any("6 specs, 4 live job(s) of at most 4" in out for out in stdouts)
        runs = runs_of(client, "race")
        assert len(runs) == 4 and len({r.data.tags["kd.key"] for r in runs}) == 4
        assert len({r.data.tags["ops.job_id"] for r in runs}) == 4
        assert sorted(our_live_jobs(tmp_path)) == sorted(r.data.tags["ops.job_id"] for r in runs)
        code, out = kd("submit", "--grid", grid, "--scheduler", "slurm", "--max-queued", "4")
        assert "skip-running 4, skip-failed 0, wait-for-teacher 0, wait-for-slot 2; 0 job(s)" in out
        assert len(our_live_jobs(tmp_path)) == 4
    finally:
        ours = our_live_jobs(tmp_path)
        if ours:
            subprocess.run(["scancel", *ours], check=True)
