"""Choose K-1 cuts among the candidates so that the most expensive block is as cheap as possible.

:func:`min_max_partition` is the exact dynamic programme over plain numbers (O(K·C²)); the
function :func:`partition` applies it to a traced graph and returns a :class:`~fxlocal.plan.Plan`.
Because blocks are gradient-isolated, a block's cost includes the aux head at its end.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch.fx as fx

from .analyze import GraphAnalysis, analyze, covered_module_paths
from .cost import BALANCE_METRICS, Cost, MemoryModel
from .errors import KOutOfRangeError, PartitionError
from .plan import BlockPlan, Plan
from .trace import traced_input_size

__all__ = ["min_max_partition", "partition", "plan_from_cuts"]


def min_max_partition(
    segment_costs: Sequence[float],
    k: int,
    cut_costs: Sequence[float] | Sequence[Sequence[float]] | None = None,
    cut_penalties: Sequence[int] | None = None,
    segment_peaks: Sequence[float] | None = None,
) -> list[int]:
    """Exact min-max split of ``segment_costs`` into ``k`` contiguous blocks.

    Segment ``i`` ends at cut candidate ``i`` (the last segment ends at the output), so a block of
    segments ``a..b`` costs ``sum(segment_costs[a..b]) + cut_costs[b]`` when ``b`` is not the last
    segment (its aux head), else just the sum. Returns the ``k - 1`` candidate indices cut after,
    ascending. Among splits with the same maximum, fewer ``cut_penalties`` win (cuts that do not
    end a module cost 1), then the smaller sum of squared block costs (more even).
    ``segment_peaks`` add a non-additive term: a block also costs the largest peak among its
    segments (backward's transient buffers). ``cut_costs`` may also be one row per block,
    ``cut_costs[j][b]`` for block ``j`` ending at ``b``, where the head depends on the block.
    """
    n = len(segment_costs)
    if not 1 <= k <= n:
        raise PartitionError(f"k must be between 1 and {n} here, got {k}")
    if cut_costs is None:
        rows = [[0.0] * (n - 1)]
    elif len(cut_costs) and isinstance(cut_costs[0], Sequence):
        rows = [list(row) for row in cut_costs]
    else:
        rows = [list(cut_costs)]
    penalty = list(cut_penalties) if cut_penalties is not None else [0] * (n - 1)
    prefix = [0.0]
    for c in segment_costs:
        prefix.append(prefix[-1] + c)

    peaks = list(segment_peaks) if segment_peaks is not None else [0.0] * n

    def block(j: int, a: int, b: int, peak: float) -> float:
        head = rows[min(j, len(rows) - 1)][b] if b < n - 1 else 0.0
        return prefix[b + 1] - prefix[a] + head + peak

    inf = (math.inf, math.inf, math.inf)
    # best[j][b]: (max block cost, penalties, sum of squares) of segments 0..b in j+1 blocks
    best = [[inf] * n for _ in range(k)]
    back = [[-1] * n for _ in range(k)]
    for b in range(n):
        c = block(0, 0, b, max(peaks[: b + 1]))
        best[0][b] = (c, 0, c * c)
    for j in range(1, k):
        for b in range(j, n):
            peak = 0.0
            for a in range(b, j - 1, -1):  # block j covers segments a..b
                peak = max(peak, peaks[a])
                prev_max, prev_pen, prev_sq = best[j - 1][a - 1]
                c = block(j, a, b, peak)
                cand = (max(prev_max, c), prev_pen + penalty[a - 1], prev_sq + c * c)
                if cand < best[j][b]:
                    best[j][b], back[j][b] = cand, a
    cuts, b = [], n - 1
    for j in range(k - 1, 0, -1):
        a = back[j][b]
        cuts.append(a - 1)
        b = a - 1
    return sorted(cuts)


def partition(
    gm: fx.GraphModule,
    k: int,
    balance: str = "flops",
    input_size: tuple[int, ...] | None = None,
    head_cost: Callable[[int], Cost] | None = None,
    analysis: GraphAnalysis | None = None,
    model_name: str = "",
    aux: str = "dgl",
    allowed: Sequence[int] | None = None,
    memory: MemoryModel | None = None,
    heads_vary_by_block: bool = False,
) -> Plan:
    """Balanced K-way partition of a traced graph.

    ``head_cost(i)`` is the cost of the aux head placed after candidate ``i`` (defaults to zero);
    with ``heads_vary_by_block``, ``head_cost(i, j)`` that of the head training block ``j``
    there (AugLocal's depth shrinks block by block), and the DP prices each block's own.
    ``allowed`` restricts the cuts to those candidate indices (e.g. unit boundaries); the
    segments between allowed cuts are merged. ``input_size`` defaults to the traced size.
    ``memory`` prices ``balance="memory"`` (batch, optimizer state, pipeline mode).
    """
    if balance not in BALANCE_METRICS:
        raise PartitionError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_METRICS)}")
    if analysis is None:
        analysis = analyze(gm, input_size or traced_input_size(gm), timed=balance == "time")
    if balance == "time" and not any(c.seconds for c in analysis.segment_costs):
        raise PartitionError("balance='time' needs a timed analysis: analyze(gm, input_size, timed=True)")
    allowed = sorted(allowed) if allowed is not None else list(range(len(analysis.candidates)))
    if k < 1 or k > len(allowed) + 1:
        units_only = len(allowed) < len(analysis.candidates)
        where = ("unit boundary" if len(allowed) == 1 else "unit boundaries") + " to cut at" if units_only else "cut candidates"
        raise KOutOfRangeError(
            f"k={k} is out of range: this graph has {len(allowed)} {where}, so k can be 1 to {len(allowed) + 1}"
            + (f"; aux='dgl' can cut at its {len(analysis.candidates)} cut candidates" if units_only else "")
            + ("" if analysis.candidates else " (no point of it leaves a single tensor live: branches run side by side to the output)"),
            max_k=len(allowed) + 1,
        )
    bounds = [-1, *allowed, len(analysis.segment_costs) - 1]
    merged = [
        sum((analysis.segment_costs[s] for s in range(bounds[i] + 1, bounds[i + 1] + 1)), Cost())
        for i in range(len(bounds) - 1)
    ]
    blocks_priced = range(max(k - 1, 1)) if heads_vary_by_block and head_cost else [None]
    heads = [
        {i: _timed_head(analysis, head_cost(i) if j is None else head_cost(i, j)) if head_cost else Cost() for i in allowed}
        for j in blocks_priced
    ]
    chosen = min_max_partition(
        [_score(c, balance, memory) for c in merged],
        k,
        [
            [_score(row[i], balance, memory, head=True) + _boundary(analysis.candidates[i], balance, memory) for i in allowed]
            for row in heads
        ],
        [0 if analysis.candidates[i].closes else 1 for i in allowed],
        [(memory or MemoryModel()).transient(c) for c in merged] if balance == "memory" else None,
    )
    cut_idx = [allowed[c] for c in chosen]
    head_costs = [Cost()] * len(analysis.candidates)
    for b, i in enumerate(cut_idx):
        head_costs[i] = heads[min(b, len(heads) - 1)][i]
    return plan_from_cuts(gm, analysis, cut_idx, balance, head_costs, model_name=model_name, aux=aux, memory=memory)


def _timed_head(analysis: GraphAnalysis, head: Cost) -> Cost:
    """Heads are measured on fake tensors, not timed: in a timed analysis, price a head's FLOPs
    at the seconds per FLOP the model itself was measured at."""
    total = sum(analysis.segment_costs, Cost())
    if not total.seconds or head.seconds or not total.flops:
        return head
    return replace(head, seconds=head.flops * total.seconds / total.flops)


def _boundary(candidate, balance: str, memory: MemoryModel | None) -> float:
    return (memory or MemoryModel()).boundary(candidate.nbytes) if balance == "memory" else 0.0


def _score(cost: Cost, balance: str, memory: MemoryModel | None, head: bool = False) -> float:
    if balance == "memory":
        return (memory or MemoryModel()).bytes(cost, head=head)
    return cost.metric(balance)


def plan_from_cuts(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    cut_idx: Sequence[int],
    balance: str,
    heads: Sequence[Cost],
    model_name: str = "",
    aux: str = "dgl",
    memory: MemoryModel | None = None,
) -> Plan:
    """The Plan for cutting after the given candidate indices (ascending)."""
    bounds = [-1, *cut_idx, len(analysis.segment_costs) - 1]
    blocks = []
    for b in range(len(bounds) - 1):
        segs = range(bounds[b] + 1, bounds[b + 1] + 1)
        cost = sum((analysis.segment_costs[s] for s in segs), Cost())
        head = _timed_head(analysis, heads[bounds[b + 1]]) if b < len(bounds) - 2 else Cost()
        names = {name for s in segs for name in analysis.segment_nodes[s]}
        end = analysis.candidates[bounds[b + 1]] if b < len(bounds) - 2 else None
        blocks.append(
            BlockPlan(
                index=b,
                module_paths=covered_module_paths(gm, names),
                params=cost.params,
                gflops=cost.flops / 1e9,
                activation_mib=cost.activation_bytes / 2**20,
                head_params=head.params,
                head_gflops=head.flops / 1e9,
                head_activation_mib=head.activation_bytes / 2**20,
                cost=_score(cost, balance, memory)
                + _score(head, balance, memory, head=True)
                + ((memory or MemoryModel()).transient(cost + head) if balance == "memory" else 0.0)
                + (_boundary(end, balance, memory) if end else 0.0),
                cut_node=end.node if end else None,
                cut_shape=list(end.shape) if end else None,
            )
        )
    return Plan(
        model=model_name,
        input_size=list(analysis.input_size),
        k=len(blocks),
        balance=balance,
        aux=aux,
        num_candidates=len(analysis.candidates),
        blocks=blocks,
    )
