"""``LocalModel``: K gradient-isolated blocks, their aux heads, and the block-by-block step."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .plan import Plan

__all__ = ["LocalModel"]


class LocalModel(nn.Module):
    """A model cut into gradient-isolated blocks, each but the last trained by its own aux head.

    ``forward(x)`` computes exactly what the original model computes (the blocks hold the
    original parameters). ``train_step`` trains block by block: forward one block, its local
    loss, backward at once, hand the detached output on, so autograd only ever holds one
    block's graph.
    """

    def __init__(
        self,
        blocks: list[fx.GraphModule],
        heads: list[nn.Module],
        plan: Plan,
        config: dict | None = None,
    ):
        super().__init__()
        if len(heads) != len(blocks) - 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) - 1} heads, got {len(heads)}")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.plan = plan
        # The convert() arguments that rebuild this model (see fxlocal.checkpoint).
        self.config = dict(config or {})

    @property
    def k(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor):
        carried: tuple = (x,)
        for block in self.blocks[:-1]:
            carried = block(*carried)
        return self.blocks[-1](*carried)

    def block_parameters(self, b: int) -> Iterator[nn.Parameter]:
        """Parameters trained by block ``b``'s local loss: the block's and its head's."""
        yield from self.blocks[b].parameters()
        if b < len(self.heads):
            yield from self.heads[b].parameters()

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> list[float]:
        """One local-learning step; returns each block's loss (the last block's is the model's).

        Each block's loss is backpropagated before the next block runs, so only one block's
        activations are alive at a time; the optimizer is stepped once all blocks are done.
        """
        criterion = criterion or nn.functional.cross_entropy
        optimizer.zero_grad(set_to_none=True)
        losses = []
        carried: tuple = (x,)
        for b, block in enumerate(self.blocks):
            out = block(*carried)
            if b < len(self.heads):
                loss = criterion(self.heads[b](out[0]), y)
            else:
                loss = criterion(out, y)
            loss.backward()
            losses.append(loss.item())
            # The next block detaches its input itself; drop our reference to this block's graph.
            carried = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in out) if b < len(self.heads) else ()
            del out, loss
        optimizer.step()
        return losses

    def extra_repr(self) -> str:
        return f"k={self.k}, aux={self.plan.aux!r}, balance={self.plan.balance!r}"
