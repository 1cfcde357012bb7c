"""Aux heads that keep only their inputs for backward and recompute the rest there.

A head made of unit copies (AugLocal's sampled units, MLAAN's augmented chain, MAN's copy and
EMA twin) saves as much for backward as the units it copies; on a ResNet-101's 56×56 maps that
is as much as the block it trains. With ``recompute`` each copy (and each twin) runs as its own
``torch.utils.checkpoint`` region: forward keeps its input only, backward recomputes one
region's activations at a time. The gradients are the same (same inputs, same weights, RNG
state replayed, BatchNorm running statistics put back); the cost is the copies' forward again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from torch import nn

from ..errors import IncompatibleOptionsError
from ..graph.cost import Cost
from ..graph.recompute import checkpointed

__all__ = ["run", "recomputed_cost", "forward_flops", "checked_flag"]


def checked_flag(value: Any, name: str = "recompute") -> bool:
    """A true/false option as given (``--aux-option recompute=yes`` would otherwise be a
    truthy string)."""
    if not isinstance(value, bool):
        raise IncompatibleOptionsError(f"{name} must be true or false, got {value!r}")
    return value


def run(module: nn.Module, *tensors: Any, recompute: bool = False) -> Any:
    """``module(*tensors)``; with ``recompute``, while training with gradients, as a region
    whose activations backward recomputes (all of them: a copy is as cheap to run as to keep)."""
    return checkpointed(module, *tensors, policy="all" if recompute else "none")


def forward_flops(units: Sequence[Cost]) -> float:
    """The FLOPs of one more forward of each of these units, priced as trained (a forward is a
    third of a training step's FLOPs: backward computes two gradients per forward product)."""
    return sum(u.flops for u in units) / 3


def recomputed_cost(regions: Sequence[Cost], rerun_flops: float, saved_bytes: float) -> Cost:
    """Per-sample cost of ``regions`` (each what one recomputed copy or twin costs trained
    normally) run with ``recompute``: their forward runs again (``rerun_flops``, see :func:`forward_flops`), and what
    backward holds beside the block is the regions' inputs (``saved_bytes``, beyond the block
    output they start from) and one region's activations at a time, the largest."""
    total = sum(regions, Cost())
    return replace(
        total,
        flops=total.flops + rerun_flops,
        activation_bytes=saved_bytes + max((r.activation_bytes for r in regions), default=0.0),
    )
