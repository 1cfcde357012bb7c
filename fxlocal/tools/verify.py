"""Checks that a conversion keeps its promises: gradient isolation and a faithful export.

Both work on real and on fake tensors (``FakeTensorMode``), so the zoo sweep can check models
too large to run here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..local_model import LocalModel

__all__ = ["isolation_violations", "export_mismatch"]


def _stacked(predictions) -> torch.Tensor:
    """Every tensor of a prediction (a tensor, or a detector's list of dicts) as one flat tensor."""
    leaves, _ = tree_flatten(predictions)
    return torch.cat([t.detach().float().flatten() for t in leaves]) if leaves else torch.zeros(0)


def isolation_violations(local: LocalModel, x: torch.Tensor, y: torch.Tensor, blocks=None) -> list[str]:
    """Where block ``j``'s local loss reaches other parameters than block ``j``'s, head ``j``'s
    and, for a cascade, the ``input_window - 1`` blocks before it, or misses one of those
    (empty: isolated). A tied parameter (:meth:`LocalModel.block_parameters`) counts as each
    holding block's own. ``blocks``: the losses to check (default all)."""
    names = {id(p): n for n, p in local.named_parameters()}
    problems = []
    window = local.input_window
    trainable = {id(p) for p in local.parameters() if p.requires_grad}
    # one forward for every loss, each backpropagated alone: the graphs are kept between them
    losses = local.local_losses(x, y)
    for j in blocks if blocks is not None else range(local.k):
        local.zero_grad(set_to_none=True)
        losses[j].backward(retain_graph=True)
        got = {id(p) for p in local.parameters() if p.grad is not None}
        objective = local.heads[j] if j < len(local.heads) else local.final_objective
        own = {id(p) for p in objective.parameters()} if objective is not None else set()
        own |= {id(p) for b in range(max(0, j - window + 1), j + 1) for p in local.blocks[b].parameters()}
        own &= trainable  # a frozen one (a replaced unit's stand-in original) gets no gradient
        for what, ids in (("reaches foreign", got - own), ("misses own", own - got)):
            if ids:
                problems.append(f"loss {j} {what} parameters: {', '.join(sorted(names[i] for i in ids)[:3])}")
    local.zero_grad(set_to_none=True)
    return problems


def export_mismatch(local: LocalModel, fresh: nn.Module, x: torch.Tensor | None = None) -> str | None:
    """Why ``fresh`` (a new instance of the original model) does not take the trained backbone
    back exactly: strict ``load_state_dict`` of :meth:`LocalModel.backbone_state_dict`, then,
    given ``x`` (real tensors), bit-identical eval outputs. ``None`` when it does."""
    try:
        fresh.load_state_dict(local.backbone_state_dict(), strict=True)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:300]
    if x is None:
        return None
    with torch.no_grad():
        if local.task is not None:  # the predictions: a detector's boxes, a segmenter's logits
            objective = local.final_objective
            want = _stacked(objective.predict(local.eval()(x)))
            got = _stacked(objective.original_predictions(fresh.eval(), x))
            if want.shape != got.shape:
                return f"eval predictions differ in shape: {tuple(want.shape)} against {tuple(got.shape)}"
        else:
            want, got = local.eval()(x), fresh.eval()(x)
    # bit-identical, NaN where NaN: an untrained net in eval mode (BatchNorm's running variance
    # still 1) can overflow, and then both compute the same NaNs (torchvision's mnasnet1_0)
    if not torch.allclose(want, got, rtol=0, atol=0, equal_nan=True):
        if not torch.equal(want.isnan(), got.isnan()):
            return "eval outputs differ: NaN in one where the other has a number"
        return f"eval outputs differ by up to {(want - got).nan_to_num().abs().max().item():.3g}"
    return None
