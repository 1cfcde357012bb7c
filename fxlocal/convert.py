"""``convert``: model (or name) -> trace -> analyze -> partition -> split -> aux heads -> LocalModel.

The first two steps (:func:`analyze_model`) depend on the model and input size alone: what
converts one model several times (another K, aux method or balance: ``--max-memory``'s K
search, the zoo check) does them once and passes the :class:`AnalyzedModel` to ``convert``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import fx, nn

from .analyze import GraphAnalysis, analyze
from .aux import HeadSpec, UnitLibrary, get_aux
from .aux.joint import JointHead, one_per_tensor
from .backbone import map_backbone
from .cost import BALANCE_METRICS, Cost, MemoryModel, measure_module, model_device
from .errors import (
    FxLocalError,
    IncompatibleOptionsError,
    InputSizeError,
    KOutOfRangeError,
    NotAClassifierError,
    PartitionError,
    PlanMismatchError,
)
from .local_model import LocalModel
from .models import create_model, native_input_sizes
from .partition import partition, plan_from_cuts
from .plan import BlockPlan, Plan
from .recompute import checked_policy
from .split import split_graph
from .trace import trace

__all__ = ["AnalyzedModel", "analyze_model", "convert"]


@dataclass
class AnalyzedModel:
    """A model traced and analysed once, to be converted several times. ``convert`` works on a
    copy of the model and graph: the LocalModels made from one AnalyzedModel share no weights
    (all start from the same ones)."""

    model: nn.Module
    gm: fx.GraphModule  # traced from ``model``: shares its modules
    analysis: GraphAnalysis
    input_size: tuple[int, ...]
    model_name: str
    from_name: bool  # built from its name: the config records it, checkpoints rebuild from it
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)

    def copy(self) -> "AnalyzedModel":
        # one deepcopy, so the graph's modules stay the copied model's; the analysis is plain data
        model, gm = copy.deepcopy((self.model, self.gm))
        return replace(self, model=model, gm=gm)

    @property
    def timed(self) -> bool:
        return any(c.seconds for c in self.analysis.segment_costs)


def analyze_model(
    model_or_name: nn.Module | str,
    input_size: tuple[int, ...] = (3, 224, 224),
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
    timed: bool = False,
    name: str | None = None,
) -> AnalyzedModel:
    """Build (from a name: timm, then torchvision, random init), trace and analyse a model:
    its cut candidates, units and per-segment costs (``timed``: also wall time, measured here).
    ``name`` names a module in messages and plans (default: the name it was built from, or its class)."""
    input_size = tuple(int(s) for s in input_size)
    try:
        if isinstance(model_or_name, str):
            model_name = name or model_or_name
            model = create_model(model_or_name, num_classes, input_size, **(model_kwargs or {}))
        else:
            model_name, model = name or type(model_or_name).__name__, model_or_name
        gm = trace(model, input_size)
    except InputSizeError as exc:
        # fixed-resolution models timm does not flag (EfficientFormer) and patch sizes that do
        # not divide the input: name the sizes the model is made for
        sizes = native_input_sizes(model_or_name) if isinstance(model_or_name, str) else []
        if not sizes:
            raise
        made_for = " or ".join(" ".join(map(str, s)) for s in sizes)
        raise InputSizeError(f"{exc} (it is made for --input-size {made_for})") from exc
    _num_classes(gm, num_classes, model_name)  # refuse a feature encoder before analysing it
    return AnalyzedModel(
        model, gm, analyze(gm, input_size, timed=timed), input_size, model_name,
        from_name=isinstance(model_or_name, str), num_classes=num_classes, model_kwargs=dict(model_kwargs or {}),
    )


def _reuse(analyzed: AnalyzedModel, input_size, num_classes, model_kwargs, timed: bool) -> AnalyzedModel:
    """A private copy of ``analyzed`` for one conversion; the arguments given must agree with it."""
    given = {"input_size": input_size and tuple(int(s) for s in input_size), "num_classes": num_classes,
             "model_kwargs": model_kwargs}
    for name, value in given.items():
        if value is not None and value != getattr(analyzed, name):
            raise IncompatibleOptionsError(
                f"{name}={value!r} differs from the analysed model's {getattr(analyzed, name)!r}: "
                f"analyse it again with {name}={value!r}, or leave {name} out"
            )
    own = analyzed.copy()
    if timed and not own.timed:
        own.analysis = analyze(own.gm, own.input_size, timed=True)
    return own


def _num_classes(gm, num_classes: int | None, model_name: str) -> int:
    """The classes the model's own output scores: the local losses and the last block's are
    cross-entropies over them. A model whose output is one tensor but not (batch, classes)
    logits (a feature encoder: timm's ``*_enc`` models) is refused; tuples (a distilled or
    aux-logit model's training output) are left to the objective."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    val = getattr(out, "meta", {}).get("val")
    if isinstance(val, torch.Tensor):
        per_image = ", ".join(map(str, val.shape[1:]))
        if val.dim() != 2:
            raise NotAClassifierError(
                f"{model_name} outputs (batch, {per_image}) features, not (batch, classes) logits: it has no "
                "classification head; fxlocal trains classifiers, so use a variant of it with a head"
            )
        if num_classes is not None and val.shape[-1] != num_classes:
            raise NotAClassifierError(
                f"{model_name} outputs {val.shape[-1]} values per image, not the {num_classes} classes asked for: "
                "its head ignores num_classes (or it has none); use a variant of it with a classification head"
            )
        return int(val.shape[-1])
    if num_classes is not None:
        return num_classes
    raise FxLocalError("cannot tell the number of classes from the model's output; pass num_classes")


def _unit_library(gm, analysis: GraphAnalysis) -> UnitLibrary:
    """The graph's units with what each costs (the segments between its cuts)."""
    bounds = [-1] + [u.cut_position for u in analysis.units]
    costs = [
        sum((analysis.segment_costs[s] for s in range(bounds[i] + 1, bounds[i + 1] + 1)), Cost())
        for i in range(len(analysis.units))
    ]
    tail = sum((analysis.segment_costs[s] for s in range(bounds[-1] + 1, len(analysis.segment_costs))), Cost())
    return UnitLibrary(gm, analysis.units, costs, tail)


def _plan_at_modules(cuts: list[str], k: int, plan: Plan | None, analysis, model_name: str, aux: str, balance: str,
                     input_size) -> Plan:
    """A plan whose blocks end where the modules ``cuts`` end (convert checks the rest)."""
    if plan is not None:
        raise PlanMismatchError("give convert either cuts or a plan, not both")
    if len(cuts) + 1 != k:
        raise PartitionError(f"{len(cuts)} cuts make {len(cuts) + 1} blocks, but k={k}: set k to {len(cuts) + 1}")
    # a module a cut candidate closes, or a unit's last module (a Sequential's last unit ends
    # where the Sequential does: its candidate closes the Sequential)
    by_module = {c.closes: c.node for c in analysis.candidates if c.closes}
    by_module.update({u.modules[-1]: u.cut for u in analysis.units if u.modules})
    unknown = [m for m in cuts if m not in by_module]
    if unknown:
        raise PlanMismatchError(
            f"cuts names {unknown[0]!r}, which is not a module a block can end at in {model_name}; "
            "`fxlocal inspect` lists the cut points"
        )
    blocks = [BlockPlan(index=i, module_paths=[], params=0, gflops=0.0, activation_mib=0.0, cut_node=by_module[m])
              for i, m in enumerate(cuts)]
    blocks.append(BlockPlan(index=len(cuts), module_paths=[], params=0, gflops=0.0, activation_mib=0.0))
    return Plan(model_name, list(input_size), k, balance, aux, len(analysis.candidates), blocks)


def convert(
    model_or_name: nn.Module | str | AnalyzedModel,
    k: int = 4,
    aux: str = "dgl",
    input_size: tuple[int, ...] | None = None,
    balance: str = "flops",
    num_classes: int | None = None,
    plan: Plan | None = None,
    model_kwargs: dict | None = None,
    memory: MemoryModel | None = None,
    backbone_recompute: str = "none",
    cuts: list[str] | None = None,
    **aux_options,
) -> LocalModel:
    """Convert a timm/torchvision model (or its name) into a :class:`LocalModel` of ``k`` blocks.

    Names go through ``timm.create_model`` then ``torchvision.models.get_model`` (random init).
    ``input_size`` defaults to (3, 224, 224); an :class:`AnalyzedModel` (:func:`analyze_model`)
    is converted at its own size, classes and model kwargs, without tracing it again.
    ``plan`` re-applies a saved :class:`Plan` instead of partitioning. ``model_kwargs`` go to the
    model's constructor; ``memory`` prices ``balance="memory"`` (batch size, optimizer state,
    pipeline mode; default batch 64, SGD momentum, one process); ``aux_options`` to the aux method (``aux_depth=3`` for ``auglocal``,
    ``span=2, wx=0.001, wy=0.999, momentum=0.995, chain_length=4`` for ``mlaan``).
    ``backbone_recompute`` (``"none"``, ``"cheap"``, ``"all"``) trades step time for memory:
    training recomputes the blocks' activations in backward, one unit at a time
    (:mod:`fxlocal.recompute`); ``balance="memory"`` prices the blocks so.
    ``cuts`` names the modules the first ``k - 1`` blocks end at (``["act1", "layer1.0"]``),
    instead of partitioning: a paper's hand-written split.
    """
    if balance not in BALANCE_METRICS:
        raise PartitionError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_METRICS)}")
    method = get_aux(aux, **aux_options)
    # balance="memory" prices the blocks as they will run
    memory = replace(memory or MemoryModel(), recompute=checked_policy(backbone_recompute))
    if aux == "none" and k != 1:
        raise PartitionError("aux='none' is plain end-to-end training: use it with k=1")
    if k < 1:
        raise PartitionError(f"k must be at least 1, got {k}")
    timed = balance == "time" and plan is None
    if isinstance(model_or_name, AnalyzedModel):
        analyzed = _reuse(model_or_name, input_size, num_classes, model_kwargs, timed)
    else:
        analyzed = analyze_model(model_or_name, input_size or (3, 224, 224), num_classes, model_kwargs, timed)
    model, gm, analysis, model_name = analyzed.model, analyzed.gm, analyzed.analysis, analyzed.model_name
    input_size, num_classes, model_kwargs = analyzed.input_size, analyzed.num_classes, analyzed.model_kwargs
    classes = _num_classes(gm, num_classes, model_name)
    units = _unit_library(gm, analysis)
    unit_at = {u.cut_position: u.index for u in analysis.units}

    def specs(position: int, block: int, num_blocks: int) -> list[HeadSpec]:
        """What the head at a cut is built from: a method that copies units gets the cut's
        tensor and the one it carries if any (its copies take both); any other one spec per
        tensor, and a head for each (``JointHead``)."""
        c = analysis.candidates[position]
        carried = tuple((t.shape, t.layout) for t in c.carried)
        if method.cuts_at_units:
            return [HeadSpec(c.shape, c.layout, classes, block, num_blocks, unit_at.get(position), units, carried)]
        return [
            HeadSpec(shape, layout, classes, block, num_blocks, unit_at.get(position), units)
            for shape, layout in [(c.shape, c.layout), *carried]
        ]

    def build_head(position: int, block: int, num_blocks: int) -> nn.Module:
        heads = [method.build_head(s) for s in specs(position, block, num_blocks)]
        return one_per_tensor(heads)

    @lru_cache(maxsize=None)
    def head_cost(position: int, block: int = 0) -> Cost:
        """What the head at ``position`` training block ``block`` costs (the DP prices every cut
        as if for block 0 unless the method's heads vary by block)."""
        if aux == "none":
            return Cost()
        total = Cost()
        for s in specs(position, block, k):
            if hasattr(method, "head_cost"):
                total = total + method.head_cost(s)
            else:
                total = total + built_head_cost(s)
        return total

    measured: dict[tuple, Cost] = {}

    def built_head_cost(s: HeadSpec) -> Cost:
        # Built on the meta device (instant) and measured once per structure and input shape:
        # the heads of cuts of one shape (every block of a ConvMixer, a ViT; DGL's heads of one
        # stage, whatever block they train) are the same computation.
        with torch.device("meta"):
            head = method.build_head(s)
        key = (s.shape, s.layout, repr(head))
        if key not in measured:
            measured[key] = measure_module(head, s.shape)
        return measured[key]

    allowed = None
    if method.cuts_at_units:
        if len(analysis.units) < 2 and k > 1:
            raise KOutOfRangeError(
                f"k={k} is out of range: aux={aux!r} cuts only between units and {model_name} has "
                f"{len(analysis.units)} unit{'' if len(analysis.units) == 1 else 's'}, so k can be 1 to 1"
                + (f"; aux='dgl' can cut at its {len(analysis.candidates)} cut candidates" if analysis.candidates else ""),
                max_k=1,
            )
        allowed = [u.cut_position for u in analysis.units[:-1]]

    twice = method.backpropagates_blocks_twice

    @lru_cache(maxsize=None)
    def first_part_cost(position: int, block: int = 0) -> Cost:
        """What the head's first part holds through its first backward, which keeps the block's
        graph (a method whose heads backpropagate their block twice: MLAAN's independent head)."""
        return sum((method.first_part_cost(s) for s in specs(position, block, k)), Cost()) if twice else Cost()

    if cuts is not None:
        plan = _plan_at_modules(cuts, k, plan, analysis, model_name, aux, balance, input_size)
    if plan is None:
        plan = partition(
            gm, k, balance, analysis=analysis, head_cost=head_cost, model_name=model_name, aux=aux,
            allowed=allowed, memory=memory, heads_vary_by_block=method.heads_vary_by_block,
            first_part_cost=first_part_cost if twice else None, input_window=method.input_window,
        )
    position = {c.node: i for i, c in enumerate(analysis.candidates)}
    missing = [c for c in plan.cuts if c not in position or (allowed is not None and position[c] not in allowed)]
    if missing:
        raise PlanMismatchError(
            f"the plan cuts after {missing[0]!r}, which is not a "
            f"{'unit boundary' if allowed is not None else 'cut candidate'} of {model_name} "
            f"at input size {input_size}; re-run the partition"
        )
    # Re-derive the plan's figures with each block's real head (its depth may depend on the block).
    cut_idx = [position[c] for c in plan.cuts]
    heads_cost = [Cost()] * len(analysis.candidates)
    first_parts_cost = [Cost()] * len(analysis.candidates)
    for b, i in enumerate(cut_idx):
        heads_cost[i], first_parts_cost[i] = head_cost(i, b), first_part_cost(i, b)
    given, plan = plan, plan_from_cuts(
        gm, analysis, cut_idx, plan.balance, heads_cost, model_name=model_name, aux=aux, memory=memory,
        first_parts=first_parts_cost if twice else None, input_window=method.input_window,
    )
    if plan.balance == "time" and not any(c.seconds for c in analysis.segment_costs):
        for block, measured in zip(plan.blocks, given.blocks):  # a saved plan's times, not re-measured
            block.cost = measured.cost
    carries = {c: analysis.candidates[position[c]].carried for c in plan.cuts}
    blocks = split_graph(gm, plan.cuts, {c: carried[0].node for c, carried in carries.items() if carried})
    heads = []
    for b, block_plan in enumerate(plan.blocks[:-1]):
        with model_device(model):  # heads live with the weights (the meta device for a sweep)
            head = build_head(position[block_plan.cut_node], b, plan.k)
        block_plan.head = head.describe(method.describe) if isinstance(head, JointHead) else method.describe(head)
        heads.append(head)
    config = dict(
        model=model_name if analyzed.from_name else None,
        k=plan.k,
        aux=aux,
        input_size=list(input_size),
        balance=plan.balance,
        num_classes=num_classes,
        model_kwargs=dict(model_kwargs or {}),
        aux_options=dict(aux_options),
        backbone_recompute=backbone_recompute,
    )
    final = method.final_objective() if hasattr(method, "final_objective") else None
    backbone_map, untraced = map_backbone(model, blocks)
    unit_ends = {u.cut for u in analysis.units}
    local = LocalModel(
        blocks, heads, plan, config, final_objective=final, backbone=(backbone_map, untraced),
        backbone_recompute=backbone_recompute,
        # unit boundaries inside each block (not its input, not its own end)
        region_ends=[
            [n.name for n in block.graph.nodes if n.name in unit_ends and n.op != "placeholder" and n.name not in plan.cuts]
            for block in blocks
        ],
    )
    local.trace_report = gm.meta["fxlocal_trace"]
    local.train(model.training)
    return local
