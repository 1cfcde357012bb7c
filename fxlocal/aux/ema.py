"""Frozen EMA twins of backbone units (MLAAN's LAM, MAN's EMA branch).

A twin is a copy of a live backbone unit whose parameters are turned into *buffers*: it gets
no gradient, never shows up in ``parameters()`` (so never in an optimizer's parameter groups),
and is saved in ``state_dict``. :meth:`EMATwin.update` moves it toward the live unit by the
momentum rule ``θ_ema = m·θ_ema + (1-m)·θ_live``, parameters only: the twin's BatchNorm running
statistics are its own, as in the reference implementations. The twin of a replaced unit
(:mod:`fxlocal.graph.replace`) is a plain unit that follows its live ``a·θ_before + b·θ_after``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph.cost import Cost
from ..graph.replace import blends, effective_parameters, materialised_copy
from . import recompute as recompute_

__all__ = ["EMATwin", "ParallelSum", "twin_cost"]


class EMATwin(nn.Module):
    """The frozen twin of ``live``, starting from ``live``'s weights or, given ``start`` (a module
    of the same structure, e.g. a re-initialised copy), from ``start``'s."""

    def __init__(self, live: nn.Module, momentum: float = 0.995, start: nn.Module | None = None):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = materialised_copy(live if start is None else start)
        for owner in self.module.modules():
            for name, p in list(owner._parameters.items()):
                if p is not None:
                    del owner._parameters[name]
                    owner.register_buffer(name, p.detach().clone())
        live_now = effective_parameters(live)
        self._names = [name for name, _ in live_now]
        # The live parameters it follows: a plain list, so they are not this module's parameters
        # (for a replaced unit, their values now: recomputed from the unit at every update).
        self._live = [p for _, p in live_now]
        self._recomputed_from = (live,) if blends(live) else ()

    @property
    def live_parameters(self) -> list[nn.Parameter]:
        """The live backbone parameters this twin follows (it reads them after every step)."""
        return list(self._live)

    def follow(self, live: list[torch.Tensor]) -> None:
        """Follow ``live`` instead: tensors standing for the live parameters, in their order (a
        pipeline stage holds copies of the next stage's weights, refreshed by messages).

        Raises:
            ValueError: tensors that do not match the live parameters' shapes.
        """
        if [tuple(t.shape) for t in live] != [tuple(p.shape) for p in self._live]:
            raise ValueError("an EMA twin follows tensors shaped as the live parameters it mirrors")
        self._live = list(live)
        self._recomputed_from = ()

    def averaged(self) -> list[torch.Tensor]:
        """The twin's copies of the live parameters, in the live unit's order."""
        buffers = dict(self.module.named_buffers())
        return [buffers[n] for n in self._names]

    @torch.no_grad()
    def update(self) -> None:
        if self._recomputed_from:
            self._live = [t for _, t in effective_parameters(self._recomputed_from[0])]
        for ema, live in zip(self.averaged(), self._live):
            ema.mul_(self.momentum).add_(live.detach(), alpha=1 - self.momentum)

    def forward(self, *args):
        return self.module(*args)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def twin_cost(unit: Cost) -> Cost:
    """What the EMA twin of a unit costing ``unit`` adds to a step. It runs on the block's
    output, which needs a gradient, so backward passes through it: it saves the unit's
    activations and computes the input gradient (two thirds of the unit's FLOPs: no weight
    gradients). Its weights are buffers: resident, with no gradient or optimizer state."""
    return Cost(
        flops=unit.flops * 2 / 3,
        activation_bytes=unit.activation_bytes,
        largest_activation_bytes=unit.largest_activation_bytes,
        buffer_bytes=unit.param_bytes,
    )


class ParallelSum(nn.Module):
    """``a(x) + b(x)``: a trainable unit copy and its EMA twin side by side; with ``recompute``
    each recomputed in backward on its own (see :mod:`.recompute`). With ``learnable_scale``
    (MAN++), ``s·a(x) + (2 - s)·b(x)`` with a trainable scalar ``s`` that starts at 1."""

    def __init__(self, a: nn.Module, b: nn.Module, recompute: bool = False, learnable_scale: bool = False):
        super().__init__()
        self.a, self.b = a, b
        self.recompute = recompute
        self.scale = nn.Parameter(torch.ones(())) if learnable_scale else None

    def _add(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return p + q if self.scale is None else self.scale * p + (2 - self.scale) * q

    def forward(self, *x):
        ya = recompute_.run(self.a, *x, recompute=self.recompute)
        yb = recompute_.run(self.b, *x, recompute=self.recompute)
        if isinstance(ya, tuple):  # unit pieces return (tensor, [carried,] *values): tensors add
            return tuple(self._add(p, q) if isinstance(p, torch.Tensor) else p for p, q in zip(ya, yb))
        return self._add(ya, yb)
