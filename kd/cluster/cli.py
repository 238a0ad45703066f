"""`kd submit`, `kd status`, `kd cron`, `kd server`: added to the `kd` command by `register(sub)`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kd.cluster import CRONTAB_ENV
from kd.cluster.schedulers import SCHEDULERS
from kd.errors import SpecError
from kd.flags import EXIT_STORE


def register(sub: Any) -> None:
    """Add the cluster subcommands to `kd`'s subparsers."""
    p = sub.add_parser("submit", help="submit a grid's unfinished runs as PBS / Slurm / local jobs",
                       description="Plan from MLflow and the scheduler (submit / resume / skip / wait), then "
                                   "submit. Idempotent: run it from cron. See docs/cluster.md.")
    add_submit_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan only: no run, script or job")
    tune = p.add_argument_group("tuning workers (instead of --grid; see docs/tuning.md)")
    tune.add_argument("--tune", metavar="STUDY", default=None, help="submit worker jobs for this Optuna study")
    tune.add_argument("--workers", type=int, default=1, help="worker jobs kept alive for the study (default 1)")
    tune.add_argument("--storage", default=None, help="the study's Optuna storage (default: optuna.db beside "
                                                      "the sqlite store)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="progress of a grid (or of every run of an experiment)")
    p.add_argument("--grid", default=None, help="grid name (beta, charlie, smoke) or YAML path")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the grid's, else kd)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for kd submit")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cron", help="install or remove the crontab entry that runs kd submit for a grid")
    p.add_argument("action", choices=("on", "off"))
    add_submit_args(p)
    p.add_argument("--every", type=int, default=30, help="minutes between rounds (default 30)")
    p.add_argument("--log", default=None, help="log file (default: cron.log in the grid's jobs folder)")
    p.add_argument("--crontab-file", default=os.environ.get(CRONTAB_ENV),
                   help=f"edit this file instead of the user's crontab (default ${CRONTAB_ENV})")
    p.set_defaults(func=cmd_cron)

    p = sub.add_parser("server", help="start mlflow server on PostgreSQL with a shared artifact folder")
    p.add_argument("--backend-store-uri", default=os.environ.get("KD_SERVER_BACKEND_URI"),
                   help="postgresql://USER:PASSWORD@HOST:5432/DB (default $KD_SERVER_BACKEND_URI)")
    p.add_argument("--artifacts-destination", required=True, help="artifact folder on shared storage")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: tunnel to it (docs/cluster.md)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--app-name", choices=("basic-auth",), default=None, help="MLflow's basic-auth app")
    p.set_defaults(func=cmd_server)


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None, help="grid name (beta, charlie, smoke) or YAML path")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="pbs", help="default pbs")
    p.add_argument("--max-queued", type=int, default=10, help="live jobs of the experiment at most (default 10)")
    p.add_argument("--pack", type=int, default=1, help="students per job when they share data and teacher")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field (epochs=2) or a job setting (walltime=01:00:00); repeatable")
    p.add_argument("--retry-failed", action="store_true", help="resubmit FAILED runs too")


def submit_argv(args: argparse.Namespace) -> list[str]:
    """The `kd submit` arguments equivalent to args (what the cron entry runs)."""
    from kd.cluster.grids import GRIDS_DIR

    grid = args.grid if (GRIDS_DIR / f"{args.grid}.yaml").is_file() else str(Path(args.grid).absolute())
    argv = ["submit", "--grid", grid, "--scheduler", args.scheduler, "--max-queued", str(args.max_queued),
            "--pack", str(args.pack)]
    argv += ["--experiment", args.experiment] if args.experiment else []
    argv += [a for pair in args.set for a in ("--set", pair)]
    return argv + (["--retry-failed"] if args.retry_failed else [])


