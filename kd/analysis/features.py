"""Representation metrics: how a student's stage features look, and how close they are to its teacher's.

Each run's `best.pth` (and its teacher's) sees one fixed probe batch of test images: `probe_size`
images drawn by a permutation with seed 0, normalised with the dataset's mean and std. Per stage
map (N, C, H, W), with energies summed over all N x C maps so that dead channels weigh nothing:
- `wavelet_hf_energy`: share of the energy in the detail sub-bands (LH, HL, HH) of a one-level
  Haar DWT (PyWavelets, periodization, which keeps energy);
- `spectral_entropy`: Shannon entropy of the summed 2-D FFT power spectrum (DC included),
  divided by log(H*W): 0 for constant maps, 1 for a flat spectrum;
- `lowpass_residual_energy`: share of the energy left in x - gaussian_filter(x, sigma=1 px);
and over all activation values of the stage: `skewness`, `kurtosis` (excess), `iqr`, `cv`
(std / mean), `std` (scipy.stats; population moments). `cka` is linear CKA (Kornblith et al.
2019) between the student's stage and the teacher's stage at the same relative depth.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pywt
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from scipy import ndimage, stats
from torch import nn

from kd.analysis import plots
from kd.analysis.collect import find_teacher_run
from kd.analysis.tables import markdown
from kd.data import DATASETS, load_dataset
from kd.data.augment import normalize
from kd.errors import SpecError
from kd.models import create_model
from kd.models.weights import load_weights_only
from kd.tracking import tags as T

METRICS = ("wavelet_hf_energy", "spectral_entropy", "lowpass_residual_energy", "skewness", "kurtosis", "iqr",
           "cv", "std")
IDENTITY = ["dataset", "role", "model", "teacher", "method", "alpha"]
PROBE_SEED = 0


def share(part: float, total: float) -> float:
    return float(part / total) if total > 0 else 0.0


def wavelet_hf_energy(maps: np.ndarray) -> float:
    approx, details = pywt.dwt2(maps.astype(np.float64), "haar", mode="periodization", axes=(-2, -1))
    high = sum(float(np.square(d).sum()) for d in details)
    return share(high, high + float(np.square(approx).sum()))


def spectral_entropy(maps: np.ndarray) -> float:
    h, w = maps.shape[-2:]
    if h * w < 2:
        return math.nan
    power = np.square(np.abs(np.fft.fft2(maps.astype(np.float64), axes=(-2, -1)))).reshape(-1, h * w).sum(0)
    if power.sum() == 0:
        return 0.0
    p = power[power > 0] / power.sum()
    return float(-(p * np.log(p)).sum() / math.log(h * w))


def lowpass_residual_energy(maps: np.ndarray) -> float:
    x = maps.astype(np.float64)
    residual = x - ndimage.gaussian_filter(x, sigma=(0.0,) * (x.ndim - 2) + (1.0, 1.0), mode="reflect")
    return share(float(np.square(residual).sum()), float(np.square(x).sum()))


def distribution_stats(values: np.ndarray) -> dict[str, float]:
    v = values.astype(np.float64).ravel()
    mean, std = v.mean(), v.std()
    return {
        "skewness": float(stats.skew(v)) if std > 0 else math.nan,
        "kurtosis": float(stats.kurtosis(v)) if std > 0 else math.nan,
        "iqr": float(stats.iqr(v)),
        "cv": float(std / mean) if mean != 0 else math.nan,
        "std": float(std),
    }


def stage_metrics(maps: np.ndarray) -> dict[str, float]:
    """Every metric of one stage's features (N, C, H, W)."""
    return {
        "wavelet_hf_energy": wavelet_hf_energy(maps),
        "spectral_entropy": spectral_entropy(maps),
        "lowpass_residual_energy": lowpass_residual_energy(maps),
        **distribution_stats(maps),
    }


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples (any shapes (n, ...)), through
    the n x n Gram matrices of the centred features: <Kx, Ky>_F / (|Kx|_F |Ky|_F)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    gx, gy = x @ x.T, y @ y.T
    norm = math.sqrt(float((gx * gx).sum()) * float((gy * gy).sum()))
    return float((gx * gy).sum()) / norm if norm > 0 else math.nan


def matched_stage(stage: int, n_student: int, n_teacher: int) -> int:
    """The teacher stage at the same relative depth (0-based): the same index when counts agree."""
    return max(0, round((stage + 1) * n_teacher / n_student) - 1)


def probe_batch(dataset: str, size: int) -> torch.Tensor:
    data = load_dataset(dataset)
    order = torch.randperm(len(data.test_labels), generator=torch.Generator().manual_seed(PROBE_SEED))
    images = data.test_images[order[:size]]
    return normalize(images, torch.tensor(data.mean), torch.tensor(data.std))


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SpecError(f"no run {run_id} in the tracking store: pass run ids from the MLflow UI or runs.csv") from None
    if not run.data.tags.get(T.KEY):
        raise SpecError(f"run {run_id} is not a kd training run (no kd.key tag): pass training runs")
    return run


def load_model(client: MlflowClient, run: Run, tmp: Path) -> nn.Module:
    """The run's best.pth in its model, in eval mode on the CPU."""
    tags = run.data.tags
    info = DATASETS[tags[T.DATASET]]
    model = create_model(tags[T.MODEL], info.num_classes, info.channels, info.image_size)
    try:
        path = client.download_artifacts(run.info.run_id, "best.pth", str(tmp))
    except (MlflowException, OSError):
        raise SpecError(f"run {run.info.run_id} has no best.pth (status {run.info.status}): "
                        "pass finished runs") from None
    model.load_state_dict(load_weights_only(Path(path))["weights"])
    return model.eval()


