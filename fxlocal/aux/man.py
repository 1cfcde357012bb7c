"""MAN (Su et al., ECCV 2024): the aux input first passes through ``LB(x) + EMA(x)``, where both
copy the next block's first unit U — LB a trainable copy (the "learnable bias"), EMA a frozen
twin updated from the live U after the block's backward — then the base method's head, sized
from U's output (the reference's ImageNet code sizes it from the input, which only works when U
keeps the shape).

MAN is a plug-in: its paper reports DGL+MAN and InfoPro(*)+MAN. ``base`` is the method whose
head ends the path (``"dgl"``, the default, or ``"infopro"``: ``--aux infopro+man``); options
MAN does not take are the base's. With ``learnable_scale`` (MAN++), ``s·LB(x) + (2 - s)·EMA(x)``.
"""

from __future__ import annotations

from torch import nn

from ..errors import FxLocalError
from ..graph.cost import Cost
from ..graph.replace import materialised_copy
from .base import AuxHead, AuxMethod, HeadSpec, get_base, head_loss, register_aux
from .ema import EMATwin, ParallelSum, twin_cost
from .joint import JointHead, one_per_tensor
from .recompute import checked_flag, forward_flops, recomputed_cost
from .unit_copies import handed_on

__all__ = ["MAN"]


class MANHead(AuxHead):
    """The base head after ``LB(x) + EMA(x)``; the EMA twin follows LB after each backward. The
    block's loss is the base head's (its own where it computes one: InfoPro's)."""

    def __init__(self, pair: ParallelSum, head: nn.Module, summary: str):
        super().__init__()
        self.pair = pair
        self.head = head
        self.summary = summary
        self.owns_loss = isinstance(head, AuxHead) and head.owns_loss
        self.needs_model_input = isinstance(head, AuxHead) and head.needs_model_input

    def forward(self, *tensors):
        return self.head(*handed_on(self.pair(*tensors)))

    def local_loss(self, ctx, b: int, out):
        return head_loss(self.head, ctx, b, self.pair(*handed_on(out)))

    def after_backward(self) -> None:
        self.pair.b.update()


@register_aux("man")
class MAN(AuxMethod):
    cuts_at_units = True

    takes_base = True

    def __init__(
        self,
        momentum: float = 0.995,
        recompute: bool = False,
        copy_init: str = "live",
        learnable_scale: bool = False,
        base: str | AuxMethod = "dgl",
        **base_options,
    ):
        if copy_init not in ("live", "random"):
            raise FxLocalError(f"man copy_init is 'live' or 'random', got {copy_init!r}")
        self.base = get_base("man", base, **base_options)
        self.learnable_scale = checked_flag(learnable_scale, "learnable_scale")
        # LB and the EMA twin start as copies of the live unit ("live"), or re-initialised
        # ("random": the reference's, which builds both afresh)
        self.copy_init = copy_init
        self.momentum = momentum
        self.recompute = checked_flag(recompute)  # the copy and twin recomputed in backward (see .recompute)

    @property
    def heads_vary_by_block(self) -> bool:
        return self.base.heads_vary_by_block

    @property
    def reconstructs_input(self) -> bool:
        return self.base.reconstructs_input

    def build_head(self, spec: HeadSpec) -> nn.Module:
        if spec.units is None or spec.unit is None or spec.unit + 1 >= len(spec.units):
            raise FxLocalError("man heads copy the next block's first unit: the cut must be at a unit boundary")
        u = spec.unit + 1
        live = spec.units.live(u)  # refuses, at convert time, a unit that cannot run on the cut tensor alone
        unit = spec.units.units[u]
        if self.copy_init == "live":
            lb, twin = materialised_copy(live), EMATwin(live, self.momentum)
        else:
            lb, twin = spec.units.fresh_unit(u), EMATwin(live, self.momentum, start=spec.units.fresh_unit(u))
        pair = ParallelSum(lb, twin, recompute=self.recompute, learnable_scale=self.learnable_scale)
        base = one_per_tensor([self.base.build_head(spec.on(shape, layout)) for shape, layout in unit.tensors])
        heads = base.describe(self.base.describe) if isinstance(base, JointHead) else self.base.describe(base)
        lb_name = f"s·LB(unit {u} {unit.name}) + (2-s)·EMA twin" if self.learnable_scale else f"LB(unit {u} {unit.name}) + EMA twin"
        summary = f"MAN: {lb_name} (m={self.momentum}{', both re-initialised' if self.copy_init == 'random' else ''}) → {heads}"
        summary += "; LB and twin recomputed in backward" if self.recompute else ""
        return MANHead(pair, base, summary)

    def head_cost(self, spec: HeadSpec) -> Cost:
        """LB trains like the unit it copies, the twin beside it costs what :func:`twin_cost`
        says, their sum is kept, then the base's head; recomputed, both forwards (each the unit's)
        run again and only one's activations are alive at a time. With ``learnable_scale`` both
        outputs are kept besides, for the scale's gradient."""
        u = spec.unit + 1
        unit, lb = spec.units.units[u], spec.units.unit_costs[u]
        base = sum((self.base.head_cost(spec.on(shape, layout)) for shape, layout in unit.tensors), Cost())
        # LB(x) + EMA(x) is a new tensor, kept by the base's head for its backward
        pair_out = spec.units.handed_bytes(u)
        scaled = Cost(activation_bytes=2 * pair_out) if self.learnable_scale else Cost()
        if not self.recompute:
            return lb + twin_cost(lb) + Cost(activation_bytes=pair_out) + scaled + base
        return recomputed_cost([lb, twin_cost(lb)], forward_flops([lb, lb]), pair_out) + scaled + base

    def describe(self, head: nn.Module) -> str:
        return head.summary
