"""`kd bench`: students' images per second of a thesis-style loop and of this engine, solo and packed.

One invocation, one model pair, one data shape (CIFAR: 3x32x32, 100 classes, synthetic uint8
images) and one batch size, each pipeline for `--warmup` steps and then `--steps` timed ones:

- reference: the thesis's loop. A torch DataLoader with worker processes and torchvision
  transforms on PIL images (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
  Normalize), fp32, cudnn deterministic, the eager step (teacher forward, student forward,
  backward, SGD) with a host read of the loss every step, as a thesis logs it;
- engine solo: the suite's own Trainer step (`fast.make_trainer`: GraphedTrainer where CUDA graphs
  apply, else the eager Trainer) on data resident on the device, in the suite's precision;
- engine packed: N students of the same pair sharing one teacher forward per batch.

On CUDA the engine runs with cudnn deterministic on (the suite's default) and off. Speed is a
benchmark, never a test: on the CPU this is a smoke run, and its numbers are only information.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd.cluster.estimate import save_measurement
from kd.data.base import ImageData
from kd.data.loader import DeviceData
from kd.engine import compiled, fast
from kd.engine.job import build_parts, new_student, pick_device, seeded_build
from kd.engine.trainer import Precision, Student, Trainer, set_cudnn_deterministic
from kd.methods import METHODS
from kd.models import create_model
from kd.spec import RunSpec, SpecError, check_precision

DATASET = "cifar100"  # the shape and augmentation (padding 4, flips) of the benchmark's data
MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)  # CIFAR-100's, for the normalisation


def synthetic_cifar(n: int, seed: int = 0) -> ImageData:
    """CIFAR-shaped random uint8 images and labels (speed does not depend on the pixels)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n + 1000, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n + 1000,), generator=g)
    return ImageData(images[:n], labels[:n], images[n:], labels[n:], 100, MEAN, STD)


class ThesisCifar(torch.utils.data.Dataset):
    """What torchvision's CIFAR100 does per item: an HWC uint8 array -> PIL image -> transforms."""

    def __init__(self, data: ImageData) -> None:
        from torchvision import transforms

        self.images = data.train_images.permute(0, 2, 3, 1).contiguous().numpy()  # as CIFAR100.data
        self.labels = data.train_labels.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def specs_for(args: argparse.Namespace, n: int) -> list[RunSpec]:
    """n students of the pair, as a charlie pack would hold them (alphas spread over (0, 1))."""
    taught = args.method != "pure"
    return [RunSpec.create(dataset=DATASET, model=args.student, teacher=args.teacher if taught else None,
                           method=args.method, alpha=(i + 1) / (n + 1) if taught else 0.0,
                           batch_size=args.batch_size, seed=0) for i in range(n)]


def build(args: argparse.Namespace, data: DeviceData, device: torch.device, n: int, precision: Precision,
          graphed: bool) -> tuple[list[Student], torch.nn.Module | None]:
    """The students (built as a run builds them) and a randomly initialised teacher."""
    specs = specs_for(args, n)
    students = []
    for spec in specs:
        model, method, _ = build_parts(spec, data, device)
        students.append(new_student(spec, model, method, precision, graphed))
        model.train(), method.train()  # what Trainer.train_epoch does before the batches
    teacher = None
    if specs[0].teacher:
        teacher = seeded_build(0, lambda: create_model(args.teacher, data.num_classes, data.in_channels,
                                                       data.image_size))
        teacher = calibrated(teacher.to(device), data)
    return students, teacher


