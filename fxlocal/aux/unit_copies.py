"""Fresh copies of a graph's units and of the model's own head, for aux nets built from the graph.

The traced graph is split at every unit boundary; a copy is a deep copy of one piece with every module that can re-initialise
itself reset, so it never shares weights or starting values with the backbone unit it mirrors.

A piece may take plain values computed before it besides its input tensor (CoaT reads
``B = x.shape[0]`` once at the top and uses it in every block). A copy runs on its own input, so
those values are supplied there: the graph's values at two batch sizes tell which are the batch
(read from the copy's input at run time) and which are constants of the architecture (kept as
traced). A value that is neither cannot be reproduced and the unit cannot be copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import fx, nn

from ..errors import FxLocalError
from ..graph.analyze import GraphAnalysis
from ..graph.cost import Cost
from ..graph.replace import materialised_copy
from ..graph.split import split_graph
from ..graph.trace import SHAPE_BATCH, values_at_batch
from ..graph.units import Unit
from . import recompute as recompute_
from .adapters import Tensors, make_tensors_adapter
from .ema import ParallelSum

__all__ = ["UnitChain", "UnitLibrary", "WithPlainInputs", "handed_on", "reinitialise"]


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

    @classmethod
    def from_analysis(cls, gm: fx.GraphModule, analysis: GraphAnalysis) -> "UnitLibrary":
        """The units of an analysed graph, with what each costs (the segments between its cuts).

        Args:
            gm: the traced graph.
            analysis: its :func:`~fxlocal.graph.analyze.analyze` result.

        Returns:
            The library the unit-copying methods build their heads from.
        """
        bounds = [-1] + [u.cut_position for u in analysis.units]
        costs = [
            sum((analysis.segment_costs[s] for s in range(bounds[i] + 1, bounds[i + 1] + 1)), Cost())
            for i in range(len(analysis.units))
        ]
        tail = sum((analysis.segment_costs[s] for s in range(bounds[-1] + 1, len(analysis.segment_costs))), Cost())
        return cls(gm, analysis.units, costs, tail)

    @property
    def pieces(self) -> list[nn.Module]:
        """One module per unit, then the tail (the model's own head), sharing the backbone's
        weights, each callable on its input tensor alone where it can be (see the module
        docstring); :meth:`live` says why one cannot."""
        return self._split[0]

    @cached_property
    def _split(self) -> tuple[list[nn.Module], dict[int, str]]:
        """The pieces, and for those that cannot run alone the plain input that stops them."""
        carries = {u.cut: u.carried[0].node for u in self.units if u.carried}
        graphs = split_graph(self.gm, [u.cut for u in self.units], carries)
        # piece i takes unit i-1's tensors (one, or two where it carries one), then plain values
        takes = [1] + [len(u.tensors) for u in self.units]
        if not any(_extra_inputs(g, n) for g, n in zip(graphs, takes)):
            return list(graphs), {}
        other = _values_at_other_batch(self.gm)
        pieces: list[nn.Module] = []
        not_alone: dict[int, str] = {}
        for i, graph in enumerate(graphs):
            extra = _extra_inputs(graph, takes[i])
            values = [_batch_template(n.meta.get("val"), other[n.name]) if other else _UNKNOWN for n in extra]
            bad = [n.name for n, v in zip(extra, values) if v is _UNKNOWN]
            if bad:
                not_alone[i] = bad[0]
            pieces.append(WithPlainInputs(graph, values) if extra and not bad else graph)
        return pieces, not_alone

    def unit_at(self, cut: str) -> int | None:
        return next((u.index for u in self.units if u.cut == cut), None)

    def live(self, u: int) -> nn.Module:
        """Unit ``u`` (``len(self)``: the model's head) as a module of its input alone, sharing
        the backbone's weights (what an EMA twin follows)."""
        pieces, not_alone = self._split
        if u in not_alone:
            what = f"unit {u} ({self.units[u].name})" if u < len(self.units) else "the model's head"
            raise FxLocalError(
                f"{what} takes {not_alone[u]!r}, a value computed before it that is neither the batch size "
                "nor a constant, so it cannot be copied alone; use aux='dgl', which copies no units"
            )
        return pieces[u]

    def fresh_unit(self, u: int) -> nn.Module:
        # a replaced unit's copy is the plain unit (its own weights, reading no neighbour)
        return reinitialise(materialised_copy(self.live(u)))

    def fresh_tail(self) -> nn.Module:
        return reinitialise(materialised_copy(self.live(len(self.units))))

    def handed_bytes(self, u: int) -> float:
        """Per-sample bytes of the tensors unit ``u`` hands on (its output, and a carried one)."""
        unit = self.units[u]
        values = [self._nodes[name].meta["val"] for name in (unit.cut, *(t.node for t in unit.carried))]
        return float(sum(v.numel() // v.shape[0] * v.element_size() for v in values))

    @cached_property
    def _nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes}

    def chain_kept_bytes(self, tensors: Tensors, picks: list[int], tail: bool = False) -> float:
        """Per-sample bytes a chain of recomputed copies of units ``picks`` (then of the model's
        head, with ``tail``) keeps for backward, starting from ``tensors``: every stage's input
        but the first's (the block output, alive anyway), i.e. each copy's output and, where the
        tensors in hand do not fit the next copy, the adapter's (decided as the heads decide)."""
        kept = 0.0
        for u in [*picks, *([None] if tail else [])]:
            wanted = self.units[u - 1] if u is not None else self.units[-1]
            with torch.device("meta"):
                adapted = not isinstance(make_tensors_adapter(tensors, wanted.tensors), nn.Identity)
            if adapted:
                kept += self.handed_bytes(wanted.index)
            if u is not None:
                kept += self.handed_bytes(u)
                tensors = self.units[u].tensors
        return kept


@dataclass(frozen=True)
class BatchSize:
    """Stands for the batch size in a plain value a copied piece takes (filled in from its input)."""


_UNKNOWN = object()


def _extra_inputs(piece: fx.GraphModule, tensors: int) -> list[fx.Node]:
    """The plain values a piece takes after its ``tensors`` input tensors."""
    return [n for n in piece.graph.nodes if n.op == "placeholder"][tensors:]


def _values_at_other_batch(gm: fx.GraphModule) -> dict[str, Any] | None:
    try:
        return values_at_batch(gm, SHAPE_BATCH + 1)
    except FxLocalError:  # the model takes only the traced batch: no value can be told apart
        return None


def _batch_template(traced: Any, other: Any) -> Any:
    """``traced`` with every int that is the batch size replaced by :class:`BatchSize`, given the
    same value at batch ``SHAPE_BATCH + 1``; ``_UNKNOWN`` when some part is neither."""
    if isinstance(traced, (tuple, list)) and isinstance(other, (tuple, list)) and len(traced) == len(other):
        parts = [_batch_template(a, b) for a, b in zip(traced, other)]
        if any(p is _UNKNOWN for p in parts):
            return _UNKNOWN
        # a torch.Size cannot hold the marker; shape arguments take a tuple as well
        return traced if parts == list(traced) else (list if isinstance(traced, list) else tuple)(parts)
    if isinstance(traced, torch.Tensor) or isinstance(other, torch.Tensor):
        return _UNKNOWN
    if traced == other:
        return traced
    if (traced, other) == (SHAPE_BATCH, SHAPE_BATCH + 1):
        return BatchSize()
    return _UNKNOWN


def _fill(template: Any, batch: int) -> Any:
    if isinstance(template, BatchSize):
        return batch
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(t, batch) for t in template)
    return template


class WithPlainInputs(nn.Module):
    """A unit piece called on its input tensors alone: the plain values it took from before it are
    supplied, the batch size read from the input, the rest as traced."""

    def __init__(self, piece: fx.GraphModule, values: list[Any]):
        super().__init__()
        self.piece = piece
        self.values = values

    def forward(self, *tensors):
        return self.piece(*tensors, *(_fill(v, tensors[0].shape[0]) for v in self.values))


def handed_on(out: Any) -> tuple[torch.Tensor, ...]:
    """The tensors a stage hands to the next: unit pieces return ``(tensor, [carried,] *values)``
    (the plain values are for the backbone's next piece; a copy is given its own), the model's
    head and the heads' layers a tensor."""
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(v for v in out if isinstance(v, torch.Tensor))


class UnitChain(nn.Module):
    """``stages`` applied in turn, each on the tensors the one before handed on (one, or two
    across units that carry a second); with ``recompute``, each stage recomputed in backward
    on its own (see :mod:`.recompute`; a copy and twin pair recomputes its two parts apart)."""

    def __init__(self, stages: list[nn.Module], recompute: bool = False):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.recompute = recompute

    def forward(self, *tensors):
        for stage in self.stages:
            whole = self.recompute and not isinstance(stage, ParallelSum)
            tensors = handed_on(recompute_.run(stage, *tensors, recompute=whole))
        return tensors[0] if len(tensors) == 1 else tensors
