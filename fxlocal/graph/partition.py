"""Choose K-1 cuts among the candidates so that the most expensive block is as cheap as possible.

:class:`BlockPrices` prices a block from plain numbers per segment and per cut, and
:meth:`BlockPrices.best_cuts` is the exact dynamic programme over them (O(K·C²); O(K·C³) when a
cascade re-runs the block before, since a block's price then depends on where that block
starts); :func:`min_max_partition` is its short form. :func:`partition` applies it to a traced
graph and returns a :class:`~fxlocal.graph.plan.Plan`. Because blocks are gradient-isolated, a
block's cost includes the aux head at its end.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch.fx as fx

from ..errors import KOutOfRangeError, PartitionError
from .analyze import GraphAnalysis, analyze
from .candidates import covered_module_paths, hands_on_carried
from .cost import Cost, MemoryModel, checked_balance
from .plan import BlockPlan, Plan
from .trace import traced_input_size

__all__ = ["BackwardRegions", "BlockPrices", "CascadePrices", "min_max_partition", "partition", "plan_from_cuts"]

PerCut = Sequence[float] | Sequence[Sequence[float]]  # one value per cut, or one row of them per block


def min_max_partition(
    segment_costs: Sequence[float],
    k: int,
    cut_costs: PerCut | None = None,
    cut_penalties: Sequence[int] | None = None,
    segment_peaks: Sequence[float] | None = None,
    **prices,
) -> list[int]:
    """Exact min-max split of ``segment_costs`` into ``k`` contiguous blocks.

    Args:
        segment_costs: each segment's cost, in graph order.
        k: the number of blocks.
        cut_costs, cut_penalties, **prices: what a cut and a block add (see :class:`BlockPrices`).
        segment_peaks: backward's transient peak per segment when nothing is recomputed
            (``BackwardRegions.one_per_segment``).

    Returns:
        The ``k - 1`` segment indices to cut after, ascending.
    """
    if segment_peaks is not None:
        if prices.get("regions") is not None:
            raise ValueError("pass the transient peaks in regions, not beside them")
        prices["regions"] = BackwardRegions.one_per_segment(segment_peaks)
    return BlockPrices(segment_costs, cut_costs, cut_penalties, **prices).best_cuts(k)


@dataclass
class CascadePrices:
    """What a cascade adds to a block's step (MLAAN): its loss also trains the block before it,
    which backward re-runs from its input once the block's own graph is freed, and that earlier
    block's gradients and input are held until then. Laid out as :class:`BlockPrices`' arguments.
    Only the block just before is priced (a span of 2, MLAAN's default); a longer span's earlier
    blocks re-run after it, one at a time, unpriced."""

    activations: Sequence[float]  # per segment: what its re-run saves beside its BackwardRegions terms
    held: Sequence[float]  # per segment: what its block holds until the next block's step ends (gradients)
    inputs: Sequence[float]  # per segment: the input of a block starting there (held likewise)
    head_held: PerCut  # per cut: what the head there holds likewise (its gradients)
    rerun_costs: PerCut  # per cut: what a block ending there holds while the block before re-runs


@dataclass
class HandingOnPrices:
    """The head at a cut that carries a second tensor, for a block that only hands that tensor
    on (it was computed before the block starts: EDSR's long skip after the first block), which
    gets no head of its own there. Laid out as :class:`BlockPrices`' per-cut arguments."""

    cut_costs: PerCut
    head_peaks: PerCut | None
    from_segment: Sequence[int]  # per cut: the first segment a block may start at to hand the tensor on


@dataclass
class BlockPrices:
    """A block's price from plain numbers: segment ``i`` ends at cut candidate ``i`` (the last
    segment ends at the output), and a block of segments ``a..b`` (block ``j`` of the split)
    costs:

    * ``sum(segment_costs[a..b])`` + ``start_costs[a]`` (what it holds when it starts at ``a``)
      + ``cut_costs[b]`` unless ``b`` is the last segment (its aux head); a per-cut argument
      may be one row per block (``cut_costs[j][b]``), where the head depends on the block;
    * + its backward's peak (:class:`BackwardRegions`: each segment's transient when nothing is
      recomputed; the regions' kept and recompute terms when the blocks are recomputed). The
      head at its cut holds ``head_peaks[b]`` beside all that the block keeps; the block costs
      the larger of the two, since the head's activations are freed before the block's backward.
      With ``retained_heads`` a block with a head backpropagates twice, the first time keeping
      its graph (MLAAN's two losses), so through it every region's kept stays, beside what the
      head's first part holds (``retained_heads[b]``);
    * with a ``cascade`` (:class:`CascadePrices`), for a block after the first, the larger of that
      and the re-run of the block before, plus what the block before still holds;
    * with ``reruns`` (time), its segments again for each later block whose cascade re-runs and
      backpropagates it (``min(reruns, blocks after it)``): time its stage spends on them; with
      ``repeated_backward`` (time), that share of its segments again unless it is the last (a head
      that backpropagates its block twice, MLAAN's).

    Among splits with the same maximum, fewer ``cut_penalties`` win (cuts that do not end a
    module cost 1; cuts that carry a second tensor 2: twice the boundary, and where the block
    only hands the second one on, as between a residual branch and its add, its head sees the
    branch alone), then the smaller sum of squared block prices (more even).
    """

    segment_costs: Sequence[float]
    cut_costs: PerCut | None = None
    cut_penalties: Sequence[int] | None = None
    start_costs: Sequence[float] | None = None
    regions: "BackwardRegions | None" = None
    head_peaks: PerCut | None = None
    retained_heads: PerCut | None = None
    cascade: CascadePrices | None = None
    handing_on: "HandingOnPrices | None" = None
    reruns: int = 0
    repeated_backward: float = 0.0
    n: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.n = len(self.segment_costs)
        self._rows = _per_block_rows(self.cut_costs, n)
        self._head_rows = _per_block_rows(self.head_peaks, n)
        if self.handing_on is not None:
            h = self.handing_on
            self._rows_on, self._head_rows_on = _per_block_rows(h.cut_costs, n), _per_block_rows(h.head_peaks, n)
        self._retained_rows = _per_block_rows(self.retained_heads, n) if self.retained_heads is not None else None
        self._penalty = list(self.cut_penalties) if self.cut_penalties is not None else [0] * (n - 1)
        self._starts = list(self.start_costs) if self.start_costs is not None else [0.0] * n
        if self.regions is None:
            self.regions = BackwardRegions.one_per_segment([0.0] * n)
        self._prefix = _prefix(self.segment_costs)
        if self.cascade is not None:
            c = self.cascade
            self._act_prefix, self._held_prefix = _prefix(c.activations), _prefix(c.held)
            self._head_held, self._rerun_rows = _per_block_rows(c.head_held, n), _per_block_rows(c.rerun_costs, n)
            self._rerun_peaks: dict[int, list[float]] = {}

    def _at_cut(self, table: list[list[float]], j: int, b: int) -> float:
        return table[min(j, len(table) - 1)][b] if b < self.n - 1 else 0.0

    def _own(self, j: int, a: int, b: int, grown: "_BlockPeak", k: int) -> float:
        """Block ``j`` of ``k``, of segments ``a..b``, ``grown`` holding their backward's terms."""
        if self._retained_rows is not None and b < self.n - 1:
            value = grown.retained + self._at_cut(self._retained_rows, j, b)
        else:
            value = grown.value
        rows, head_rows = self._rows, self._head_rows
        if self.handing_on is not None and b < self.n - 1 and a >= self.handing_on.from_segment[b]:
            rows, head_rows = self._rows_on, self._head_rows_on
        peak = max(value, grown.total + self._at_cut(head_rows, j, b))
        repeats = min(self.reruns, k - 1 - j) + (self.repeated_backward if b < self.n - 1 else 0.0)
        segments = (self._prefix[b + 1] - self._prefix[a]) * (1 + repeats)
        return segments + self._at_cut(rows, j, b) + peak + self._starts[a]

    def _rerun_peak(self, p: int, e: int) -> float:
        """Segments ``p..e`` re-run and backpropagated once, as a cascade does the block before."""
        if p not in self._rerun_peaks:
            grown, row = _BlockPeak(self.regions), []
            for s in range(p, self.n):
                grown.append(s)
                row.append(self._act_prefix[s + 1] - self._act_prefix[p] + self._starts[p] + grown.value)
            self._rerun_peaks[p] = row
        return self._rerun_peaks[p][e - p]

    def _cascaded(self, j: int, p: int, a: int, b: int, own: float) -> float:
        """Block ``j`` of segments ``a..b`` (priced ``own``) after a block of segments ``p..a-1``."""
        c = self.cascade
        # the block's input, the gradient reaching it and the re-run's output
        rerun = (self._rerun_peak(p, a - 1) + 3 * c.inputs[a]
                 + self._held_prefix[b + 1] - self._held_prefix[a] + self._at_cut(self._rerun_rows, j, b))
        before = self._held_prefix[a] - self._held_prefix[p] + self._at_cut(self._head_held, j - 1, a - 1)
        return max(own + c.inputs[p], rerun) + before

    def block_prices(self, cuts: Sequence[int]) -> list[float]:
        """Each block's price when cutting after the segments ``cuts`` (ascending)."""
        bounds = [-1, *cuts, self.n - 1]
        prices = []
        for j in range(len(bounds) - 1):
            a, b = bounds[j] + 1, bounds[j + 1]
            grown = _BlockPeak(self.regions)
            for s in range(a, b + 1):
                grown.append(s)
            price = self._own(j, a, b, grown, len(bounds) - 1)
            if self.cascade is not None and j:
                price = self._cascaded(j, bounds[j - 1] + 1, a, b, price)
            prices.append(price)
        return prices

    def best_cuts(self, k: int) -> list[int]:
        """The ``k - 1`` segments to cut after (ascending) whose largest block price is smallest."""
        if not 1 <= k <= self.n:
            raise PartitionError(f"k must be between 1 and {self.n} here, got {k}")
        return self._best_cascaded(k) if self.cascade is not None else self._best(k)

    def _best(self, k: int) -> list[int]:
        n, inf = self.n, (math.inf, math.inf, math.inf)
        # best[j][b]: (max block price, penalties, sum of squares) of segments 0..b in j+1 blocks
        best = [[inf] * n for _ in range(k)]
        back = [[-1] * n for _ in range(k)]
        first = _BlockPeak(self.regions)
        for b in range(n):
            first.append(b)
            c = self._own(0, 0, b, first, k)
            best[0][b] = (c, 0, c * c)
        for j in range(1, k):
            for b in range(j, n):
                grown = _BlockPeak(self.regions)
                for a in range(b, j - 1, -1):  # block j covers segments a..b
                    grown.prepend(a)
                    prev_max, prev_pen, prev_sq = best[j - 1][a - 1]
                    c = self._own(j, a, b, grown, k)
                    cand = (max(prev_max, c), prev_pen + self._penalty[a - 1], prev_sq + c * c)
                    if cand < best[j][b]:
                        best[j][b], back[j][b] = cand, a
        cuts, b = [], n - 1
        for j in range(k - 1, 0, -1):
            a = back[j][b]
            cuts.append(a - 1)
            b = a - 1
        return sorted(cuts)

    def _best_cascaded(self, k: int) -> list[int]:
        """As :meth:`_best`, the state also holding where the last block starts."""
        n, inf = self.n, (math.inf, math.inf, math.inf)
        # best[j][a][b]: as in _best, block j covering segments a..b
        best = [[[inf] * n for _ in range(n)] for _ in range(k)]
        back = [[[-1] * n for _ in range(n)] for _ in range(k)]
        first = _BlockPeak(self.regions)
        for b in range(n):
            first.append(b)
            c = self._own(0, 0, b, first, k)
            best[0][0][b] = (c, 0, c * c)
        for j in range(1, k):
            for b in range(j, n):
                grown = _BlockPeak(self.regions)
                for a in range(b, j - 1, -1):
                    grown.prepend(a)
                    own = self._own(j, a, b, grown, k)
                    for p in range(j - 1, a):  # the block before covers segments p..a-1
                        prev_max, prev_pen, prev_sq = best[j - 1][p][a - 1]
                        if prev_max == math.inf:
                            continue
                        c = self._cascaded(j, p, a, b, own)
                        cand = (max(prev_max, c), prev_pen + self._penalty[a - 1], prev_sq + c * c)
                        if cand < best[j][a][b]:
                            best[j][a][b], back[j][a][b] = cand, p
        a = min(range(k - 1, n), key=lambda a: best[k - 1][a][n - 1])
        cuts, b = [], n - 1
        for j in range(k - 1, 0, -1):
            p = back[j][a][b]
            cuts.append(a - 1)
            a, b = p, a - 1
        return sorted(cuts)


def _prefix(values: Sequence[float]) -> list[float]:
    return [0.0, *itertools.accumulate(values)]


def _per_block_rows(costs: PerCut | None, n: int) -> list[list[float]]:
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
        beside all the block keeps (see :class:`BlockPrices`)."""
        peak = _BlockPeak(self)
        for s in segments:
            peak.append(s)
        return max(peak.value, peak.total + head_peak)


class _BlockPeak:
    """:class:`BackwardRegions`' peak of a block grown one segment at a time, at either end:
    ``max`` over its regions ``r`` of (kept up to ``r``) + (``r``'s recompute) + (``r``'s largest
    transient), in O(1) per segment; ``retained``: the same with all the block keeps in place of
    what it keeps up to ``r`` (a backward that keeps the graph frees nothing as it goes)."""

    def __init__(self, regions: BackwardRegions):
        self.regions = regions
        self.done = -math.inf  # the largest term among the regions not at the growing end
        self.done_own = -math.inf  # the largest recompute + transient among them
        self.region = None  # the region at the growing end, its recompute and transient
        self.recompute = self.transient = 0.0
        self.kept = 0.0  # kept up to the growing end's region, included
        self.total = 0.0  # kept by the whole block
        self.value = self.retained = -math.inf

    def _grow(self, s: int, fresh_kept: bool) -> None:
        if self.regions.regions[s] != self.region:
            if self.region is not None:
                self.done = max(self.done, self.kept + self.recompute + self.transient)
                self.done_own = max(self.done_own, self.recompute + self.transient)
            self.region, self.recompute, self.transient = self.regions.regions[s], 0.0, 0.0
            if fresh_kept:
                self.kept = 0.0
        self.kept += self.regions.kept[s]
        self.total += self.regions.kept[s]
        self.recompute += self.regions.recompute[s]
        self.transient = max(self.transient, self.regions.peaks[s])

    def _update(self) -> None:
        self.value = max(self.done, self.kept + self.recompute + self.transient)
        self.retained = self.total + max(self.done_own, self.recompute + self.transient)

    def append(self, s: int) -> None:
        self._grow(s, fresh_kept=False)
        self._update()

    def prepend(self, s: int) -> None:
        self._grow(s, fresh_kept=True)
        self.done += self.regions.kept[s]  # held through the later regions' backward too
        self._update()


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
    first_part_cost: Callable[[int], Cost] | None = None,
    input_window: int = 1,
    head_cost_handing_on: Callable[[int], Cost] | None = None,
) -> Plan:
    """Balanced K-way partition of a traced graph.

    Args:
        gm: the traced graph.
        k: the number of blocks.
        balance: ``flops``, ``params``, ``activations``, ``memory`` or ``time`` (a timed analysis).
        input_size: default: the traced size.
        head_cost: ``head_cost(i)``, the cost of the aux head after candidate ``i`` (default zero);
            with ``heads_vary_by_block``, ``head_cost(i, j)`` that of the head training block ``j``
            there (AugLocal's depth shrinks block by block), and the DP prices each block's own.
        analysis: the graph's analysis (default: analysed here).
        model_name, aux: recorded in the plan.
        allowed: the candidate indices cuts may use (unit boundaries); segments between are merged.
        memory: prices ``balance="memory"`` (batch, optimizer state, pipeline mode).
        heads_vary_by_block: see ``head_cost``.
        first_part_cost: laid out as ``head_cost``: what a head that backpropagates its block twice
            holds through the first backward (see :class:`BlockPrices`).
        input_window: above 1, a block's loss re-runs the blocks before it.
        head_cost_handing_on: laid out as ``head_cost``: the head at a cut that carries a second
            tensor for a block that only hands it on (:func:`~fxlocal.graph.candidates.hands_on_carried`);
            default: as ``head_cost``.

    Returns:
        The :class:`Plan`, each block priced with the head that will train it.
    """
    checked_balance(balance)
    if analysis is None:
        analysis = analyze(gm, input_size or traced_input_size(gm), timed=balance == "time")
    if balance == "time" and not any(c.seconds for c in analysis.segment_costs):
        raise PartitionError("balance='time' needs a timed analysis: analyze(gm, input_size, timed=True)")
    units_only = allowed is not None
    allowed = sorted(allowed) if allowed is not None else list(range(len(analysis.candidates)))
    # A cut after the last segment that holds parameters would leave the last block nothing to
    # train: the model's own loss would reach no weight, and the model's head would be trained
    # by an aux head on its logits (CrossViT averages its two heads' logits after both). Such cuts
    # are never used.
    trained = [i for i, cost in enumerate(analysis.segment_costs) if cost.params]
    if trained:
        allowed = [position for position in allowed if position < trained[-1]]
    if k < 1 or k > len(allowed) + 1:
        where = ("unit boundary" if len(allowed) == 1 else "unit boundaries") + " to cut at" if units_only else "cut candidates"
        raise KOutOfRangeError(
            f"k={k} is out of range: this graph has {len(allowed)} {where}, so k can be 1 to {len(allowed) + 1}"
            + (f"; aux='dgl' can cut at its {len(analysis.candidates)} cut candidates" if units_only else "")
            + ("" if analysis.candidates else " (no point of it leaves a single tensor live: branches run side by side to the output)"),
            max_k=len(allowed) + 1,
        )
    bounds = [-1, *allowed, len(analysis.segment_costs) - 1]
    groups = [list(range(bounds[i] + 1, bounds[i + 1] + 1)) for i in range(len(bounds) - 1)]
    blocks_priced = range(max(k - 1, 1)) if heads_vary_by_block and head_cost else [None]

    def rows(cost: Callable | None) -> list[dict[int, Cost]] | None:
        if cost is None:
            return None
        return [{i: _timed_head(analysis, cost(i) if j is None else cost(i, j), i) for i in allowed} for j in blocks_priced]

    heads = rows(head_cost) or [{i: Cost() for i in allowed}]
    firsts = rows(first_part_cost)
    carrying = any(analysis.candidates[i].carried for i in allowed)
    handing = rows(head_cost_handing_on) if carrying else None
    prices = _block_prices(analysis, balance, memory, groups, heads, firsts, input_window, handing)
    cut_idx = [allowed[c] for c in prices.best_cuts(k)]

    def at_cuts(rows: list[dict[int, Cost]], handing_rows: list[dict[int, Cost]] | None = None) -> list[Cost]:
        costs = [Cost()] * len(analysis.candidates)
        for b, (after, i) in enumerate(zip([None, *cut_idx], cut_idx)):
            chosen = handing_rows if handing_rows and hands_on_carried(analysis.candidates, i, after) else rows
            costs[i] = chosen[min(b, len(chosen) - 1)][i]
        return costs

    return plan_from_cuts(gm, analysis, cut_idx, balance, at_cuts(heads, handing), model_name=model_name, aux=aux, memory=memory,
                          first_parts=firsts and at_cuts(firsts), input_window=input_window)


# A head works on its cut's maps, so its untimed FLOPs are priced at the rate of the model's
# segments around the cut (a window holding at least this share of the model's FLOPs, so that a
# cut between two cheap nodes still sees the layers beside it), not at the model's average:
# ResNet-32's 16-channel maps at 28² train at half the FLOP rate of its 64-channel ones at 7².
NEAR_CUT_SHARE = 1 / 8


def _seconds_per_flop_near(costs: Sequence[Cost], total: Cost, position: int) -> float:
    """The measured seconds per FLOP of the segments ``costs`` (summing to ``total``) around
    candidate ``position``."""
    first, last = position, position + 1  # the segments ending at the cut and starting after it
    window = costs[first] + costs[last]
    while window.flops < NEAR_CUT_SHARE * total.flops and (first > 0 or last < len(costs) - 1):
        if first > 0:
            first -= 1
            window = window + costs[first]
        if last < len(costs) - 1:
            last += 1
            window = window + costs[last]
    return window.seconds / window.flops if window.flops and window.seconds else total.seconds / total.flops


def _timed_head(analysis: GraphAnalysis, head: Cost, position: int) -> Cost:
    """Heads are measured on fake tensors, not timed: in a timed analysis, price the FLOPs of a
    head at candidate ``position`` that no measured time covers (all of a plain head's; a head
    of unit copies has their segments' time, but not its classifier's, its EMA twin's or its
    re-runs') at the seconds per FLOP the model was measured at around that cut."""
    total = sum(analysis.segment_costs, Cost())
    untimed = head.flops - head.timed_flops
    if not total.seconds or not total.flops or untimed <= 0:
        return head
    rate = _seconds_per_flop_near(analysis.segment_costs, total, position)
    return replace(head, seconds=head.seconds + untimed * rate, timed_flops=head.flops)


@dataclass
class _SegmentPrices:
    """Per segment, in :class:`BlockPrices`' terms."""

    scores: list[float]  # additive
    starts: list[float]  # paid by a block that starts at the segment
    backward: BackwardRegions
    activations: list[float]  # of the scores, the saved activations (those of a cascade's re-run)
    held: list[float]  # of the scores, the gradients (a cascade holds them through the next block's step)
    inputs: list[float]  # what enters the segment


def _segment_prices(analysis: GraphAnalysis, balance: str, memory: MemoryModel | None) -> _SegmentPrices:
    """What each segment of ``analysis`` costs a block under ``balance``.

    With ``memory.recompute`` (the blocks recomputed in backward, one region per unit, see
    :mod:`fxlocal.graph.regions`) a segment keeps what the policy keeps of it (``kept_bytes`` for
    ``"cheap"``, nothing for ``"all"``) plus, where it begins a region, that region's input, and
    its region's recompute brings the rest back (:class:`BackwardRegions`); a block starting
    inside a unit keeps its own input as its first region's.
    """
    costs = analysis.segment_costs
    n = len(costs)
    zeros = [0.0] * n
    if balance != "memory":
        return _SegmentPrices([c.metric(balance) for c in costs], zeros, BackwardRegions.one_per_segment(zeros), zeros, zeros, zeros)
    memory = memory or MemoryModel()
    transient = [memory.transient(c) for c in costs]
    # per sample, what enters each segment: the model's input (fp32) or what crosses the cut before it
    entering = [memory.batch * size for size in [4.0 * math.prod(analysis.input_size), *(float(c.nbytes) for c in analysis.candidates)]]
    # its resident part: the gradients (with per-block optimizers), all its state in pipeline mode
    grads = [memory.bytes(replace(c, activation_bytes=0.0)) for c in costs]
    if memory.recompute == "none":
        activations = [memory.batch * c.activation_bytes for c in costs]
        return _SegmentPrices([memory.bytes(c) for c in costs], zeros, BackwardRegions.one_per_segment(transient), activations, grads, entering)
    unit_ends = {u.cut_position for u in analysis.units}
    begins = [i == 0 or i - 1 in unit_ends for i in range(n)]
    kept = [c.kept_bytes if memory.recompute == "cheap" else 0.0 for c in costs]
    return _SegmentPrices(
        grads,
        [0.0 if begins[i] else entering[i] for i in range(n)],
        BackwardRegions(
            list(itertools.accumulate(int(b) for b in begins)),
            [memory.batch * kept[i] + (entering[i] if begins[i] else 0.0) for i in range(n)],
            [memory.batch * max(c.activation_bytes - kept[i], 0.0) for i, c in enumerate(costs)],
            transient,
        ),
        zeros,
        grads,
        entering,
    )


def _block_prices(
    analysis: GraphAnalysis,
    balance: str,
    memory: MemoryModel | None,
    groups: Sequence[Sequence[int]],
    heads: Sequence[Mapping[int, Cost]],
    first_parts: Sequence[Mapping[int, Cost]] | None,
    input_window: int,
    handing_on: Sequence[Mapping[int, Cost]] | None = None,
) -> BlockPrices:
    """:class:`BlockPrices` for ``analysis`` cut only between ``groups`` of consecutive segments,
    ``heads`` holding (one row per block, or one for all) the head at each cut's candidate, and
    ``first_parts`` likewise what a head that backpropagates its block twice holds through the
    first backward (see :func:`partition`), ``handing_on`` the head at each cut for a block that
    only hands on what the cut carries."""
    prices = _segment_prices(analysis, balance, memory)
    priced = balance == "memory"
    model = memory or MemoryModel()
    recomputed = priced and model.recompute != "none"
    ends = [g[-1] for g in groups[:-1]]

    def per_cut(price: Callable[[Cost, int], float], rows=heads) -> list[list[float]]:
        return [[price(row[i], i) for i in ends] for row in rows]

    def output(i: int) -> float:
        return model.boundary(analysis.candidates[i].nbytes) if priced else 0.0

    def resident(head: Cost) -> float:  # the head's parameters, gradients and optimizer state
        return _score(replace(head, activation_bytes=0.0), balance, memory, head=True)

    cascade = None
    if priced and input_window > 1:
        cascade = CascadePrices(
            activations=[sum(prices.activations[s] for s in g) for g in groups],
            held=[sum(prices.held[s] for s in g) for g in groups],
            inputs=[prices.inputs[g[0]] for g in groups],
            head_held=per_cut(lambda head, i: head.param_bytes if model.per_block else 0.0),
            rerun_costs=per_cut(lambda head, i: resident(head) + output(i)),
        )
    def cut_costs(rows) -> list[list[float]]:
        return per_cut(lambda head, i: (resident(head) if recomputed else _score(head, balance, memory, head=True)) + output(i), rows)

    def head_peaks(rows) -> list[list[float]] | None:
        # beside all the block keeps: what the head holds while it trains (with the blocks
        # recomputed, its activations, else priced additively above) and its backward's transient
        return per_cut(lambda head, i: model.transient(head) + (model.batch * head.activation_bytes if recomputed else 0.0),
                       rows) if priced else None

    handing = None
    if handing_on is not None:
        # a block of groups a..b hands on what cut b carries when the cut before it (after group a - 1) is past where that was computed
        from_segment = [next((a for a in range(1, b + 1) if hands_on_carried(analysis.candidates, end, ends[a - 1])), len(groups))
                        for b, end in enumerate(ends)]
        handing = HandingOnPrices(cut_costs(handing_on), head_peaks(handing_on), from_segment)
    return BlockPrices(
        [sum(prices.scores[s] for s in g) for g in groups],
        cut_costs(heads),
        [(0 if analysis.candidates[i].closes else 1) + (2 if analysis.candidates[i].carried else 0) for i in ends],
        start_costs=[prices.starts[g[0]] for g in groups],
        regions=prices.backward.merged(groups),
        head_peaks=head_peaks(heads),
        # stored, a head's activations are priced additively above already
        retained_heads=per_cut(lambda part, i: model.batch * part.activation_bytes if recomputed else 0.0, first_parts)
        if priced and first_parts is not None else None,
        cascade=cascade,
        handing_on=handing,
        # a cascade re-runs the blocks before it in its backward: their time, on their own stage in a pipeline
        reruns=input_window - 1 if balance == "time" else 0,
        repeated_backward=BACKWARD_SHARE if balance == "time" and first_parts is not None else 0.0,
    )


# A block's backward's share of its forward and backward time: a convolution's or a Linear's
# backward computes two products (the input's gradient and the weights') to the forward's one.
BACKWARD_SHARE = 2 / 3


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
    first_parts: Sequence[Cost] | None = None,
    input_window: int = 1,
) -> Plan:
    """The Plan for cutting after the given candidate indices (ascending); ``heads[i]`` is the
    head at candidate ``i`` (``first_parts[i]`` its first part, see :func:`partition`), the rest
    as in :func:`partition`."""
    bounds = [-1, *cut_idx, len(analysis.segment_costs) - 1]
    timed = [_timed_head(analysis, h, i) for i, h in enumerate(heads)]
    groups = [[s] for s in range(len(analysis.segment_costs))]
    firsts = [first_parts] if first_parts is not None else None
    prices = _block_prices(analysis, balance, memory, groups, [timed], firsts, input_window).block_prices(cut_idx)
    blocks = []
    for b in range(len(bounds) - 1):
        segs = range(bounds[b] + 1, bounds[b + 1] + 1)
        cost = sum((analysis.segment_costs[s] for s in segs), Cost())
        head = timed[bounds[b + 1]] if b < len(bounds) - 2 else Cost()
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
                cost=prices[b],
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
