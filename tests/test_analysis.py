"""`kd report`, `kd plot` and `kd import-legacy` on sqlite stores filled with runs whose numbers the tests choose."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from kd.analysis import cli, legacy
from kd.analysis.collect import collect_runs
from kd.analysis.report import REPORT_KEYS, build_report, report_json
from kd.analysis.tables import summarize
from kd.cluster.grids import load_grid
from kd.models import create_model
from kd.spec import RunSpec, SpecError
from kd.tracking.runs import spec_tags
from kd.tracking.store import experiment_id, get_client

# one worker: its session fixtures train once, not once per xdist worker
pytestmark = pytest.mark.xdist_group("analysis")

# Final test accuracies by (dataset, model, teacher, method, alpha) and seed. The test's own
# arithmetic below is the reference the tables must match.
TEACHERS = {0: 92.0, 1: 93.0, 2: 94.5}
PURE = {0: 88.0, 1: 88.5, 2: 89.5}
LOGIT_05 = {0: 89.0, 1: 90.0, 2: 89.2}
LOGIT_025 = {0: 88.7, 1: 89.9}  # seed 2 missing
RKD_COLLAPSED = 15.0  # seed 0: best 16 < 2 x 10 % chance on cifar10; seed 1 still running; seed 2 missing


def curve(final: float) -> list[float]:
    """Three epochs whose best is final + 1 and whose last is final."""
    return [final / 2, final + 1.0, final]


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised empty store, made once: creating MLflow's schema takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(empty_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return get_client()


def add_run(
    client: MlflowClient,
    accs: list[float],
    *,
    status: str = "FINISHED",
    epochs: int = 3,
    experiment: str = "kd",
    extra_tags: dict[str, str] | None = None,
    **spec_fields: object,
) -> str:
    """A run as the engine leaves it: spec tags and params, per-epoch metrics, final metrics if FINISHED."""
    spec = RunSpec.create(**{"dataset": "cifar10", "epochs": epochs, **spec_fields})
    run_id = client.create_run(experiment_id(client, experiment), run_name=spec.name()).info.run_id
    points = [Metric(k, v, 0, e + 1) for e, a in enumerate(accs)
              for k, v in (("test_acc", a), ("train_acc", a + 2), ("test_loss", 1 / a), ("train_loss", 0.9 / a))]
    if status == "FINISHED":
        points += [Metric("best_test_acc", max(accs), 0, len(accs)), Metric("final_test_acc", accs[-1], 0, len(accs))]
    tags = {**spec_tags(spec), "kd.epoch": str(len(accs)), **(extra_tags or {})}
    client.log_batch(run_id, metrics=points, params=[Param(k, v) for k, v in spec.params().items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


STUDENT = {"model": "ResNet8", "teacher": "ResNet20"}


def fill(client: MlflowClient, grid: str | None = None) -> None:
    """cifar10 ResNet20 -> ResNet8 over seeds with flags planted, a cifar100 corner, a ViT family,
    and runs that are not results."""
    for seed, acc in TEACHERS.items():
        add_run(client, curve(acc), model="ResNet20", role="teacher", seed=seed)
    for seed, acc in PURE.items():
        add_run(client, curve(acc), model="ResNet8", seed=seed)
    add_run(client, curve(50.0), status="FAILED", method="logit", alpha=0.5, seed=0, **STUDENT)  # retried below
    for seed, acc in LOGIT_05.items():
        add_run(client, curve(acc), method="logit", alpha=0.5, seed=seed,
                extra_tags={"kd.grid": grid} if grid else None, **STUDENT)
    for seed, acc in LOGIT_025.items():
        add_run(client, curve(acc), method="logit", alpha=0.25, seed=seed, **STUDENT)
    add_run(client, curve(RKD_COLLAPSED), method="rkd", alpha=0.5, seed=0, **STUDENT)
    add_run(client, [40.0, 45.0], status="RUNNING", method="rkd", alpha=0.5, seed=1, **STUDENT)
    add_run(client, curve(70.0), dataset="cifar100", model="ResNet20", role="teacher")
    add_run(client, curve(65.0), dataset="cifar100", model="ResNet8")
    add_run(client, curve(66.0), dataset="cifar100", method="logit", **STUDENT)
    add_run(client, curve(80.0), model="ViTTiny", role="teacher")
    add_run(client, curve(70.0), model="ViTStudent")
    add_run(client, curve(72.5), model="ViTStudent", teacher="ViTTiny", method="logit")
    exp = experiment_id(client, "kd")
    client.create_run(exp, run_name="analysis", tags={"kd.role": "analysis", "kd.key": "x"})
    client.create_run(exp, run_name="foreign")
    add_run(client, curve(99.0), method="logit", alpha=0.5, seed=0, lr=0.01,
            extra_tags={"mlflow.parentRunId": "a-tuning-study"}, **STUDENT)


def row(summary: pd.DataFrame, **where: object) -> pd.Series:
    mask = pd.Series(True, index=summary.index)
    for column, value in where.items():
        mask &= summary[column] == value
    assert mask.sum() == 1, where
    return summary[mask].iloc[0]


def paired(a: dict[int, float], b: dict[int, float]) -> float:
    return statistics.mean(a[s] - b[s] for s in a if s in b)


def kd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def kd(*argv: str) -> int:
    args = kd_parser().parse_args(list(argv))
    return args.func(args)


def assert_image(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, path
    if path.suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100
    else:
        assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]


def test_collect_keeps_one_row_per_result(client: MlflowClient) -> None:
    fill(client)
    runs = collect_runs(client, "kd")
    assert len(runs) == 3 + 3 + 3 + 2 + 2 + 3 + 3  # no retried attempt, analysis, foreign run or trial
    assert "x" not in set(runs.key) and (runs.run_name != "foreign").all()
    logit0 = runs[(runs.method == "logit") & (runs.model == "ResNet8") & (runs.seed == 0) & (runs.dataset == "cifar10")
                  & (runs.alpha == 0.5)]
    assert len(logit0) == 1 and logit0.final_acc.iloc[0] == LOGIT_05[0] and logit0.status.iloc[0] == "FINISHED"
    running = runs[~runs.finished].iloc[0]
    assert (running.method, running.status, running.final_acc, running.best_acc) == ("rkd", "RUNNING", 45.0, 45.0)
    assert runs["params.temperature"].eq("4.0").all()
    assert set(runs.family) == {"cnn", "vit"}


def test_tables_match_an_independent_computation(client: MlflowClient) -> None:
    fill(client)
    summary = summarize(collect_runs(client, "kd"))
    cifar10 = summary[summary.dataset == "cifar10"]
    teacher = row(cifar10, role="teacher", model="ResNet20")
    pure = row(cifar10, role="student", model="ResNet8", method="pure")
    logit = row(cifar10, method="logit", alpha=0.5, model="ResNet8")
    quarter = row(cifar10, method="logit", alpha=0.25)
    rkd = row(cifar10, method="rkd")
    for got, accs in ((teacher, TEACHERS), (pure, PURE), (logit, LOGIT_05), (quarter, LOGIT_025)):
        finals = list(accs.values())
        assert got.n == len(finals) and got.seeds == ",".join(map(str, accs))
        assert got.final_mean == pytest.approx(statistics.mean(finals))
        assert got.final_std == pytest.approx(statistics.stdev(finals))  # sample std, ddof=1
        assert got.best_mean == pytest.approx(statistics.mean(a + 1 for a in finals))
        assert got.best_std == pytest.approx(statistics.stdev(a + 1 for a in finals))
    assert float(logit.d_pure_final) == pytest.approx(paired(LOGIT_05, PURE))
    assert logit.d_teacher_final == pytest.approx(paired(LOGIT_05, TEACHERS))
    assert quarter.d_pure_best == pytest.approx(paired(LOGIT_025, PURE))  # best - best: the +1 cancels
    assert pure.d_teacher_final == pytest.approx(paired(PURE, TEACHERS))  # the teacher its KD students name
    assert pd.isna(pure.d_pure_final) and pd.isna(teacher.d_teacher_final)
    # flags where planted, and nowhere else
    assert (rkd.n, rkd.collapsed, rkd.unfinished, rkd.missing) == (1, "0", "1 (RUNNING 2/3)", "2")
    assert pd.isna(rkd.final_std)
    assert quarter.missing == "2"
    others = summary.drop(index=rkd.name)
    assert (others.collapsed == "").all() and (others.unfinished == "").all()
    assert set(summary.missing[summary.dataset == "cifar100"]) == {""}
    assert set(summary.missing[summary.model.str.startswith("ViT")]) == {"1,2"}
    expected = summarize(collect_runs(client, "kd"), seeds=[0, 1])
    assert set(expected.missing[expected.dataset == "cifar100"]) == {"1"}
    assert row(expected, dataset="cifar10", method="logit", alpha=0.25).missing == ""


def test_report_writes_tables_plots_and_report_json(client: MlflowClient, tmp_path: Path) -> None:
    fill(client)
    out = tmp_path / "report"
    report = build_report(client, "kd", out)
    assert json.loads((out / "report.json").read_text()) == report
    cnn, vit = report["cnn"], report["vit"]
    assert (cnn["dataset"], cnn["teacher"], cnn["student"], cnn["kd_method"], cnn["kd_alpha"]) == (
        "cifar10", "ResNet20", "ResNet8", "logit", 0.5)
    assert cnn["teacher_accuracy"] == pytest.approx(statistics.mean(TEACHERS.values()) / 100)
    assert cnn["student_accuracy_without_kd"] == pytest.approx(statistics.mean(PURE.values()) / 100)
    assert cnn["student_accuracy_with_kd"] == pytest.approx(statistics.mean(LOGIT_05.values()) / 100)
    assert [vit[k] for k in REPORT_KEYS] == pytest.approx([0.80, 0.70, 0.725])
    best = report_json(summarize(collect_runs(client, "kd")), metric="best", dataset="cifar100")
    assert best["cnn"]["teacher_accuracy"] == pytest.approx(0.71)
    assert best["vit"]["teacher_accuracy"] is None  # no ViT runs on cifar100
    md = (out / "summary.md").read_text()
    logit = f"{statistics.mean(LOGIT_05.values()):.2f} ± {statistics.stdev(LOGIT_05.values()):.2f}"
    assert "## cifar10" in md and "## cifar100" in md and logit in md and "collapsed seeds 0" in md
    tex = (out / "tables" / "cifar10.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"$\pm$", r"ResNet20 $\to$ ResNet8"))
    assert "±" not in tex
    summary_csv = pd.read_csv(out / "summary.csv")
    assert {"final_mean", "final_std", "d_pure_final", "d_teacher_best", "collapsed", "missing"} <= set(summary_csv)
    assert len(pd.read_csv(out / "runs.csv")) == 19
    stems = {p.stem for p in (out / "plots").iterdir()}
    assert stems == {f"{kind}_{d}_{m}" for kind in ("curves", "alpha", "dots")
                     for d, m in (("cifar10", "ResNet8"), ("cifar100", "ResNet8"), ("cifar10", "ViTStudent"))}
    for path in (out / "plots").iterdir():
        assert_image(path)


def test_two_recipes_of_one_method_and_alpha_are_two_flagged_rows(client: MlflowClient, tmp_path: Path) -> None:
    """A 3-epoch and a 15-epoch teacher (and their students) are never averaged into one row."""
    for epochs, accs in ((3, TEACHERS), (15, {0: 97.0, 1: 99.7})):
        for seed, acc in accs.items():
            add_run(client, curve(acc), model="ResNet20", role="teacher", seed=seed, epochs=epochs)
            add_run(client, curve(acc - 5), method="logit", alpha=0.5, seed=seed, epochs=epochs, **STUDENT)
    build_report(client, "kd", tmp_path / "r")
    summary = pd.read_csv(tmp_path / "r" / "summary.csv", keep_default_na=False)
    teachers = summary[summary.role == "teacher"].sort_values("n", ascending=False)
    assert list(teachers.n) == [3, 2] and list(teachers.recipe_differs) == ["epochs=3", "epochs=15"]
    assert teachers.final_mean.tolist() == pytest.approx([statistics.mean(TEACHERS.values()), (97.0 + 99.7) / 2])
    students = summary[summary.method == "logit"]
    assert len(students) == 2 and set(students.recipe_differs) == {"epochs=3", "epochs=15"}
    md = (tmp_path / "r" / "summary.md").read_text()
    assert md.count("separate recipe: epochs=3") == 2 and md.count("separate recipe: epochs=15") == 2
    # seeds 0 and 1 of the 3-epoch students pair with the newer 15-epoch teachers: their Δ teacher says so
    assert md.count("Δ teacher across recipes: epochs 3 vs 15/3") == 1 and md.count("across recipes") == 1
    methodology = (tmp_path / "r" / "methodology.md").read_text()
    assert "| cifar10 |" in methodology and "Training hours" in methodology


def test_latex_escapes_thesis_text() -> None:
    from kd.analysis.tables import latex_text

    assert latex_text("attention_transfer 1.00 ± 0.50, Δ 5%") == r"attention\_transfer 1.00 $\pm$ 0.50, $\Delta$ 5\%"


def test_cli_report_is_logged_as_one_analysis_run(client: MlflowClient, tmp_path: Path) -> None:
    add_run(client, curve(90.0), model="ResNet20", role="teacher")
    add_run(client, curve(85.0), method="logit", **STUDENT)
    assert kd("report", "--out", str(tmp_path / "r")) == 0
    assert client.search_runs([experiment_id(client, "kd")], "tags.`kd.analysis` = 'report'") == []
    analysis = client.search_runs([experiment_id(client, "kd-analysis")], "tags.`kd.analysis` = 'report'")
    assert len(analysis) == 1 and analysis[0].info.run_name == "analysis"
    assert analysis[0].data.tags["kd.role"] == "analysis" and analysis[0].info.status == "FINISHED"
    logged = {f.path for f in client.list_artifacts(analysis[0].info.run_id)}
    assert {"report.json", "summary.md", "summary.csv", "runs.csv", "plots", "tables"} <= logged
    assert len(collect_runs(client, "kd")) == 2  # the analysis run is not a result
    for argv, message in ((("--experiment", "nope"), "no experiment 'nope'"), (("--seeds", "0,x"), "--seeds"),
                          (("--dataset", "svhn"), "--dataset svhn"), (("--grid", "g9"), "no experiment 'g9'"),
                          (("--grid", "g9", "--experiment", "kd"), "kd.grid=g9"),
                          (("--collapse-factor", "0"), "--collapse-factor")):
        with pytest.raises(SpecError, match=message):
            kd("report", "--out", str(tmp_path / "bad"), *argv)


def test_grid_selects_its_runs_and_their_baselines(client: MlflowClient, tmp_path: Path) -> None:
    fill(client, grid="g1")
    kd("report", "--out", str(tmp_path / "g"), "--grid", "g1", "--experiment", "kd")
    summary = pd.read_csv(tmp_path / "g" / "summary.csv", keep_default_na=False)
    groups = set(zip(summary.dataset, summary.model, summary.method, summary.alpha, strict=True))
    assert groups == {("cifar10", "ResNet20", "pure", 0.0), ("cifar10", "ResNet8", "pure", 0.0),
                      ("cifar10", "ResNet8", "logit", 0.5)}
    logit = row(summary, method="logit")
    assert float(logit.d_pure_final) == pytest.approx(paired(LOGIT_05, PURE))


def test_a_grid_report_reads_the_grid_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kd report --grid charlie` (the README's) reads charlie's experiment, where the submitter put its runs."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert cli.experiment_of(argparse.Namespace(experiment=None, grid="charlie")) == load_grid("charlie").experiment
    assert cli.experiment_of(argparse.Namespace(experiment=None, grid="gone-grid")) == "gone-grid"
    assert cli.experiment_of(argparse.Namespace(experiment="mine", grid="charlie")) == "mine"
    assert cli.experiment_of(argparse.Namespace(experiment=None, grid=None)) == "kd"
    assert cli.expected_seeds(argparse.Namespace(seeds=None, grid="charlie")) == [0, 1, 2]  # flags a missing seed
    assert cli.expected_seeds(argparse.Namespace(seeds="0,1", grid="charlie")) == [0, 1]


def test_plot_redraws_only_runs_that_moved(client: MlflowClient) -> None:
    teacher = add_run(client, curve(90.0), model="ResNet20", role="teacher")
    running = add_run(client, [30.0, 40.0], status="RUNNING", method="logit", alpha=0.5, **STUDENT)
    assert kd("plot") == 0
    for run_id in (teacher, running):
        run = client.get_run(run_id)
        assert run.data.tags["ops.plotted_epoch"] == run.data.tags["kd.epoch"]
        names = {f.path for f in client.list_artifacts(run_id)}
        assert {"Accuracy.png", "Loss.png"} <= names
        for name in ("Accuracy.png", "Loss.png"):
            assert_image(Path(client.download_artifacts(run_id, name)))
    from kd.analysis.plots import plot_runs

    assert plot_runs(client, "kd") == (0, 2)
    client.log_batch(running, metrics=[Metric("test_acc", 50.0, 0, 3)], tags=[RunTag("kd.epoch", "3")])
    assert plot_runs(client, "kd") == (1, 1)
    assert client.get_run(running).data.tags["ops.plotted_epoch"] == "3"
    assert plot_runs(client, "kd", force=True) == (2, 0)


# --- the thesis tree -------------------------------------------------------------------------

LEGACY_CONFIG = {"epochs": 3, "batch_size": 128, "lr": 0.1, "alpha": 0.5, "temperature": 4.0,
                 "dataset": "Cifar10", "distillation": "logit"}


def legacy_dir(root: Path, rel: str, model: str, accs: list[float], status: str = "completed",
               weights_of: str | None = None) -> None:
    """One seed directory as the thesis code wrote it."""
    d = root / "experiments" / rel
    d.mkdir(parents=True)
    metrics = {"train_loss": [1.0] * len(accs), "train_acc": [a + 1 for a in accs],
               "test_loss": [1.1] * len(accs), "test_acc": accs, "config": LEGACY_CONFIG}
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "status.json").write_text(json.dumps({"status": status, "epoch": len(accs), "max_acc": max(accs),
                                               "config": LEGACY_CONFIG}))
    torch.save({"weights": create_model(weights_of or model, 10).state_dict()}, d / "best.pth")


@pytest.fixture
def beta_tree(tmp_path: Path) -> Path:
    root = tmp_path / "beta"
    legacy_dir(root, "Cifar10/pure/ResNet20/0", "ResNet20", [50.0, 70.0, 80.0])
    legacy_dir(root, "Cifar10/pure/ResNet8/0", "ResNet8", [40.0, 60.0, 65.0])
    legacy_dir(root, "Cifar10/logit/ResNet20_to_ResNet8/0", "ResNet8", [45.0, 62.0, 66.0])
    legacy_dir(root, "Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/0", "ResNet8", [44.0, 63.0, 67.0])
    legacy_dir(root, "Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/1", "ResNet8", [41.0, 58.0], "in_progress")
    # malformed: an empty status.json (the SVHN failures), weights of another model, nothing at all
    legacy_dir(root, "Cifar10/rkd/ResNet20_to_ResNet8/0", "ResNet8", [10.0])
    (root / "experiments/Cifar10/rkd/ResNet20_to_ResNet8/0/status.json").write_text("")
    legacy_dir(root, "Cifar10/fitnets/ResNet20_to_ResNet8/0", "ResNet8", [50.0], weights_of="ResNet20")
    (root / "experiments/SVHN/pure/ResNet8/0").mkdir(parents=True)
    return root


MALFORMED = {Path("Cifar10/rkd/ResNet20_to_ResNet8/0"), Path("Cifar10/fitnets/ResNet20_to_ResNet8/0"),
             Path("SVHN/pure/ResNet8/0")}


def legacy_spec(**fields: object) -> RunSpec:
    return RunSpec.create(dataset="cifar10", epochs=3, batch_size=128, lr=0.1, temperature=4.0, **fields)


def test_import_legacy_twice(client: MlflowClient, beta_tree: Path, capsys: pytest.CaptureFixture) -> None:
    assert kd("import-legacy", str(beta_tree)) == 0
    err = capsys.readouterr().err
    assert all(f"skipped {p}" in err for p in MALFORMED) and "status.json is not JSON" in err
    assert "best.pth does not load into ResNet8" in err
    runs = {r.data.tags["kd.legacy_path"]: r for r in client.search_runs([experiment_id(client, "beta-legacy")])}
    assert len(runs) == 5
    expected = {
        "Cifar10/pure/ResNet20/0": legacy_spec(model="ResNet20", role="teacher"),
        "Cifar10/pure/ResNet8/0": legacy_spec(model="ResNet8"),
        "Cifar10/logit/ResNet20_to_ResNet8/0": legacy_spec(method="logit", alpha=0.5, **STUDENT),
        "Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/0": legacy_spec(method="logit", alpha=0.25, **STUDENT),
        "Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/1": legacy_spec(method="logit", alpha=0.25, seed=1, **STUDENT),
    }
    for path, spec in expected.items():
        run = runs[path]
        assert run.data.tags["kd.source"] == "legacy"
        assert {k: run.data.tags.get(k) for k in spec_tags(spec)} == spec_tags(spec)
        assert run.data.params == spec.params()
        assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"best.pth", "metrics.json", "config.json"}
    unfinished = runs["Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/1"]
    assert unfinished.info.status == "KILLED" and unfinished.data.tags["kd.epoch"] == "2"
    assert "final_test_acc" not in unfinished.data.metrics
    quarter = runs["Cifar10/logit/alpha_0.25/ResNet20_to_ResNet8/0"]
    assert quarter.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(quarter.info.run_id, "test_acc")] == [44.0, 63.0, 67.0]
    assert (quarter.data.metrics["best_test_acc"], quarter.data.metrics["final_test_acc"]) == (67.0, 67.0)

    assert kd("import-legacy", str(beta_tree / "experiments")) == 0  # the experiments/ folder works too
    assert "imported 0 runs into experiment 'beta-legacy', 5 already there, 3 directories skipped" in capsys.readouterr().out
    assert len(client.search_runs([experiment_id(client, "beta-legacy")])) == 5

    summary = summarize(collect_runs(client, "beta-legacy"))
    assert row(summary, method="logit", alpha=0.25).unfinished == "1 (KILLED 2/3)"
    assert row(summary, method="logit", alpha=0.5).d_teacher_final == pytest.approx(66.0 - 80.0)


class CreatesAFile:
    """A pickle payload that, unpickled by plain pickle, creates `path` (what a hostile file could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_import_legacy_never_runs_a_hostile_best_pth(tmp_path: Path) -> None:
    """best.pth is read by torch's weights-only unpickler: the file's callable is refused, not called,
    and the directory is skipped naming it."""
    root = tmp_path / "beta"
    legacy_dir(root, "Cifar10/pure/ResNet8/0", "ResNet8", [40.0, 60.0, 65.0])
    planted = tmp_path / "planted"
    torch.save({"weights": CreatesAFile(planted)}, root / "experiments/Cifar10/pure/ResNet8/0/best.pth")
    runs, bad = legacy.scan(root / "experiments")
    assert runs == [] and not planted.exists()
    [(path, why)] = bad
    assert path == Path("Cifar10/pure/ResNet8/0") and "best.pth is refused" in why and "open" in why, why


def test_import_legacy_deletes_a_run_whose_writing_fails(
    client: MlflowClient, beta_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = MlflowClient.log_artifact

    def flaky(self: MlflowClient, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        if local_path.endswith("best.pth") and "ResNet20/0" in local_path and "_to_" not in local_path:
            raise OSError("disk full")
        real(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", flaky)
    result = legacy.import_legacy(client, beta_tree)
    assert len(result.imported) == 4
    assert [(str(p), "disk full" in why) for p, why in result.skipped if p not in MALFORMED] == [
        ("Cifar10/pure/ResNet20/0", True)]
    exp = experiment_id(client, "beta-legacy")
    assert len(client.search_runs([exp])) == 4  # the failed run was deleted, not left half-written
    monkeypatch.setattr(MlflowClient, "log_artifact", real)
    again = legacy.import_legacy(client, beta_tree)
    assert [str(p) for p, _ in again.imported] == ["Cifar10/pure/ResNet20/0"] and len(again.present) == 4
