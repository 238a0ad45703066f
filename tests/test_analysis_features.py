"""Feature-map metrics and CKA on known arrays; then `kd analyze features` and the analysis notebook
on a store produced by real (short) digits runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient
from scipy import ndimage

from kd.analysis import cli
from kd.analysis.collect import analysis_experiment
from kd.analysis.features import (
    distribution_stats,
    linear_cka,
    lowpass_residual_energy,
    matched_stage,
    spectral_entropy,
    stage_metrics,
    wavelet_hf_energy,
)
from kd.engine.job import run_specs
from kd.spec import RunSpec, SpecError
from kd.tracking.store import get_client
from tests.conftest import CPU

# one worker: its module fixtures train once, not once per xdist worker
pytestmark = pytest.mark.xdist_group("analysis_features")

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)


def test_constant_maps_have_no_high_frequencies() -> None:
    maps = np.full((2, 3, 8, 8), 5.0)
    assert wavelet_hf_energy(maps) == 0.0
    assert spectral_entropy(maps) == 0.0
    assert lowpass_residual_energy(maps) == pytest.approx(0.0, abs=1e-12)
    assert wavelet_hf_energy(np.zeros((1, 1, 4, 4))) == 0.0  # no energy at all: no share either


def test_wavelet_energy_matches_a_direct_haar_transform() -> None:
    x = rng.normal(size=(2, 3, 8, 6))
    blocks = x.reshape(2, 3, 4, 2, 3, 2)  # 2x2 blocks; orthonormal Haar: approx = block sum / 2
    approx_energy = np.square(blocks.sum(axis=(3, 5)) / 2).sum()
    assert wavelet_hf_energy(x) == pytest.approx(1 - approx_energy / np.square(x).sum())
    checkerboard = np.indices((8, 8)).sum(0) % 2 * 2.0 - 1.0  # all energy at the finest scale
    assert wavelet_hf_energy(checkerboard[None, None]) == pytest.approx(1.0)


def test_spectral_entropy_of_known_spectra() -> None:
    delta = np.zeros((1, 1, 8, 8))
    delta[0, 0, 3, 5] = 1.0  # flat spectrum
    assert spectral_entropy(delta) == pytest.approx(1.0)
    cosine = np.cos(2 * np.pi * np.arange(8) / 4)[None, :] * np.ones((8, 1))  # two equal peaks in 64 bins
    assert spectral_entropy(cosine[None, None]) == pytest.approx(math.log(2) / math.log(64))
    assert math.isnan(spectral_entropy(np.ones((2, 2, 1, 1))))  # a 1x1 map has no spectrum


def test_lowpass_residual_matches_a_per_map_filter() -> None:
    x = rng.normal(size=(2, 2, 6, 6))
    residual = sum(np.square(m - ndimage.gaussian_filter(m, 1.0, mode="reflect")).sum() for m in x.reshape(-1, 6, 6))
    assert lowpass_residual_energy(x) == pytest.approx(residual / np.square(x).sum())


def test_distribution_statistics_against_moments() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    d = v - v.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    got = distribution_stats(v.reshape(1, 1, 1, 5))
    assert got["skewness"] == pytest.approx(m3 / m2**1.5)
    assert got["kurtosis"] == pytest.approx(m4 / m2**2 - 3)
    assert got["iqr"] == pytest.approx(4.0 - 2.0)
    assert got["std"] == pytest.approx(math.sqrt(m2))
    assert got["cv"] == pytest.approx(math.sqrt(m2) / 4.0)
    flat = distribution_stats(np.ones(6))
    assert math.isnan(flat["skewness"]) and flat["std"] == 0.0
    assert set(stage_metrics(rng.normal(size=(2, 2, 4, 4)))) == {
        "wavelet_hf_energy", "spectral_entropy", "lowpass_residual_energy", "skewness", "kurtosis", "iqr", "cv", "std"}


def test_linear_cka_properties() -> None:
    x = rng.normal(size=(40, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # orthogonal transforms
    assert linear_cka(x, 3.7 * x + 2.0) == pytest.approx(1.0)  # isotropic scaling (and a shift)
    y = rng.normal(size=(40, 7))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_space = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(feature_space)
    assert linear_cka(x, y) < 0.9
    maps = rng.normal(size=(10, 4, 3, 3))  # stage maps are flattened per example
    assert linear_cka(maps, maps.reshape(10, -1) @ np.linalg.qr(rng.normal(size=(36, 36)))[0]) == pytest.approx(1.0)


def test_stages_match_by_relative_depth() -> None:
    assert [matched_stage(i, 3, 3) for i in range(3)] == [0, 1, 2]
    assert [matched_stage(i, 3, 4) for i in range(3)] == [0, 2, 3]
    assert [matched_stage(i, 4, 2) for i in range(4)] == [0, 0, 1, 1]


# --- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A ResNet8 teacher and a logit-KD ResNet8 student trained for 2 epochs on digits."""
    root = tmp_path_factory.mktemp("digits-store")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    patch.chdir(root)
    common = dict(dataset="digits", model="ResNet8", epochs=2, batch_size=64)
    teacher = run_specs([RunSpec.create(role="teacher", **common)], experiment="kd", options=CPU)[0]
    student = run_specs([RunSpec.create(teacher="ResNet8", method="logit", alpha=0.5, **common)],
                        experiment="kd", options=CPU)[0]
    yield {"root": root, "teacher": teacher.run_id, "student": student.run_id}
    patch.undo()


