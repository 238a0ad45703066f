"""The analysis commands of `kd`: report, plot, analyze features, import-legacy.

`register(sub)` adds them to the main parser; each handler returns an exit code and raises
`SpecError` on bad input (the main CLI prints it and exits 2). Heavy imports happen inside the
handlers so that `kd --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kd.analysis import LEGACY_EXPERIMENT
from kd.errors import SpecError
from kd.tracking import tags as T

if TYPE_CHECKING:
    from kd.cluster.grids import Grid


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SpecError(f"--seeds {text} is not a list of integers: pass e.g. --seeds 0,1,2") from None


def add_experiment(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--experiment", default=default or os.environ.get("MLFLOW_EXPERIMENT_NAME", "kd"),
                        help="MLflow experiment (default %(default)s)")


def add_grid_and_experiment(parser: argparse.ArgumentParser, grid_help: str) -> None:
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: the grid's with --grid, else $MLFLOW_EXPERIMENT_NAME or kd)")
    parser.add_argument("--grid", help=grid_help)


def grid_of(args: argparse.Namespace) -> Grid | None:
    """The --grid, if it is still a grid file (its runs' tag outlives the file)."""
    from kd.cluster.grids import load_grid

    try:
        return load_grid(args.grid) if args.grid else None
    except SpecError:
        return None


def experiment_of(args: argparse.Namespace) -> str:
    """--experiment; else the experiment a --grid's runs live in (the grid's, or its name for a grid
    that is no longer a file); else $MLFLOW_EXPERIMENT_NAME or kd."""
    if args.experiment:
        return args.experiment
    if args.grid:
        grid = grid_of(args)
        return grid.experiment if grid else args.grid
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "kd")


def grid_tag(args: argparse.Namespace) -> str | None:
    """The `kd.grid` a --grid's runs carry: the grid's name (a file's stem), also when a path is given."""
    grid = grid_of(args)
    return grid.name if grid else args.grid


def expected_seeds(args: argparse.Namespace) -> list[int] | None:
    """--seeds; else a --grid's seeds, so that a seed no job has reached yet is flagged missing."""
    seeds = parse_seeds(args.seeds)
    grid = grid_of(args) if seeds is None else None
    return sorted({s.seed for s in grid.specs}) if grid else seeds


