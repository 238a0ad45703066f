"""Thesis tables: accuracy per dataset x model x method x alpha, mean ± std over seeds, with flags.

Rules (docs/analysis.md):
- a group's statistics use its FINISHED runs, one per seed (the newest); std is the sample
  standard deviation (ddof=1), so it is undefined (blank) for a single seed;
- Δ vs pure / vs teacher is paired by seed: the mean over the group's seeds that also have a
  finished pure student (same dataset and model) / teacher (same dataset, the `kd.teacher`
  model) of the difference of accuracies. A pure student's teacher is the one teacher model its
  dataset's KD students of the same model name, if there is exactly one;
- flags: collapsed = best accuracy below `collapse_factor` x chance (100 / classes); unfinished =
  a seed whose run exists but is not FINISHED; missing = an expected seed with no run at all
  (expected: `--seeds`, else every seed seen on the dataset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kd.analysis.collect import NOT_RECIPE, same_spelling
from kd.spec import COLLAPSE_FACTOR, TEACHER_SHARED

SCIENCE = ["dataset", "role", "model", "teacher", "method", "alpha"]
GROUP = [*SCIENCE, "recipe"]  # runs are averaged only with runs of the same recipe (all but the seed)
BASELINE_INDEX = ["dataset", "model", "seed"]
METRICS = ("final", "best")


def newest(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per value of `columns`: the newest run."""
    return frame.sort_values("start_time").drop_duplicates(columns, keep="last")


def shared_params(runs: pd.DataFrame) -> list[str]:
    """The params a student shares with its teacher and its pure baseline (epochs, batch, optimiser,
    schedule, ...): a Δ between runs that differ in them compares two recipes."""
    return [f"params.{name}" for name in TEACHER_SHARED if name not in BASELINE_INDEX and f"params.{name}" in runs]


def baseline(runs: pd.DataFrame, mask: pd.Series) -> pd.DataFrame:
    """Accuracies and shared params of finished baseline runs by (dataset, model, seed)."""
    chosen = newest(runs[mask & runs.finished], BASELINE_INDEX)
    return chosen.set_index(BASELINE_INDEX)[["final_acc", "best_acc", *shared_params(runs)]]


def paired_delta(done: pd.DataFrame, base: pd.DataFrame, dataset: str, model: str) -> tuple[pd.Series, str]:
    """Mean over shared seeds of (group accuracy - baseline accuracy), per metric, and where the
    paired baselines' recipe differs from the group's (`epochs 15 vs 3`; empty: the same recipe)."""
    ref = base.reindex([(dataset, model, s) for s in done.seed])
    diff = done[["final_acc", "best_acc"]].to_numpy() - ref[["final_acc", "best_acc"]].to_numpy()
    paired = ref.final_acc.notna().to_numpy()
    gaps = []
    for column in base.columns[2:]:
        mine, theirs = done[column][paired].fillna(""), ref[column][paired].fillna("")
        if set(mine.map(same_spelling)) != set(theirs.map(same_spelling)):
            gaps.append(f"{column.removeprefix('params.')} {'/'.join(sorted(set(mine)))} vs "
                        f"{'/'.join(sorted(set(theirs)))}")
    return pd.DataFrame(diff, columns=list(METRICS)).mean(), ", ".join(gaps)


def seed_list(seeds: Sequence[int]) -> str:
    return ",".join(str(s) for s in sorted(seeds))


def recipe_differences(runs: pd.DataFrame) -> dict[tuple, str]:
    """For a (dataset, role, model, teacher, method, alpha) trained with several recipes: per
    recipe, the params that set it apart (`epochs=3`), so its row says why it stands alone."""
    columns = [c for c in runs.columns if c.startswith("params.") and c.removeprefix("params.") not in NOT_RECIPE]
    notes = {}
    for key, part in runs.groupby(SCIENCE, sort=False):
        recipes = part.drop_duplicates("recipe").set_index("recipe")[columns].fillna("")
        if len(recipes) < 2:
            continue
        differing = [c for c in columns if recipes[c].map(same_spelling).nunique() > 1]
        for name, values in recipes.iterrows():
            notes[(*key, name)] = ", ".join(f"{c.removeprefix('params.')}={values[c]}" for c in differing)
    return notes


