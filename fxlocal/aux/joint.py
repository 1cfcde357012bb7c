"""One head per tensor that crosses a cut, for cuts that carry a second tensor (two branches
side by side: CrossViT's token streams, NASNet's cell inputs). Their logits are averaged, as
CrossViT's own head averages its branches', so the local loss reaches every parameter of the
block, whichever branch it feeds. Heads that compute their block's loss themselves (InfoPro's)
each compute theirs on their tensor, and the block's loss is the mean."""

from __future__ import annotations

import torch
from torch import nn

from .base import AuxHead, head_loss
from .unit_copies import handed_on

__all__ = ["JointHead", "one_per_tensor"]


class JointHead(AuxHead):
    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        # the block's loss is the heads' own when any computes its own
        self.owns_loss = any(isinstance(h, AuxHead) and h.owns_loss for h in heads)
        self.needs_model_input = any(isinstance(h, AuxHead) and h.needs_model_input for h in heads)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads take {len(self.heads)} tensors, got {len(tensors)}")
        return torch.stack([head(t) for head, t in zip(self.heads, tensors)]).mean(0)

    def local_loss(self, ctx, b: int, out):
        parts = [head_loss(head, ctx, b, t) for head, t in zip(self.heads, handed_on(out))]
        return torch.stack([loss for loss, _ in parts]).mean(), torch.stack([logits for _, logits in parts]).mean(0)

    def after_backward(self) -> None:
        for head in self.heads:
            if isinstance(head, AuxHead):
                head.after_backward()

    def describe(self, describe_head) -> str:
        """What the heads are, each as ``describe_head`` says, and how their logits combine."""
        return " + ".join(describe_head(h) for h in self.heads) + ", logits averaged"


def one_per_tensor(heads: list[nn.Module]) -> nn.Module:
    """The head for a cut from one head per tensor crossing it: that head, or their JointHead."""
    return heads[0] if len(heads) == 1 else JointHead(heads)
