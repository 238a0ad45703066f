"""Distillation methods: each loss against an independent (loop-based) computation, where the
gradients go, finite gradients on degenerate input under autocast, and the real models' shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kd.methods import METHODS, build_method
from kd.methods.attention_transfer import at_loss
from kd.methods.dkd import dkd_losses
from kd.methods.factor_transfer import ft_loss
from kd.methods.fitnets import Connector, fitnets_loss
from kd.methods.logit import kd_loss
from kd.methods.nst import nst_loss
from kd.methods.rkd import rkd_angle_loss, rkd_distance_loss
from kd.methods.tucker import tucker_core, tucker_loss
from kd.models import create_model
from kd.spec import RunSpec, SpecError

# Every registered method of the suite (not those other tests register for themselves) that
# distills, i.e. all but `pure`: a method added to the registry is tested here without a word. Methods
# that take extra inputs (Method.inputs: CRD, MLKD) are called with them in tests/test_methods_crd_mlkd.py.
METHOD_NAMES = [name for name, cls in METHODS.items()
                if cls.__module__.startswith("kd.methods.") and name != "pure" and not cls.inputs]
CIFAR = [torch.Size(s) for s in [(16, 32, 32), (32, 16, 16), (64, 8, 8), (100,)]]  # ResNet56 / ResNet112
RESNET18 = [torch.Size(s) for s in [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (100,)]]


def make(name: str, student_shapes, teacher_shapes, **options):
    spec = RunSpec.create(
        dataset="digits", model="ResNet20", teacher="ResNet32", method=name, options=options
    )
    return build_method(spec, student_shapes, teacher_shapes)


def features(shapes, n: int, *, requires_grad: bool = False) -> list[torch.Tensor]:
    """Random post-ReLU-like stage maps and logits, as leaf tensors."""
    out = [torch.rand(n, *s) if len(s) == 3 else torch.randn(n, *s) for s in shapes]
    return [f.requires_grad_(requires_grad) for f in out]


def digits_outputs(n: int = 8):
    torch.manual_seed(0)
    student, teacher = create_model("ResNet20", 10, 1, 8), create_model("ResNet32", 10, 1, 8).eval()
    x = torch.randn(n, 1, 8, 8)
    with torch.no_grad():
        t_out = teacher(x)
    return student, x, t_out


def huber(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


# ---------------------------------------------------------------- losses against direct computations


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (5, 1, 2, 3)])
def test_fitnets_loss_is_the_mean_squared_error(shape):
    a, b = torch.randn(shape), torch.randn(shape)
    direct = sum(float(x - y) ** 2 for x, y in zip(a.flatten(), b.flatten(), strict=True)) / a.numel()
    assert fitnets_loss(a, b).item() == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize(
    "guided, hint", [((16, 32, 32), (32, 16, 16)), ((16, 8, 8), (32, 4, 4)), ((16, 32, 32), (64, 8, 8)),
                     ((32, 16, 16), (16, 32, 32)), ((16, 30, 30), (32, 12, 12))]
)  # fmt: skip
def test_fitnets_connector_maps_the_guided_shape_onto_the_hint(guided, hint):
    assert Connector(guided, hint)(torch.randn(2, *guided)).shape[1:] == hint


def direct_attention(f: torch.Tensor, p: float) -> list[torch.Tensor]:
    maps = []
    for sample in f:
        q = sum(sample[c].abs() ** p for c in range(sample.shape[0])) / sample.shape[0]
        maps.append(q.flatten() / q.flatten().norm())
    return maps


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_transfer_matches_per_sample_maps(reduction, p):
    student = features([(3, 8, 8), (5, 4, 4), (7, 2, 2), (10,)], 3)
    teacher = features([(6, 4, 4), (8, 4, 4), (9, 1, 1), (10,)], 3)  # stage 1: pooled 8x8 -> 4x4
    losses = []
    for s, t in zip(student[:-1], teacher[:-1], strict=True):
        if s.shape[-1] > t.shape[-1]:
            s = F.avg_pool2d(s, s.shape[-1] // t.shape[-1])
        if t.shape[-1] > s.shape[-1]:
            t = F.avg_pool2d(t, t.shape[-1] // s.shape[-1])
        pairs = zip(direct_attention(s, p), direct_attention(t, p), strict=True)
        losses.append(sum(((a - b) ** 2).sum() for a, b in pairs) / (s.shape[0] * s[0, 0].numel()))
    direct = sum(losses) if reduction == "sum" else sum(losses) / 3
    method = make("attention_transfer", [], [], at_p=p, at_weight=7.0, at_reduction=reduction)
    assert method(student, teacher, None, 1)["loss_at"].item() == pytest.approx(7.0 * float(direct), rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (5, 2, 1, 1)])
def test_factor_transfer_loss_is_l1_of_normalised_factors(shape):
    a, b = torch.randn(shape), torch.randn(shape)
    direct = 0.0
    for x, y in zip(a, b, strict=True):
        direct += (x.flatten() / x.norm() - y.flatten() / y.norm()).abs().sum().item()
    assert ft_loss(a, b).item() == pytest.approx(direct / a.numel(), rel=1e-5)


@pytest.mark.parametrize(("batch", "classes", "temperature"), [(1, 3, 4.0), (5, 10, 4.0), (8, 100, 1.0)])
def test_kd_loss_is_hinton_by_hand(batch, classes, temperature):
    """T^2 * mean over samples of sum_c p_t log(p_t / p_s), softmaxes written out by hand."""
    s, t = torch.randn(batch, classes) * 3, torch.randn(batch, classes) * 3
    total = 0.0
    for s_row, t_row in zip(s.double().tolist(), t.double().tolist(), strict=True):
        p_s = [math.exp(v / temperature) for v in s_row]
        p_t = [math.exp(v / temperature) for v in t_row]
        p_s, p_t = [v / sum(p_s) for v in p_s], [v / sum(p_t) for v in p_t]
        total += sum(q * math.log(q / p) for p, q in zip(p_s, p_t, strict=True))
    assert kd_loss(s, t, temperature).item() == pytest.approx(temperature**2 * total / batch, rel=1e-4)


def normalised_distances_by_hand(e: torch.Tensor) -> torch.Tensor:
    """Eq. 3 of Park et al. in float64 loops: d_ij / mu, mu = sum of d_ij over i != j / (n (n - 1));
    all 0 when mu = 0 (every sample equal)."""
    rows = e.double().tolist()
    n = len(rows)
    d = [[math.dist(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return torch.tensor([[d[i][j] / mu if mu > 0 else 0.0 for j in range(n)] for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("n, dim, repeated", [(5, 3, False), (4, 7, False), (2, 2, False), (6, 3, True)])
def test_rkd_losses_match_loops_over_pairs_and_triplets(n, dim, repeated):
    """`repeated`: the last sample repeats the first in both networks (a batch with one image twice):
    that pair is at distance 0 and counts in the scale mu, the mean over all i != j (eq. 3)."""
    s, t = torch.randn(n, dim), torch.randn(n, dim)
    if repeated:
        s[-1], t[-1] = s[0], t[0]
    distances = normalised_distances_by_hand

    def cosines(e):
        out = torch.zeros(n, n, n)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = e[i] - e[j], e[k] - e[j]
                    if a.norm() > 0 and b.norm() > 0:  # i = j, k = j or a repeated sample: cos 0
                        out[i, j, k] = a.dot(b) / (a.norm() * b.norm())
        return out

    assert rkd_distance_loss(s, t).item() == pytest.approx(
        huber(distances(s) - distances(t)).mean().item(), rel=1e-5
    )
    assert rkd_angle_loss(s, t).item() == pytest.approx(
        huber(cosines(s) - cosines(t)).mean().item(), rel=1e-5
    )


def test_rkd_distance_of_a_collapsed_student_is_the_teachers_huber_cost():
    """Every student embedding equal (mu = 0): its normalised distances are 0, so the term is the
    mean Huber cost of the teacher's normalised distances, about 0.4 x 25, not 2.2e7, and finite
    with a finite gradient. float32 sums of 8 x 8 O(1) terms: 1e-5 relative is ample."""
    torch.manual_seed(0)
    s = torch.randn(1, 16, 1, 1).expand(8, 16, 1, 1).clone().requires_grad_()  # the pooled map
    t = torch.randn(8, 16, 1, 1)
    want = sum(huber_by_hand(0.0, x) for row in normalised_distances_by_hand(t.flatten(1)).tolist() for x in row) / 64
    logits = torch.zeros(8, 10)
    got = make("rkd", [], [])([s, logits], [t, logits], torch.zeros(8, dtype=torch.long), 1)["loss_rkd_distance"]
    assert got.item() == pytest.approx(25 * want, rel=1e-5) and 0 < want < 1
    got.backward()
    assert torch.isfinite(s.grad).all()


def huber_by_hand(x: float, y: float) -> float:
    return 0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5


@pytest.mark.parametrize("cs, ct", [(3, 5), (4, 4), (1, 2)])
def test_nst_is_mmd_with_explicit_kernel_sums(cs, ct):
    s, t = torch.rand(2, cs, 3, 2), torch.rand(2, ct, 3, 2)

    def kernel_mean(a, b):  # a, b: lists of normalised channel vectors
        return sum((x.dot(y)) ** 2 for x in a for y in b) / (len(a) * len(b))

    direct = 0.0
    for x, y in zip(s, t, strict=True):
        xs = [c.flatten() / c.norm() for c in x]
        ys = [c.flatten() / c.norm() for c in y]
        direct += kernel_mean(xs, xs) + kernel_mean(ys, ys) - 2 * kernel_mean(xs, ys)
    assert nst_loss(s, t).item() == pytest.approx(float(direct) / 2, rel=1e-4, abs=1e-7)


def reference_core(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """HOSVD via torch.linalg.svd of each mode-n unfolding (d_n x rest), same sign rule, einsum."""
    factors = []
    for mode, rank in enumerate(ranks):
        u = torch.linalg.svd(x.movedim(mode, 0).reshape(x.shape[mode], -1), full_matrices=False).U[:, :rank]
        peak = u[u.abs().argmax(0), torch.arange(u.shape[1])]
        factors.append(u * torch.sign(peak))
    letters = "abcd"[: x.dim()]
    for mode, u in enumerate(factors):
        out = letters.replace(letters[mode], "z")
        x = torch.einsum(f"{letters},{letters[mode]}z->{out}", x, u)
    return x


@pytest.mark.parametrize(
    "shape, ranks", [((4, 3, 5, 6), [2, 2, 3, 4]), ((3, 4, 4), [3, 4, 4]), ((2, 6, 3), [1, 3, 2])]
)
def test_tucker_core_matches_svd_hosvd(shape, ranks):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(tucker_core(x[None], ranks)[0], reference_core(x, ranks))


def test_tucker_core_with_full_ranks_keeps_the_energy():
    """Orthonormal factors of full rank: the core is x in rotated bases, with the same norm."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(tucker_core(x[None], [3, 4, 5])[0].norm(), x.norm())


