"""``analyze``: a traced graph's cut candidates, its units and what each segment between two
candidates costs to train (per sample), as one :class:`GraphAnalysis`.

A *segment* is the run of nodes after one candidate up to and including the next; with ``C``
candidates there are ``C + 1`` segments, the last one ending at the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.fx as fx

from .candidates import CutCandidate, find_cut_candidates
from .cost import Cost, measure_nodes, time_segments
from .units import Unit, find_units

__all__ = ["GraphAnalysis", "analyze"]


@dataclass
class GraphAnalysis:
    """Cut candidates and the cost of each segment between them (``len(candidates) + 1``)."""

    candidates: list[CutCandidate]
    segment_costs: list[Cost]
    segment_nodes: list[list[str]]
    input_size: tuple[int, ...]
    units: list[Unit] = field(default_factory=list)

    @property
    def max_k(self) -> int:
        return len(self.candidates) + 1


def analyze(gm: fx.GraphModule, input_size: tuple[int, ...], timed: bool = False) -> GraphAnalysis:
    """Cut candidates of ``gm``, its units and the per-sample training cost of every segment.

    Args:
        gm: a graph from :func:`fxlocal.trace` (nodes carry ``meta["val"]``).
        input_size: the per-sample input shape it was traced at.
        timed: also measure wall time (``Cost.seconds``, for ``balance="time"``) by running it for real.

    Returns:
        The :class:`GraphAnalysis`: candidates, units, and ``len(candidates) + 1`` segment costs.
    """
    candidates = find_cut_candidates(gm)
    node_costs = measure_nodes(gm, input_size)
    cut_at = {c.index for c in candidates}
    segments: list[list[str]] = [[]]
    costs: list[Cost] = [Cost()]
    for i, node in enumerate(gm.graph.nodes):
        if node.op not in ("placeholder", "output"):
            segments[-1].append(node.name)
            costs[-1] = costs[-1] + node_costs[node.name]
        if i in cut_at:
            segments.append([])
            costs.append(Cost())
    if timed:  # the segments of one real training step, as a block trains them
        seconds = time_segments(gm, input_size, [[c.node, *(t.node for t in c.carried)] for c in candidates])
        costs = [replace(cost, seconds=t, timed_flops=cost.flops) for cost, t in zip(costs, seconds)]
    return GraphAnalysis(candidates, costs, segments, tuple(input_size), find_units(gm, candidates))
