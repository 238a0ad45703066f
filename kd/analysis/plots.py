"""Figures as PNG and PDF, drawn on `matplotlib.figure.Figure` (the Agg canvas): no pyplot, no
global backend state, so they work the same from cron, a notebook or a test.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient

from kd.analysis.collect import histories, training_runs
from kd.analysis.summaries import epoch_stats
from kd.analysis.tables import Panel, best_kd, panel, panels
from kd.methods.base import LOSS_CE
from kd.tracking import tags as T

P, R = ParamSpec("P"), TypeVar("R")

FORMATS = ("png", "pdf")
# Sizes readable in a thesis page and on a screen: set when the figure is drawn into.
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 9, "figure.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3}
PANEL_COLUMNS = 2  # curves: methods in a grid of this many columns


def styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Draw under STYLE (matplotlib reads font sizes when a text is made, so around the drawing)."""
    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


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
    """Mean curve over runs with a ± sd band (a line only, for a single run)."""
    stats = epoch_stats(curves, run_ids)
    if stats.empty:
        return
    few = len(stats) < 30  # short runs: a marker per epoch, or a 1-epoch run draws nothing
    line = ax.plot(stats.index, stats["mean"], label=f"{label} (n={stats.n.max()})",
                   marker="." if few else None, **style)[0]
    ax.fill_between(stats.index, stats["mean"] - stats.sd.fillna(0), stats["mean"] + stats.sd.fillna(0),
                    color=line.get_color(), alpha=0.2, linewidth=0)


TEACHER_COLOUR, PURE_COLOUR = "0.45", "black"
LINESTYLES = ("--", "-.", ":")  # the recipes of one method in one alpha plot, told apart


def method_colours(summary: pd.DataFrame) -> dict[str, tuple[float, ...]]:
    """One colour per KD method of the report, the same in every panel and figure."""
    methods = sorted(set(summary.method[summary.teacher != ""]))
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {method: cmap(i % cmap.N) for i, method in enumerate(methods)}


def shade(colour: tuple[float, ...], i: int, count: int) -> tuple[float, ...]:
    """The i-th of `count` shades of one colour (dark to light): a method's alphas in its panel."""
    mix = 0.55 * i / max(count - 1, 1)
    return tuple(c + (1.0 - c) * mix for c in colour[:3])


def legend(ax: Axes) -> None:
    """The legend below the axes, where it covers no curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, frameon=False)


def recipe_label(part: pd.DataFrame, differs: pd.Series) -> str:
    """` (epochs=3)` for a group whose recipe differs from a same-named group's, else nothing."""
    note = differs.get(part.recipe.iloc[0], "")
    return f" ({note})" if note else ""