@torch.no_grad()
def stage_features(model: nn.Module, images: torch.Tensor, device: torch.device) -> list[np.ndarray]:
    return [f.float().cpu().numpy() for f in model.to(device)(images.to(device))[:-1]]


def identity(run: Run) -> dict[str, object]:
    tags = run.data.tags
    return {"run_id": run.info.run_id, "dataset": tags[T.DATASET], "role": tags[T.ROLE],
            "model": tags[T.MODEL], "teacher": tags.get(T.TEACHER, ""), "method": tags[T.METHOD],
            "alpha": float(tags.get(T.ALPHA, 0)), "seed": int(tags.get(T.SEED, 0))}


def measure(
    client: MlflowClient, run_ids: list[str], probe_size: int = 256, device: str = "cpu"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run and stage with every metric and `cka`, the full student x teacher CKA
    grid). The teachers of student runs are measured too, once each."""
    if probe_size < 2:
        raise SpecError("--probe-size must be at least 2 (CKA needs several images)")
    dev = torch.device(device)
    runs = {run_id: get_run(client, run_id) for run_id in run_ids}
    teacher_of = {run_id: find_teacher_run(client, run) for run_id, run in runs.items()}
    for run_id, teacher_id in teacher_of.items():
        if runs[run_id].data.tags.get(T.TEACHER) and teacher_id is None:
            raise SpecError(f"run {run_id} has no registered or finished teacher run: train its teacher first")
        if teacher_id and teacher_id not in runs:
            runs[teacher_id] = get_run(client, teacher_id)
    probes: dict[str, torch.Tensor] = {}
    feats: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="kd-features-") as tmp:
        for run_id, run in runs.items():
            dataset = run.data.tags[T.DATASET]
            if dataset not in probes:
                probes[dataset] = probe_batch(dataset, probe_size)
            model = load_model(client, run, Path(tmp) / run_id)
            feats[run_id] = stage_features(model, probes[dataset], dev)
    rows, grid = [], []
    for run_id, run in runs.items():
        teacher = feats.get(teacher_of.get(run_id) or "")
        for stage, maps in enumerate(feats[run_id]):
            cka = math.nan
            if teacher is not None:
                values = [linear_cka(maps, t_maps) for t_maps in teacher]
                grid += [{"run_id": run_id, "stage": stage + 1, "teacher_stage": t + 1, "cka": v}
                         for t, v in enumerate(values)]
                cka = values[matched_stage(stage, len(feats[run_id]), len(teacher))]
            rows.append({**identity(run), "stage": stage + 1, **stage_metrics(maps), "cka": cka})
    return pd.DataFrame(rows), pd.DataFrame(grid, columns=["run_id", "stage", "teacher_stage", "cka"])


def summarize_features(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric over seeds per (dataset, role, model, teacher, method, alpha, stage)."""
    grouped = per_run.groupby([*IDENTITY, "stage"], sort=True)
    return grouped[[*METRICS, "cka"]].mean().join(grouped.seed.count().rename("n")).reset_index()


def feature_plots(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per dataset and student model: a row per metric, a column per stage; each KD method's
    mean vs alpha, with the pure student (dashed) and the teacher (dotted) as references."""
    written = []
    students = summary[summary.role == "student"]
    for (dataset, model), here in students.groupby(["dataset", "model"]):
        teacher_model = next(iter(sorted(set(here.teacher) - {""})), "")
        teacher = summary[(summary.dataset == dataset) & (summary.role == "teacher") & (summary.model == teacher_model)]
        stages = sorted(set(here.stage))
        names = [*METRICS, "cka"]
        fig, axes = plots.grid_figure(len(names), len(stages), 3.2, 2.4)
        for r, name in enumerate(names):
            for c, stage in enumerate(stages):
                ax = axes[r, c]
                at = here[here.stage == stage]
                for method, part in at[at.teacher != ""].groupby("method"):
                    ax.plot(part.alpha, part[name], marker="o", label=method)
                for ref, style in ((at[at.method == "pure"], "--"), (teacher[teacher.stage == stage], ":")):
                    if len(ref) and not math.isnan(ref[name].iloc[0]):
                        ax.axhline(ref[name].iloc[0], color="0.3", linestyle=style)
                ax.set_title(f"{name}, stage {stage}", fontsize="small")
                ax.tick_params(labelsize="x-small")
        plots.legend(axes[0, 0])
        for ax in axes[-1]:
            ax.set_xlabel("alpha")
        fig.suptitle(f"{dataset}: {model} (dashed: pure student, dotted: teacher {teacher_model})")
        written += plots.save(fig, out / f"features_{dataset}_{model}")
    return written


def write_features(per_run: pd.DataFrame, grid: pd.DataFrame, out: Path) -> list[Path]:
    """features_runs.csv, cka_grid.csv, features.csv / .md (means over seeds) and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_features(per_run)
    written = [out / "features_runs.csv", out / "cka_grid.csv", out / "features.csv", out / "features.md"]
    per_run.to_csv(written[0], index=False)
    grid.to_csv(written[1], index=False)
    summary.to_csv(written[2], index=False)
    header = [*IDENTITY, "stage", "n", *METRICS, "cka"]
    cells = [[("" if math.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v) for v in row]
             for row in summary[header].itertuples(index=False)]
    written[3].write_text("# Feature metrics (mean over seeds)\n\n" + markdown(header, cells))
    return written + feature_plots(summary, out / "plots")
