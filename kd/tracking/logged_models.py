"""Every finished run's best weights as an MLflow 3 logged model, in the pickle-free `pt2` format.

The logged model is usable without kd: `Classifier(model, mean, std)` takes float32 images in
[0, 1], shape (N, C, H, W) (what torchvision's `ToTensor` gives), normalises them inside with
its dataset's training mean and std, and returns the logits alone, shape (N, classes). Its input
example is a batch of real test images, its `mlflow.note.content` tag (which the registry copies
into the version's description) states the input format and the class names. It is exported
with `torch.export` (`serialization_format="pt2"`), so `mlflow.pytorch.load_model` needs neither
kd nor pickle. kd itself keeps loading `best.pth` (`{'weights': state_dict}`, weights_only).

The logged model is named like its run, carries the run's accuracy and loss of the weights it
holds (best epoch), linked to the test split's dataset, and no system metrics.
`log_trained_model(client, run_id, spec, weights, shape)` needs only JSON and a file, so it can run
after training, in another process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from torch import Tensor, nn

from kd.data import DATASETS
from kd.models import create_model
from kd.models.weights import load_weights_only
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP

EXAMPLE_IMAGES = 4  # test images in the input example
DIGITS = [str(d) for d in range(10)]
CLASS_NAMES = {  # label i of each ten-class dataset; the others are described by their label order
    "digits": DIGITS,
    "svhn": DIGITS,
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
LABEL_ORDER = {"cifar100": "CIFAR-100's fine labels in their alphabetical order (apple ... worm)",
               "tinyimagenet": "TinyImageNet's WordNet ids (wnids.txt) in sorted order"}


class Classifier(nn.Module):
    """A kd model for users outside kd: [0, 1] images in, logits out (kd's models take normalised
    images and return `[stage features..., logits]`)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)[-1]


def model_shape(dataset: str, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                test_images: Tensor) -> dict[str, Any]:
    """What the export needs to know of the data besides the spec, as JSON: the dataset's sizes,
    its training mean and std, and the first test images (uint8) for the input example."""
    info = DATASETS[dataset]
    return {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "example": test_images[:EXAMPLE_IMAGES].cpu().tolist()}


def build(spec: RunSpec, weights: Path, shape: dict[str, Any]) -> Classifier:
    net = create_model(spec.model, shape["num_classes"], shape["in_channels"], shape["image_size"])
    net.load_state_dict(load_weights_only(weights)["weights"])
    return Classifier(net, shape["mean"], shape["std"]).eval()


def model_name(spec: RunSpec) -> str:
    """The run's name as MLflow allows a model's (no '.', '/', ':', '%', quotes): `a0.25` -> `a0_25`."""
    return re.sub(r"[./:%\"']", "_", spec.name())


def model_card(spec: RunSpec, shape: dict[str, Any]) -> str:
    """How to use the model without kd: input format, normalisation, output, class names."""
    size = f"(N, {shape['in_channels']}, {shape['image_size']}, {shape['image_size']})"
    names = CLASS_NAMES.get(spec.dataset)
    classes = (", ".join(f"{i} = {name}" for i, name in enumerate(names)) if names
               else f"index i = label i of {LABEL_ORDER.get(spec.dataset, spec.dataset + ' in its label order')}")
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(shape["mean"], shape["std"], strict=True))
    return (f"{spec.model} trained by kd on {spec.dataset} ({DATASETS[spec.dataset].description}).\n\n"
            f"Input: float32 images in [0, 1], shape {size}, channels first (NCHW; what torchvision's "
            f"`ToTensor` gives). The model normalises them itself with the training set's per-channel "
            f"mean/std ({stats}).\n\nOutput: float32 logits, shape (N, {shape['num_classes']}); "
            f"the class is their argmax. Classes: {classes}.\n\n"
            "Load: `mlflow.pytorch.load_model(uri)` (torch.export, no pickle, no kd needed).")


def log_trained_model(client: MlflowClient, run_id: str, spec: dict[str, Any], weights: str,
                      shape: dict[str, Any]) -> str:
    """Log best.pth's model as the run's logged model (named like the run, linked to it, with its
    best epoch's accuracy and loss on the test split); returns the model id (`models:/<id>`)."""
    run_spec = RunSpec.from_dict(spec)
    model = build(run_spec, Path(weights), shape)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=model_name(run_spec), source_run_id=run_id, params=run_spec.params(),
        tags={T.ROLE: run_spec.role, T.DATASET: run_spec.dataset, T.NOTE: model_card(run_spec, shape)},
        model_type="pytorch",
    )
    example = np.asarray(shape["example"], dtype=np.float32) / 255
    try:  # log_model's helpers read the fluent store: MLFLOW_TRACKING_URI, which get_client set to this
        # client's store. No run_id: MLflow would attach every step-0 metric (system samples too)
        mlflow.pytorch.log_model(
            model, name=model_name(run_spec), model_id=logged.model_id, input_example=example,
            serialization_format="pt2", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=SUMMARY_STEP)])
        client.log_batch(run_id, metrics=model_metrics(client, run, logged.model_id))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def model_metrics(client: MlflowClient, run: Any, model_id: str) -> list[Metric]:
    """The run's points that describe the logged weights (best.pth): best_test_acc and best_epoch
    (summary step), test_acc and test_loss of the best epoch; each linked to the test split."""
    test = [i.dataset for i in run.inputs.dataset_inputs if any(t.value == "test" for t in i.tags)]
    dataset = {"dataset_name": test[0].name, "dataset_digest": test[0].digest} if test else {}
    best_epoch = int(run.data.metrics.get("best_epoch", 0))
    wanted = {"best_test_acc": SUMMARY_STEP, "best_epoch": SUMMARY_STEP, "test_acc": best_epoch,
              "test_loss": best_epoch}
    return [Metric(m.key, m.value, m.timestamp, m.step, run_id=run.info.run_id, model_id=model_id, **dataset)
            for key, step in wanted.items() for m in client.get_metric_history(run.info.run_id, key)
            if m.step == step]


def note_registered_version(client: MlflowClient, model_id: str, name: str, version: int | str) -> None:
    """Tell the logged model its registered version (tag `mlflow.modelVersions`, what
    `mlflow.register_model` and a tracking server write): MLflow's UI then shows the version on the
    model's page and in the experiment's Models tab. Idempotent: a server has written it already (the
    version as MLflow spells it, an int, so the entries compare equal)."""
    entry = {"name": name, "version": version}
    known = json.loads(client.get_logged_model(model_id).tags.get(T.MODEL_VERSIONS) or "[]")
    if entry not in known:
        client.set_logged_model_tags(model_id, {T.MODEL_VERSIONS: json.dumps([*known, entry])})


def model_description(client: MlflowClient, model_id: str) -> str:
    """The logged model's card (its `mlflow.note.content`), for the registered version's description."""
    return client.get_logged_model(model_id).tags.get(T.NOTE, "")


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the run's newest READY logged model, if it has one."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None
