"""Aux heads of unit copies recomputed in backward (``recompute=True``): same training, less kept."""

import copy

import pytest
import torch

import fxlocal
from fxlocal.aux.ema import ParallelSum
from fxlocal.aux.unit_copies import UnitChain
from helpers import assert_trains_alike, saved_activation_bytes

CIFAR = (3, 32, 32)


def _recomputing(local):
    """A copy of ``local`` whose heads recompute, same weights and state."""
    twin = copy.deepcopy(local)
    flipped = [m for m in twin.modules() if isinstance(m, (UnitChain, ParallelSum))]
    assert flipped
    for m in flipped:
        m.recompute = True
    return twin


def _assert_trains_as_stored(stored, size, classes):
    """Stored vs recomputed heads: the same training (running statistics are updated once, not
    again by the recompute)."""
    assert_trains_alike(stored, _recomputing(stored), size, classes, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man"])
def test_recomputed_heads_train_exactly_as_stored_ones(aux):
    torch.manual_seed(0)
    _assert_trains_as_stored(fxlocal.convert("resnet32_cifar", k=4, aux=aux, input_size=CIFAR), CIFAR, 10)


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man"])
def test_recomputed_copies_take_a_carried_second_branch(aux):
    """Copies of units that hand two tensors on (TwoBranches' blocks), recomputed; priced for
    balance="memory" with both tensors as the copies' inputs."""
    from nets import TwoBranches

    torch.manual_seed(0)
    size = (12, 4, 4)
    kwargs = dict(k=3, aux=aux, input_size=size, num_classes=5, balance="memory")
    local = fxlocal.convert(TwoBranches(), recompute=True, **kwargs)
    assert all("recomputed" in b.head for b in local.plan.blocks[:-1])
    _assert_trains_as_stored(fxlocal.convert(TwoBranches(), **kwargs), size, 5)


# (aux, hidden unit): MLAAN's chain from 32² maps; AugLocal's copies from unit 0 and 5 need
# adapters between them (each its own recomputed stage, whose output is kept too)
@pytest.mark.parametrize("aux,unit", [("mlaan", 2), ("auglocal", 0), ("auglocal", 5)])
def test_a_recomputed_chain_keeps_only_its_stages_inputs_and_is_priced_so(aux, unit):
    from fxlocal.aux import HeadSpec, UnitLibrary, get_aux
    from fxlocal.graph.analyze import analyze
    from fxlocal.graph.trace import trace

    gm = trace(fxlocal.create_model("resnet32_cifar", 10, CIFAR), CIFAR)
    analysis = analyze(gm, CIFAR)
    library = UnitLibrary.from_analysis(gm, analysis)
    cut = analysis.candidates[analysis.units[unit].cut_position]
    spec = HeadSpec(cut.shape, cut.layout, 10, 0, 4, unit, library)
    batch = 8
    x = torch.randn(batch, *cut.shape, requires_grad=True)
    kept, priced = {}, {}
    for recompute in (False, True):
        method = get_aux(aux, recompute=recompute)
        head = method.build_head(spec).train()
        # MLAAN's head's forward is its cascade path: the chain and the head it ends in
        kept[recompute] = saved_activation_bytes(head, x) / batch
        # MLAAN's independent head is not part of the chain (it holds its activations before)
        priced[recompute] = (method.chain_cost if aux == "mlaan" else method.head_cost)(spec).activation_bytes
    # priced: what the recomputed chain keeps (its stages' inputs), measured, plus the largest
    # copy's activations, alive while that copy is recomputed
    picks = get_aux(aux).chain(spec) if aux == "mlaan" else get_aux(aux).picks(spec)
    regions = [library.unit_costs[u] for u in picks] + ([library.tail_cost] if aux == "auglocal" else [])
    largest = max(r.activation_bytes for r in regions)
    assert priced[True] == pytest.approx(kept[True] + largest, rel=0.05)
    assert kept[True] < kept[False] / 2 and priced[True] < priced[False]


@pytest.mark.parametrize("aux", ["auglocal", "man"])
def test_recompute_lowers_the_peak_of_a_block_its_head_binds(aux):
    """Block 0 cut right after the stem: its part of the step is mostly its head's copies of
    32×32 units, which recomputing keeps only the inputs of."""
    from fxlocal.memory import block_step_peaks

    plan = fxlocal.convert("resnet32_cifar", k=4, aux=aux, input_size=CIFAR).plan
    plan.blocks[0].cut_node = "act1"
    stored = fxlocal.convert("resnet32_cifar", aux=aux, input_size=CIFAR, plan=plan)
    peaks = [block_step_peaks(m, 64, CIFAR, 10) for m in (stored, _recomputing(stored))]
    assert peaks[1][0] < 0.85 * peaks[0][0]
    assert max(peaks[1]) <= max(peaks[0])


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man"])
def test_a_recompute_option_that_is_not_a_flag_is_refused(aux):
    from fxlocal.aux import get_aux
    from fxlocal.errors import IncompatibleOptionsError

    with pytest.raises(IncompatibleOptionsError, match="recompute must be true or false, got 'yes'"):
        get_aux(aux, recompute="yes")
