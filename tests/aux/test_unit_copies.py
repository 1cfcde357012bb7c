"""Unit copies that take plain values from before them, and cut candidates whose dim 0 is not the
batch: the two mechanisms behind the CoaT and EfficientViM/CrossViT failures of the zoo sweep."""

import pytest
import torch
from torch import nn

import fxlocal
from fxlocal.errors import FxLocalError
from fxlocal.tools.verify import isolation_violations

SIZE = (3, 16, 16)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x, rows):
        y = self.act(self.bn(self.conv(x)))
        return y.reshape(rows, -1).reshape(y.shape)


class RowsFromTop(nn.Module):
    """CoaT's pattern: a value read from the input's shape once, at the top, used by every block
    (CoaT's is the batch size: ``rows_per_sample=1``)."""

    def __init__(self, rows_per_sample: int = 1):
        super().__init__()
        self.rows_per_sample = rows_per_sample
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8, 16, 2), Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        rows = x.shape[0] * self.rows_per_sample
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, rows)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man"])
def test_copied_units_read_the_batch_size_from_their_input(aux):
    torch.manual_seed(0)
    local = fxlocal.convert(RowsFromTop(), k=3, aux=aux, input_size=SIZE)
    # traced with a batch of 2: a copy given the traced value would fail on 3
    x, y = torch.randn(3, *SIZE), torch.randint(0, 10, (3,))
    losses = local.train_step(x, y, torch.optim.SGD(local.parameters(), lr=0.01))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert isolation_violations(local, x, y) == []


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man"])
def test_a_unit_that_needs_another_value_from_before_is_refused_at_convert(aux):
    with pytest.raises(FxLocalError, match="cannot be copied alone; use aux='dgl'"):
        fxlocal.convert(RowsFromTop(rows_per_sample=4), k=3, aux=aux, input_size=SIZE)
    # DGL copies nothing: the blocks compute the value from the real input
    local = fxlocal.convert(RowsFromTop(rows_per_sample=4), k=3, aux="dgl", input_size=SIZE)
    local.train_step(torch.randn(3, *SIZE), torch.randint(0, 10, (3,)), torch.optim.SGD(local.parameters(), lr=0.01))


class StackedHeads(nn.Module):
    """CrossViT's and EfficientViM's ending: per-branch logits stacked batch-second, averaged."""

    def __init__(self, heads: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(8, 10) for _ in range(heads))

    def forward(self, x):
        x = self.body(self.stem(x)).mean((2, 3))
        return torch.stack([h(x) for h in self.heads]).mean(0)


@pytest.mark.parametrize("heads", [2, 4])
def test_a_tensor_without_the_batch_first_is_no_cut_candidate(heads):
    # with 2 heads the stack is (2, 2, 10) at the traced batch of 2: only another batch tells
    gm = fxlocal.trace(StackedHeads(heads), SIZE)
    names = [c.node for c in fxlocal.find_cut_candidates(gm)]
    assert "stack" not in names and "body_2" in names