def summarize(
    runs: pd.DataFrame, seeds: Sequence[int] | None = None, collapse_factor: float = COLLAPSE_FACTOR
) -> pd.DataFrame:
    """One row per group (dataset, role, model, teacher, method, alpha, recipe) of the runs; a
    group that shares all but its recipe with another is flagged with what differs."""
    differences = recipe_differences(runs)
    teachers = baseline(runs, runs.role == "teacher")
    pures = baseline(runs, (runs.role == "student") & (runs.method == "pure"))
    named = runs[runs.teacher != ""].groupby(["dataset", "model"]).teacher.unique()
    expected = {d: set(seeds) if seeds else set(g.seed) for d, g in runs.groupby("dataset")}
    rows = []
    for values, group in runs.groupby(GROUP, sort=True):
        row = dict(zip(GROUP, values, strict=True))
        dataset, model = row["dataset"], row["model"]
        done = newest(group[group.finished], ["seed"]).sort_values("seed")
        teacher = row["teacher"]
        if row["role"] == "student" and not teacher:
            options = named.get((dataset, model), [])
            teacher = options[0] if len(options) == 1 else ""
        d_pure, pure_gap = paired_delta(done, pures, dataset, model) if row["teacher"] else (None, "")
        d_teacher, teacher_gap = paired_delta(done, teachers, dataset, teacher) if teacher else (None, "")
        stuck = newest(group[~group.seed.isin(done.seed)], ["seed"]).sort_values("seed")
        collapsed = done[done.best_acc < collapse_factor * done.chance]
        row.update(
            n=len(done),
            seeds=seed_list(done.seed),
            final_mean=done.final_acc.mean(),
            final_std=done.final_acc.std(ddof=1),
            best_mean=done.best_acc.mean(),
            best_std=done.best_acc.std(ddof=1),
            **{f"d_pure_{m}": math.nan if d_pure is None else d_pure[m] for m in METRICS},
            **{f"d_teacher_{m}": math.nan if d_teacher is None else d_teacher[m] for m in METRICS},
            reference_teacher=teacher,
            d_pure_recipe=pure_gap,
            d_teacher_recipe=teacher_gap,
            collapsed=seed_list(collapsed.seed),
            recipe_differs=differences.get(values, ""),
            unfinished=", ".join(f"{r.seed} ({r.status} {r.epoch}/{r.epochs})" for r in stuck.itertuples()),
            missing=seed_list(expected.get(dataset, set()) - set(group.seed)),
        )
        rows.append(row)
    return ordered(pd.DataFrame(rows))


def ordered(summary: pd.DataFrame) -> pd.DataFrame:
    """Thesis order per dataset and teacher: the teacher, then per student model its pure run and
    its KD groups by method and alpha."""
    if summary.empty:
        return summary
    lineage = summary.model.where(summary.role == "teacher", summary.reference_teacher)
    rank = (summary.role != "teacher").astype(int) + (summary.teacher != "").astype(int)
    keys = pd.DataFrame({"dataset": summary.dataset, "lineage": lineage, "first": rank > 0, "model": summary.model,
                         "rank": rank, "method": summary.method, "alpha": summary.alpha})
    return summary.loc[keys.sort_values(list(keys.columns)).index].reset_index(drop=True)


def seed_flags(row: pd.Series) -> list[str]:
    """A group's collapsed, unfinished and missing seeds, and Δ columns that compare another recipe."""
    parts = [f"{name} seeds {row[name]}" for name in ("collapsed", "unfinished", "missing") if row[name]]
    return parts + [f"Δ {name} across recipes: {row[f'd_{name}_recipe']}" for name in ("pure", "teacher")
                    if row[f"d_{name}_recipe"]]


def flags(row: pd.Series) -> str:
    separate = [f"separate recipe: {row.recipe_differs}"] if row.recipe_differs else []
    return "; ".join(separate + seed_flags(row))


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def signed(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.2f}"


def model_cell(row: pd.Series) -> str:
    return f"{row.teacher} → {row.model}" if row.teacher else row.model


def method_cell(row: pd.Series) -> str:
    return "teacher" if row.role == "teacher" else row.method


def alpha_cell(row: pd.Series) -> str:
    return f"{row.alpha:g}" if row.teacher else ""


def display(summary: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of one dataset's table; Δ columns use `metric` (final | best)."""
    header = ["Model", "Method", "α", "n", "Final (%)", "Best (%)", f"Δ pure ({metric})",
              f"Δ teacher ({metric})", "Flags"]
    cells = [
        [model_cell(r), method_cell(r), alpha_cell(r), str(r.n), mean_std(r.final_mean, r.final_std),
         mean_std(r.best_mean, r.best_std), signed(r[f"d_pure_{metric}"]), signed(r[f"d_teacher_{metric}"]),
         flags(r)]
        for _, r in summary.iterrows()
    ]
    return header, cells


def markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *cells]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines) + "\n"


LATEX_REPLACEMENTS = (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                      ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("α", r"$\alpha$"), ("→", r"$\to$"), ("—", "--"))


