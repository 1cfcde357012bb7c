"""The LocalModel a recipe describes (random init, seeded; with ``convert.max_memory`` the
smallest K that fits), the one a training checkpoint holds, and the one every rank agrees on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..aux import get_aux
from ..convert import convert
from ..errors import TaskError
from ..graph.plan import Plan
from ..local_model import LocalModel
from .checkpoint import load_weights
from .data import dataset_info, normalisation
from .recipe import Recipe
from .runtime import Distributed


def build_model(recipe: Recipe, plan: Plan | None = None) -> LocalModel:
    """The converted model a recipe describes (random init, seeded).

    Args:
        recipe: the recipe; with ``convert.max_memory`` set, K is the smallest whose predicted step
            peak fits it at the recipe's batch size and optimizer (``convert.k`` is then ignored).
        plan: cut by this plan instead (a checkpoint's, or another rank's: ``balance="time"``
            measures, and two measurements differ); default: the recipe's ``convert.plan`` file, if any.

    Returns:
        The :class:`~fxlocal.LocalModel`.
    """
    from ..convert import AnalyzedModel, analyze_model
    from ..graph.cost import MemoryModel
    from ..memory import fit_to_memory, parse_bytes

    info = dataset_info(recipe.data.dataset)
    size = tuple(recipe.data.input_size)
    if plan is None and recipe.convert.plan is not None:
        plan = Plan.load(recipe.convert.plan)
    states = 2 if recipe.optimizer.name.startswith(("adam", "lamb")) else 1
    per_block = recipe.optimizer.per_block
    priced = MemoryModel(
        batch=recipe.batch_size, optimizer_states=states, per_block=per_block, pipeline=recipe.pipeline.enabled
    )
    classes = recipe.model.num_classes or info.num_classes or None
    task = recipe_task(recipe)
    aux_options = dict(recipe.convert.aux_options)
    if get_aux(recipe.convert.aux, **aux_options).reconstructs_input:
        # the heads undo the data's normalisation to reconstruct the images (InfoPro's target)
        mean, std = normalisation(info, size[0])
        aux_options.setdefault("input_mean", list(mean))
        aux_options.setdefault("input_std", list(std))

    replace = recipe.convert.replace.model_dump() if recipe.convert.replace is not None else None

    def build(k: int, model: AnalyzedModel | None = None) -> LocalModel:
        torch.manual_seed(recipe.seed)
        return with_bn_momentum(convert(
            model if model is not None else recipe.model.name,
            k=k,
            plan=plan,
            aux=recipe.convert.aux,
            input_size=size,
            balance=recipe.convert.balance,
            num_classes=classes,
            model_kwargs=recipe.model.kwargs,
            memory=priced,
            backbone_recompute=recipe.convert.backbone_recompute,
            cuts=recipe.convert.cuts if plan is None else None,
            replace=replace,
            task=task,
            **aux_options,
        ), recipe.model.bn_momentum)

    if plan is not None:
        return build(plan.k)
    if recipe.convert.max_memory is None:
        return build(recipe.convert.k)
    parse_bytes(recipe.convert.max_memory)  # a malformed size is refused before the model is traced
    torch.manual_seed(recipe.seed)
    # traced and analysed once for every K the search tries; the chosen K is then built afresh
    # (seeded), as a recipe that names that K would build it
    analyzed = analyze_model(recipe.model.name, size, classes, recipe.model.kwargs, timed=recipe.convert.balance == "time",
                             replace=replace, task=task)
    optimizer = "adamw" if states == 2 else "sgd"
    k, _, _ = fit_to_memory(analyzed, recipe.convert.aux, recipe.convert.max_memory, lambda k: build(k, analyzed),
                            recipe.batch_size, optimizer, per_block=per_block)
    return build(k)


def with_bn_momentum(local: LocalModel, momentum: float | None) -> LocalModel:
    """``local`` with every BatchNorm's momentum set to ``momentum`` (``model.bn_momentum``);
    as it is when None."""
    if momentum is not None:
        for module in local.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)):
                module.momentum = momentum
    return local


def recipe_task(recipe: Recipe) -> str:
    """The task a recipe trains for: ``model.task``, which must be its dataset's, else the dataset's.

    Raises:
        TaskError: ``model.task`` differs from what the dataset's targets are.
    """
    own = dataset_info(recipe.data.dataset).task
    if recipe.model.task is not None and recipe.model.task != own:
        raise TaskError(
            f"model.task is {recipe.model.task} but {recipe.data.dataset}'s targets are for {own}: "
            f"set model.task to {own}, or use a {recipe.model.task} dataset"
        )
    return own


def model_from_checkpoint(state: dict) -> LocalModel:
    """The trained LocalModel of a loaded training checkpoint.

    Args:
        state: what :func:`~fxlocal.training.checkpoint.load_training_checkpoint` returned.

    Returns:
        The model, rebuilt from the checkpoint's recipe and plan, with its weights.
    """
    from .recipe import load_recipe

    local = build_model(load_recipe(data=state["recipe"]), Plan.from_dict(state["plan"]))
    load_weights(local, state["model"], "the checkpoint")
    return local


def build_agreed_model(recipe: Recipe, dist_: Distributed, checkpoint: dict | None = None) -> LocalModel:
    """:func:`build_model` on every rank, cut where rank 0 cuts (or where the checkpoint did)."""
    if checkpoint is not None:
        return build_model(recipe, Plan.from_dict(checkpoint["plan"]))
    if not dist_.enabled:
        return build_model(recipe)
    local = build_model(recipe) if dist_.main else None
    shared = [local.plan.to_dict() if local is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return local if local is not None else build_model(recipe, Plan.from_dict(shared[0]))
