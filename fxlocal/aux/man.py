"""MAN (Su et al., ECCV 2024): the aux input first passes through ``LB(x) + EMA(x)``, where both
copy the next block's first unit U — LB a trainable copy (the "learnable bias"), EMA a frozen
twin updated from the live U after the block's backward — then DGL's head, sized from U's
output (the reference's ImageNet code sizes it from the input, which only works when U keeps
the shape).
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import FxLocalError
from ..graph.cost import Cost
from ..graph.units import Unit
from .base import AuxHead, AuxMethod, HeadSpec, register_aux
from .dgl import DGLHead, dgl_head_cost
from .ema import EMATwin, ParallelSum, twin_cost
from .joint import JointHead, one_per_tensor
from .recompute import checked_flag, forward_flops, recomputed_cost
from .unit_copies import handed_on

__all__ = ["MAN"]


class MANHead(AuxHead):
    """DGL's head after ``LB(x) + EMA(x)``; the EMA twin follows LB after each backward."""

    def __init__(self, pair: ParallelSum, head: nn.Module, summary: str):
        super().__init__()
        self.pair = pair
        self.head = head
        self.summary = summary

    def forward(self, *tensors):
        return self.head(*handed_on(self.pair(*tensors)))

    def after_backward(self) -> None:
        self.pair.b.update()


@register_aux("man")
class MAN(AuxMethod):
    cuts_at_units = True

    def __init__(
        self,
        momentum: float = 0.995,
        conv_layers: int = 3,
        mlp_layers: int = 3,
        max_mlp_width: int = 1024,
        recompute: bool = False,
        copy_init: str = "live",
    ):
        if copy_init not in ("live", "random"):
            raise FxLocalError(f"man copy_init is 'live' or 'random', got {copy_init!r}")
        # LB and the EMA twin start as copies of the live unit ("live"), or re-initialised
        # ("random": the reference's, which builds both afresh)
        self.copy_init = copy_init
        self.momentum = momentum
        self.recompute = checked_flag(recompute)  # the copy and twin recomputed in backward (see .recompute)
        self.dgl_options = dict(conv_layers=conv_layers, mlp_layers=mlp_layers, max_mlp_width=max_mlp_width)

    def build_head(self, spec: HeadSpec) -> nn.Module:
        if spec.units is None or spec.unit is None or spec.unit + 1 >= len(spec.units):
            raise FxLocalError("man heads copy the next block's first unit: the cut must be at a unit boundary")
        u = spec.unit + 1
        live = spec.units.live(u)  # refuses, at convert time, a unit that cannot run on the cut tensor alone
        unit = spec.units.units[u]
        if self.copy_init == "live":
            lb, twin = copy.deepcopy(live), EMATwin(live, self.momentum)
        else:
            lb, twin = spec.units.fresh_unit(u), EMATwin(live, self.momentum, start=spec.units.fresh_unit(u))
        pair = ParallelSum(lb, twin, recompute=self.recompute)
        dgl = one_per_tensor(self._dgl_heads(unit, spec))
        heads = dgl.describe(lambda h: h.summary) if isinstance(dgl, JointHead) else dgl.summary
        summary = f"MAN: LB(unit {u} {unit.name}) + EMA twin (m={self.momentum}{', both re-initialised' if self.copy_init == 'random' else ''}) → {heads}"
        summary += "; LB and twin recomputed in backward" if self.recompute else ""
        return MANHead(pair, dgl, summary)

    def _dgl_heads(self, unit: Unit, spec: HeadSpec) -> list[DGLHead]:
        """DGL's head on each tensor unit U hands on (two where it carries a second)."""
        return [
            DGLHead(HeadSpec(shape, layout, spec.num_classes, spec.block), **self.dgl_options)
            for shape, layout in unit.tensors
        ]

    def head_cost(self, spec: HeadSpec) -> Cost:
        """LB trains like the unit it copies, the twin beside it costs what :func:`twin_cost`
        says, their sum is kept, then DGL's head; recomputed, both forwards (each the unit's) run
        again and only one's activations are alive at a time."""
        u = spec.unit + 1
        unit, lb = spec.units.units[u], spec.units.unit_costs[u]
        dgl = sum((dgl_head_cost(tuple(shape), layout, spec.num_classes, **self.dgl_options) for shape, layout in unit.tensors), Cost())
        # LB(x) + EMA(x) is a new tensor, kept by DGL's head for its backward
        pair_out = spec.units.handed_bytes(u)
        if not self.recompute:
            return lb + twin_cost(lb) + Cost(activation_bytes=pair_out) + dgl
        return recomputed_cost([lb, twin_cost(lb)], forward_flops([lb, lb]), pair_out) + dgl

    def describe(self, head: nn.Module) -> str:
        return head.summary