def kd(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_analyze_features_on_real_runs(digits_store: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(digits_store["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    out = root / "features"
    assert kd("analyze", "features", "--runs", digits_store["student"], "--probe-size", "64",
              "--out", str(out), "--device", "cpu") == 0
    per_run = pd.read_csv(out / "features_runs.csv")
    student = per_run[per_run.run_id == digits_store["student"]]
    teacher = per_run[per_run.run_id == digits_store["teacher"]]  # measured as the student's reference
    assert list(student.stage) == [1, 2, 3] and list(teacher.stage) == [1, 2, 3]
    assert set(student.method) == {"logit"} and set(teacher.role) == {"teacher"}
    assert student.cka.between(0, 1 + 1e-9).all() and teacher.cka.isna().all()
    grid = pd.read_csv(out / "cka_grid.csv")
    assert len(grid) == 9
    diagonal = grid[grid.stage == grid.teacher_stage].set_index("stage").cka
    assert np.allclose(diagonal.loc[student.stage].to_numpy(), student.cka.to_numpy())
    assert student[["wavelet_hf_energy", "spectral_entropy", "lowpass_residual_energy"]].stack().between(0, 1).all()
    assert (student["std"] > 0).all()
    summary = pd.read_csv(out / "features.csv")
    assert len(summary) == 6 and set(summary.n) == {1}
    for fmt in ("png", "pdf"):
        assert (out / "plots" / f"features_digits_ResNet8.{fmt}").stat().st_size > 1000
    client: MlflowClient = get_client()
    logged = client.search_runs([client.get_experiment_by_name(analysis_experiment("kd")).experiment_id],
                                "tags.`kd.analysis` = 'features'")  # beside the training runs, not among them
    assert len(logged) == 1
    assert {"features.csv", "features_runs.csv", "cka_grid.csv", "features.md", "plots"} <= {
        f.path for f in client.list_artifacts(logged[0].info.run_id)}
    with pytest.raises(SpecError, match="no run nonexistent"):
        kd("analyze", "features", "--runs", "nonexistent", "--out", str(out))


def test_notebook_runs_top_to_bottom(digits_store: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(digits_store["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, alpha, bars, features
    assert (root / "analysis-notebook" / "report.json").exists()
    assert (root / "analysis-notebook" / "features" / "features.csv").exists()