def make_out_folder(path: Path) -> None:
    """`--out`, made before any work: a path under a file is one line, not a traceback after collecting."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"--out {path} cannot be made a folder ({err.strerror or err}): pass --out a folder you "
                        "can write") from None


def cmd_report(args: argparse.Namespace) -> int:
    from kd.analysis.collect import log_analysis
    from kd.analysis.field import ran_text
    from kd.analysis.report import REPORT_KEYS, gather, write_report
    from kd.analysis.summaries import log_summaries, recipe_summaries
    from kd.analysis.tables import COLLAPSE_FACTOR
    from kd.tracking.store import get_client

    factor = COLLAPSE_FACTOR if args.collapse_factor is None else args.collapse_factor
    if factor <= 0:
        raise SpecError("--collapse-factor must be positive: pass e.g. --collapse-factor 2")
    make_out_folder(args.out)
    client = get_client()
    args.experiment = experiment_of(args)
    grid = grid_tag(args)
    material = gather(client, args.experiment, grid, expected_seeds(args), factor)
    report = write_report(material, args.out, args.metric, args.dataset)
    logged, unchanged = log_summaries(client, args.experiment, recipe_summaries(material.runs, material.curves))
    tags = {T.ANALYSIS_GRID: grid} if grid else {}  # not kd.grid: it is no grid run
    run_id, target = log_analysis(client, args.experiment, "report", args.out, tags)
    for name, entry in report.items():
        values = ", ".join(f"{k}={'n/a' if entry[k] is None else format(entry[k], '.4f')}" for k in REPORT_KEYS)
        print(f"{name}: {values} ({entry.get('dataset', 'no runs')})")
    if not material.field.empty:
        print(f"\nThe field's table beside kd's (best and last epoch: mean ± sd over seeds):\n{ran_text(material.field)}")
    print(f"report written to {args.out} and logged as run {run_id} ('analysis') in experiment '{target}', "
          f"with {logged + unchanged} summary runs, one per recipe ({logged} logged, {unchanged} unchanged)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from kd.analysis.plots import plot_runs
    from kd.tracking.store import get_client

    plotted, current = plot_runs(get_client(), experiment_of(args), grid_tag(args), args.force)
    print(f"plotted {plotted} runs, {current} already up to date")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from kd.analysis.collect import log_analysis
    from kd.analysis.features import measure, write_features
    from kd.tracking.store import get_client
    from kd.tracking.system import pick_device

    if args.data_root:
        os.environ["KD_DATA_ROOT"] = args.data_root
    make_out_folder(args.out)
    client = get_client()
    device = pick_device(args.device)
    per_run, grid = measure(client, args.runs, args.probe_size, str(device))
    write_features(per_run, grid, args.out)
    experiment = args.experiment or client.get_experiment(client.get_run(args.runs[0]).info.experiment_id).name
    run_id, target = log_analysis(client, experiment, "features", args.out, {T.PROBE_SIZE: str(args.probe_size)})
    print(f"feature metrics of {per_run.run_id.nunique()} runs written to {args.out} "
          f"and logged as run {run_id} ('analysis') in experiment '{target}'")
    return 0


def cmd_import_legacy(args: argparse.Namespace) -> int:
    from kd.analysis.legacy import import_legacy
    from kd.tracking.store import get_client

    teachers = [t for t in (args.teacher_models or "").split(",") if t]
    result = import_legacy(get_client(), args.path, args.experiment, teachers)
    for path, why in result.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(f"imported {len(result.imported)} runs into experiment '{args.experiment}', "
          f"{len(result.present)} already there, {len(result.skipped)} directories skipped")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add report, plot, analyze (features) and import-legacy to the `kd` parser."""
    p = sub.add_parser("report", help="tables, plots and report.json from the tracking store")
    add_grid_and_experiment(p, "only runs tagged kd.grid=NAME (plus the baselines they compare with)")
    p.add_argument("--out", type=Path, required=True, help="directory for the report files")
    p.add_argument("--seeds", help="expected seeds, e.g. 0,1,2 (default: every seed seen on the dataset)")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="accuracy for Δ columns, plots and report.json (default final)")
    p.add_argument("--dataset", help="report.json's dataset (default: per family, the one with most runs)")
    p.add_argument("--collapse-factor", type=float, default=None,
                   help="flag runs whose best accuracy is below this x chance (default 2)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="each run's Accuracy.png and Loss.png, for runs that moved (cron-safe)")
    add_grid_and_experiment(p, "only runs tagged kd.grid=NAME")
    p.add_argument("--force", action="store_true", help="redraw every run")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("analyze", help="representation analyses")
    kinds = p.add_subparsers(dest="analysis", required=True)
    f = kinds.add_parser("features", help="feature-map metrics and CKA vs the teacher, per stage")
    f.add_argument("--runs", nargs="+", required=True, metavar="RUN_ID", help="student (or teacher) runs")
    f.add_argument("--probe-size", type=int, default=256, help="test images in the probe batch (default 256)")
    f.add_argument("--out", type=Path, default=Path("features"), help="output directory (default features)")
    f.add_argument("--experiment", default=None, help="where the analysis run goes (default: the first run's)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    f.add_argument("--data-root", default=None, help="dataset directory (default $KD_DATA_ROOT or ./data)")
    f.set_defaults(func=cmd_features)

    p = sub.add_parser("import-legacy", help="import the thesis experiments/ tree as MLflow runs")
    p.add_argument("path", type=Path, help="the tree (a folder holding experiments/, or experiments/ itself)")
    add_experiment(p, default=LEGACY_EXPERIMENT)
    p.add_argument("--teacher-models", help="comma-separated models to treat as teachers under pure/ "
                   "(default: the models named as teachers by Teacher_to_Student folders)")
    p.set_defaults(func=cmd_import_legacy)
