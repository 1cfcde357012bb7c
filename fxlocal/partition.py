"""Choose K-1 cuts among the candidates so that the most expensive block is as cheap as possible.

:func:`min_max_partition` is the exact dynamic programme over plain numbers (O(K·C²)); the
function :func:`partition` applies it to a traced graph and returns a :class:`~fxlocal.plan.Plan`.
Because blocks are gradient-isolated, a block's cost includes the aux head at its end.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch.fx as fx

from .analyze import GraphAnalysis, analyze, covered_module_paths
from .cost import BALANCE_METRICS, Cost, MemoryModel
from .errors import KOutOfRangeError, PartitionError
from .plan import BlockPlan, Plan
from .trace import traced_input_size

__all__ = ["BackwardRegions", "min_max_partition", "partition", "plan_from_cuts"]


def min_max_partition(
    segment_costs: Sequence[float],
    k: int,
    cut_costs: Sequence[float] | Sequence[Sequence[float]] | None = None,
    cut_penalties: Sequence[int] | None = None,
    segment_peaks: Sequence[float] | None = None,
    start_costs: Sequence[float] | None = None,
    regions: "BackwardRegions | None" = None,
    head_peaks: Sequence[float] | Sequence[Sequence[float]] | None = None,
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
    ``start_costs[a]`` is added to a block that starts at segment ``a``. ``regions`` prices
    blocks whose activations backward recomputes region by region (:class:`BackwardRegions`,
    which then holds the peaks); ``head_peaks`` (laid out as ``cut_costs``) is then what the
    head at a cut holds while it trains, beside all that its block keeps: the block costs the
    larger of that and its backward's peak, since the head's activations are freed before the
    block's backward starts.
    """
    n = len(segment_costs)
    if not 1 <= k <= n:
        raise PartitionError(f"k must be between 1 and {n} here, got {k}")
    rows = _per_block_rows(cut_costs, n)
    head_rows = _per_block_rows(head_peaks, n)
    penalty = list(cut_penalties) if cut_penalties is not None else [0] * (n - 1)
    prefix = [0.0]
    for c in segment_costs:
        prefix.append(prefix[-1] + c)

    starts = list(start_costs) if start_costs is not None else [0.0] * n
    if regions is not None and segment_peaks is not None:
        raise ValueError("pass the transient peaks in regions, not beside them")
    if regions is None:
        regions = BackwardRegions.one_per_segment(segment_peaks if segment_peaks is not None else [0.0] * n)

    def at_cut(table: list[list[float]], j: int, b: int) -> float:
        return table[min(j, len(table) - 1)][b] if b < n - 1 else 0.0

    def block(j: int, a: int, b: int, grown: _BlockPeak) -> float:
        peak = max(grown.value, grown.total + at_cut(head_rows, j, b))
        return prefix[b + 1] - prefix[a] + at_cut(rows, j, b) + peak + starts[a]

    inf = (math.inf, math.inf, math.inf)
    # best[j][b]: (max block cost, penalties, sum of squares) of segments 0..b in j+1 blocks
    best = [[inf] * n for _ in range(k)]
    back = [[-1] * n for _ in range(k)]
    first = _BlockPeak(regions)
    for b in range(n):
        first.append(b)
        c = block(0, 0, b, first)
        best[0][b] = (c, 0, c * c)
    for j in range(1, k):
        for b in range(j, n):
            grown = _BlockPeak(regions)
            for a in range(b, j - 1, -1):  # block j covers segments a..b
                grown.prepend(a)
                prev_max, prev_pen, prev_sq = best[j - 1][a - 1]
                c = block(j, a, b, grown)
                cand = (max(prev_max, c), prev_pen + penalty[a - 1], prev_sq + c * c)
                if cand < best[j][b]:
                    best[j][b], back[j][b] = cand, a
    cuts, b = [], n - 1
    for j in range(k - 1, 0, -1):
        a = back[j][b]
        cuts.append(a - 1)
        b = a - 1
    return sorted(cuts)


