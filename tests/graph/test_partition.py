import itertools
import random
import statistics

import pytest
import torch

import fxlocal
from fxlocal import min_max_partition
from fxlocal.errors import PartitionError


def brute_force(costs, k, cut_costs):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(n - 1), k - 1):
        bounds = [-1, *cuts, n - 1]
        worst = max(
            sum(costs[bounds[i] + 1 : bounds[i + 1] + 1]) + (cut_costs[bounds[i + 1]] if i < k - 1 else 0)
            for i in range(k)
        )
        best = min(best, worst)
    return best


def block_max(costs, cuts, cut_costs):
    bounds = [-1, *cuts, len(costs) - 1]
    return max(
        sum(costs[bounds[i] + 1 : bounds[i + 1] + 1]) + (cut_costs[bounds[i + 1]] if i < len(bounds) - 2 else 0)
        for i in range(len(bounds) - 1)
    )


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 10)
    k = rng.randint(1, n)
    costs = [rng.choice([0, rng.randint(1, 100)]) for _ in range(n)]
    cut_costs = [rng.randint(0, 30) for _ in range(n - 1)] if seed % 2 else [0] * (n - 1)
    cuts = min_max_partition(costs, k, cut_costs)
    assert len(cuts) == k - 1 and cuts == sorted(set(cuts))
    assert all(0 <= c < n - 1 for c in cuts)
    assert block_max(costs, cuts, cut_costs) == brute_force(costs, k, cut_costs)


@pytest.mark.parametrize("seed", range(20))
def test_dp_with_a_head_per_block_matches_brute_force(seed):
    """Where a cut's head depends on the block it trains (AugLocal's depth), block j ending at
    b costs ``cut_costs[j][b]``."""
    rng = random.Random(200 + seed)
    n = rng.randint(3, 9)
    k = rng.randint(2, n)
    costs = [rng.randint(0, 50) for _ in range(n)]
    rows = [[rng.randint(0, 60) for _ in range(n - 1)] for _ in range(k - 1)]
    cuts = min_max_partition(costs, k, rows)

    def worst(cs):
        bounds = [-1, *cs, n - 1]
        return max(
            sum(costs[bounds[j] + 1 : bounds[j + 1] + 1]) + (rows[j][bounds[j + 1]] if j < k - 1 else 0)
            for j in range(k)
        )

    assert len(cuts) == k - 1 and worst(cuts) == min(worst(cs) for cs in itertools.combinations(range(n - 1), k - 1))


def test_dp_is_not_equal_count():
    # one huge segment: equal counts would put it with others; min-max isolates it
    costs = [1, 1, 1, 50, 1, 1, 1, 1]
    cuts = min_max_partition(costs, 3)
    assert block_max(costs, cuts, [0] * 7) == 50


def test_penalties_break_ties_only():
    costs = [5, 0, 5]  # cutting after segment 0 or 1 gives the same max
    assert min_max_partition(costs, 2, cut_penalties=[1, 0]) == [1]
    assert min_max_partition(costs, 2, cut_penalties=[0, 1]) == [0]


@pytest.mark.parametrize("k", [0, 4])
def test_k_out_of_range(k):
    with pytest.raises(PartitionError):
        min_max_partition([1, 2, 3], k)


@pytest.mark.parametrize("seed", range(25))
def test_dp_with_peaks_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(2, 9)
    k = rng.randint(1, n)
    costs = [rng.randint(0, 50) for _ in range(n)]
    peaks = [rng.randint(0, 80) for _ in range(n)]
    cuts = min_max_partition(costs, k, segment_peaks=peaks)

    def worst(cs):
        bounds = [-1, *cs, n - 1]
        return max(
            sum(costs[bounds[i] + 1 : bounds[i + 1] + 1]) + max(peaks[bounds[i] + 1 : bounds[i + 1] + 1])
            for i in range(len(bounds) - 1)
        )

    assert worst(cuts) == min(worst(list(c)) for c in itertools.combinations(range(n - 1), k - 1))


