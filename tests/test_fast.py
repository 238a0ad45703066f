"""The fast engine, on the CPU: on-device augmentation equals torchvision's, packed students equal
their solo runs, the graphed step's body equals the eager step, and every fallback to eager.

There is no GPU here, so the captured body is exercised through a stand-in for CudaGraphs that
runs it eagerly at each "replay": everything but the capture itself (static buffers, device
tallies, tensor learning rates, warm-up, re-capture, the eager tail, the guard) is what the GPU runs.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import pytest
import torch
from mlflow import MlflowClient
from torchvision.transforms.v2 import functional as TF

from kd.data import load_dataset
from kd.data.augment import crop_flip, draw_crop_flip
from kd.data.loader import DeviceData
from kd.engine import compiled, fast
from kd.engine.job import build_parts, new_student, run_specs
from kd.engine.trainer import (
    MAX_SKIPPED_STEPS,
    NON_FINITE,
    SKIPPED,
    Precision,
    Tally,
    Trainer,
    TrainingDiverged,
    build_optimizer,
)
from kd.methods.base import METHODS, Method, register_method
from kd.models import create_model
from kd.spec import RunOptions, RunSpec
from tests.conftest import CPU

# one worker: its module fixtures train once, not once per xdist worker
pytestmark = pytest.mark.xdist_group("fast")

COMMON = dict(dataset="digits", model="ResNet8", epochs=2, batch_size=48, train_limit=320)  # 6 full + 1 short


class Uncaptured:
    """CudaGraphs' stand-in: warm-up is a plain call, and each replay runs the captured body eagerly."""

    def __init__(self) -> None:
        self.captures = 0

    def warmup(self) -> nullcontext:
        return nullcontext()

    def capture(self, step):
        self.captures += 1
        return step


class FailingCapture(Uncaptured):
    def capture(self, step):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store for this module's runs, and an (untrained) digits teacher passed as --teacher-weights."""
    tmp = tmp_path_factory.mktemp("fast")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(tmp)
        torch.save({"weights": create_model("ResNet8", 10, 1, 8).state_dict()}, tmp / "teacher.pth")
        yield str(tmp / "teacher.pth")


def kd_spec(teacher_weights: str, method: str, **options) -> RunSpec:
    return RunSpec.create(**COMMON, teacher="ResNet8", teacher_weights=teacher_weights, method=method, alpha=0.5,
                          options=options)


def pack(teacher_weights: str) -> list[RunSpec]:
    """A pure student with KD students; DKD's ramp changes each epoch, Tucker cannot be captured."""
    return [RunSpec.create(**COMMON), kd_spec(teacher_weights, "logit"), kd_spec(teacher_weights, "dkd", dkd_warmup=2),
            kd_spec(teacher_weights, "tucker")]


@pytest.fixture(scope="module")
def eager_pack(teacher_weights: str) -> list[dict[str, list[tuple[int, float]]]]:
    """The pack trained eagerly on the CPU: every metric history, per student."""
    return [histories(o.run_id) for o in run_specs(pack(teacher_weights), experiment="eager", options=CPU,
                                                   progress=False)]


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k not in ("epoch_time", "train_time") and not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def tag(run_id: str) -> str:
    return MlflowClient().get_run(run_id).data.tags["kd.step_mode"]


@pytest.fixture
def as_on_a_gpu(monkeypatch: pytest.MonkeyPatch):
    """run_specs picks modes as on a GPU and captures with `graphs` (the CPU stand-in)."""

    def use(graphs: Uncaptured) -> Uncaptured:
        real = fast.step_modes
        monkeypatch.setattr(fast, "step_modes", lambda device, specs: real(torch.device("cuda"), specs))
        monkeypatch.setattr(fast, "CudaGraphs", lambda: graphs)
        return graphs

    return use


