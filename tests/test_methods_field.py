"""ReviewKD, DIST, CTKD and logit standardisation: each loss against a hand computation from its
equations (plain Python floats), finite values and gradients on the inputs that broke RKD
(duplicate samples, a collapsed student, very confident logits), CTKD's learned temperature
surviving kill -9, and every method distilling on digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kd.cli import build_parser
from kd.engine.job import run_specs
from kd.flags import method_options
from kd.methods import METHODS, build_method
from kd.methods.ctkd import curriculum_strength, learned_temperature
from kd.methods.dist import dist_losses
from kd.methods.dkd import dkd_losses
from kd.methods.logit import standardized
from kd.methods.mlkd import confidence_shares, mlkd_losses
from kd.methods.reviewkd import hcl_loss
from kd.spec import RunSpec
from kd.tuning.space import build_space
from tests.conftest import CPU
from tests.test_crash_safety import history, method_state_after_kill_9

LOGITS = [torch.Size([10])]  # what the logit methods see of a model: its logits
S_LOGITS = [[1.0, 2.0, 3.0, 6.0], [0.5, -1.0, 0.0, 2.5]]
T_LOGITS = [[4.0, 0.0, 1.0, 2.0], [0.0, 3.0, -2.0, 1.0]]


def method(name: str, temperature: float = 4.0, **options) -> torch.nn.Module:
    """A logit-family method as a run builds it (for logits alone)."""
    spec = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method=name,
                          temperature=temperature, options=options)
    return build_method(spec, LOGITS, LOGITS)


# ---------------------------------------------------------------- by hand, from the equations


def z_scores(row: list[float]) -> list[float]:
    """Sun et al. 2024's Z-score with Bessel's std, as the authors' `Tensor.std`."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / std for v in row]


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def hinton(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 * KL(p_t || p_s), mean over the samples."""
    kls = [sum(q * math.log(q / p) for p, q in zip(softmax(s, temperature), softmax(t, temperature), strict=True))
           for s, t in zip(student, teacher, strict=True)]
    return temperature**2 * sum(kls) / len(kls)


def pearson(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
    return cov / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))


def test_standardized_logits_are_z_scores_and_ignore_shift_and_scale():
    z = torch.tensor(S_LOGITS)
    assert standardized(z).tolist() == [pytest.approx(z_scores(row), rel=1e-6) for row in S_LOGITS]
    torch.testing.assert_close(standardized(3.5 * z - 7.0), standardized(z))


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_logit_kd_with_standardisation_is_kd_of_the_z_scores(temperature):
    s, t = torch.tensor(S_LOGITS), torch.tensor(T_LOGITS)
    terms = method("logit", temperature=temperature, logit_standardize=True, logit_weight=10.0)([s], [t], None, 1)
    want = 10.0 * hinton([z_scores(r) for r in S_LOGITS], [z_scores(r) for r in T_LOGITS], temperature)
    assert terms["loss_kd"].item() == pytest.approx(want, rel=1e-5)
    plain = method("logit", temperature=temperature)([s], [t], None, 1)["loss_kd"]
    assert plain.item() == pytest.approx(hinton(S_LOGITS, T_LOGITS, temperature), rel=1e-5)


def test_dkd_with_standardisation_decouples_the_z_scores():
    s, t, y = torch.tensor(S_LOGITS), torch.tensor(T_LOGITS), torch.tensor([3, 1])
    terms = method("dkd", temperature=2.0, dkd_standardize=True, dkd_warmup=0)([s], [t], y, 1)
    by_hand = [torch.tensor([z_scores(r) for r in rows]) for rows in (S_LOGITS, T_LOGITS)]
    tckd, nckd = dkd_losses(*by_hand, y, 2.0)
    assert terms["loss_dkd_tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert terms["loss_dkd_nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-5)


def test_mlkd_with_standardisation_z_scores_its_instance_terms_only():
    """As the authors of logit standardisation run MLKD: the batch and class terms and the
    confidence shares keep the raw logits."""
    g = torch.Generator().manual_seed(1)
    weak_s, weak_t, strong_s, strong_t = (torch.randn(4, 5, generator=g) for _ in range(4))
    temperatures = (4.0, 2.0)
    raw = mlkd_losses(weak_s, weak_t, strong_s, strong_t, temperatures)
    got = mlkd_losses(weak_s, weak_t, strong_s, strong_t, temperatures, standardize=True)
    z = [[z_scores(row) for row in x.tolist()] for x in (weak_s, weak_t, strong_s, strong_t)]
    share = confidence_shares(weak_t)[0].item()
    want = sum(share * hinton(z[0], z[1], t) + hinton(z[2], z[3], t) for t in temperatures)
    assert got[0].item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(got[1], raw[1]) and torch.equal(got[2], raw[2])


def test_dist_is_one_minus_mean_pearson_over_samples_and_over_classes():
    rows = S_LOGITS + [[0.0, 0.0, 1.0, -1.0]]
    teacher_rows = T_LOGITS + [[1.0, 1.0, 0.0, 2.0]]
    temperature = 4.0
    ys, yt = [softmax(r, temperature) for r in rows], [softmax(r, temperature) for r in teacher_rows]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt, strict=True)) / 3
    columns = lambda y: [list(c) for c in zip(*y, strict=True)]  # noqa: E731
    intra = 1 - sum(pearson(a, b) for a, b in zip(columns(ys), columns(yt), strict=True)) / 4
    got = dist_losses(torch.tensor(rows), torch.tensor(teacher_rows), temperature)
    assert [g.item() for g in got] == pytest.approx([16 * inter, 16 * intra], rel=1e-5)
    terms = method("dist")([torch.tensor(rows)], [torch.tensor(teacher_rows)], None, 1)
    assert terms["loss_dist_inter"].item() == pytest.approx(2 * 16 * inter, rel=1e-5)


def test_ctkd_is_kd_at_the_learned_temperature_and_its_gradient_is_reversed_by_the_curriculum():
    """T = 1 + 20 sigmoid(theta), theta = 1 at the start; theta's gradient is -lambda(epoch) times
    dL/dtheta (a central difference of the hand-computed loss), the student's is KD's own."""
    assert [curriculum_strength(e, 10, 1.0) for e in (1, 5, 10, 30)] == pytest.approx(
        [(1 - math.cos(math.pi / 10)) / 2, 0.5, 1.0, 1.0])
    assert curriculum_strength(3, 0, 0.7) == 0.7

    def loss_at(theta: float) -> float:
        return hinton(S_LOGITS, T_LOGITS, 1 + 20 / (1 + math.exp(-theta)))

    slope = (loss_at(1 + 1e-4) - loss_at(1 - 1e-4)) / 2e-4
    for epoch in (1, 5, 12):
        ctkd = method("ctkd")
        s = torch.tensor(S_LOGITS, requires_grad=True)
        loss = ctkd([s], [torch.tensor(T_LOGITS)], None, epoch)["loss_ctkd"]
        assert loss.item() == pytest.approx(loss_at(1.0), rel=1e-5)
        loss.backward()
        assert ctkd.theta.grad.item() == pytest.approx(-curriculum_strength(epoch, 10, 1.0) * slope, rel=1e-3)
        fixed = torch.tensor(S_LOGITS, requires_grad=True)
        temperature = learned_temperature(torch.tensor([1.0]), 1.0, 20.0)
        method("logit", temperature=temperature.item())([fixed], [torch.tensor(T_LOGITS)], None, 1)["loss_kd"].backward()
        torch.testing.assert_close(s.grad, fixed.grad)


def test_reviewkd_hcl_is_the_weighted_pyramid_of_mses():
    """A 4x4 level: full MSE, then 2x2 and 1x1 average pools at weights 1/2, 1/4 (4x4 is not
    smaller than the map), normalised by 1.75; a 1x1 level: its MSE alone; levels summed."""
    a = [[float(4 * i + j) for j in range(4)] for i in range(4)]
    b = [[float((i * j) % 3) for j in range(4)] for i in range(4)]

    def pooled(m: list[list[float]], size: int) -> list[list[float]]:
        k = 4 // size
        return [[sum(m[k * i + u][k * j + v] for u in range(k) for v in range(k)) / k**2 for j in range(size)]
                for i in range(size)]

    def mse(x: list[list[float]], y: list[list[float]]) -> float:
        return sum((p - q) ** 2 for rx, ry in zip(x, y, strict=True) for p, q in zip(rx, ry, strict=True)) / len(x) ** 2

    level_4x4 = (mse(a, b) + mse(pooled(a, 2), pooled(b, 2)) / 2 + mse(pooled(a, 1), pooled(b, 1)) / 4) / 1.75
    level_1x1 = (3.0 - 1.0) ** 2
    got = hcl_loss([torch.tensor(a).view(1, 1, 4, 4), torch.full((1, 1, 1, 1), 3.0)],
                   [torch.tensor(b).view(1, 1, 4, 4), torch.ones(1, 1, 1, 1)])
    assert got.item() == pytest.approx(level_4x4 + level_1x1, rel=1e-6)


STUDENT = [torch.Size(s) for s in [(4, 8, 8), (8, 4, 4), (16, 2, 2), (10,)]]
TEACHER = [torch.Size(s) for s in [(4, 16, 16), (8, 8, 8), (16, 4, 4), (32, 2, 2), (10,)]]


def test_reviewkd_fuses_the_student_onto_the_teachers_levels_and_ramps_up():
    """A 3-stage student under a 4-stage teacher: stages 1-3 pair with the teacher's 2-4, plus the
    pooled level; each fusion's output has the teacher level's channels and size."""
    review = build_method(RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet8", method="reviewkd"),
                          STUDENT, TEACHER)
    student = [torch.rand(2, *s) for s in STUDENT]
    shapes, deeper = [], None
    levels = [student[2].mean((2, 3), keepdim=True), student[2], student[1], student[0]]  # deepest first
    for fusion, level, size in zip(review.fusions, levels, [(1, 1), (2, 2), (4, 4), (8, 8)], strict=True):
        out, deeper = fusion(level, deeper, size)
        shapes.append(out.shape[1:])
    assert shapes == [(32, 1, 1), (32, 2, 2), (16, 4, 4), (8, 8, 8)]
    assert review.fusions[0].attention is None and all(f.attention is not None for f in review.fusions[1:])
    teacher = [torch.rand(2, *s) for s in TEACHER]
    ramp = [review(student, teacher, None, e)["loss_reviewkd"].item() for e in (1, 10, 20, 50)]
    assert ramp == pytest.approx([ramp[2] / 20, ramp[2] / 2, ramp[2], ramp[2]], rel=1e-5)


# ---------------------------------------------------------------- the inputs that broke RKD


EDGE_CASES = {  # (student logits, teacher logits) of 4 samples, 10 classes
    "duplicate samples": lambda g: (torch.randn(1, 10, generator=g).expand(4, 10).clone(),
                                    torch.randn(1, 10, generator=g).expand(4, 10).clone()),
    "collapsed student": lambda g: (torch.zeros(4, 10), torch.randn(4, 10, generator=g)),
    "very confident": lambda g: (1e4 * torch.eye(10)[[1, 2, 3, 4]], 1e4 * torch.eye(10)[[0, 1, 2, 3]]),
}
LOGIT_METHODS = {
    "logit, standardised": ("logit", {"logit_standardize": True}),
    "dkd, standardised": ("dkd", {"dkd_standardize": True}),
    "dist": ("dist", {}),
    "ctkd": ("ctkd", {}),
    "ctkd, standardised": ("ctkd", {"ctkd_standardize": True}),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("variant", list(LOGIT_METHODS))
def test_logit_family_is_finite_with_finite_gradients_on_the_hard_cases(variant, case):
    """(ReviewKD's degenerate feature maps: the registry-wide tests in test_methods.py.)"""
    name, options = LOGIT_METHODS[variant]
    student, teacher = EDGE_CASES[case](torch.Generator().manual_seed(0))
    built = method(name, **options)
    student.requires_grad_(True)
    terms = built([student], [teacher], torch.tensor([0, 1, 2, 3]), 12)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values()), terms
    grads = [student.grad, *(p.grad for p in built.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_collapsed_student_standardises_to_zero_with_zero_gradient():
    z = torch.full((2, 5), 3.0, requires_grad=True)
    out = standardized(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 5)) and torch.equal(z.grad, torch.zeros(2, 5))


# ---------------------------------------------------------------- options, flags, tuning


def test_standardisation_is_an_option_of_each_logit_method_and_a_flag():
    declared = method_options()
    for name in ("logit", "dkd", "ctkd", "mlkd"):
        assert declared[name][f"{name}_standardize"][0] is False
    args = build_parser().parse_args(["distill", "--method", "dkd", "--dkd-standardize", "yes"])
    assert getattr(args, "opt.dkd_standardize") is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--method", "dkd", "--dkd-standardize", "maybe"])


@pytest.mark.parametrize(("name", "tuned"), [("reviewkd", ["alpha", "reviewkd_weight"]),
                                             ("dist", ["alpha", "dist_inter_weight", "dist_intra_weight"]),
                                             ("ctkd", ["alpha", "ctkd_weight"])])
def test_kd_tune_searches_alpha_and_each_loss_weight(name, tuned):
    """Each weight over [default / 10, default * 10], log-uniform (kd/tuning/space.py's default_dim)."""
    space = build_space(name, None, None)
    assert [d.name for d in space] == tuned
    defaults = METHODS[name].option_defaults()
    assert all((d.low, d.high, d.log) == pytest.approx((defaults[d.name] / 10, defaults[d.name] * 10, True))
               for d in space if d.name != "alpha")


# ---------------------------------------------------------------- training on digits


DIGITS = dict(dataset="digits", epochs=4, batch_size=64)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ResNet8 digits teacher for this module's students (their teacher_weights): trained as a pure
    student, so that nothing is registered or exported (the registry is tested elsewhere)."""
    folder = tmp_path_factory.mktemp("field-teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        mp.chdir(folder)
        [outcome] = run_specs([RunSpec.create(model="ResNet8", **DIGITS)], options=CPU, progress=False)
        return MlflowClient().download_artifacts(outcome.run_id, "best.pth", str(folder))


def student(teacher_weights: str, name: str, **fields) -> RunSpec:
    return RunSpec.create(model="ResNet8", teacher="ResNet8", teacher_weights=teacher_weights, method=name,
                          **{**DIGITS, **fields})


# The published CIFAR-100 ratios of CE to the terms (docs/methods.md): ReviewKD and DIST add their
# terms to CE (here both halved, alpha 0.5); CTKD is 0.1 CE + 0.9 KD; logit standardisation is
# 0.1 CE + 9 KD at base temperature 2. On 640 images (40 steps) DIST and the standardised KD were
# still near chance after 2 epochs at kd's lr 0.1; the full digits set takes them past 90 %.
PUBLISHED = [("reviewkd", dict(alpha=0.5)), ("dist", dict(alpha=0.5)), ("ctkd", dict(alpha=0.9)),
             ("logit", dict(alpha=0.9, temperature=2.0, options={"logit_standardize": True, "logit_weight": 10.0}))]


def test_each_method_distils_on_digits_far_above_chance(store, teacher_weights):
    specs = [student(teacher_weights, name, **fields) for name, fields in PUBLISHED]
    for outcome in run_specs(specs, options=CPU, progress=False):
        label = f"{outcome.spec.method} {outcome.spec.options}"
        assert outcome.best_acc > 60.0, f"{label} reached only {outcome.best_acc:.1f} % (chance: 10 %)"
        terms = [k for k in MlflowClient().get_run(outcome.run_id).data.metrics if k.startswith("loss_")]
        for key in terms:
            assert [s for s, v in history(outcome.run_id, key) if math.isfinite(v)] == [1, 2, 3, 4], (label, key)


def test_ctkd_temperature_survives_kill_9_with_identical_history(store, teacher_weights, tmp_path: Path):
    spec = student(teacher_weights, "ctkd", alpha=0.9, epochs=3, train_limit=640)
    argv = ("distill", "--dataset", "digits", "--teacher", "ResNet8", "--student", "ResNet8", "--method", "ctkd",
            "--alpha", "0.9", "--epochs", "3", "--batch-size", "64", "--train-limit", "640",
            "--teacher-weights", teacher_weights, "--device", "cpu")
    resumed, reference = method_state_after_kill_9(spec, argv, "step:15", ["loss_ctkd"], tmp_path)  # in epoch 2
    theta = resumed["theta"], reference["theta"]
    assert torch.equal(*theta) and theta[0].item() != 1.0  # learned, and the same after the kill
