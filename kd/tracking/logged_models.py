"""Every finished run's best weights as an MLflow 3 logged model, in the pickle-free `pt2` format.

The logged model is `Logits(model)`: kd's models return `[stage features..., logits]`, the
logged one returns the logits alone (float32, shape (N, classes)) for float32 images normalised
as kd trains them, shape (N, C, H, W). Its signature and input example say so. It is exported
with `torch.export` (`serialization_format="pt2"`), so `mlflow.pytorch.load_model` needs neither
kd nor pickle. kd itself keeps loading `best.pth` (`{'weights': state_dict}`, weights_only).

`log_trained_model(client, run_id, spec, weights, shape)` needs only JSON and a file, so it can run
after training, in another process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from torch import Tensor, nn

from kd.models import create_model
from kd.models.weights import load_weights_only
from kd.spec import RunSpec
from kd.tracking import tags as T
from kd.tracking.presentation import SUMMARY_STEP


class Logits(nn.Module):
    """A kd model that returns its logits only: what a user of the registered model wants."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[-1]


def model_shape(num_classes: int, in_channels: int, image_size: int) -> dict[str, int]:
    """What the export needs to know of the data besides the spec (JSON)."""
    return {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}


def build(spec: RunSpec, weights: Path, shape: dict[str, int]) -> Logits:
    net = create_model(spec.model, shape["num_classes"], shape["in_channels"], shape["image_size"])
    net.load_state_dict(load_weights_only(weights)["weights"])
    return Logits(net).eval()


def log_trained_model(client: MlflowClient, run_id: str, spec: dict[str, Any], weights: str,
                      shape: dict[str, int]) -> str:
    """Log best.pth's model as the run's logged model (linked to the run, its summary metrics at
    SUMMARY_STEP and their dataset); returns the model id (`models:/<id>`)."""
    run_spec = RunSpec.from_dict(spec)
    model = build(run_spec, Path(weights), shape)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=run_spec.model, source_run_id=run_id, params=run_spec.params(),
        tags={T.ROLE: run_spec.role, T.DATASET: run_spec.dataset}, model_type="pytorch",
    )
    example = np.zeros((2, shape["in_channels"], shape["image_size"], shape["image_size"]), dtype=np.float32)
    try:  # log_model's helpers (and the registry's) read the fluent store: MLFLOW_TRACKING_URI, which
        # get_client set to this client's store; setting MLflow's global instead outlives the call
        mlflow.pytorch.log_model(
            model, name=run_spec.model, model_id=logged.model_id, run_id=run_id, step=SUMMARY_STEP,
            input_example=example, serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # no requirement inference
        )
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the run's newest READY logged model, if it has one."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None
