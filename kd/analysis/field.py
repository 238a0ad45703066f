"""The field's CIFAR-100 table beside kd's: `kd report` writes field.md and field.csv and prints them.

The published numbers are package data (published_cifar100.yaml), each with its source (repository
README and paper). Per (teacher -> student, method) and kd group (alpha, recipe): the published top-1,
kd's mean ± sample sd over seeds of the best-epoch and the last-epoch accuracy (the sources do not
say which they report, so both are shown, labelled), the number of seeds and kd - published. A
difference is flagged where it lies outside SPREAD sd of kd's runs, rests on fewer than MIN_SEEDS
seeds, or compares a kd recipe other than the sources'. kd's runs on another dataset get the same
table with the published columns empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kd.analysis.tables import markdown, mean_std, seed_flags, signed

PUBLISHED = Path(__file__).with_name("published_cifar100.yaml")
DATASET = "cifar100"  # the dataset the published numbers are for
MIN_SEEDS = 3
SPREAD = 2.0  # a difference outside this many of kd's sample sds is flagged
METRICS = (("best", "best epoch"), ("final", "last epoch"))
TEACHER, PURE = "teacher", "pure"  # the kd methods of the models trained alone (`methods` in the data)


@dataclass(frozen=True)
class Source:
    name: str
    repository: str
    paper: str
    reports: str  # what the source says its numbers are (epoch, runs)


@dataclass(frozen=True)
class Published:
    source: Source
    teacher: str
    student: str
    method: str  # as the source names it
    kd_method: str | None  # kd's method for it (teacher, pure, logit, ...); None where kd has none
    kd_options: dict[str, Any]  # the method options that make kd's method the source's (KD+LS)
    top1: float

    def matches(self, group: pd.Series, params: pd.Series) -> bool:
        """Whether a kd group (and its recipe's params) trains what this row published."""
        return kd_method(group) == self.kd_method and all(
            same_value(params.get(f"params.{name}"), value) for name, value in self.kd_options.items())


@dataclass(frozen=True)
class Field:
    """The published table and the recipe its sources train with."""

    rows: list[Published]
    sources: dict[str, Source]
    recipe: dict[str, Any]
    lr_by_model: dict[str, float]

    def pairs(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((r.teacher, r.student) for r in self.rows))

    def expected(self, model: str, distilling: bool) -> dict[str, Any]:
        """The sources' recipe for training `model` (temperature only when distilling)."""
        recipe = {**self.recipe, "lr": self.lr_by_model.get(model, self.recipe["lr"])}
        return recipe if distilling else {k: v for k, v in recipe.items() if k != "temperature"}


def load_field(path: Path = PUBLISHED) -> Field:
    """The published rows, one per (source, pair, method) with a number, with their sources."""
    data = yaml.safe_load(path.read_text())
    sources = {name: Source(name, **fields) for name, fields in data["sources"].items()}
    rows = []
    for table in data["tables"]:
        pairs = [tuple(pair.split(" -> ")) for pair in table["pairs"]]
        for method, values in table["rows"].items():
            kd = data["methods"].get(method, {})
            rows += [Published(sources[table["source"]], teacher, student, method, kd.get("method"),
                               kd.get("options", {}), float(top1))
                     for (teacher, student), top1 in zip(pairs, values, strict=True) if top1 is not None]
    return Field(rows, sources, data["recipe"], data["lr_by_model"])


def same_value(text: object, expected: object) -> bool:
    """A param as MLflow holds it (text) against a recipe value from YAML."""
    value = yaml.safe_load(text) if isinstance(text, str) else text
    if isinstance(expected, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(value, expected, rel_tol=1e-9)
    return value == expected


def recipe_gaps(params: pd.Series, model: str, distilling: bool, field: Field) -> str:
    """`epochs=3, lr=0.1`: where a kd recipe (a run's `params.*`) differs from the sources'."""
    return ", ".join(f"{name}={params.get(f'params.{name}')}"
                     for name, value in field.expected(model, distilling).items()
                     if not same_value(params.get(f"params.{name}"), value))


def pair_groups(summary: pd.DataFrame, teacher: str, student: str) -> pd.DataFrame:
    """kd's groups of one pair: the teacher alone, the student alone (pure) and its KD groups."""
    alone = (summary.role == "teacher") & (summary.model == teacher)
    pure = (summary.role == "student") & (summary.model == student) & (summary.method == PURE)
    taught = (summary.model == student) & (summary.teacher == teacher)
    return summary[alone | pure | taught]


def kd_method(group: pd.Series) -> str:
    return TEACHER if group.role == "teacher" else group.method


def difference_flags(published: Published | None, group: pd.Series, gaps: str) -> list[str]:
    """Why kd - published says little: few seeds, outside SPREAD sd, another recipe."""
    parts = [f"{group.n} seeds < {MIN_SEEDS}"] if group.n < MIN_SEEDS else []
    if published is None:
        return parts
    for metric, label in METRICS:
        sd = group[f"{metric}_std"]
        if not math.isnan(sd) and abs(group[f"{metric}_mean"] - published.top1) > SPREAD * sd:
            parts.append(f"Δ {label} outside {SPREAD:g} sd")
    if gaps:
        parts.append(f"not the sources' recipe: {gaps}")
    return parts


def table_row(dataset: str, teacher: str, student: str, published: Published | None, group: pd.Series | None,
              gaps: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "dataset": dataset, "teacher": teacher, "student": student,
        "method": published.method if published else kd_method(group),
        "kd_method": published.kd_method if published else kd_method(group),
        "alpha": math.nan if group is None or group.role == "teacher" or group.method == PURE else group.alpha,
        "published": published.top1 if published else math.nan,
        "source": published.source.name if published else "",
        "n": 0 if group is None else int(group.n),
    }
    for metric, _ in METRICS:
        mean = math.nan if group is None else group[f"{metric}_mean"]
        row.update({f"{metric}_mean": mean, f"{metric}_sd": math.nan if group is None else group[f"{metric}_std"],
                    f"d_{metric}": mean - row["published"]})
    if group is None:
        row["flags"] = "no kd runs" if published.kd_method else "no such method in kd"
    else:
        row["flags"] = "; ".join(difference_flags(published, group, gaps) + seed_flags(group))
    return row


def pair_rows(dataset: str, teacher: str, student: str, groups: pd.DataFrame, published: list[Published],
              params: pd.DataFrame, gaps: dict[int, str]) -> list[dict[str, Any]]:
    """The published rows of one pair, each beside every kd group of its method, then kd's other groups."""
    rows, used = [], set()
    for entry in published:
        matched = groups[[entry.matches(g, params.loc[g.recipe]) for _, g in groups.iterrows()]]
        used.update(matched.index)
        rows += [table_row(dataset, teacher, student, entry, g, gaps[i]) for i, g in matched.iterrows()]
        if matched.empty:
            rows.append(table_row(dataset, teacher, student, entry, None, ""))
    rows += [table_row(dataset, teacher, student, None, g, gaps[i]) for i, g in groups.iterrows() if i not in used]
    return rows


def field_table(summary: pd.DataFrame, runs: pd.DataFrame, field: Field) -> pd.DataFrame:
    """Per dataset with kd runs on a field pair: each pair's rows (published ones on DATASET only)."""
    params = runs.drop_duplicates("recipe").set_index("recipe")
    rows: list[dict[str, Any]] = []
    for dataset, here in summary.groupby("dataset", sort=True):
        for teacher, student in field.pairs():
            groups = pair_groups(here, teacher, student)
            if (groups.role == "teacher").all():  # no student yet (the teacher may be another pair's)
                continue
            gaps = {i: recipe_gaps(params.loc[g.recipe], g.model, g.role == "student" and g.method != PURE, field)
                    for i, g in groups.iterrows()}
            published = [r for r in field.rows if (r.teacher, r.student) == (teacher, student)] \
                if dataset == DATASET else []
            rows += pair_rows(dataset, teacher, student, groups, published, params, gaps)
    return pd.DataFrame(rows)


HEADER = ["Teacher → student", "Method", "α", "Published (%)", "Source", "kd best epoch (%)", "Δ best",
          "kd last epoch (%)", "Δ last", "n", "Flags"]


def cells(table: pd.DataFrame) -> list[list[str]]:
    return [[f"{r.teacher} → {r.student}", r.method if r.method == r.kd_method or not r.kd_method
             else f"{r.method} ({r.kd_method})", "" if math.isnan(r.alpha) else f"{r.alpha:g}",
             "" if math.isnan(r.published) else f"{r.published:.2f}", r.source,
             mean_std(r.best_mean, r.best_sd), signed(r.d_best), mean_std(r.final_mean, r.final_sd),
             signed(r.d_final), str(r.n), r.flags]
            for r in table.itertuples()]


def sources_text(field: Field) -> str:
    return "\n".join(f"- **{s.name}**: {s.repository}; {s.paper}. Reports: {s.reports}."
                     for s in field.sources.values())


def write_field(table: pd.DataFrame, field: Field, out: Path) -> None:
    """field.csv and field.md: a section per dataset, then the sources."""
    table.to_csv(out / "field.csv", index=False)
    note = (f"kd: mean ± sample sd (ddof=1) over seeds of the best-epoch accuracy (`best_test_acc`, chosen "
            f"on the test set) and the last-epoch accuracy (`final_test_acc`); Δ = kd − published, flagged "
            f"outside {SPREAD:g} sd of kd's runs, on fewer than {MIN_SEEDS} seeds, or where kd's recipe "
            "is not the sources'.\n\n")
    sections = [f"## {dataset}\n\n{markdown(HEADER, cells(part))}" for dataset, part in table.groupby("dataset")]
    (out / "field.md").write_text("# The field's table beside kd's\n\n" + note + "\n".join(sections)
                                  + f"\n## Sources\n\n{sources_text(field)}\n")


def ran_text(table: pd.DataFrame) -> str:
    """The rows kd has runs for, as `kd report` prints them, and how many published rows it left out."""
    ran = table[table.n > 0]
    rows = [[dataset, *row] for dataset, row in zip(ran.dataset, cells(ran), strict=True)]
    return markdown(["Dataset", *HEADER], rows) + f"({len(table) - len(ran)} published rows without kd runs: see field.md)\n"