@pytest.mark.parametrize(("channels", "size", "padding", "flip"), [(3, 32, 4, True), (1, 8, 1, False), (3, 9, 2, True)])
def test_on_device_crop_flip_equals_torchvision_per_image(channels, size, padding, flip):
    """Same drawn offsets and flips: pad by `padding`, crop at (top, left), then flip, as torchvision's
    RandomCrop(size, padding) + RandomHorizontalFlip do for the same draws."""
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8, generator=g)
    offsets, flips = draw_crop_flip(len(images), padding, flip, g)
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding and (flips.any() if flip else not flips.any())
    ours = crop_flip(images, offsets, flips, padding)
    for image, (top, left), flipped, got in zip(images, offsets.tolist(), flips, ours, strict=True):
        want = TF.crop(TF.pad(image, [padding]), top, left, size, size)
        if flipped:
            want = TF.horizontal_flip(want)
        assert torch.equal(got, want)


def test_packed_students_equal_their_solo_runs_bit_for_bit(teacher_weights, eager_pack):
    for spec, together in list(zip(pack(teacher_weights), eager_pack, strict=True))[:3]:
        [alone] = run_specs([spec], experiment=f"solo-{spec.method}", options=CPU, progress=False)
        assert histories(alone.run_id) == together, spec.method
        assert tag(alone.run_id) == "eager: no CUDA device (cpu)"


def test_graphed_step_equals_the_eager_step_and_mixes_with_eager_students(teacher_weights, eager_pack, as_on_a_gpu):
    """Captured once for epoch 1 and again for DKD's epoch-2 ramp; Tucker steps eagerly after each
    replay, on the graph's teacher outputs; the short last batch is eager. Every metric is the eager one."""
    graphs = as_on_a_gpu(Uncaptured())
    graphed = run_specs(pack(teacher_weights), experiment="graphed", options=CPU, progress=False)
    assert graphs.captures == 2
    assert [histories(o.run_id) for o in graphed] == eager_pack
    assert [tag(o.run_id) for o in graphed] == [fast.GRAPH] * 3 + [
        "eager: method 'tucker' is not capturable (torch.linalg.eigh checks its result on the host)"]


def test_a_failed_capture_trains_eagerly_and_says_why(teacher_weights, eager_pack, as_on_a_gpu):
    as_on_a_gpu(FailingCapture())
    fell_back = run_specs(pack(teacher_weights), experiment="fell-back", options=CPU, progress=False)
    assert [histories(o.run_id) for o in fell_back] == eager_pack
    assert [tag(o.run_id) for o in fell_back][:3] == [
        "eager: capture failed: RuntimeError: operation not permitted when stream is capturing"] * 3


def unit_parts(teacher_weights: str, n: int):
    """A logit pack of `n` identical fresh students on digits (CPU), their teacher and precision."""
    spec = kd_spec(teacher_weights, "logit")
    data = DeviceData(load_dataset("digits"), "digits", torch.device("cpu"), spec.seed, train_limit=spec.train_limit)
    amp = Precision.for_device(torch.device("cpu"))
    teacher = create_model("ResNet8", 10, 1, 8).eval().requires_grad_(False)
    students = []
    for _ in range(n):
        model, method, _ = build_parts(spec, data, torch.device("cpu"))
        students.append(new_student(spec, model, method, amp, graphed=True))
    return spec, data, amp, teacher, students


def assert_same_training(a, b) -> None:
    assert a.batch == b.batch and dict(a.sums) == dict(b.sums)
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                 strict=True))


def test_capture_fallback_unit(teacher_weights):
    """GraphedTrainer.capture when capturing raises: False, eager from then on, the batch still trained
    exactly once (parameters equal a plain Trainer's after the same batches)."""
    spec, data, amp, teacher, (failing, plain) = unit_parts(teacher_weights, 2)
    graphed = fast.GraphedTrainer([failing], data, teacher=teacher, precision=amp, progress=False,
                                  graphs=FailingCapture())
    eager = Trainer([plain], data, teacher=teacher, precision=amp, progress=False)
    batches = list(data.train_batches(1, spec.batch_size))[: fast.WARMUP_STEPS + 2]
    for b, (x, y) in enumerate(batches):
        graphed.train_batch([failing], x, y, 1, b)
        eager.train_batch([plain], x, y, 1, b)
    graphed.settle()
    eager.settle()
    assert graphed.failure == "eager: capture failed: RuntimeError: operation not permitted when stream is capturing"
    assert graphed.replay is None and failing.batch == plain.batch == len(batches)
    assert_same_training(failing, plain)