def calibrated(teacher: nn.Module, data: DeviceData, batches: int = 10) -> nn.Module:
    """A random teacher with its BatchNorm statistics measured on a few batches. Left at their
    initial values (mean 0, variance 1) they normalise nothing in eval mode, and a ResNet-112's
    logits overflow, as a trained teacher's never do."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    teacher.train()
    with torch.no_grad():
        for _, (x, _) in zip(range(batches), data.train_batches(0, 256), strict=False):
            teacher(x)
    return teacher.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Per student: `--warmup` untimed steps, then `--steps` timed ones."""
    for _ in range(args.warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def reference(args: argparse.Namespace, images: ImageData, data: DeviceData, device: torch.device) -> dict[str, Any]:
    """The thesis-style loop: DataLoader + torchvision, fp32, deterministic, the eager step."""
    set_cudnn_deterministic(True)
    precision = Precision(device, None)
    students, teacher = build(args, data, device, 1, precision, graphed=False)
    trainer = Trainer(students, data, teacher=teacher, precision=precision, progress=False)
    loader = torch.utils.data.DataLoader(ThesisCifar(images), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    batches = itertools.chain.from_iterable(enumerate(loader) for _ in itertools.count())

    def step() -> None:
        b, (x, y) = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        trainer.train_batch(students, x, y, 1, b)

    rate = images_per_second(step, args, device)
    return {"pipeline": "reference", "label": f"reference: DataLoader ({args.workers} workers) + torchvision, "
            "fp32, eager", "students": 1, "cudnn_deterministic": True if device.type == "cuda" else None,
            "precision": "fp32", "step_mode": "eager", "images_per_s": rate}


def engine(args: argparse.Namespace, data: DeviceData, device: torch.device, n: int,
           deterministic: bool | None, compile: bool = False) -> dict[str, Any]:
    """The suite's step on resident data: graphed where it applies, as `kd job` would train the pack
    (`compile`: with `kd job --compile`'s fused kernels; their compilation happens in the warm-up)."""
    if deterministic is not None:
        set_cudnn_deterministic(deterministic)
    precision = Precision.for_device(device, args.precision)
    modes = fast.step_modes(device, specs_for(args, n))
    students, teacher = build(args, data, device, n, precision, graphed=fast.GRAPH in modes)
    forwards = compiled.CompiledForwards(compile)
    trainer = fast.make_trainer(students, data, modes, teacher=teacher, precision=precision, progress=False,
                                forwards=forwards)
    batches = endless(data, args.batch_size)

    def step() -> None:
        epoch, b, x, y = next(batches)
        trainer.train_batch(students, x, y, epoch, b)

    rate = images_per_second(step, args, device)
    trainer.settle()  # the guard's last read: a benchmark of a diverged step would mean nothing
    mode = getattr(trainer, "failure", None) or modes[0]
    dtype = precision.name
    name = "engine solo" if n == 1 else f"engine packed x{n}"
    fused = ", compiled" if forwards.state == compiled.ON else ""
    return {"pipeline": "solo" if n == 1 else "packed", "label": f"{name}: resident data, {dtype}, {mode}{fused}",
            "students": n, "cudnn_deterministic": deterministic, "precision": dtype, "step_mode": mode,
            "compile": forwards.state, "images_per_s": rate}


def endless(data: DeviceData, batch_size: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    for epoch in itertools.count(1):
        for b, (x, y) in enumerate(data.train_batches(epoch, batch_size)):
            yield epoch, b, x, y


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    images = synthetic_cifar(args.images)
    data = DeviceData(images, DATASET, device, seed=0)
    results = [reference(args, images, data, device)]
    for compile in (False, True) if args.compile else (False,):
        for deterministic in (True, False) if device.type == "cuda" else (None,):
            for n in dict.fromkeys((1, args.students)):
                results.append(engine(args, data, device, n, deterministic, compile))
    for r in results:
        r["images_per_s_total"] = r["images_per_s"] * r["students"]
        r["ratio"] = r["images_per_s"] / results[0]["images_per_s"]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()}, {torch.get_num_threads()} threads")
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "teacher": args.teacher,
            "student": args.student, "method": args.method, "batch_size": args.batch_size, "images": args.images,
            "warmup": args.warmup, "steps": args.steps, "students": args.students, "workers": args.workers,
            "results": results}


def report(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"kd bench: {s['teacher']} -> {s['student']}, {s['method']}, batch {s['batch_size']}, "
             f"{s['images']} synthetic 3x32x32 images (100 classes), {s['device']} ({s['device_name']}), "
             f"torch {s['torch']}",
             f"{s['warmup']} warm-up + {s['steps']} timed steps per pipeline; img/s: each student's images per "
             "second, and all the pack's students' together",
             f"{'pipeline':<70} {'cudnn det.':>10} {'img/s':>10} {'vs ref.':>8} {'all students':>13} {'vs ref.':>8}"]
    reference_rate = s["results"][0]["images_per_s"]
    for r in s["results"]:
        det = {True: "on", False: "off", None: "n/a"}[r["cudnn_deterministic"]]
        total = r["images_per_s_total"]
        lines.append(f"{r['label']:<70} {det:>10} {r['images_per_s']:>10,.1f} {r['ratio']:>7.2f}x "
                     f"{total:>13,.1f} {total / reference_rate:>7.2f}x")
    if s["device"] == "cpu":
        solo = next(r for r in s["results"] if r["pipeline"] == "solo")
        verdict = "not slower" if solo["ratio"] >= 1 else "SLOWER"
        lines.append(f"on the CPU, for information only: engine solo is {solo['ratio']:.2f}x the reference "
                     f"({verdict}); speed is measured on a GPU, see docs/performance.md")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.workers is None:
        args.workers = 8 if pick_device(args.device).type == "cuda" else 2
    if args.steps < 1 or args.warmup < 0 or args.students < 1 or args.batch_size < 1 or args.workers < 0:
        raise SpecError("--steps, --students and --batch-size must be >= 1, --warmup and --workers >= 0")
    check_precision(args.precision)
    if args.images < args.batch_size:
        raise SpecError(f"--images {args.images} is less than one batch: pass --images >= --batch-size")
    specs_for(args, 1)  # unknown models or methods stop here, as one line
    if METHODS[args.method].inputs:
        raise SpecError(f"kd bench compares with the thesis-style loop, which feeds no {', '.join(sorted(METHODS[args.method].inputs))}: "
                        f"method '{args.method}' needs it; bench another method, or read a training's epoch_time")
    summary = run_bench(args)
    print(report(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"kept as this device's measurement for kd submit --dry-run's estimates: {save_measurement(summary)}")
    return 0
