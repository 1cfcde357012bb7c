"""Save and load converted models: the convert() arguments, the Plan and the weights.

A file holds no pickled code, only plain data and tensors, so it loads with
``torch.load(weights_only=True)``; the model is rebuilt by re-applying the Plan. Writes are atomic
(temp file + rename): an interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from .errors import FxLocalError
from .local_model import LocalModel
from .plan import Plan, atomic_write_bytes

__all__ = ["save_converted", "load_converted", "CheckpointError"]

FORMAT = "fxlocal.converted/1"


class CheckpointError(FxLocalError, ValueError):
    """A file that is not an fxlocal checkpoint, or cannot be written or read."""


def save_converted(local: LocalModel, path: str | os.PathLike) -> None:
    payload = {
        "format": FORMAT,
        "config": local.config,
        "plan": local.plan.to_dict(),
        "state_dict": local.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror}") from exc


def load_converted(path: str | os.PathLike, model: nn.Module | None = None) -> LocalModel:
    """Rebuild a converted model saved by :func:`save_converted`.

    ``model`` is needed only when the original was converted from a module, not a name.
    """
    from .convert import convert

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"no such file: {path}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path} is not an fxlocal checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fxlocal converted-model file")
    config = dict(payload["config"])
    source = model if model is not None else config.pop("model")
    config.pop("model", None)
    if source is None:
        raise CheckpointError(f"{path} was converted from a module object: pass that model to load it")
    config.pop("k")
    options = config.pop("aux_options", {})
    local = convert(source, k=payload["plan"]["k"], plan=Plan.from_dict(payload["plan"]), **config, **options)
    local.load_state_dict(payload["state_dict"])
    return local