def latex_text(text: str) -> str:
    for old, new in LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def latex(header: list[str], cells: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); text columns left, numbers right."""
    align = "".join("l" if i in (0, 1, len(header) - 1) else "r" for i in range(len(header)))
    body = [" & ".join(latex_text(c) for c in line) + r" \\" for line in cells]
    return "\n".join([
        r"\begin{table}[ht]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
        " & ".join(latex_text(h) for h in header) + r" \\", r"\midrule", *body, r"\bottomrule",
        r"\end{tabular}", rf"\caption{{{latex_text(caption)}}}", rf"\label{{{label}}}", r"\end{table}", "",
    ])


def write_tables(runs: pd.DataFrame, summary: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """runs.csv, summary.csv, summary.md (a section per dataset) and tables/{dataset}.tex."""
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = [out / "runs.csv", out / "summary.csv", out / "summary.md"]
    runs.to_csv(written[0], index=False)
    summary.to_csv(written[1], index=False)
    sections = []
    for dataset, part in summary.groupby("dataset", sort=True):
        header, cells = display(part, metric)
        sections.append(f"## {dataset}\n\n{markdown(header, cells)}")
        caption = (f"Test accuracy on {dataset}: mean ± sample std (ddof=1) over n seeds; "
                   f"Δ is paired by seed on the {metric} accuracy.")
        tex = out / "tables" / f"{dataset}.tex"
        tex.write_text(latex(header, cells, caption, f"tab:kd-{dataset}"))
        written.append(tex)
    note = (f"Mean ± sample standard deviation (ddof=1) over seeds; Δ columns are paired by seed "
            f"on the {metric} test accuracy.\n\n")
    written[2].write_text("# Accuracy by dataset, method and alpha\n\n" + note + "\n".join(sections))
    return written


def panels(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, student model) pairs with student rows: one figure / report entry each."""
    students = summary[summary.role == "student"]
    return sorted(set(zip(students.dataset, students.model, strict=True)))


@dataclass
class Panel:
    """One student model on one dataset: its KD groups, its pure student and its teacher."""

    kd: pd.DataFrame
    pure: pd.Series | None
    teacher: pd.Series | None


def panel(summary: pd.DataFrame, dataset: str, model: str) -> Panel:
    """The teacher is the one the KD students name (the most common if several), else the pure
    student's reference teacher."""
    here = summary[(summary.dataset == dataset) & (summary.role == "student") & (summary.model == model)]
    kd = here[here.teacher != ""]
    pure = here[here.method == "pure"]
    pure_row = pure.iloc[0] if len(pure) else None
    teacher = kd.teacher.mode().iloc[0] if len(kd) else (pure_row.reference_teacher if pure_row is not None else "")
    teachers = summary[(summary.dataset == dataset) & (summary.role == "teacher") & (summary.model == teacher)]
    return Panel(kd, pure_row, teachers.iloc[0] if len(teachers) else None)


def best_kd(kd: pd.DataFrame, metric: str) -> pd.Series | None:
    """The KD group (method, alpha) with the highest mean accuracy."""
    scored = kd[kd.n > 0]
    return scored.loc[scored[f"{metric}_mean"].idxmax()] if len(scored) else None


ENVIRONMENT = ["gpu", "gpu_driver", "torch", "cuda", "cudnn", "precision", "cudnn_deterministic", "version"]


def methodology(runs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and computing environment (GPU, driver, torch / CUDA / cuDNN, precision, cuDNN
    determinism, kd version): how many finished runs, their total and median training time."""
    done = runs[runs.finished].assign(**{c: runs[c].replace("", "unknown") for c in ENVIRONMENT})
    table = done.groupby(["dataset", *ENVIRONMENT]).agg(runs=("run_id", "size"), hours=("train_time", "sum"),
                                                        median_minutes=("train_time", "median")).reset_index()
    table["hours"] /= 3600.0
    table["median_minutes"] /= 60.0
    return table


def write_methodology(runs: pd.DataFrame, out: Path) -> list[Path]:
    """methodology.csv and methodology.md: the machines and versions behind each dataset's numbers."""
    table = methodology(runs)
    header = ["Dataset", "GPU", "Driver", "torch", "CUDA", "cuDNN", "Precision", "cuDNN deterministic", "kd",
              "Runs", "Training hours", "Median minutes"]
    cells = [[*(str(r[c]) for c in ["dataset", *ENVIRONMENT]), str(r.runs), f"{r.hours:.2f}",
              f"{r.median_minutes:.1f}"] for _, r in table.iterrows()]
    paths = [out / "methodology.csv", out / "methodology.md"]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(paths[0], index=False)
    paths[1].write_text("# Computing environment per dataset\n\nFinished runs; training time is the sum of "
                        "their epoch times.\n\n" + markdown(header, cells))
    return paths

