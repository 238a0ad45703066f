"""`kd bench --device cpu`: a smoke run in CI that prints every pipeline and its ratio (no timing asserted)."""

from __future__ import annotations

import json

from kd.cli import main
from tests.conftest import run_kd


def test_bench_on_the_cpu_prints_both_pipelines_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    done = run_kd("bench", "--device", "cpu", "--steps", "2", "--warmup", "1", "--teacher", "ResNet20",
                  "--student", "ResNet8", "--students", "2", "--batch-size", "32", "--images", "256",
                  "--json", str(out), timeout=300, env={"KD_BENCH_FILE": str(tmp_path / "kept.json")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for label in ("reference: DataLoader (2 workers) + torchvision, fp32, eager",
                  "engine solo: resident data, fp32, eager: no CUDA device (cpu)",
                  "engine packed x2: resident data, fp32, eager: no CUDA device (cpu)"):
        [row] = [line for line in lines if line.startswith(label)]
        assert row.endswith("x") and float(row.split()[-1].rstrip("x")) > 0, row
    assert any(line.startswith("on the CPU, for information only: engine solo is") for line in lines)
    summary = json.loads(out.read_text())
    assert summary["device"] == "cpu" and summary["batch_size"] == 32 and summary["students"] == 2
    assert [r["pipeline"] for r in summary["results"]] == ["reference", "solo", "packed"]
    assert [r["students"] for r in summary["results"]] == [1, 1, 2]
    assert summary["results"][0]["ratio"] == 1.0
    assert all(r["images_per_s"] > 0 and r["cudnn_deterministic"] is None for r in summary["results"])
    kept = json.loads((tmp_path / "kept.json").read_text())  # kd submit --dry-run's estimates read it
    assert list(kept) == [summary["device_name"]] and kept[summary["device_name"]]["results"] == summary["results"]


def test_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "--device", "cpu", "--student", "ResNet9000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ResNet9000" in err, err
    assert main(["bench", "--device", "cpu", "--method", "mlkd"]) == 2  # its strong view: not in the thesis loop
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "method 'mlkd' needs it" in err, err