def cmd_submit(args: argparse.Namespace) -> int:
    from kd.cluster.grids import job_settings, load_grid
    from kd.cluster.submit import store_exists, submit_grid, submit_tune
    from kd.tracking.store import get_client, ui_hint

    if bool(args.grid) == bool(args.tune):
        raise SpecError("kd submit needs --grid NAME or --tune STUDY (one of them)")
    if args.tune:
        from kd.tuning.storage import default_storage

        submit_tune(args.tune, args.storage or default_storage(), args.workers, args.scheduler, job_settings(args.set),
                    experiment=args.experiment or "kd", max_queued=args.max_queued, dry_run=args.dry_run)
        return 0
    grid = load_grid(args.grid, args.set)
    experiment = args.experiment or grid.experiment
    submit_grid(grid, args.scheduler, experiment=experiment, max_queued=args.max_queued,
                pack=args.pack, dry_run=args.dry_run, retry_failed=args.retry_failed)
    found = get_client().get_experiment_by_name(experiment) if store_exists() else None  # a dry run creates none
    if found is not None:
        print(ui_hint(found.experiment_id))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kd.cluster.grids import load_grid
    from kd.cluster.submit import journals_dir
    from kd.spec import RunSpec
    from kd.tracking.journal import journal_root
    from kd.tracking.queries import NEW, SpecStatus, format_summary, latest_runs, summarize
    from kd.tracking.registry import teachers_by_recipe
    from kd.tracking.runs import read_config
    from kd.tracking.store import StoreUnreachable, experiment_id, get_client, ui_hint

    grid = load_grid(args.grid, args.set) if args.grid else None
    roots = [journal_root()] + ([journals_dir(grid.job.resolved())] if grid else [])
    try:
        client = get_client()
    except StoreUnreachable as away:  # one line, then what this machine's journals know
        print(f"kd: {away}", file=sys.stderr, flush=True)
        print_unsynced(None, roots)
        return EXIT_STORE
    experiment = args.experiment or (grid.experiment if grid else "kd")
    exists = client.get_experiment_by_name(experiment) is not None  # status must not create it
    if grid:
        specs = list(grid.specs)
    else:
        runs = latest_runs(client, experiment).values() if exists else []
        specs = [RunSpec.from_dict(read_config(client, run.info.run_id)) for run in runs]
    rows = summarize(client, specs, experiment) if exists else [SpecStatus(s, None, NEW) for s in specs]
    print(f"experiment {experiment}:")
    print(format_summary(rows))
    teachers = teachers_by_recipe(client, specs)
    if teachers:
        print("registered teachers (students are taught only by their own recipe's):", *teachers, sep="\n")
    print_unsynced(client, roots)
    if exists:
        print(ui_hint(experiment_id(client, experiment)))
    return 0


def print_unsynced(client: Any, roots: list[Path]) -> None:
    """The journals' records the store lacks, one line per run: those kd sync ships, those it sets
    aside (another process took the run over), and journals it cannot read (file and line). With the
    store away (`client` None), every journal's run: its state, epoch and records not yet shipped."""
    from kd.tracking.journal import JOURNAL, BadJournal, journal_folders, local_state, read_records
    from kd.tracking.ledger import Ledger, find_ledger
    from kd.tracking.runs import taken_over

    found = find_ledger(client) if client else None  # status only reads: no ledger is created
    for folder in journal_folders(roots):
        try:
            state = local_state(folder)
            fenced = state["pending"] and found and taken_over(lambda: Ledger(client, found), folder,
                                                               read_records(folder / JOURNAL), state["pending"])
        except BadJournal as err:
            print(f"unreadable: {err}")
            continue
        if fenced:
            print(f"taken over: {fenced}; kd sync sets them aside")
        elif state["pending"] or client is None:
            print(f"{'unsynced' if state['pending'] else 'synced'}: run {state['run_id']} ({state['status'] or 'started'} at epoch {state['epoch']} in its "
                  f"journal): {state['pending']} record(s) in {state['folder']}; kd sync ships them")


def cmd_cron(args: argparse.Namespace) -> int:
    from kd.cluster.cron import entry, set_entry
    from kd.cluster.grids import load_grid
    from kd.tracking.store import tracking_uri

    if not args.grid:
        raise SpecError("kd cron needs --grid NAME")
    grid = load_grid(args.grid, args.set)  # a bad grid or setting fails now, not every 30 minutes
    if args.action == "off":
        removed = set_entry(grid.name, None, args.crontab_file)
        print(f"removed the kd cron entry of grid {grid.name}" if removed else f"no kd cron entry for grid {grid.name}")
        return 0
    log = Path(args.log).absolute() if args.log else Path(grid.job.resolved().jobs_dir) / grid.name / "cron.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MLFLOW_TRACKING_URI": tracking_uri()}
    if os.environ.get("KD_DATA_ROOT"):
        env["KD_DATA_ROOT"] = str(Path(os.environ["KD_DATA_ROOT"]).absolute())
    line = entry(grid.name, args.every, submit_argv(args), log, env)
    replaced = set_entry(grid.name, line, args.crontab_file)
    print(("replaced" if replaced else "installed") + f" the kd cron entry of grid {grid.name}:\n{line}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from kd.cluster.server import SERVER_SETTINGS, server_argv

    if not args.backend_store_uri:
        raise SpecError("kd server needs --backend-store-uri postgresql://USER:PASSWORD@HOST:5432/DB")
    argv = server_argv(args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port,
                       workers=args.workers, app_name=args.app_name)
    print(f"MLflow server on http://{args.host}:{args.port} (artifacts in {argv[argv.index('--artifacts-destination') + 1]});"
          f" point kd at it: export MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
    for name, value in SERVER_SETTINGS.items():
        os.environ.setdefault(name, value)
    os.execv(argv[0], argv)  # the server replaces this process
