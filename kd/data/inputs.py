"""What data a run trained and was tested on, as MLflow dataset inputs (the UI's Datasets column).

Computed in the job from the tensors the trainer uses, as plain JSON, so that logging it
(`kd.tracking.presentation.log_dataset_inputs`) can happen later, in another process.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import Tensor

from kd.data.base import data_root
from kd.data.loader import DeviceData, Split

DIGEST_CHARS = 16  # MLflow keeps at most 36; 64 bits tell any two splits apart


def digest(split: Split) -> str:
    """A hash of the split's uint8 images and int64 labels: same data, same digest, on any machine."""
    h = hashlib.sha256()
    for tensor in (split.images, split.labels):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def tensor_spec(tensor: Tensor) -> str:
    """MLflow's tensor-spec JSON, so the UI shows dtype and shape like any logged numpy dataset."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": [-1, *tensor.shape[1:]]}}])


def dataset_inputs(data: DeviceData, name: str, val_fraction: float, train_limit: int) -> list[dict[str, Any]]:
    """One entry per non-empty split (train, validation, test): the fields of an MLflow dataset
    input (name, digest, source, schema, profile) and its context (the split)."""
    source = "sklearn.datasets.load_digits" if name == "digits" else str(data_root().resolve())
    entries = []
    for context, split in (("train", data.train), ("validation", data.val), ("test", data.test)):
        if not len(split):
            continue
        entries.append({
            "name": name,
            "digest": digest(split),
            "source_type": "local",
            "source": json.dumps({"uri": source}),
            "schema": json.dumps({"mlflow_tensorspec": {"features": tensor_spec(split.images),
                                                        "targets": tensor_spec(split.labels)}}),
            "profile": json.dumps({"num_rows": len(split), "features_shape": list(split.images.shape),
                                   "val_fraction": val_fraction, "train_limit": train_limit}),
            "context": context,
        })
    return entries
