"""Fresh copies of a graph's units and of the model's own head, for aux nets built from the graph.

The traced graph is split at every unit boundary; a copy is a deep copy of one piece with every module that can re-initialise
itself reset, so it never shares weights or starting values with the backbone unit it mirrors.
"""

from __future__ import annotations

import copy
from functools import cached_property

import torch.fx as fx
from torch import nn

from ..cost import Cost
from ..errors import FxLocalError
from ..split import split_graph
from ..units import Unit

__all__ = ["UnitLibrary", "UnitChain", "reinitialise"]


def reinitialise(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class UnitLibrary:
    """The units of one traced graph and the pieces of graph they are made of."""

    def __init__(
        self,
        gm: fx.GraphModule,
        units: list[Unit],
        unit_costs: list[Cost] | None = None,
        tail_cost: Cost | None = None,
    ):
        self.gm = gm
        self.units = units
        self.unit_costs = unit_costs or [Cost()] * len(units)
        self.tail_cost = tail_cost or Cost()

    def __len__(self) -> int:
        return len(self.units)

    @cached_property
    def pieces(self) -> list[fx.GraphModule]:
        """One GraphModule per unit, then the tail (the model's own head); shared weights."""
        return split_graph(self.gm, [u.cut for u in self.units])

    def unit_at(self, cut: str) -> int | None:
        return next((u.index for u in self.units if u.cut == cut), None)

    def _fresh(self, piece: fx.GraphModule, what: str) -> fx.GraphModule:
        if sum(1 for n in piece.graph.nodes if n.op == "placeholder") != 1:
            raise FxLocalError(f"{what} needs values computed before it besides its input; it cannot be copied alone")
        return reinitialise(copy.deepcopy(piece))

    def fresh_unit(self, u: int) -> fx.GraphModule:
        return self._fresh(self.pieces[u], f"unit {u} ({self.units[u].name})")

    def fresh_tail(self) -> fx.GraphModule:
        return self._fresh(self.pieces[-1], "the model's head")


class UnitChain(nn.Module):
    """``stages`` applied in turn; unit pieces return ``(tensor,)`` and hand the tensor on."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
            if isinstance(x, tuple):
                x = x[0]
        return x