def _per_block_rows(costs: Sequence[float] | Sequence[Sequence[float]] | None, n: int) -> list[list[float]]:
    """Per-cut costs as one row per block (a single row serves every block)."""
    if costs is None:
        return [[0.0] * (n - 1)]
    if len(costs) and isinstance(costs[0], Sequence):
        return [list(row) for row in costs]
    return [list(costs)]


@dataclass
class BackwardRegions:
    """How a block's backward peaks, per segment: backward runs region by region (the model's
    units, when the blocks are recomputed; else each segment is its own), and while it runs
    region ``r`` the block holds what every region up to ``r`` keeps (``kept``; the regions
    after it are done and freed), what ``r``'s recompute brings back (``recompute``) and
    backward's transient buffers (``peaks``, the largest of ``r``'s)."""

    regions: Sequence[int]  # consecutive segments of one region share a number
    kept: Sequence[float]
    recompute: Sequence[float]
    peaks: Sequence[float]

    @classmethod
    def one_per_segment(cls, peaks: Sequence[float]) -> "BackwardRegions":
        """Nothing recomputed: a block's peak is its largest transient (its activations being
        priced additively)."""
        zeros = [0.0] * len(peaks)
        return cls(list(range(len(peaks))), zeros, zeros, list(peaks))

    def merged(self, groups: Sequence[Sequence[int]]) -> "BackwardRegions":
        """The same for segments merged in consecutive ``groups`` (each within one region, as
        the segments between two unit boundaries are)."""
        return BackwardRegions(
            [self.regions[g[-1]] for g in groups],
            [sum(self.kept[s] for s in g) for g in groups],
            [sum(self.recompute[s] for s in g) for g in groups],
            [max(self.peaks[s] for s in g) for g in groups],
        )

    def block_peak(self, segments: Sequence[int], head_peak: float = 0.0) -> float:
        """The peak of a block of these consecutive segments, its head holding ``head_peak``
        beside all the block keeps (see :func:`min_max_partition`)."""
        peak = _BlockPeak(self)
        for s in segments:
            peak.append(s)
        return max(peak.value, peak.total + head_peak)