@pytest.mark.parametrize("mode", ["full", "sample"])
def test_tucker_loss_compares_normalised_cores_with_equal_ranks(mode):
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 6, 2, 2)  # channel and spatial sizes differ
    if mode == "full":
        ranks, clipped = [3, 2, 3, 3], [3, 2, 2, 2]
        cores = [(reference_core(s.double(), clipped), reference_core(t.double(), clipped))]
    else:
        ranks, clipped = [2, 3, 3], [2, 2, 2]
        cores = [
            (reference_core(a.double(), clipped), reference_core(b.double(), clipped))
            for a, b in zip(s, t, strict=True)
        ]
    direct = sum(((a / a.norm() - b / b.norm()) ** 2).sum() for a, b in cores) / len(cores)
    assert tucker_loss(s, t, ranks, mode).item() == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_match_probabilities_computed_directly(temperature):
    s, t, y = torch.randn(5, 6), torch.randn(5, 6), torch.tensor([0, 3, 5, 3, 1])
    tckd = nckd = 0.0
    for row_s, row_t, target in zip(s, t, y.tolist(), strict=True):
        p_s, p_t = (row_s / temperature).softmax(0), (row_t / temperature).softmax(0)
        b_s = torch.stack([p_s[target], 1 - p_s[target]])
        b_t = torch.stack([p_t[target], 1 - p_t[target]])
        tckd += (b_t * (b_t / b_s).log()).sum().item()
        others = [c for c in range(6) if c != target]
        q_s, q_t = (row_s[others] / temperature).softmax(0), (row_t[others] / temperature).softmax(0)
        nckd += (q_t * (q_t / q_s).log()).sum().item()
    got_tckd, got_nckd = dkd_losses(s, t, y, temperature)
    assert got_tckd.item() == pytest.approx(tckd / 5 * temperature**2, rel=1e-4)
    assert got_nckd.item() == pytest.approx(nckd / 5 * temperature**2, rel=1e-4)


