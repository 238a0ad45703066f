"""Figures as PNG and PDF, drawn on `matplotlib.figure.Figure` (the Agg canvas): no pyplot, no
global backend state, so they work the same from cron, a notebook or a test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient

from kd.analysis.collect import histories, training_runs
from kd.analysis.tables import Panel, best_kd, panel, panels
from kd.tracking import tags as T

FORMATS = ("png", "pdf")


def save(fig: Figure, stem: Path) -> list[Path]:
    """The figure as stem.png and stem.pdf."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def grid_figure(rows: int, cols: int, width: float = 4.0, height: float = 3.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def band(ax: Axes, curves: pd.DataFrame, run_ids: pd.Series, label: str, **style: object) -> None:
    """Mean curve over runs with a ± std band (a line only, for a single run)."""
    points = curves[curves.run_id.isin(run_ids)]
    if points.empty:
        return
    stats = points.groupby("step").value.agg(["mean", "std"])
    line = ax.plot(stats.index, stats["mean"], label=f"{label} (n={points.run_id.nunique()})", **style)[0]
    ax.fill_between(stats.index, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                    color=line.get_color(), alpha=0.2, linewidth=0)


def legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def accuracy_curves(runs: pd.DataFrame, curves: pd.DataFrame, summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per dataset and student model: a panel per KD method with a curve per alpha, the pure
    student and the teacher as references (finished runs; band = ± std over seeds)."""
    done = runs[runs.finished]
    written = []
    for dataset, model in panels(summary):
        here = done[done.dataset == dataset]
        students = here[(here.role == "student") & (here.model == model)]
        methods = sorted(set(students.method[students.teacher != ""])) or ["pure"]
        teacher = panel(summary, dataset, model).teacher
        fig, axes = grid_figure(1, len(methods))
        for ax, method in zip(axes[0], methods, strict=True):
            if teacher is not None:
                band(ax, curves, here.run_id[(here.role == "teacher") & (here.model == teacher.model)],
                     f"teacher {teacher.model}", color="0.4", linestyle=":")
            band(ax, curves, students.run_id[students.method == "pure"], "pure", color="black", linestyle="--")
            kd = students[(students.method == method) & (students.teacher != "")]
            for alpha, part in kd.groupby("alpha"):
                band(ax, curves, part.run_id, f"α={alpha:g}")
            ax.set(title=f"{method}", xlabel="epoch", ylabel="test accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            legend(ax)
        fig.suptitle(f"{dataset}: {model}, test accuracy (mean ± std over seeds)")
        written += save(fig, out / f"curves_{dataset}_{model}")
    return written


def reference_line(ax: Axes, row: pd.Series | None, metric: str, label: str, style: str) -> None:
    if row is not None and row.n > 0:
        ax.axhline(row[f"{metric}_mean"], color="0.3", linestyle=style, label=f"{label} {row[f'{metric}_mean']:.2f}")


def alpha_curves(summary: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per dataset and student model: accuracy vs alpha, a line per KD method (± std over seeds)."""
    written = []
    for dataset, model in panels(summary):
        p: Panel = panel(summary, dataset, model)
        fig, axes = grid_figure(1, 1, 6.0, 4.0)
        ax = axes[0, 0]
        for method, part in p.kd[p.kd.n > 0].groupby("method"):
            part = part.sort_values("alpha")
            ax.errorbar(part.alpha, part[f"{metric}_mean"], yerr=part[f"{metric}_std"].fillna(0), marker="o",
                        capsize=3, label=method)
        reference_line(ax, p.pure, metric, "pure", "--")
        reference_line(ax, p.teacher, metric, "teacher", ":")
        ax.set(title=f"{dataset}: {model}", xlabel="alpha", ylabel=f"{metric} test accuracy (%)")
        legend(ax)
        written += save(fig, out / f"alpha_{dataset}_{model}")
    return written


def baseline_bars(summary: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per dataset and student model: teacher, pure student and best KD group, ± std."""
    written = []
    for dataset, model in panels(summary):
        p = panel(summary, dataset, model)
        best = best_kd(p.kd, metric)
        bars = [(f"teacher\n{p.teacher.model}" if p.teacher is not None else "teacher", p.teacher),
                (f"pure\n{model}", p.pure),
                (f"best KD\n{best.method} α={best.alpha:g}" if best is not None else "best KD", best)]
        means = [row[f"{metric}_mean"] if row is not None else np.nan for _, row in bars]
        stds = [row[f"{metric}_std"] if row is not None else np.nan for _, row in bars]
        fig, axes = grid_figure(1, 1, 5.0, 4.0)
        ax = axes[0, 0]
        ax.bar([label for label, _ in bars], np.nan_to_num(means), yerr=np.nan_to_num(stds), capsize=4,
               color=["0.5", "0.75", "tab:blue"])
        for x, (mean, std) in enumerate(zip(means, np.nan_to_num(stds), strict=True)):
            if not np.isnan(mean):
                ax.annotate(f"{mean:.2f}", (x, mean + std), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize="small")
        ax.set(title=f"{dataset}: {model}", ylabel=f"{metric} test accuracy (%)")
        written += save(fig, out / f"bars_{dataset}_{model}")
    return written


def run_figures(history: dict[str, pd.DataFrame], title: str) -> dict[str, Figure]:
    """A run's `Accuracy.png` and `Loss.png`: train and test curves per epoch (the thesis plots)."""
    figures = {}
    for name, quantity, unit in (("Accuracy.png", "acc", " (%)"), ("Loss.png", "loss", "")):
        fig, axes = grid_figure(1, 1, 6.0, 4.0)
        ax = axes[0, 0]
        for split in ("train", "test"):
            points = history[f"{split}_{quantity}"]
            ax.plot(points.step, points.value, label=split)
        ax.set(title=title, xlabel="epoch", ylabel=f"{quantity}{unit}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        figures[name] = fig
    return figures


def plot_runs(client: MlflowClient, experiment: str, grid: str | None = None, force: bool = False) -> tuple[int, int]:
    """Log `Accuracy.png` and `Loss.png` into every run whose `kd.epoch` moved since its last plot
    (tag `ops.plotted_epoch`), so a cron job redraws only what changed. Returns (plotted, up to date)."""
    plotted = current = 0
    for run in training_runs(client, experiment):
        tags = run.data.tags
        epoch = tags.get(T.EPOCH)
        if not epoch or (grid and tags.get(T.GRID) != grid):
            continue
        if epoch == tags.get(T.PLOTTED_EPOCH) and not force:
            current += 1
            continue
        run_id = run.info.run_id
        history = {key: histories(client, [run_id], key)
                   for key in ("train_acc", "test_acc", "train_loss", "test_loss")}
        with tempfile.TemporaryDirectory(prefix="kd-plot-") as tmp:
            for name, fig in run_figures(history, run.info.run_name).items():
                fig.savefig(Path(tmp) / name, dpi=120, bbox_inches="tight")
                client.log_artifact(run_id, str(Path(tmp) / name))
        client.set_tag(run_id, T.PLOTTED_EPOCH, epoch)
        plotted += 1
    return plotted, current