class _BlockPeak:
    """:class:`BackwardRegions`' peak of a block grown one segment at a time, at either end:
    ``max`` over its regions ``r`` of (kept up to ``r``) + (``r``'s recompute) + (``r``'s largest
    transient), in O(1) per segment."""

    def __init__(self, regions: BackwardRegions):
        self.regions = regions
        self.done = -math.inf  # the largest term among the regions not at the growing end
        self.region = None  # the region at the growing end, its recompute and transient
        self.recompute = self.transient = 0.0
        self.kept = 0.0  # kept up to the growing end's region, included
        self.total = 0.0  # kept by the whole block
        self.value = -math.inf

    def _term(self) -> float:
        return self.kept + self.recompute + self.transient

    def _grow(self, s: int, fresh_kept: bool) -> None:
        if self.regions.regions[s] != self.region:
            if self.region is not None:
                self.done = max(self.done, self._term())
            self.region, self.recompute, self.transient = self.regions.regions[s], 0.0, 0.0
            if fresh_kept:
                self.kept = 0.0
        self.kept += self.regions.kept[s]
        self.total += self.regions.kept[s]
        self.recompute += self.regions.recompute[s]
        self.transient = max(self.transient, self.regions.peaks[s])

    def append(self, s: int) -> float:
        self._grow(s, fresh_kept=False)
        self.value = max(self.done, self._term())
        return self.value

    def prepend(self, s: int) -> float:
        self._grow(s, fresh_kept=True)
        self.done += self.regions.kept[s]  # held through the later regions' backward too
        self.value = max(self.done, self._term())
        return self.value


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
    merged = [range(bounds[i] + 1, bounds[i + 1] + 1) for i in range(len(bounds) - 1)]
    prices = _segment_prices(analysis, balance, memory)
    blocks_priced = range(max(k - 1, 1)) if heads_vary_by_block and head_cost else [None]
    heads = [
        {i: _timed_head(analysis, head_cost(i) if j is None else head_cost(i, j)) if head_cost else Cost() for i in allowed}
        for j in blocks_priced
    ]
    recomputed = balance == "memory" and memory is not None and memory.recompute != "none"
    chosen = min_max_partition(
        [sum(prices.scores[s] for s in segs) for segs in merged],
        k,
        [
            [_head_score(row[i], balance, memory, recomputed) + _boundary(analysis.candidates[i], balance, memory) for i in allowed]
            for row in heads
        ],
        [0 if analysis.candidates[i].closes else 1 for i in allowed],
        start_costs=[prices.starts[segs[0]] for segs in merged],
        regions=prices.backward.merged(merged),
        head_peaks=[[_head_peak(row[i], memory) for i in allowed] for row in heads] if recomputed else None,
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


@dataclass
class _SegmentPrices:
    """Per segment, in :func:`min_max_partition`'s terms."""

    scores: list[float]  # additive
    starts: list[float]  # paid by a block that starts at the segment
    backward: BackwardRegions


def _segment_prices(analysis: GraphAnalysis, balance: str, memory: MemoryModel | None) -> _SegmentPrices:
    """What each segment of ``analysis`` costs a block under ``balance``.

    With ``memory.recompute`` (the blocks recomputed in backward, one region per unit, see
    :mod:`fxlocal.regions`) a segment keeps what the policy keeps of it (``kept_bytes`` for
    ``"cheap"``, nothing for ``"all"``) plus, where it begins a region, that region's input, and
    its region's recompute brings the rest back (:class:`BackwardRegions`); a block starting
    inside a unit keeps its own input as its first region's.
    """
    costs = analysis.segment_costs
    n = len(costs)
    if balance != "memory":
        return _SegmentPrices([c.metric(balance) for c in costs], [0.0] * n, BackwardRegions.one_per_segment([0.0] * n))
    memory = memory or MemoryModel()
    transient = [memory.transient(c) for c in costs]
    if memory.recompute == "none":
        return _SegmentPrices([memory.bytes(c) for c in costs], [0.0] * n, BackwardRegions.one_per_segment(transient))
    unit_ends = {u.cut_position for u in analysis.units}
    begins = [i == 0 or i - 1 in unit_ends for i in range(n)]
    # per sample, what enters each segment: the model's input (fp32) or what crosses the cut before it
    entering = [4.0 * math.prod(analysis.input_size), *(float(c.nbytes) for c in analysis.candidates)]
    kept = [c.kept_bytes if memory.recompute == "cheap" else 0.0 for c in costs]
    return _SegmentPrices(
        [memory.bytes(replace(c, activation_bytes=0.0)) for c in costs],
        [0.0 if begins[i] else memory.batch * entering[i] for i in range(n)],
        BackwardRegions(
            list(itertools.accumulate(int(b) for b in begins)),
            [memory.batch * (kept[i] + (entering[i] if begins[i] else 0.0)) for i in range(n)],
            [memory.batch * max(c.activation_bytes - kept[i], 0.0) for i, c in enumerate(costs)],
            transient,
        ),
    )


def _head_score(head: Cost, balance: str, memory: MemoryModel | None, recomputed: bool) -> float:
    """The head's additive price: with recomputed blocks its activations are in
    :func:`_head_peak` instead (held beside what its block keeps, not beside its backward)."""
    return _score(replace(head, activation_bytes=0.0) if recomputed else head, balance, memory, head=True)


def _head_peak(head: Cost, memory: MemoryModel | None) -> float:
    memory = memory or MemoryModel()
    return head.activation_bytes * memory.batch + memory.transient(head)


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
    prices = _segment_prices(analysis, balance, memory)
    recomputed = balance == "memory" and memory is not None and memory.recompute != "none"
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
                cost=sum(prices.scores[s] for s in segs)
                + prices.starts[segs[0]]
                + _head_score(head, balance, memory, recomputed)
                + (
                    prices.backward.block_peak(segs, _head_peak(head, memory) if recomputed else (memory or MemoryModel()).transient(head))
                    if balance == "memory"
                    else 0.0
                )
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