def no_cxx_compiler(graph_module, example_inputs):
    """A torch.compile backend that fails as inductor does on a machine without a C++ compiler."""
    raise RuntimeError("no C++ compiler found")


@pytest.mark.parametrize(("backend", "state"), [
    ("eager", compiled.ON),
    (no_cxx_compiler, "failed, trained uncompiled: BackendCompilerFailed: backend='no_cxx_compiler' raised: "
                      "RuntimeError: no C++ compiler found"),
])
def test_compiled_forwards_leave_no_trace_and_a_failing_compiler_trains_uncompiled(teacher_weights, backend, state):
    """Dynamo with its `eager` backend computes exactly what the modules do, so a compiled epoch is
    bit-identical to a plain one only if the compile trial put back BatchNorm's statistics, the
    gradients and the RNG. A compiler that fails does so in the trial, before any step: the run
    trains uncompiled, bit-identically, and its tag says why."""
    spec, data, amp, teacher, (fused, plain) = unit_parts(teacher_weights, 2)
    forwards = compiled.CompiledForwards(True, backend=backend)
    with_compile = Trainer([fused], data, teacher=teacher, precision=amp, progress=False, forwards=forwards)
    without = Trainer([plain], data, teacher=teacher, precision=amp, progress=False)
    for b, (x, y) in enumerate(data.train_batches(1, spec.batch_size)):  # the short last batch is plain
        with_compile.train_batch([fused], x, y, 1, b)
        without.train_batch([plain], x, y, 1, b)
    with_compile.settle()
    without.settle()
    assert forwards.state == state and bool(forwards.compiled) == (state == compiled.ON)
    assert_same_training(fused, plain)


DRIFT = 3e-3  # of a loss's terms, after two epochs compiled vs eager (see below)
KD_TEMPERATURE = RunSpec.create(**COMMON, teacher="ResNet8", method="logit", alpha=0.5).temperature


def test_inductor_compiled_runs_match_the_eager_ones(teacher_weights, eager_pack, as_on_a_gpu):
    """`--compile` with inductor (C++ kernels on the CPU), solo on the eager Trainer and as a graphed
    pack: fused kernels round differently, so the metrics equal the eager runs' to float tolerance.

    Inductor reorders float32 sums (differently for each CPU's vector width), and 14 SGD steps grow
    those 1e-7 roundings to about 1e-3 of the magnitude of the terms a loss is computed from. For
    cross-entropies that magnitude is the loss itself (tolerance relative); the KD loss
    T^2 KL(p_t || p_s) = T^2 (H(p_t, p_s) - H(p_t)) is the small difference of two entropies of up
    to log(classes) each, so its error is measured on T^2 log(classes), not on its own value (8e-3
    of it on one CPU). The compiled part is the forward: a wrong one moves loss_ce, train_loss and
    test_loss by far more than 3e-3 of themselves.
    """
    fused = RunOptions(device="cpu", compile=True)
    solo = run_specs([kd_spec(teacher_weights, "logit")], experiment="compiled-solo", options=fused, progress=False)
    as_on_a_gpu(Uncaptured())
    packed = run_specs(pack(teacher_weights)[:2], experiment="compiled-graphed", options=fused, progress=False)
    for outcome, want in [(solo[0], eager_pack[1]), (packed[0], eager_pack[0]), (packed[1], eager_pack[1])]:
        got = histories(outcome.run_id)
        assert got.keys() == want.keys()
        for key, history in want.items():
            assert [s for s, _ in got[key]] == [s for s, _ in history]
            values = [v for _, v in history]
            if key.endswith("_acc"):  # in percent: 1.0 ~ 3 digits images
                close = pytest.approx(values, abs=1.0)
            elif key in ("loss_kd", "loss_distill"):  # the compiled runs are pure and logit: loss_distill is loss_kd
                close = pytest.approx(values, abs=DRIFT * KD_TEMPERATURE**2 * math.log(10))
            else:
                close = pytest.approx(values, rel=DRIFT)
            assert [v for _, v in got[key]] == close, key
        assert MlflowClient().get_run(outcome.run_id).data.tags["kd.compile"] == compiled.ON
    assert [tag(o.run_id) for o in packed] == [fast.GRAPH] * 2


