"""Checkpoints, the one module that writes and reads them: converted models (``fxlocal convert
--output``: the convert() arguments, the Plan and the weights) and training checkpoints (the
recipe, the plan, weights, optimizer and scheduler states, RNG, history; resumable).

A file holds no pickled code, only plain data and tensors, so it loads with
``torch.load(weights_only=True)``; a model is rebuilt by re-applying its Plan. Writes are atomic
(temp file, fsync, rename): a writer killed at any moment leaves the previous file loadable.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..convert import convert
from ..errors import FxLocalError
from ..graph.plan import Plan, atomic_write_bytes
from ..local_model import LocalModel
from .recipe import Recipe

__all__ = [
    "CheckpointError",
    "TRAINING_FORMAT",
    "check_resumable",
    "converted_from",
    "invalid_fields",
    "load_converted",
    "load_training_checkpoint",
    "load_weights",
    "read_checkpoint_file",
    "resume_state",
    "rng_state",
    "save_checkpoint",
    "save_converted",
    "set_rng_state",
    "training_checkpoint_from",
    "write_checkpoint",
]

FORMAT = "fxlocal.converted/1"


class CheckpointError(FxLocalError, ValueError):
    """A file that is not an fxlocal checkpoint, or cannot be written or read."""


def read_checkpoint_file(path: str | os.PathLike, allow_numpy_arrays: bool = False) -> object:
    """Load a file written by fxlocal with ``torch.load(weights_only=True)``: tensors and plain
    data only, so a file from anyone cannot run code while it loads.

    Args:
        path: the file.
        allow_numpy_arrays: also accept numpy arrays (training checkpoints of format 1 stored
            numpy's RNG state as one); numpy's array rebuild runs no code of the file's choosing.

    Returns:
        What the file holds.

    Raises:
        CheckpointError: no such file, a file that holds pickled objects other than tensors and
            plain data (refused before any of them is built), or one that is truncated or not a
            torch file.
    """
    import pickle

    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]] if allow_numpy_arrays else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function it would have called
            raise CheckpointError(
                f"refused to load {path}: it holds pickled Python objects, which fxlocal never writes "
                "(loading them could run code); use a file written by fxlocal"
            ) from None
        raise CheckpointError(f"{path} is not an fxlocal checkpoint (unreadable pickle: it may be truncated)") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError or zipfile errors for a cut file
        raise CheckpointError(f"{path} is not an fxlocal checkpoint ({type(exc).__name__}: truncated or another kind of file)") from None


def save_converted(local: LocalModel, path: str | os.PathLike) -> None:
    """Write a converted model (``fxlocal convert --output``): its config, plan and weights, plain
    data and tensors only, atomically.

    Args:
        local: the converted model.
        path: the file to write.
    """
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

    Args:
        path: the file.
        model: the original module, needed only when it was converted from a module, not a name.

    Returns:
        The :class:`~fxlocal.LocalModel` with the saved weights.
    """
    return converted_from(read_checkpoint_file(path), path, model)


def converted_from(payload: object, path: str | os.PathLike, model: nn.Module | None = None) -> LocalModel:
    """:func:`load_converted` of a file already read with :func:`read_checkpoint_file`."""

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fxlocal converted-model file")
    wrong = invalid_fields(payload, {"config": dict, "plan": dict, "state_dict": dict})
    if wrong:
        raise CheckpointError(f"{path} is an incomplete converted-model file (no valid {', '.join(wrong)}): convert the model again")
    config = dict(payload["config"])
    source = model if model is not None else config.pop("model")
    config.pop("model", None)
    if source is None:
        raise CheckpointError(f"{path} was converted from a module object: pass that model to load it")
    config.pop("k", None)
    options = config.pop("aux_options", {})
    plan = Plan.from_dict(payload["plan"])
    local = convert(source, k=plan.k, plan=plan, **config, **options)
    load_weights(local, payload["state_dict"], path)
    return local


def invalid_fields(payload: dict, kinds: dict[str, type]) -> list[str]:
    """The keys of ``kinds`` that ``payload`` lacks or holds as another type."""
    return [key for key, kind in kinds.items() if not isinstance(payload.get(key), kind)]


def load_weights(local: LocalModel, state_dict: object, path: str | os.PathLike) -> None:
    """``local.load_state_dict(state_dict)``, with a file whose weights do not fit one line."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds no weights: use a complete checkpoint")
    try:
        local.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: its weights do not fit the model its plan builds ({first.rstrip('.')}); use a complete checkpoint") from None


TRAINING_FORMAT = "fxlocal.training/1"


def rng_state() -> dict:
    """The torch, Python and numpy RNG states, as plain data and tensors (a checkpoint loads them with ``weights_only``)."""
    # numpy's key as a tensor: a checkpoint holds tensors and plain data only (weights_only loads)
    name, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (numpy's key as a tensor, or as an array from older checkpoints)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or an array in checkpoints before it was one
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, recipe: Recipe, local: LocalModel, optimizers, schedulers, scaler, epoch: int, history) -> None:
    """Write a resumable training checkpoint: weights, optimizers, schedulers, scaler, RNG, history."""
    write_checkpoint(
        path, recipe, local, epoch, history,
        model=local.state_dict(),
        optimizers=[o.state_dict() for o in optimizers],
        schedulers=[s.state_dict() for s in schedulers],
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=rng_state(),
    )


def write_checkpoint(path: Path, recipe: Recipe, local: LocalModel, epoch: int, history, **states) -> None:
    """Write a training checkpoint atomically. ``states``: ``model`` (the whole LocalModel's
    state_dict), ``optimizers`` and ``schedulers`` (one per block with per-block optimizers),
    ``scaler``, ``rng``, and anything a trainer adds for itself (the pipeline's per-stage RNG)."""
    payload = {
        "format": TRAINING_FORMAT,
        "recipe": recipe.model_dump(mode="json"),
        "plan": local.plan.to_dict(),
        "config": local.config,
        "epoch": epoch,  # epochs completed
        "history": history,
        **states,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def resume_state(out_dir: Path, resume: bool) -> dict | None:
    """The training state to resume from: ``out_dir/last.pt`` read with :func:`load_training_checkpoint`
    when ``resume``, else None.

    Raises:
        FxLocalError: ``resume`` and there is no checkpoint there.
    """
    if not resume:
        return None
    last = out_dir / "last.pt"
    if not last.exists():
        raise FxLocalError(f"nothing to resume: no checkpoint at {last}")
    return load_training_checkpoint(last)


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`~fxlocal.training.fit` (tensors and plain data only: it cannot run code).

    Args:
        path: the file.

    Returns:
        Its payload: recipe, plan, weights, optimizer and scheduler states, RNG, history.

    Raises:
        CheckpointError: a missing, truncated or incomplete file, one that is not a training
            checkpoint, or one that holds pickled objects.
    """
    # format 1 kept numpy's RNG key as an array
    return training_checkpoint_from(read_checkpoint_file(path, allow_numpy_arrays=True), path)


def training_checkpoint_from(payload: object, path: str | os.PathLike) -> dict:
    """:func:`load_training_checkpoint` of a file already read with ``read_checkpoint_file``."""
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{path} is not an fxlocal training checkpoint")
    wrong = invalid_fields(payload, {"recipe": dict, "plan": dict, "config": dict, "model": dict, "epoch": int, "history": list})
    if wrong:
        raise CheckpointError(f"{path} is an incomplete training checkpoint (no valid {', '.join(wrong)}): use an earlier one or train again")
    return payload


def check_resumable(state: dict, path: Path, optimizers: int) -> None:
    """A checkpoint that evaluates may still lack what resuming needs (one written by hand)."""
    wrong = invalid_fields(state, {"optimizers": list, "schedulers": list, "rng": dict})
    if wrong:
        raise CheckpointError(f"{path} cannot be resumed (no valid {', '.join(wrong)}): train again without --resume")
    if len(state["optimizers"]) != optimizers:
        raise CheckpointError(
            f"{path} holds {len(state['optimizers'])} optimizer(s) and the recipe makes {optimizers}: "
            "resume with the recipe's optimizer.per_block as it was"
        )