def logits_with_target_probability(p: float, temperature: float, target: int, g: torch.Generator) -> torch.Tensor:
    """(10,) float32 logits whose softmax at `temperature` gives the target about probability p."""
    z = torch.randn(10, generator=g, dtype=torch.float64)
    rest = torch.cat([z[:target], z[target + 1 :]]) / temperature
    z[target] = temperature * (math.log(p / (1 - p)) + rest.logsumexp(0).item())
    return z.float()


def tckd_by_hand(s: list[float], t: list[float], target: int, temperature: float) -> float:
    """T^2 KL between the (p_target, 1 - p_target) pairs, in float64 with 1 - p summed from the
    other classes' probabilities (no cancellation)."""

    def binary(z: list[float]) -> tuple[float, float]:
        e = [math.exp((v - z[target]) / temperature) for v in z]  # the target's is 1
        rest = sum(v for c, v in enumerate(e) if c != target)
        return 1 / (1 + rest), rest / (1 + rest)

    b_s, b_t = binary(s), binary(t)
    return temperature**2 * sum(q * math.log(q / p) for p, q in zip(b_s, b_t, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("p_teacher, p_student", [(0.999, 0.99), (0.9999, 0.999), (0.99, 0.9999)])
def test_dkd_tckd_is_precise_at_confident_targets(temperature, p_teacher, p_student):
    """At p_target 0.999-0.9999, log p_target from z_t - logsumexp(z) kept only 3 digits in float32;
    via the target-vs-rest gap TCKD matches a float64 computation to 1e-6 (from the float32 logits)."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([3, 7])
    s = torch.stack([logits_with_target_probability(p_student, temperature, c, g) for c in y.tolist()])
    t = torch.stack([logits_with_target_probability(p_teacher, temperature, c, g) for c in y.tolist()])
    want = sum(tckd_by_hand(a, b, c, temperature) for a, b, c in zip(s.tolist(), t.tolist(), y.tolist(), strict=True))
    tckd, _ = dkd_losses(s, t, y, temperature)
    assert tckd.item() == pytest.approx(want / 2, rel=1e-6)


def test_dkd_decomposes_hinton_kd():
    """The paper's identity: KD = TCKD + (1 - p_t^teacher) NCKD (per sample)."""
    s, t, y = torch.randn(1, 10), torch.randn(1, 10), torch.tensor([4])
    tckd, nckd = dkd_losses(s, t, y, 4.0)
    p_target = (t / 4.0).softmax(1)[0, 4]
    assert kd_loss(s, t, 4.0).item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-4)


@pytest.mark.parametrize(
    "epoch, warmup, ramp", [(1, 20, 0.05), (10, 20, 0.5), (20, 20, 1.0), (50, 20, 1.0), (1, 0, 1.0)]
)
def test_dkd_warmup_ramps_both_terms(epoch, warmup, ramp):
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    tckd, nckd = dkd_losses(s, t, y, 4.0)
    out = make("dkd", [], [], dkd_warmup=warmup, dkd_alpha=2.0, dkd_beta=3.0)([s], [t], y, epoch)
    assert out["loss_dkd_tckd"].item() == pytest.approx(ramp * 2.0 * tckd.item(), rel=1e-6)
    assert out["loss_dkd_nckd"].item() == pytest.approx(ramp * 3.0 * nckd.item(), rel=1e-6)


def test_losses_are_zero_when_student_equals_teacher():
    f, e, logits = torch.rand(4, 6, 4, 4), torch.randn(5, 8), torch.randn(4, 10)
    zero = [fitnets_loss(f, f), at_loss(f, f, 2.0), ft_loss(f, f), rkd_distance_loss(e, e), rkd_angle_loss(e, e),
            nst_loss(f, f), tucker_loss(f, f, [3, 4, 2, 2], "full"), tucker_loss(f, f, [4, 2, 2], "sample"),
            *dkd_losses(logits, logits, torch.tensor([1, 2, 3, 4]), 4.0)]  # fmt: skip
    assert max(z.abs().item() for z in zero) < 1e-6


# ---------------------------------------------------------------- gradients, autocast, degenerate input


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradients_reach_student_and_method_parts_never_the_teacher(name):
    method = make(name, CIFAR, RESNET18)  # deeper, wider teacher: pairing and channel mismatch
    student, teacher = features(CIFAR, 4, requires_grad=True), features(RESNET18, 4, requires_grad=True)
    sum(method(student, teacher, torch.tensor([0, 1, 2, 3]), 1).values()).backward()
    assert all(t.grad is None for t in teacher)
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    if name in ("fitnets", "factor_transfer"):
        assert trainable  # connector / translator


DEGENERATE = {  # case: (student transform, teacher transform) of a random batch of 4
    "identical_samples": (lambda f: f[:1].expand_as(f).contiguous(),) * 2,
    "all_zero": (torch.zeros_like,) * 2,
    "zero_student": (torch.zeros_like, lambda f: f),
    "batch_of_2": (lambda f: f[:2],) * 2,
}
SMALL = [torch.Size(s) for s in [(16, 8, 8), (32, 4, 4), (10,)]]


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_finite_gradients_on_degenerate_input_under_bf16_autocast(name, case):
    torch.manual_seed(0)
    method = make(name, SMALL, SMALL)
    to_student, to_teacher = DEGENERATE[case]
    student = [to_student(f).bfloat16().requires_grad_() for f in features(SMALL, 4)]
    teacher = [to_teacher(f).bfloat16() for f in features(SMALL, 4)]
    targets = torch.zeros(student[0].shape[0], dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method(student, teacher, targets, 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    grads = [s.grad for s in student if s.grad is not None] + [
        p.grad for p in method.parameters() if p.grad is not None
    ]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "loss", [lambda s, t: at_loss(s, t, 2.0), nst_loss, lambda s, t: tucker_loss(s, t, [3, 4, 2, 2], "full"),
             lambda s, t: tucker_loss(s, t, [4, 2, 2], "sample"), lambda s, t: rkd_angle_loss(s.flatten(1), t.flatten(1)),
             lambda s, t: rkd_distance_loss(s.flatten(1), t.flatten(1))]
)  # fmt: skip
def test_losses_stay_fp32_under_autocast(loss):
    s, t = torch.rand(4, 6, 4, 4), torch.rand(4, 5, 4, 4)
    expected = loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- factor transfer's pre-training


def test_factor_transfer_pretrains_a_frozen_paraphraser():
    student, x, _ = digits_outputs()
    teacher = create_model("ResNet8", 10, 1, 8).eval()
    with torch.no_grad():
        t_out = teacher(x)
    method = make("factor_transfer", [o.shape[1:] for o in student(x)], [o.shape[1:] for o in t_out],
                  ft_pretrain_epochs=3)  # fmt: skip
    assert method.pretrain_artifact == "paraphraser.pth" and method.pretrained_module() is method.paraphraser
    assert not any(p.requires_grad for p in method.paraphraser.parameters())
    before = [p.clone() for p in method.paraphraser.parameters()]
    logged = []
    data = [(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    assert method.pretrain(teacher, lambda: iter(data), lambda *point: logged.append(point))
    assert [(name, epoch) for name, _, epoch in logged] == [("paraphraser_loss", e) for e in (1, 2, 3)]
    assert all(isinstance(v, float) and v > 0 for _, v, _ in logged)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.paraphraser.parameters(), strict=True))

    # Restored (no pretrain call) or pre-trained: the paraphraser stays out of the student's optimiser.
    restored = make("factor_transfer", method.student_shapes, method.teacher_shapes)
    restored.load_state_dict(method.state_dict())
    for m in (method, restored):
        assert not any(p.requires_grad for p in m.paraphraser.parameters())
        optimizer = torch.optim.SGD(
            [*student.parameters(), *(p for p in m.parameters() if p.requires_grad)], lr=0.1
        )
        optimizer.zero_grad()
        sum(m(student(x), t_out, None, 1).values()).backward()
        optimizer.step()
        assert all(p.grad is None for p in m.paraphraser.parameters())
        assert all(p.grad is not None for p in m.translator.parameters())


# ---------------------------------------------------------------- the real models


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_with_the_digits_models(name):
    student, x, t_out = digits_outputs()
    s_out = student(x)
    method = make(name, [o.shape[1:] for o in s_out], [o.shape[1:] for o in t_out])
    terms = method(s_out, t_out, torch.arange(8) % 10, 1)
    assert terms and all(k.startswith("loss_") and torch.isfinite(v) for k, v in terms.items())
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_with_resnet56_and_resnet112_shapes(name):
    method = make(name, CIFAR, CIFAR)
    student = features(CIFAR, 4, requires_grad=True)
    terms = method(student, features(CIFAR, 4), torch.tensor([0, 5, 50, 99]), 3)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())


# ---------------------------------------------------------------- registration and options


def test_methods_are_registered_with_unique_simple_options():
    spec_fields = {f.name for f in dataclasses.fields(RunSpec)}
    seen: set[str] = set()
    for name in ["pure", *METHOD_NAMES]:
        cls = METHODS[name]
        assert cls.name == name and cls.reference
        assert cls.not_capturable is None or (isinstance(cls.not_capturable, str) and cls.not_capturable)
        for option, (default, meaning) in cls.options.items():
            assert isinstance(default, int | float | str | bool) and meaning
            assert option not in seen and option not in spec_fields
            seen.add(option)
        built = cls(CIFAR, CIFAR, temperature=4.0)
        assert {k: getattr(built, k) for k in cls.options} == cls.option_defaults()  # each default written once


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_epoch_key_says_when_the_forward_changes_with_the_epoch(name):
    """A CUDA graph captured at one epoch is replayed at every epoch with the same `epoch_key`: the
    terms must then be the same (a method whose forward reads the epoch must say so)."""
    method = make(name, CIFAR, CIFAR, **({"dkd_warmup": 3} if name == "dkd" else {}))
    student, teacher, targets = features(CIFAR, 4), features(CIFAR, 4), torch.tensor([0, 5, 50, 99])
    epochs = [1, 2, 3, 4, 50, 1000]
    terms = {e: method(student, teacher, targets, e) for e in epochs}
    for a in epochs:
        for b in epochs:
            if method.epoch_key(a) == method.epoch_key(b):
                assert all(torch.equal(terms[a][k], terms[b][k]) for k in terms[a]), (a, b)
    if name == "dkd":
        assert [method.epoch_key(e) for e in epochs] == [1, 2, 3, 3, 3, 3]


@pytest.mark.parametrize(
    "name, options", [("attention_transfer", {"at_reduction": "max"}), ("tucker", {"tucker_mode": "batch"}),
                      ("tucker", {"tucker_channel_rank": 0}), ("fitnets", {"hint_stage": 4}),
                      ("fitnets", {"guided_stage": 0})]
)  # fmt: skip
def test_bad_options_are_spec_errors(name, options):
    with pytest.raises(SpecError):
        make(name, CIFAR, CIFAR, **options)
