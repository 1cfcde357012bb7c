"""convert's contract beyond the LocalModel: the plan it returns is priced with each block's real
head, once, and what it refuses."""

import pytest
from torch import nn

import fxlocal
from fxlocal.errors import KOutOfRangeError
from helpers import convert_named

SIZE = (3, 32, 32)


@pytest.mark.parametrize("aux,options,balance", [
    ("dgl", {}, "flops"),
    ("dgl", {}, "memory"),
    ("auglocal", {}, "flops"),  # pyramidal: each block's head is priced as its own
    ("man", {}, "flops"),
    ("mlaan", {"blocks_without_own_loss": 1, "span": 2}, "flops"),  # block 0's head has no loss
])
def test_the_plan_is_priced_with_the_heads_that_train_its_blocks(aux, options, balance):
    """Re-applying a plan prices its cuts with each block's real head; the plan convert returned
    must already be that one (it is computed once, by the partition)."""
    local = convert_named("resnet32_cifar", SIZE, k=4, aux=aux, balance=balance, **options)
    again = convert_named("resnet32_cifar", SIZE, k=4, aux=aux, balance=balance, plan=local.plan, **options)
    figures = lambda plan: [(b.cut_node, b.params, b.gflops, b.activation_mib, b.cost) for b in plan.blocks]  # noqa: E731
    assert figures(local.plan) == figures(again.plan)
    assert [b.head for b in local.plan.blocks] == [b.head for b in again.plan.blocks]


def test_a_saved_plan_sets_k():
    local = convert_named("resnet32_cifar", SIZE, k=6, aux="auglocal")
    again = convert_named("resnet32_cifar", SIZE, k=4, aux="auglocal", plan=local.plan)
    assert again.k == 6 and [b.head for b in again.plan.blocks] == [b.head for b in local.plan.blocks]


def test_a_model_of_one_unit_cannot_be_cut_by_a_method_that_copies_units():
    one_unit = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(KOutOfRangeError, match=r"aux='auglocal' cuts only between units and Sequential has 1 unit, "
                                               r"so k can be 1 to 1; aux='dgl' can cut at its \d+ cut candidates"):
        fxlocal.convert(one_unit, k=2, aux="auglocal", input_size=(3, 8, 8))
    assert fxlocal.convert(one_unit, k=2, aux="dgl", input_size=(3, 8, 8)).k == 2
