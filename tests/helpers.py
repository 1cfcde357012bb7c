"""Shared test helpers."""

import torch
from torch import nn


def local_losses(local, x, y):
    """Each block's local loss, computed the way LocalModel.train_step computes them."""
    losses, carried = [], (x,)
    for b, block in enumerate(local.blocks):
        out = block(*carried)
        logits = local.heads[b](out[0]) if b < len(local.heads) else out
        losses.append(nn.functional.cross_entropy(logits, y))
        carried = out if b < len(local.heads) else ()
    return losses


def assert_gradient_isolation(local, x, y, blocks=None):
    """Block j's loss reaches exactly block j's and its head's parameters, and some of them."""
    for j in blocks if blocks is not None else range(local.k):
        local.zero_grad(set_to_none=True)
        local_losses(local, x, y)[j].backward()
        got = {id(p) for p in local.parameters() if p.grad is not None}
        own = {id(p) for p in local.block_parameters(j)}
        assert got == own, f"loss {j}: {len(got - own)} foreign, {len(own - got)} missing gradients"
        assert any(p.grad.abs().sum() > 0 for p in local.block_parameters(j))
    local.zero_grad(set_to_none=True)


def assert_trains(local, size, num_classes=10, batch=4):
    """One train step gives finite per-block losses and moves every block's parameters."""
    before = [[p.detach().clone() for p in local.block_parameters(b)] for b in range(local.k)]
    opt = torch.optim.SGD(local.parameters(), lr=0.01)
    losses = local.train_step(torch.randn(batch, *size), torch.randint(0, num_classes, (batch,)), opt)
    assert len(losses) == local.k and all(torch.isfinite(torch.tensor(losses)))
    for b in range(local.k):
        after = list(local.block_parameters(b))
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(before[b], after)), f"block {b} did not train"
    return losses