class PlantedNaN(Method):
    name = "planted_nan_graphed"

    def forward(self, student, teacher, targets, epoch):
        return {"loss_planted": student[-1].sum() * float("nan")}


def test_the_graphed_guard_names_method_epoch_and_first_bad_step(teacher_weights, eager_pack, as_on_a_gpu):
    """A diverged student in a graphed pack: FAILED with the eager guard's message, out of the graph
    from the next capture on; the pure student beside it trains exactly as it does eagerly."""
    register_method(PlantedNaN)
    try:
        graphs = as_on_a_gpu(Uncaptured())
        with pytest.raises(TrainingDiverged, match=r"non-finite loss in method 'planted_nan_graphed' at epoch 1, "
                                                   r"step 1: .*loss_planted=nan"):
            run_specs([pack(teacher_weights)[0], kd_spec(teacher_weights, "planted_nan_graphed")],
                      experiment="guard", options=CPU, progress=False)
    finally:
        METHODS.pop(PlantedNaN.name)
    client = MlflowClient()
    runs = {r.data.tags["kd.method"]: r for r in client.search_runs([client.get_experiment_by_name("guard").experiment_id])}
    assert runs["planted_nan_graphed"].info.status == "FAILED"
    assert "non-finite loss" in runs["planted_nan_graphed"].data.tags["kd.error"]
    assert runs["pure"].info.status == "FINISHED" and histories(runs["pure"].info.run_id) == eager_pack[0]
    assert graphs.captures == 2  # both students for epoch 1, the pure one alone for epoch 2


def test_tally_reports_the_earliest_event_like_the_eager_guard():
    tally = Tally.create(["loss_total", "loss_ce"], torch.device("cpu"))
    logits, y = torch.eye(4), torch.arange(4)
    good = {"loss_total": torch.tensor(1.0), "loss_ce": torch.tensor(2.0)}
    for step in range(1, MAX_SKIPPED_STEPS + 1):
        tally.record(good, logits, y, torch.tensor(step), torch.tensor(True))
    tally.record({**good, "loss_ce": torch.tensor(float("inf"))}, logits, y, torch.tensor(101), torch.tensor(False))
    with pytest.raises(TrainingDiverged, match=rf"^{re.escape(SKIPPED)} in method 'm' at epoch 3, "
                                               rf"step {MAX_SKIPPED_STEPS}: loss_total=1, loss_ce=2$"):
        tally.check("m", 3)
    tally.first.zero_()
    tally.record({**good, "loss_total": torch.tensor(float("nan"))}, logits, y, torch.tensor(102), torch.tensor(False))
    with pytest.raises(TrainingDiverged, match=rf"^{NON_FINITE} in method 'm' at epoch 3, step 102: loss_total=nan"):
        tally.check("m", 3)
    assert tally.correct.item() == 4 * (MAX_SKIPPED_STEPS + 2) and tally.streak.item() == 0


def test_step_modes_and_capture_keys():
    specs = [RunSpec.create(**COMMON, teacher="ResNet8", method=m, alpha=0.5) for m in ("logit", "tucker")]
    assert fast.step_modes(torch.device("cpu"), specs) == ["eager: no CUDA device (cpu)"] * 2
    assert fast.step_modes(torch.device("cuda"), specs) == [
        fast.GRAPH, "eager: method 'tucker' is not capturable (torch.linalg.eigh checks its result on the host)"]
    dkd = METHODS["dkd"]([], [], dkd_warmup=20)
    assert [dkd.epoch_key(e) for e in (1, 19, 20, 21, 150)] == [1, 19, 20, 20, 20]
    assert METHODS["logit"]([], []).epoch_key(7) is None
    # each method says whether it is capturable; whether its epoch_key tells the truth: test_methods.py
    assert {name for name, cls in METHODS.items() if cls.not_capturable} == {"tucker"}


