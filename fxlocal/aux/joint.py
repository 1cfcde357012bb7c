"""One head per tensor that crosses a cut, for cuts that carry a second tensor (two branches
side by side: CrossViT's token streams, NASNet's cell inputs). Their logits are averaged, as
CrossViT's own head averages its branches', so the local loss reaches every parameter of the
block, whichever branch it feeds. Heads that compute their block's loss themselves (InfoPro's)
each compute theirs on their tensor, and the block's loss is the mean. A tensor the block only
hands on (EDSR's long skip, after the block that computes it) gets no head: it would train
nothing of the block."""

from __future__ import annotations

import torch
from torch import nn

from .base import AuxHead, head_loss
from .unit_copies import handed_on

__all__ = ["JointHead", "one_per_tensor"]


class JointHead(AuxHead):
    """``heads[i]`` on tensor ``takes[i]`` of those crossing the cut (default: one per tensor)."""

    def __init__(self, heads: list[nn.Module], takes: tuple[int, ...] | None = None):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.takes = tuple(range(len(heads))) if takes is None else tuple(takes)
        if len(self.takes) != len(heads):
            raise ValueError(f"{len(heads)} heads but {len(self.takes)} tensor positions for them")
        # the block's loss is the heads' own when any computes its own
        self.owns_loss = any(isinstance(h, AuxHead) and h.owns_loss for h in heads)
        self.needs_model_input = any(isinstance(h, AuxHead) and h.needs_model_input for h in heads)

    def _taken(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(tensors) <= max(self.takes):
            raise ValueError(f"the heads take tensors {list(self.takes)} of those crossing the cut, got {len(tensors)}")
        return [tensors[i] for i in self.takes]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(t) for head, t in zip(self.heads, self._taken(tensors))]).mean(0)

    def local_loss(self, ctx, b: int, out):
        parts = [head_loss(head, ctx, b, t) for head, t in zip(self.heads, self._taken(handed_on(out)))]
        return torch.stack([loss for loss, _ in parts]).mean(), torch.stack([logits for _, logits in parts]).mean(0)

    def after_backward(self) -> None:
        for head in self.heads:
            if isinstance(head, AuxHead):
                head.after_backward()

    def describe(self, describe_head) -> str:
        """What the heads are, each as ``describe_head`` says, and how their logits combine."""
        if len(self.heads) == 1:
            return f"{describe_head(self.heads[0])} (on the cut's tensor; the one carried beside it is handed on unchanged)"
        return " + ".join(describe_head(h) for h in self.heads) + ", logits averaged"


def one_per_tensor(heads: list[nn.Module], takes: tuple[int, ...] | None = None, crossing: int | None = None) -> nn.Module:
    """The head for a cut from one head per tensor crossing it.

    Args:
        heads: the heads, in the order of the tensors they take.
        takes: which of the tensors crossing the cut each head takes (default: one each, in order).
        crossing: how many tensors cross the cut (default: as many as heads).

    Returns:
        The one head where one tensor crosses, else their :class:`JointHead`.
    """
    crossing = len(heads) if crossing is None else crossing
    return heads[0] if crossing == 1 else JointHead(heads, takes)
