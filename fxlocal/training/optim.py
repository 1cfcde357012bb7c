"""Optimizers and schedules from timm, as a recipe asks: one over the model, or one per block
(each block's parameters and its head's, stepped right after its backward)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleOptionsError
from ..local_model import LocalModel
from .recipe import FUSED_OPTIMIZERS, OptimizerSection, Recipe
from .runtime import loss_scaled

FUSED_DEVICES = frozenset({"cpu", "cuda"})
# torch's SGD optimizers (timm's names): their fused kernel, when a loss scaler skips an
# overflowing step, still keeps the momentum buffers it allocated uninitialised on a first step
FUSED_SGD = frozenset({"sgd", "nesterov", "momentum"})
# what a group says about its kernel: torch's load_state_dict would restore the saved ones
KERNEL_KEYS = ("fused", "foreach")


def fused_update(section: OptimizerSection, params: list[nn.Parameter], loss_scaled: bool = False) -> bool:
    """Whether the optimizer over ``params`` uses torch's fused kernel.

    Args:
        section: the recipe's optimizer (``fused``: None for where torch has the kernel).
        params: the tensors it updates, already on their device.
        loss_scaled: whether fp16's loss scaler steps it. The default is then the unfused loop:
            with a fused SGD, a step the scaler skips still stores the momentum buffers its first
            step allocated, unwritten.

    Returns:
        True where ``fused`` asks for it, or leaves it open and the kernel serves the optimizer,
        every tensor's device and dtype, without a loss scaler.

    Raises:
        IncompatibleOptionsError: ``fused: true`` where torch's kernel does not serve a tensor,
            or for SGD under a loss scaler (``load_recipe`` refuses an optimizer without a fused
            kernel before the model is built).
    """
    served = section.name in FUSED_OPTIMIZERS and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    if section.fused and not served:
        raise IncompatibleOptionsError(
            f"optimizer.fused: true, but torch's fused {section.name} serves floating-point tensors on "
            f"{' or '.join(sorted(FUSED_DEVICES))} only and this model has others: set optimizer.fused to null or false"
        )
    if section.fused and loss_scaled and section.name in FUSED_SGD:
        raise IncompatibleOptionsError(
            f"optimizer.fused: true with fp16's loss scaler: torch's fused {section.name} keeps uninitialised momentum "
            "when the scaler skips a step; set optimizer.fused to null or false, or amp to bf16"
        )
    return served and not loss_scaled if section.fused is None else section.fused


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the kernel ``optimizer`` was built with.

    torch restores each group's saved ``fused`` and ``foreach``: a checkpoint written before
    ``optimizer.fused``, or under another setting, would switch the recipe's kernel back, and a
    fused optimizer turned unfused under a loss scaler fails its next step.

    Args:
        optimizer: built from the recipe (:func:`make_optimizer`).
        state: a state dict of an optimizer over the same parameters.
    """
    saved = state["param_groups"]
    if len(saved) == len(optimizer.param_groups):  # otherwise torch's own error says what differs
        saved = [{**old, **{key: new[key] for key in KERNEL_KEYS if key in new}} for old, new in zip(saved, optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": saved})


def make_optimizer(recipe: Recipe, module: nn.Module, only: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """timm's optimizer for ``module`` (no weight decay on biases and norms), over ``only`` of its
    parameters when given, with torch's fused kernel where :func:`fused_update` says so."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    o = recipe.optimizer

    def groups(m: nn.Module) -> list[dict]:
        if o.decay_norm_and_bias:
            return [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
        return param_groups_weight_decay(m, o.weight_decay)

    def only_those(m: nn.Module) -> list[dict]:
        keep = set(map(id, only)) if only is not None else {id(p) for p in m.parameters()}
        chosen = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups(m)]
        return [g for g in chosen if g["params"]]

    timm_groups = only is None and not o.decay_norm_and_bias  # timm's own grouping (it honours no_weight_decay())
    trained = [p for p in (only if only is not None else module.parameters()) if p.requires_grad]
    device = trained[0].device if trained else torch.device("cpu")
    fused = {"fused": True} if fused_update(o, trained, loss_scaled(recipe, device)) else {}
    return create_optimizer_v2(
        module, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
        param_group_fn=None if timm_groups else only_those, **fused,
    )


def block_stage(local: LocalModel, b: int) -> nn.ModuleList:
    """Block ``b`` and its head: what its local loss trains."""
    return nn.ModuleList([local.blocks[b], *([local.heads[b]] if b < len(local.heads) else [])])


def make_optimizers(recipe: Recipe, local: LocalModel) -> list[torch.optim.Optimizer]:
    """The optimizers a recipe trains ``local`` with.

    Args:
        recipe: its ``optimizer`` section (``per_block``: one optimizer per block).
        local: the converted model.

    Returns:
        One optimizer over the whole model, or one per block over :meth:`LocalModel.block_parameters`.
    """
    if not recipe.optimizer.per_block:
        return [make_optimizer(recipe, local)]
    # a tied parameter is stepped by one block's optimizer only (LocalModel.block_parameters)
    return [make_optimizer(recipe, block_stage(local, b), list(local.block_parameters(b))) for b in range(local.k)]


def make_schedulers(recipe: Recipe, optimizers: list[torch.optim.Optimizer]) -> list[Any]:
    """timm's scheduler of the recipe for each optimizer (stepped per epoch)."""
    from timm.scheduler import create_scheduler_v2

    s = recipe.scheduler
    if s.name == "none":
        return []
    return [
        create_scheduler_v2(
            opt,
            sched=s.name,
            num_epochs=recipe.epochs,
            decay_epochs=s.decay_epochs,
            decay_milestones=s.decay_milestones,
            decay_rate=s.decay_rate,
            min_lr=s.min_lr,
            warmup_lr=s.warmup_lr,
            warmup_epochs=s.warmup_epochs,
        )[0]
        for opt in optimizers
    ]