@styled
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
        differs = summary.set_index("recipe").recipe_differs
        colours = method_colours(summary)
        cols = min(PANEL_COLUMNS, len(methods))
        fig, axes = grid_figure(math.ceil(len(methods) / cols), cols, 5.0, 4.2)
        for ax in axes.flat[len(methods):]:
            ax.set_visible(False)
        for ax, method in zip(axes.flat, methods, strict=False):
            if teacher is not None:
                band(ax, curves, here.run_id[(here.role == "teacher") & (here.model == teacher.model)],
                     f"teacher {teacher.model}", color=TEACHER_COLOUR, linestyle=":")
            band(ax, curves, students.run_id[students.method == "pure"], "pure", color=PURE_COLOUR, linestyle="--")
            kd = students[(students.method == method) & (students.teacher != "")]
            groups = list(kd.groupby(["alpha", "recipe"]))
            for i, ((alpha, _), part) in enumerate(groups):
                band(ax, curves, part.run_id, f"α={alpha:g}{recipe_label(part, differs)}",
                     color=shade(colours.get(method, PURE_COLOUR), i, len(groups)))
            ax.set(title=f"{method}", xlabel="epoch", ylabel="test accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            legend(ax)
        fig.suptitle(f"{dataset}: {model}, test accuracy (mean ± sd over seeds)")
        written += save(fig, out / f"curves_{dataset}_{model}")
    return written


def reference_line(ax: Axes, row: pd.Series | None, metric: str, label: str, style: str, colour: str) -> None:
    if row is not None and row.n > 0:
        ax.axhline(row[f"{metric}_mean"], color=colour, linestyle=style, label=f"{label} {row[f'{metric}_mean']:.2f}")


def shown(rows: list[pd.Series | None], metric: str) -> tuple[list[float], list[float]]:
    """Means and sds of the rows that have finished seeds (sd 0 where undefined)."""
    kept = [row for row in rows if row is not None and row.n > 0]
    return [row[f"{metric}_mean"] for row in kept], [np.nan_to_num(row[f"{metric}_std"]) for row in kept]


@styled
def alpha_curves(summary: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per dataset and student model: accuracy vs alpha, a line per KD method (± sd over seeds), the
    pure student and the teacher as lines inside the axes."""
    written = []
    colours = method_colours(summary)
    for dataset, model in panels(summary):
        p: Panel = panel(summary, dataset, model)
        fig, axes = grid_figure(1, 1, 6.0, 4.5)
        ax = axes[0, 0]
        scored = p.kd[p.kd.n > 0]
        # a line per method and recipe but the alpha (what recipe_differs names)
        for i, ((method, note), part) in enumerate(scored.groupby(["method", "recipe_differs"])):
            part = part.sort_values("alpha")
            across = sorted(set(part.d_pure_recipe) - {""})  # the pure line is another recipe's
            label = method + (f" ({note})" if note else "") + (f" (vs pure: {'; '.join(across)})" if across else "")
            ax.errorbar(part.alpha, part[f"{metric}_mean"], yerr=part[f"{metric}_std"].fillna(0), marker="o",
                        capsize=3, color=colours[method], linestyle="-" if not note else LINESTYLES[i % 3],
                        label=label)
        reference_line(ax, p.pure, metric, "pure", "--", PURE_COLOUR)
        reference_line(ax, p.teacher, metric, "teacher", ":", TEACHER_COLOUR)
        means, sds = shown([*(row for _, row in scored.iterrows()), p.pure, p.teacher], metric)
        ax.set(title=f"{dataset}: {model}", xlabel="alpha", ylabel=f"{metric} test accuracy (%)",
               ylim=fitted(means, sds))
        legend(ax)
        written += save(fig, out / f"alpha_{dataset}_{model}")
    return written


def best_label(best: pd.Series | None) -> str:
    """The best KD group, named with its recipe (the key without the seed, and what sets it apart)."""
    if best is None:
        return "best KD"
    lines = ["best KD", f"{best.method} α={best.alpha:g}", f"recipe {best.recipe[:8]}"]
    lines += [best.recipe_differs] if best.recipe_differs else []
    lines += [f"vs {name}: {best[f'd_{name}_recipe']}" for name in ("pure", "teacher") if best[f"d_{name}_recipe"]]
    return "\n".join(lines)


@styled
def baseline_dots(summary: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per dataset and student model: teacher, pure student and best KD group as dots with ± sd error
    bars (a dot plot: the axis is fitted to the spread, which a bar's length from a cut axis would misstate)."""
    written = []
    colours = method_colours(summary)
    for dataset, model in panels(summary):
        p = panel(summary, dataset, model)
        best = best_kd(p.kd, metric)
        entries = [(f"teacher\n{p.teacher.model}" if p.teacher is not None else "teacher", p.teacher, TEACHER_COLOUR),
                   (f"pure\n{model}", p.pure, PURE_COLOUR),
                   (best_label(best), best, colours[best.method] if best is not None else PURE_COLOUR)]
        fig, axes = grid_figure(1, 1, 5.5, 4.5)
        ax = axes[0, 0]
        for x, (_, row, colour) in enumerate(entries):
            if row is None or row.n == 0:
                continue
            mean, sd = row[f"{metric}_mean"], np.nan_to_num(row[f"{metric}_std"])
            ax.errorbar([x], [mean], yerr=[sd], fmt="o", markersize=8, capsize=5, color=colour)
            ax.annotate(f"{mean:.2f} ± {sd:.2f} (n={row.n})", (x, mean), xytext=(8, 0), textcoords="offset points",
                        ha="left", va="center", fontsize="small")
        means, sds = shown([row for _, row, _ in entries], metric)
        ax.set_xticks(range(len(entries)), [label for label, _, _ in entries])
        ax.set(title=f"{dataset}: {model}", ylabel=f"{metric} test accuracy (%)", ylim=fitted(means, sds),
               xlim=(-0.5, len(entries) - 0.2))
        written += save(fig, out / f"dots_{dataset}_{model}")
    return written


def fitted(means: list[float], sds: list[float]) -> tuple[float, float] | None:
    """Limits around every value ± sd with room for labels (a dot plot's axis need not start at 0)."""
    values = [(m, s if not np.isnan(s) else 0.0) for m, s in zip(means, sds, strict=True) if not np.isnan(m)]
    if not values:
        return None
    low, high = min(m - s for m, s in values), max(m + s for m, s in values)
    pad = max(0.15 * (high - low), 0.5)
    return max(low - pad, 0.0), min(high + pad, 100.0 + pad)


# A run's plots: (file, y label, (metric, legend label) per curve). Loss.png compares like with like:
# the training cross-entropy (loss_ce; label-smoothed for pure runs) with the test cross-entropy,
# not the alpha-weighted loss_total, whose scale depends on the method.
RUN_PLOTS = (
    ("Accuracy.png", "accuracy (%)", (("train_acc", "train"), ("test_acc", "test"))),
    ("Loss.png", "cross-entropy", ((LOSS_CE, "train (loss_ce)"), ("test_loss", "test"))),
)
RUN_METRICS = tuple(key for _, _, curves in RUN_PLOTS for key, _ in curves)


@styled
def run_figures(history: dict[str, pd.DataFrame], title: str) -> dict[str, Figure]:
    """A run's `Accuracy.png` and `Loss.png`: train and test curves per epoch (the thesis plots)."""
    figures = {}
    for name, ylabel, lines in RUN_PLOTS:
        fig, axes = grid_figure(1, 1, 6.0, 4.5)
        ax = axes[0, 0]
        for key, label in lines:
            points = history[key]
            ax.plot(points.step, points.value, marker="." if len(points) < 30 else None, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        legend(ax)
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
        history = {key: histories(client, [run_id], key) for key in RUN_METRICS}
        with tempfile.TemporaryDirectory(prefix="kd-plot-") as tmp:
            for name, fig in run_figures(history, run.info.run_name).items():
                fig.savefig(Path(tmp) / name, dpi=120, bbox_inches="tight")
                client.log_artifact(run_id, str(Path(tmp) / name))
        client.set_tag(run_id, T.PLOTTED_EPOCH, epoch)
        plotted += 1
    return plotted, current
