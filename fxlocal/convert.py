"""``convert``: model (or name) -> trace -> analyze -> partition -> split -> aux heads -> LocalModel."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .analyze import analyze
from .aux import HeadSpec, get_aux
from .cost import BALANCE_METRICS, Cost, measure_module
from .errors import FxLocalError, PartitionError, PlanMismatchError
from .local_model import LocalModel
from .models import create_model
from .partition import partition, plan_from_cuts
from .plan import Plan
from .split import split_graph
from .trace import trace

__all__ = ["convert"]


def _num_classes(gm, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    val = getattr(out, "meta", {}).get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2:
        return int(val.shape[-1])
    raise FxLocalError("cannot tell the number of classes from the model's output; pass num_classes")


def convert(
    model_or_name: nn.Module | str,
    k: int = 4,
    aux: str = "dgl",
    input_size: tuple[int, ...] = (3, 224, 224),
    balance: str = "flops",
    num_classes: int | None = None,
    plan: Plan | None = None,
    aux_options: dict | None = None,
) -> LocalModel:
    """Convert a timm/torchvision model (or its name) into a :class:`LocalModel` of ``k`` blocks.

    Names go through ``timm.create_model`` then ``torchvision.models.get_model`` (random init).
    ``plan`` re-applies a saved :class:`Plan` instead of partitioning.
    """
    input_size = tuple(int(s) for s in input_size)
    if balance not in BALANCE_METRICS:
        raise PartitionError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_METRICS)}")
    method = get_aux(aux, **(aux_options or {}))
    if aux == "none" and k != 1:
        raise PartitionError("aux='none' is plain end-to-end training: use it with k=1")
    if k < 1:
        raise PartitionError(f"k must be at least 1, got {k}")
    if isinstance(model_or_name, str):
        model_name = model_or_name
        model = create_model(model_or_name, num_classes, input_size)
    else:
        model_name, model = type(model_or_name).__name__, model_or_name
    gm = trace(model, input_size)
    classes = _num_classes(gm, num_classes)
    analysis = analyze(gm, input_size)

    @lru_cache(maxsize=None)
    def head_cost_for(shape: tuple[int, ...], layout: str) -> Cost:
        with torch.device("meta"):
            head = method.build_head(HeadSpec(shape, layout, classes, 0))
        return measure_module(head, shape)

    def head_cost(i: int) -> Cost:
        c = analysis.candidates[i]
        return head_cost_for(c.shape, c.layout) if aux != "none" else Cost()

    if plan is None:
        plan = partition(gm, k, balance, analysis=analysis, head_cost=head_cost, model_name=model_name, aux=aux)
    else:
        index = {c.node: i for i, c in enumerate(analysis.candidates)}
        missing = [c for c in plan.cuts if c not in index]
        if missing:
            raise PlanMismatchError(
                f"the plan cuts after {missing[0]!r}, which is not a cut candidate of {model_name} "
                f"at input size {input_size}; re-run the partition"
            )
        cut_idx = [index[c] for c in plan.cuts]
        heads_cost = [head_cost(i) if i in cut_idx else Cost() for i in range(len(analysis.candidates))]
        plan = plan_from_cuts(gm, analysis, cut_idx, plan.balance, heads_cost, model_name=model_name, aux=aux)
    blocks = split_graph(gm, plan.cuts)
    by_node = {c.node: c for c in analysis.candidates}
    heads = []
    for b, block_plan in enumerate(plan.blocks[:-1]):
        cut = by_node[block_plan.cut_node]
        head = method.build_head(HeadSpec(cut.shape, cut.layout, classes, b))
        block_plan.head = method.describe(head)
        heads.append(head)
    config = dict(
        model=model_name if isinstance(model_or_name, str) else None,
        k=plan.k,
        aux=aux,
        input_size=list(input_size),
        balance=plan.balance,
        num_classes=num_classes,
        aux_options=dict(aux_options or {}),
    )
    local = LocalModel(blocks, heads, plan, config)
    local.trace_report = gm.meta["fxlocal_trace"]
    local.train(model.training)
    return local
