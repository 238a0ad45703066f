"""Weights files a user points kd at (`--teacher-weights`, `--init-weights`): read safely, fit or refused in one line.

A file is read with `torch.load(weights_only=True)`, so a pickle that carries code is refused and its code
never runs. It may hold a plain state_dict or kd's (and the thesis's) `{'weights': state_dict}`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd.errors import SpecError

SAVE_HINT = "pass a file saved with torch.save(model.state_dict(), path), or a kd best.pth"


def load_weights_only(path: Path) -> dict[str, Any]:
    """A file kd wrote itself (best.pth, a checkpoint), read with `weights_only=True`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """The state_dict in the file at `path`; `what` names it in errors (e.g. `--teacher-weights`)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise SpecError(f"{what} {path} cannot be read ({err.strerror or err}): {SAVE_HINT}") from None
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # no class or function to import: not a pickle of tensors at all
            raise SpecError(f"{what} {path} is not a weights-only PyTorch checkpoint (no tensors in it: a plain "
                            f"pickle or another file): {SAVE_HINT}") from None
        raise SpecError(f"{what} {path} is not a weights-only PyTorch checkpoint (it holds code or other objects, "
                        f"which kd does not run): {SAVE_HINT}") from None
    except Exception as err:  # a text file, an empty or cut file: torch raises KeyError, EOFError, RuntimeError...
        raise SpecError(f"{what} {path} is not a PyTorch checkpoint ({type(err).__name__}): {SAVE_HINT}") from None
    state = loaded.get("weights", loaded) if isinstance(loaded, dict) else loaded
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise SpecError(f"{what} {path} holds no state_dict (it holds a {type(state).__name__}): {SAVE_HINT}")
    return state


def fit_state_dict(model: nn.Module, state: dict[str, Tensor], source: str, model_name: str) -> None:
    """Load `state` into `model`, or name the first key that is missing, unexpected or of another shape."""
    own = model.state_dict()
    problem = None
    for key, value in own.items():
        if key not in state:
            problem = f"it lacks {key}"
        elif state[key].shape != value.shape:
            problem = f"{key} is {tuple(state[key].shape)} there, {tuple(value.shape)} in {model_name}"
        if problem:
            break
    unexpected = [k for k in state if k not in own]
    if problem is None and unexpected:
        problem = f"{model_name} has no {unexpected[0]}"
    if problem:
        raise SpecError(f"{source} does not fit {model_name}: {problem}: pass weights saved from a {model_name}")
    model.load_state_dict(state)