def test_graph_ready_optimiser_is_plain_on_the_cpu():
    """fused / capturable only where a graph can exist; on the CPU the optimiser is the eager one."""
    param = [torch.nn.Parameter(torch.zeros(3))]
    for optimizer in ("sgd", "adamw"):
        group = build_optimizer(RunSpec.create(**COMMON, optimizer=optimizer), param, graphed=True).param_groups[0]
        assert group["fused"] is None and isinstance(group["lr"], float)


def test_a_resumed_optimiser_keeps_this_process_step_implementation(teacher_weights):
    """A checkpoint from another process (say, an eager one) must not turn off the fused step a graph needs."""
    spec = kd_spec(teacher_weights, "logit")
    data = DeviceData(load_dataset("digits"), "digits", torch.device("cpu"), spec.seed, train_limit=spec.train_limit)
    amp = Precision.for_device(torch.device("cpu"))
    here, elsewhere = (new_student(spec, *build_parts(spec, data, torch.device("cpu"))[:2], amp) for _ in range(2))
    elsewhere.optimizer.param_groups[0]["foreach"] = True
    here.restore(elsewhere.state())
    assert here.optimizer.param_groups[0]["foreach"] is None and here.optimizer.param_groups[0]["lr"] == spec.lr


class CountedCudaGraphs(fast.CudaGraphs):
    def __init__(self) -> None:
        super().__init__()
        self.captures = 0

    def capture(self, step):
        self.captures += 1
        return super().capture(step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): the real capture")
@pytest.mark.parametrize(("precision", "compile"), [("bf16", False), ("fp16", False), ("bf16", True)])
def test_cuda_graphed_pack_matches_eager(precision, compile):
    """The real thing: one graph for a pack (own streams, channels_last, fused SGD, fp16 scaler,
    inductor's kernels with --compile), DKD re-captured, Tucker eager beside it, the short batch
    eager; losses close to the eager step."""
    from kd.bench import synthetic_cifar

    device = torch.device("cuda")
    data = DeviceData(synthetic_cifar(128 * 4 + 40), "cifar100", device, seed=0)
    amp = Precision.for_device(device, precision)
    common = dict(dataset="cifar100", model="ResNet8", epochs=2, batch_size=128)
    specs = [RunSpec.create(**common)] + [
        RunSpec.create(**common, teacher="ResNet20", method=m, alpha=0.5, options=o)
        for m, o in (("logit", {}), ("fitnets", {}), ("dkd", {"dkd_warmup": 2}), ("tucker", {}))]
    teacher_weights = create_model("ResNet20", 100).state_dict()
    losses = {}
    for graphed in (False, True):
        students = [new_student(s, *build_parts(s, data, device)[:2], amp, graphed) for s in specs]
        teacher = create_model("ResNet20", 100).to(device).eval().requires_grad_(False)
        teacher.load_state_dict(teacher_weights)
        graphs = CountedCudaGraphs()
        forwards = compiled.CompiledForwards(compile and graphed)
        trainer = fast.make_trainer(students, data, [fast.GRAPH if graphed else "eager"], teacher=teacher,
                                    precision=amp, progress=False, **(dict(graphs=graphs, forwards=forwards)
                                                                      if graphed else {}))
        for epoch in (1, 2):
            trainer.train_epoch(epoch, students)
            for s in students:
                losses.setdefault(graphed, []).append(s.sums["loss_total"] / s.sums["seen"])
                s.scheduler.step()
                s.sums.clear()
                s.batch = 0
        if graphed:
            assert trainer.failure is None and graphs.captures == 2 and forwards.state == (
                compiled.ON if compile else compiled.OFF)
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
