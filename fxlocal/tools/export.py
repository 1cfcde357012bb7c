"""Give the trained backbone back to the model it came from: aux heads, EMA twins and
boundaries gone, weights under the original parameter names.

Formats (a registry): ``state_dict`` (``torch.save``), ``safetensors`` and ``pt2``
(``torch.export`` of the plain original model in eval mode). ``with_aux`` also writes the aux
heads beside it, for analysis. Every file is written to a temporary name and renamed only when
all of them are complete: an error leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import FxLocalError
from ..local_model import LocalModel
from ..models import create_model

__all__ = ["ExportError", "EXPORT_FORMATS", "export", "load_local_model", "plain_model"]


class ExportError(FxLocalError, ValueError):
    """A checkpoint, format or output path that export cannot use."""


def load_local_model(path: str | os.PathLike) -> LocalModel:
    """A LocalModel from either a training checkpoint or a converted-model file."""
    from ..training.build import model_from_checkpoint
    from ..training.checkpoint import FORMAT as CONVERTED
    from ..training.checkpoint import (
        CheckpointError,
        converted_from,
        read_checkpoint_file,
        training_checkpoint_from,
    )

    try:  # read once, then built by whichever format it is
        payload = read_checkpoint_file(path, allow_numpy_arrays=True)
        if isinstance(payload, dict) and payload.get("format") == CONVERTED:
            return converted_from(payload, path)
        return model_from_checkpoint(training_checkpoint_from(payload, path))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def plain_model(local: LocalModel) -> nn.Module:
    """A fresh instance of the original architecture holding the trained backbone (strict load)."""
    cfg = local.config
    if not cfg.get("model"):
        raise ExportError("this model was converted from a module object, not a name: load backbone_state_dict() into it")
    model = create_model(cfg["model"], cfg.get("num_classes"), tuple(cfg["input_size"]), **cfg.get("model_kwargs", {}))
    model.load_state_dict(local.backbone_state_dict(), strict=True)
    return model.eval()


def _tensors_only(state: dict) -> dict:
    # safetensors refuses tensors that share memory; torch.save keeps them as they are
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def _state_dict_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _safetensors_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(_tensors_only(state))


def _pt2_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    module = module.eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception:  # some models specialise the batch size: export it static
        program = torch.export.export(module, (example,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _aux_path(path: Path, i: int | None = None) -> Path:
    tag = "aux" if i is None else f"aux{i}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _write_state_dict(local: LocalModel, path: Path, with_aux: bool) -> dict[Path, bytes]:
    files = {path: _state_dict_bytes(local.backbone_state_dict())}
    if with_aux:
        files[_aux_path(path)] = _state_dict_bytes({f"heads.{k}": v for k, v in local.heads.state_dict().items()})
    return files


def _write_safetensors(local: LocalModel, path: Path, with_aux: bool) -> dict[Path, bytes]:
    files = {path: _safetensors_bytes(local.backbone_state_dict())}
    if with_aux:
        files[_aux_path(path)] = _safetensors_bytes({f"heads.{k}": v for k, v in local.heads.state_dict().items()})
    return files


def _write_pt2(local: LocalModel, path: Path, with_aux: bool) -> dict[Path, bytes]:
    size = tuple(local.config["input_size"])
    files = {path: _pt2_bytes(plain_model(local), torch.randn(2, *size))}
    if with_aux:
        local.eval()
        for i, (head, block) in enumerate(zip(local.heads, local.plan.blocks)):
            files[_aux_path(path, i)] = _pt2_bytes(head, torch.randn(2, *block.cut_shape))
    return files


EXPORT_FORMATS: dict[str, Callable[[LocalModel, Path, bool], dict[Path, bytes]]] = {
    "state_dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "pt2": _write_pt2,
}


def export(local: LocalModel, fmt: str, output: str | os.PathLike, with_aux: bool = False) -> list[Path]:
    """Write ``local``'s backbone (and with ``with_aux`` its heads) in ``fmt``; returns the paths."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    output = Path(output)
    folder = output.parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {output}: folder {folder} is not writable")
    files = EXPORT_FORMATS[fmt](local, output, with_aux)
    temps: dict[Path, str] = {}
    placed: list[Path] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
            placed.append(path)
    except OSError as exc:
        # all or nothing: a backbone without the aux file it was asked with is not a result
        for leftover in [*temps.values(), *placed]:
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise ExportError(f"cannot write {output}: {exc.strerror}") from None
    return list(files)
