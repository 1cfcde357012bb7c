"""Aux heads that keep only their inputs for backward and recompute the rest there.

A head made of unit copies (AugLocal's sampled units, MLAAN's augmented chain, MAN's copy and
EMA twin) saves as much for backward as the units it copies; on a ResNet-101's 56×56 maps that
is as much as the block it trains. With ``recompute`` each copy (and each twin) runs as its own
``torch.utils.checkpoint`` region: forward keeps its input only, backward recomputes one
region's activations at a time. The gradients are the same (same inputs, same weights, RNG
state replayed, BatchNorm running statistics put back); the cost is the copies' forward again.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cost import Cost
from ..errors import FxLocalError

__all__ = ["run", "recomputed_cost", "checked_flag"]


def checked_flag(value: Any) -> bool:
    """The ``recompute`` option as given (``--aux-option recompute=yes`` would otherwise be a
    truthy string)."""
    if not isinstance(value, bool):
        raise FxLocalError(f"recompute must be true or false, got {value!r}")
    return value


def run(module: nn.Module, *tensors: Any, recompute: bool = False) -> Any:
    """``module(*tensors)``; with ``recompute``, while training with gradients, as a region
    whose activations backward recomputes."""
    if not (recompute and module.training and torch.is_grad_enabled()):
        return module(*tensors)
    return checkpoint(module, *tensors, use_reentrant=False, context_fn=functools.partial(_statistics_restored_after_recompute, module))


def _statistics_restored_after_recompute(module: nn.Module):
    """checkpoint's (forward, recompute) contexts: the first run as it is, the second inside
    :func:`_running_statistics_kept`."""
    return nullcontext(), _running_statistics_kept(module)


@contextmanager
def _running_statistics_kept(module: nn.Module):
    """Recomputing a training-mode forward updates BatchNorm's running statistics a second time
    with the same batch: put back what the first forward left (taken when the recompute starts,
    in backward; a recompute that stops early leaves the rest untouched)."""
    saved = [
        (buffer, buffer.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for buffer in m.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def recomputed_cost(regions: Sequence[Cost], forward_flops: float, saved_bytes: float) -> Cost:
    """Per-sample cost of ``regions`` (each what one recomputed copy or twin costs trained
    normally) run with ``recompute``: their forward runs again (``forward_flops``), and what
    backward holds beside the block is the regions' inputs (``saved_bytes``, beyond the block
    output they start from) and one region's activations at a time, the largest."""
    total = sum(regions, Cost())
    return replace(
        total,
        flops=total.flops + forward_flops,
        activation_bytes=saved_bytes + max((r.activation_bytes for r in regions), default=0.0),
    )