class _CheapThenCounted(torch.nn.Module):
    """BatchNorm, 40 sines on a large map (time but no counted FLOPs), then a small Linear."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(x)
        for _ in range(40):
            x = torch.sin(x)
        return self.fc(x.mean((2, 3)))


# large enough maps that each sine takes milliseconds: a loaded machine's scheduling noise
# (a preempted node) then moves the measured split by a few sines, not a dozen
SIZE_TIMED = (16, 64, 64)


def test_time_balance_cuts_where_the_time_is_and_leaves_the_model_as_it_was():
    """FLOPs see only the Linear; measured time sees the sines, so K=2 cuts inside the chain of
    sines, not next to either end (near its middle when the machine is quiet; the margin leaves
    room for a loaded CI box's timing noise). Timing runs the model for real: BN statistics,
    gradients and the RNG are restored."""
    model = _CheapThenCounted()
    gm = fxlocal.trace(model, SIZE_TIMED)
    running = gm.bn.running_mean.clone()
    rng = torch.get_rng_state()
    plan = fxlocal.partition(gm, 2, "time")
    sines = [n.name for n in gm.graph.nodes if n.target is torch.sin]
    assert plan.balance == "time" and 5 <= sines.index(plan.cuts[0]) <= 34, plan.cuts
    assert torch.equal(gm.bn.running_mean, running) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in gm.parameters())
    analysis = fxlocal.analyze(gm, SIZE_TIMED)
    assert not any(c.seconds for c in analysis.segment_costs)  # not timed unless asked
    with pytest.raises(PartitionError, match="timed=True"):
        fxlocal.partition(gm, 2, "time", analysis=analysis)


class _ManyThenFewSines(torch.nn.Module):
    """A scale (the parameter everything's gradient leads to), 30 sines, a cut, 10 sines."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        x = x * self.scale
        for _ in range(30):
            x = torch.sin(x)
        x = torch.relu(x)  # the cut candidates between the two runs of sines
        for _ in range(10):
            x = torch.sin(x)
        return x.mean((1, 2, 3))


def test_time_gives_each_segment_its_own_backward():
    """A timed analysis runs one real training step, forward then backward, and gives each
    segment the backward of its own nodes (a gradient hook marks where the backward crosses a
    cut): the 30 sines before the ReLU cost about three times the 10 after it, forward and
    backward alike. Charged to the segment the backward starts in (the last), the ratio would
    be below 1. The median of three measurements: a box busier than its cores can preempt one
    step long enough to blur it."""
    gm = fxlocal.trace(_ManyThenFewSines(), SIZE_TIMED)
    ratios = []
    for _ in range(3):
        analysis = fxlocal.analyze(gm, SIZE_TIMED, timed=True)
        relu = next(i for i, c in enumerate(analysis.candidates) if c.node == "relu")
        seconds = [c.seconds for c in analysis.segment_costs]
        ratios.append(sum(seconds[: relu + 1]) / sum(seconds[relu + 1 :]))
    assert 1.5 < statistics.median(ratios) < 6, ratios
    assert all(p.grad is None for p in gm.parameters())


def _recomputed_block_peak(regions, kept, recompute, peaks, segs):
    """By definition: while backward runs region r, the block holds what every region up to r
    keeps, r's recompute and r's largest transient."""
    worst, held = 0, 0
    for r in sorted({regions[s] for s in segs}):
        mine = [s for s in segs if regions[s] == r]
        held += sum(kept[s] for s in mine)
        worst = max(worst, held + sum(recompute[s] for s in mine) + max(peaks[s] for s in mine))
    return worst


@pytest.mark.parametrize("seed", range(30))
def test_dp_with_recomputed_regions_matches_brute_force(seed):
    """Blocks recomputed region by region (backbone_recompute): the DP grows each block's peak at
    one end, O(1) per segment; brute force prices every split from the definition. A block's
    head trains beside all that the block keeps (``head_peaks``, one row per block)."""
    from fxlocal.graph.partition import BackwardRegions

    rng = random.Random(300 + seed)
    n = rng.randint(2, 9)
    k = rng.randint(1, n)
    costs = [rng.randint(0, 10) for _ in range(n)]
    regions = list(itertools.accumulate(rng.choice([0, 1]) for _ in range(n)))
    kept, recompute, peaks = ([rng.randint(0, 40) for _ in range(n)] for _ in range(3))
    starts = [rng.randint(0, 20) for _ in range(n)]
    heads = [[rng.randint(0, 120) for _ in range(n - 1)] for _ in range(max(k - 1, 1))]
    backward = BackwardRegions(regions, kept, recompute, peaks)
    cuts = min_max_partition(costs, k, start_costs=starts, regions=backward, head_peaks=heads)

    def peak(j, segs):
        own = _recomputed_block_peak(regions, kept, recompute, peaks, segs)
        return own if segs[-1] == n - 1 else max(own, sum(kept[s] for s in segs) + heads[j][segs[-1]])

    def worst(cs):
        bounds = [-1, *cs, n - 1]
        blocks = [list(range(bounds[i] + 1, bounds[i + 1] + 1)) for i in range(len(bounds) - 1)]
        for j, segs in enumerate(blocks):
            head = heads[j][segs[-1]] if segs[-1] < n - 1 else 0
            assert backward.block_peak(segs, head) == peak(j, segs)
        return max(sum(costs[s] for s in segs) + starts[segs[0]] + peak(j, segs) for j, segs in enumerate(blocks))

    assert worst(cuts) == min(worst(list(c)) for c in itertools.combinations(range(n - 1), k - 1))


@pytest.mark.parametrize("seed", range(30))
def test_dp_with_a_cascade_matches_brute_force(seed):
    """A cascade (MLAAN): a block's step also re-runs the block before it once its own graph is
    freed, so a block's price depends on where that block starts (the DP's state holds it).
    Heads that backpropagate their block twice keep its graph through the first backward
    (``retained_heads``). Brute force prices every split from the definition."""
    from fxlocal.graph.partition import BackwardRegions, BlockPrices, CascadePrices

    rng = random.Random(600 + seed)
    n = rng.randint(2, 8)
    k = rng.randint(1, n)
    ints = lambda m, hi: [rng.randint(0, hi) for _ in range(m)]  # noqa: E731
    costs, starts = ints(n, 10), ints(n, 20)
    regions = list(itertools.accumulate(rng.choice([0, 1]) for _ in range(n)))
    kept, recompute, peaks = ints(n, 40), ints(n, 40), ints(n, 40)
    rows = max(k - 1, 1)
    cut_costs, heads, retained = ([ints(n - 1, 60) for _ in range(rows)] for _ in range(3))
    activations, held, inputs = ints(n, 30), ints(n, 10), ints(n, 30)
    head_held, rerun_costs = ([ints(n - 1, 30) for _ in range(rows)] for _ in range(2))
    prices = BlockPrices(
        costs, cut_costs, start_costs=starts, regions=BackwardRegions(regions, kept, recompute, peaks), head_peaks=heads,
        retained_heads=retained, cascade=CascadePrices(activations, held, inputs, head_held, rerun_costs),
    )

    def own(j, segs):
        b = segs[-1]
        if b == n - 1:
            return sum(costs[s] for s in segs) + starts[segs[0]] + _recomputed_block_peak(regions, kept, recompute, peaks, segs)
        # the first backward keeps the graph: every region's kept stays through it
        worst = max(sum(recompute[s] for s in segs if regions[s] == r) + max(peaks[s] for s in segs if regions[s] == r)
                    for r in {regions[s] for s in segs})
        peak = max(sum(kept[s] for s in segs) + worst + retained[j][b], sum(kept[s] for s in segs) + heads[j][b])
        return sum(costs[s] for s in segs) + starts[segs[0]] + cut_costs[j][b] + peak

    def price(j, before, segs):
        if not j:
            return own(j, segs)
        a, b = segs[0], segs[-1]
        rerun = (sum(activations[s] for s in before) + starts[before[0]]
                 + _recomputed_block_peak(regions, kept, recompute, peaks, before)
                 + 3 * inputs[a] + sum(held[s] for s in segs) + (rerun_costs[j][b] if b < n - 1 else 0))
        holding = sum(held[s] for s in before) + head_held[j - 1][before[-1]]
        return max(own(j, segs) + inputs[before[0]], rerun) + holding

    def worst(cs):
        bounds = [-1, *cs, n - 1]
        blocks = [list(range(bounds[i] + 1, bounds[i + 1] + 1)) for i in range(len(bounds) - 1)]
        by_definition = [price(j, blocks[j - 1] if j else None, segs) for j, segs in enumerate(blocks)]
        assert prices.block_prices(list(cs)) == by_definition
        return max(by_definition)

    cuts = prices.best_cuts(k)
    assert worst(cuts) == min(worst(list(c)) for c in itertools.combinations(range(n - 1), k - 1))


class _ScaledHead(torch.nn.Module):
    """Parameter-free ops after the last Linear (as CrossViT averages its heads' logits)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x)))) * 2 + 1


def test_the_last_block_always_has_something_to_train():
    """Cuts after the last parameterised segment would leave the model's loss no weight to
    train: they are never offered, so K tops out below the candidate count, and the largest K's
    last block holds the last Linear."""
    analysis = fxlocal.analyze(fxlocal.trace(_ScaledHead(), (8,)), (8,))
    params = [cost.params for cost in analysis.segment_costs]
    tail = len(params) - 1 - max(i for i, n in enumerate(params) if n)  # candidates after the last weights
    assert tail >= 1
    max_k = analysis.max_k - tail
    local = fxlocal.convert(_ScaledHead(), k=max_k, aux="dgl", input_size=(8,), num_classes=4, balance="flops")
    assert any(True for _ in local.blocks[-1].parameters()) and "b" in local.plan.blocks[-1].module_paths
    with pytest.raises(PartitionError, match=f"k can be 1 to {max_k}"):
        fxlocal.convert(_ScaledHead(), k=max_k + 1, aux="dgl", input_size=(8,), num_classes=4)


@pytest.mark.parametrize("seed", range(40))
def test_a_block_that_only_hands_a_carried_tensor_on_is_priced_with_the_cuts_own_head(seed):
    """Where a cut carries a second tensor computed before the block starts (EDSR's long skip),
    the block's head is the cut's own alone: the DP prices each block by where it starts, and its
    split is the best by brute force."""
    from fxlocal.graph.partition import BlockPrices, HandingOnPrices

    rng = random.Random(900 + seed)
    n = rng.randint(2, 8)
    k = rng.randint(1, n)
    costs = [rng.randint(0, 10) for _ in range(n)]
    both = [rng.randint(0, 60) for _ in range(n - 1)]
    own_only = [rng.randint(0, c) for c in both]
    from_segment = [rng.randint(1, n) for _ in range(n - 1)]  # a block starting there or later hands it on
    prices = BlockPrices(costs, [both], handing_on=HandingOnPrices([own_only], None, from_segment))

    def by_definition(cuts):
        bounds = [-1, *cuts, n - 1]
        blocks = [range(bounds[i] + 1, bounds[i + 1] + 1) for i in range(len(bounds) - 1)]
        return [sum(costs[s] for s in segs) + (0 if segs[-1] == n - 1 else
                                                (own_only if segs[0] >= from_segment[segs[-1]] else both)[segs[-1]])
                for segs in blocks]

    best = prices.best_cuts(k)
    assert prices.block_prices(best) == by_definition(best)
    assert max(by_definition(best)) == min(max(by_definition(list(c))) for c in itertools.combinations(range(n - 1), k - 1))


@pytest.mark.parametrize("reruns,k,expected", [(0, 2, [2, 5]), (1, 2, [1, 5]), (1, 3, [0, 1, 5]), (2, 3, [0, 1, 5]), (1, 4, [0, 1, 2, 5])])
def test_time_prices_count_the_reruns_of_a_cascade(reruns, k, expected):
    """Balanced for time, a block that later blocks' cascades re-run (MLAAN) costs its segments
    once more per re-run (at most once per later block): its stage spends that time."""
    from fxlocal.graph.partition import BlockPrices

    prices = BlockPrices([1.0] * 6, reruns=reruns)
    cuts = prices.best_cuts(k)
    assert [*cuts, 5] == expected
    sizes = [b - a for a, b in zip([-1, *cuts], [*cuts, 5])]
    assert prices.block_prices(cuts) == [size * (1 + min(reruns, k - 1 - j)) for j, size in enumerate(sizes)]


def test_time_prices_count_a_second_backward_of_every_block_but_the_last():
    """A head that backpropagates its block twice (MLAAN's two losses) costs that block its
    backward's share again, priced for time."""
    from fxlocal.graph.partition import BACKWARD_SHARE, BlockPrices

    prices = BlockPrices([1.0] * 6, reruns=1, repeated_backward=BACKWARD_SHARE)
    assert prices.block_prices([1]) == pytest.approx([2 * (2 + BACKWARD_SHARE), 4])
    assert prices.best_cuts(2) == [0]  # 1 segment: 2.67 beside 5; 2 segments: 5.33 beside 4


def test_time_prices_the_untimed_part_of_a_head_that_copies_timed_units():
    """A head made of copies of timed units (their segments' measured time) and a classifier
    (FLOPs only) is priced at both: the classifier's FLOPs at the model's measured seconds per
    FLOP, as a head with no timed part is."""
    from fxlocal.graph.cost import Cost
    from fxlocal.graph.partition import plan_from_cuts

    gm = fxlocal.trace(_CheapThenCounted(), SIZE_TIMED)
    analysis = fxlocal.analyze(gm, SIZE_TIMED, timed=True)
    copied = next(c for c in analysis.segment_costs if c.flops)  # the Linear's
    assert copied.seconds > 0 and copied.timed_flops == copied.flops
    classifier = Cost(flops=sum(c.flops for c in analysis.segment_costs))  # as many FLOPs as the model
    cut = len(analysis.candidates) // 2

    def block0(head: Cost) -> float:
        return plan_from_cuts(gm, analysis, [cut], "time", [head] * len(analysis.candidates)).blocks[0].cost

    assert block0(copied + classifier) - block0(classifier) == pytest.approx(copied.seconds, rel=1e-6)
    # the classifier's FLOPs are all the model's, so the window priced around the cut reaches the Linear
    assert block0(classifier) - block0(Cost()) > 0


class _SlowThenFast(torch.nn.Module):
    """Convolutions on a large map, each followed by sines (time that counts no FLOPs: a slow
    FLOP rate), then Linears on a vector (a fast one, and as many FLOPs)."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(16, 16, 1) for _ in range(4))
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(4))

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
            for _ in range(16):
                x = torch.sin(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return x


def test_time_prices_a_heads_flops_at_the_rate_around_its_cut():
    """A head works on its cut's maps: the same untimed FLOPs cost more at a cut among the slow
    convolutions than at one among the fast Linears, each at the rate measured around it (about
    4.6× on a quiet machine). The median of three measurements: a busy box can blur one."""
    from fxlocal.graph.cost import Cost
    from fxlocal.graph.partition import plan_from_cuts

    gm = fxlocal.trace(_SlowThenFast(), SIZE_TIMED)
    head = Cost(flops=1e6)
    ratios = []
    for _ in range(3):
        analysis = fxlocal.analyze(gm, SIZE_TIMED, timed=True)
        names = [c.node for c in analysis.candidates]

        def head_seconds(node: str) -> float:
            def block0(h: Cost) -> float:
                return plan_from_cuts(gm, analysis, [names.index(node)], "time", [h] * len(names)).blocks[0].cost
            return block0(head) - block0(Cost())

        slow, fast = head_seconds("sin_31"), head_seconds("relu_1")
        assert fast > 0
        ratios.append(slow / fast)
    assert statistics.median(ratios) > 2, ratios
