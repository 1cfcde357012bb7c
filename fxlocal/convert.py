"""``convert``: model (or name) -> trace -> analyze [-> replace units -> trace -> analyze]
-> partition -> split -> aux heads -> LocalModel.

The first two steps (:func:`analyze_model`) depend on the model and input size alone: what
converts one model several times (another K, aux method or balance: ``--max-memory``'s K
search, the zoo check) does them once and passes the :class:`AnalyzedModel` to ``convert``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import fx, nn

from .aux import AuxMethod, HeadSpec, TaskSpec, UnitLibrary, get_aux, get_task
from .aux.joint import JointHead, one_per_tensor
from .aux.task_objectives import detector_assignment, task_objective
from .backbone import map_backbone
from .errors import (
    FxLocalError,
    IncompatibleOptionsError,
    InputSizeError,
    KOutOfRangeError,
    NotAClassifierError,
    PartitionError,
    PlanMismatchError,
    TaskError,
)
from .graph.analyze import GraphAnalysis, analyze
from .graph.candidates import find_cut_candidates, hands_on_carried
from .graph.cost import Cost, MemoryModel, checked_balance, model_device
from .graph.partition import partition, plan_from_cuts
from .graph.plan import Plan
from .graph.recompute import checked_policy
from .graph.replace import (
    ReplacementPlan,
    apply_replacement,
    checked_options,
    detach_other_blocks,
    plan_replacement,
)
from .graph.split import split_graph
from .graph.trace import trace
from .graph.units import find_units
from .local_model import LocalModel
from .models import create_model, native_input_sizes
from .models.dense import DetectionTrunk, model_task

__all__ = ["AnalyzedModel", "analyze_model", "convert", "replace"]


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
    replacement: ReplacementPlan | None = None  # units replaced (Replacement Learning), if asked
    task: TaskSpec | None = None  # the task when not classification (``model`` is a detector's trunk for detection)

    def copy(self) -> "AnalyzedModel":
        # one deepcopy, so the graph's modules stay the copied model's; the analysis is plain data
        model, gm = copy.deepcopy((self.model, self.gm))
        return dataclasses.replace(self, model=model, gm=gm)

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
    replace: dict | None = None,
    task: str | None = None,
) -> AnalyzedModel:
    """Build, trace and analyse a model once, to convert it several times.

    Args:
        model_or_name: a module, or a name (timm, then torchvision; random init).
        input_size: per-sample input shape.
        num_classes: the classes (default: the model's own).
        model_kwargs: passed to the model's constructor.
        timed: also measure each segment's wall time (for ``balance="time"``).
        name: names the model in messages and plans (default: its name, or its class).
        replace: replace units first (:func:`replace`'s options, ``{}`` for the defaults); a
            module given is changed in place.
        task: ``classification``, ``detection``, ``segmentation`` or ``super_resolution``
            (default: the model's own, :func:`fxlocal.models.dense.model_task`). A detector's
            trunk (backbone and head) is what is traced and cut.

    Returns:
        The :class:`AnalyzedModel`: model, graph and analysis; ``convert`` works on a copy of it.
    """
    input_size = tuple(int(s) for s in input_size)
    try:
        if isinstance(model_or_name, str):
            model_name = name or model_or_name
            model = create_model(model_or_name, num_classes, input_size, **(model_kwargs or {}))
        else:
            model_name, model = name or type(model_or_name).__name__, model_or_name
        task_name = _checked_task(model, task, model_name)
        if task_name == "detection" and not isinstance(model, DetectionTrunk):
            model = DetectionTrunk(model)  # the detector's traceable part; its state is the detector's
        gm = trace(model, input_size)
    except InputSizeError as exc:
        # fixed-resolution models timm does not flag (EfficientFormer) and patch sizes that do
        # not divide the input: name the sizes the model is made for
        sizes = native_input_sizes(model_or_name) if isinstance(model_or_name, str) else []
        if not sizes:
            raise
        made_for = " or ".join(" ".join(map(str, s)) for s in sizes)
        raise InputSizeError(f"{exc} (it is made for --input-size {made_for})") from exc
    task_spec = None
    if task_name == "classification":
        _num_classes(gm, num_classes, model_name)  # refuse a feature encoder before analysing it
    else:
        task_spec = _task_spec(gm, model, task_name, model_name, input_size)
    replacement = None
    if replace is not None:
        replacement = _replace_units(model, gm, replace)
        gm = trace(model, input_size)  # a replaced unit's layers are leaves now: trace it again
    return AnalyzedModel(
        model, gm, analyze(gm, input_size, timed=timed), input_size, model_name,
        from_name=isinstance(model_or_name, str), num_classes=num_classes, model_kwargs=dict(model_kwargs or {}),
        replacement=replacement, task=task_spec,
    )


def _checked_task(model: nn.Module, task: str | None, model_name: str) -> str:
    """The task to train ``model`` for: the one asked (refused where the model cannot serve it),
    else the model's own."""
    own = model_task(model)
    if task is None:
        return own
    get_task(task)  # an unknown name: the closest one
    if task == own:
        return task
    if get_task(own).dense:
        raise TaskError(f"{model_name} is a {own} model, not one for {task}: use --task {own} (or leave --task out)")
    if task == "detection":
        raise TaskError(
            f"{model_name} is a classifier: --task detection needs a torchvision detector "
            "(retinanet_resnet50_fpn, fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large, fasterrcnn_mobilenet_v3_large_fpn)"
        )
    return task  # segmentation or super-resolution of any model with a dense output (checked on its trace)


def _task_spec(gm: fx.GraphModule, model: nn.Module, task: str, model_name: str, input_size: tuple[int, ...]) -> TaskSpec:
    """What the heads and the last block's objective need to know of the task, read from the
    traced output: a dense task needs a (batch, channels, height, width) output."""
    if task == "detection":  # traced: the detector's trunk
        return TaskSpec(task, model.num_classes, tuple(input_size[1:]), detector_assignment(model, input_size))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(out, dict):  # torchvision's segmenters: {"out": logits}
        out = out.get("out")
    val = out.meta.get("val") if isinstance(out, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        shape = tuple(val.shape[1:]) if isinstance(val, torch.Tensor) else type(val).__name__
        raise TaskError(
            f"{model_name} outputs {shape} per image, not a (channels, height, width) map: "
            f"--task {task} needs a model with a dense output (e.g. fcn_resnet50, edsr_x2)"
        )
    if task == "segmentation":
        return TaskSpec(task, int(val.shape[1]), tuple(val.shape[2:]))
    return TaskSpec(task, 0, tuple(val.shape[1:]))


def replace(
    model_or_name: nn.Module | str,
    interval: int = 2,
    neighbour_grad: bool = False,
    input_size: tuple[int, ...] = (3, 224, 224),
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """Replacement Learning (:mod:`fxlocal.graph.replace`): in each run of units with identical
    parameter shapes, every ``interval``-th unit's parameters become ``a·θ_before + b·θ_after``
    of its neighbours' live ones, with ``a`` and ``b`` its only trainable parameters.

    Args:
        model_or_name: a module (changed in place) or a timm/torchvision name (random init).
        interval: every interval-th unit of a run is replaced (at least 2).
        neighbour_grad: gradients flow through a replaced unit into its neighbours' parameters
            (off by default: it learned worse, docs/replace.md).
        input_size: per-sample input shape the units are found at.
        num_classes: the classes (default: the model's own).
        model_kwargs: passed to the model's constructor.

    Returns:
        The rewritten model (same module tree; :func:`fxlocal.graph.replace.materialise` gives
        the plain architecture back with the replaced parameters' current values).

    Raises:
        ReplaceError: an interval below 2, or a model with no unit to replace.
    """
    model = (create_model(model_or_name, num_classes, tuple(input_size), **(model_kwargs or {}))
             if isinstance(model_or_name, str) else model_or_name)
    # the units are all it needs: no cost analysis, no second trace
    _replace_units(model, trace(model, tuple(input_size)), {"interval": interval, "neighbour_grad": neighbour_grad})
    return model


def _replace_units(model: nn.Module, gm: fx.GraphModule, options: dict) -> ReplacementPlan:
    """Replace ``model``'s units (found on its trace ``gm``) in place; the plan."""
    replacement = plan_replacement(model, find_units(gm, find_cut_candidates(gm)), checked_options(options))
    apply_replacement(model, replacement)
    return replacement


def _reuse(analyzed: AnalyzedModel, input_size, num_classes, model_kwargs, timed: bool, replace,
           task: str | None = None) -> AnalyzedModel:
    """A private copy of ``analyzed`` for one conversion; the arguments given must agree with it."""
    analysed_task = analyzed.task.name if analyzed.task is not None else "classification"
    if task is not None and task != analysed_task:
        raise IncompatibleOptionsError(f"task={task!r} differs from the analysed model's ({analysed_task}): analyse it with task={task!r}")
    replaced = analyzed.replacement.options if analyzed.replacement is not None else None
    if replace is not None and checked_options(replace) != replaced:
        raise IncompatibleOptionsError(
            f"replace={replace!r} differs from the analysed model's ({replaced}): analyse it with replace={replace!r}"
        )
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




def _cut_nodes_at_modules(cuts: list[str], k: int, analysis: GraphAnalysis, model_name: str) -> list[str]:
    """The cut nodes where the modules ``cuts`` end (a paper's hand-written split)."""
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
    return [by_module[m] for m in cuts]


@dataclass
class _Heads:
    """The aux method's heads at the graph's cuts: what each is built from, built, and priced.

    The partition prices every cut as if for block 0 unless the method's heads vary by block;
    ``cost`` and ``first_part_cost`` are cached per (cut position, block).
    """

    method: AuxMethod
    analysis: GraphAnalysis
    num_classes: int
    units: UnitLibrary
    k: int
    task: TaskSpec | None = None

    def __post_init__(self) -> None:
        self.unit_at = {u.cut_position: u.index for u in self.analysis.units}
        self.input_shape = tuple(self.analysis.input_size)
        self._costs = lru_cache(maxsize=None)(self._cost)
        self._first_parts = lru_cache(maxsize=None)(self._first_part_cost)

    def cost(self, position: int, block: int = 0, hands_on: bool = False) -> Cost:
        """What the head at candidate ``position`` training block ``block`` costs (nothing for
        ``aux="none"``, which has no heads); ``hands_on``: see :meth:`headed`."""
        return self._costs(position, block, hands_on) if self.method.name != "none" else Cost()

    def handing_on_cost(self, position: int, block: int = 0) -> Cost:
        """:meth:`cost` for a block that only hands on the tensor its cut carries."""
        return self.cost(position, block, True)

    def first_part_cost(self, position: int, block: int = 0, hands_on: bool = False) -> Cost:
        return self._first_parts(position, block, hands_on)

    def headed(self, position: int, hands_on: bool = False) -> tuple[int, ...]:
        """Which of the tensors crossing the cut at ``position`` get a head of their own.

        The cut's own tensor always does; a carried one (a second branch) unless the block
        ``hands_on`` it (:func:`~fxlocal.graph.candidates.hands_on_carried`): a head on a tensor
        the block did not compute trains none of its parameters. Methods that copy units take
        all tensors in one head."""
        if self.method.cuts_at_units:
            return (0,)
        return (0,) if hands_on else tuple(range(1 + len(self.analysis.candidates[position].carried)))

    def specs(self, position: int, block: int, hands_on: bool = False) -> list[HeadSpec]:
        """A method that copies units gets the cut's tensor and the one it carries if any (its
        copies take both); any other one spec per tensor that gets a head (:meth:`headed`), and
        a head for each (``JointHead``)."""
        c = self.analysis.candidates[position]
        carried = tuple((t.shape, t.layout) for t in c.carried)
        unit = self.unit_at.get(position)
        if self.method.cuts_at_units:
            return [HeadSpec(c.shape, c.layout, self.num_classes, block, self.k, unit, self.units, carried, self.input_shape,
                             task=self.task)]
        tensors = [(c.shape, c.layout), *carried]
        return [HeadSpec(*tensors[i], self.num_classes, block, self.k, unit, self.units, input_shape=self.input_shape,
                         task=self.task)
                for i in self.headed(position, hands_on)]

    def build(self, position: int, block: int, hands_on: bool = False) -> nn.Module:
        heads = [self.method.build_head(s) for s in self.specs(position, block, hands_on)]
        crossing = 1 if self.method.cuts_at_units else 1 + len(self.analysis.candidates[position].carried)
        return one_per_tensor(heads, self.headed(position, hands_on), crossing)

    def _cost(self, position: int, block: int = 0, hands_on: bool = False) -> Cost:
        return sum((self.method.head_cost(s) for s in self.specs(position, block, hands_on)), Cost())

    def _first_part_cost(self, position: int, block: int = 0, hands_on: bool = False) -> Cost:
        """What the head's first part holds through its first backward, which keeps the block's
        graph (a method whose heads backpropagate their block twice: MLAAN's independent head)."""
        return sum((self.method.first_part_cost(s) for s in self.specs(position, block, hands_on)), Cost())


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
    replace: dict | None = None,
    task: str | None = None,
    **aux_options,
) -> LocalModel:
    """Convert a timm/torchvision model (or its name) into a :class:`LocalModel` of ``k`` blocks.

    Args:
        model_or_name: a module, a timm/torchvision name (built with random init), or an
            :class:`AnalyzedModel` (converted at its own size, classes and model kwargs, without
            tracing it again).
        k: the number of gradient-isolated blocks.
        aux: the aux method (:func:`fxlocal.available_aux`); ``"none"`` is end to end (k=1).
        input_size: per-sample input shape; default (3, 224, 224).
        balance: what the partition balances: ``flops``, ``params``, ``activations``,
            ``memory`` (a training step's peak) or ``time`` (measured here).
        num_classes: the classes (default: the model's own).
        plan: a saved :class:`Plan` to cut by instead of partitioning (its K is used; ``k`` is
            ignored).
        model_kwargs: passed to the model's constructor.
        memory: prices ``balance="memory"`` (batch, optimizer state, pipeline mode; default
            batch 64, SGD momentum, one process).
        backbone_recompute: ``"none"``, ``"cheap"`` or ``"all"``: training recomputes the blocks'
            activations in backward, one unit at a time (:mod:`fxlocal.graph.recompute`), and
            ``balance="memory"`` prices them so.
        cuts: the modules the first ``k - 1`` blocks end at (``["act1", "layer1.0"]``), instead
            of partitioning: a paper's hand-written split.
        replace: Replacement Learning first (:func:`replace`'s options as a dict, ``{}`` for
            its defaults): a replaced unit belongs to the block of its position and is never
            cut inside; it reads a neighbour another block trains without its gradient.
        task: ``classification``, ``detection``, ``segmentation`` or ``super_resolution``
            (default: the model's own). Under a task the last block's loss is the task's (a
            detector's own loss on its head's outputs), plain heads predict its global target,
            and ``aux="glcan"`` builds heads for it (:mod:`fxlocal.aux.glcan`).
        **aux_options: the aux method's options (``aux_depth=3`` for ``auglocal``;
            ``span=2, wx=0.001, wy=0.999, momentum=0.995, chain_length=4`` for ``mlaan``).

    Returns:
        The :class:`LocalModel`: blocks sharing the model's parameters, one head per block but
        the last, and the plan.
    """
    checked_balance(balance)
    method = get_aux(aux, **aux_options)
    if aux == "none" and k != 1:
        raise PartitionError("aux='none' is plain end-to-end training: use it with k=1")
    if k < 1:
        raise PartitionError(f"k must be at least 1, got {k}")
    if cuts is not None and plan is not None:
        raise PlanMismatchError("give convert either cuts or a plan, not both")
    # balance="memory" prices the blocks as they will run
    memory = dataclasses.replace(memory or MemoryModel(), recompute=checked_policy(backbone_recompute))
    timed = balance == "time" and plan is None
    if isinstance(model_or_name, AnalyzedModel):
        analyzed = _reuse(model_or_name, input_size, num_classes, model_kwargs, timed, replace, task)
    else:
        analyzed = analyze_model(model_or_name, input_size or (3, 224, 224), num_classes, model_kwargs, timed,
                                 replace=replace, task=task)
    gm, analysis = analyzed.gm, analyzed.analysis
    if plan is not None and tuple(plan.input_size) != tuple(analyzed.input_size):
        # its cuts are named by node, and the names may stay while the shapes change
        raise PlanMismatchError(
            f"the plan was made at input size {tuple(plan.input_size)} and {analyzed.model_name} is converted at "
            f"{tuple(analyzed.input_size)}: make the plan at that size (fxlocal convert --input-size ... --save-plan)"
        )
    k = plan.k if plan is not None else k
    if analyzed.task is not None and method.final_objective() is not None:
        raise TaskError(
            f"aux={aux!r} trains the last block with its own loss over classes, which a {analyzed.task.name} model "
            "does not have; use glcan, dgl, auglocal, man or infopro"
        )
    classes = (analyzed.task.global_size if analyzed.task is not None
               else _num_classes(gm, analyzed.num_classes, analyzed.model_name))
    heads = _Heads(method, analysis, classes, UnitLibrary.from_analysis(gm, analysis), k, analyzed.task)
    allowed = [u.cut_position for u in analysis.units[:-1]] if method.cuts_at_units else None
    if analyzed.replacement is not None:
        allowed = _outside_replaced_units(analysis, analyzed.replacement, allowed)
    if allowed == [] and k > 1:
        units = len(analysis.units)
        raise KOutOfRangeError(
            f"k={k} is out of range: aux={aux!r} cuts only between units and {analyzed.model_name} has "
            f"{units} unit{'' if units == 1 else 's'}, so k can be 1 to 1"
            + (f"; aux='dgl' can cut at its {len(analysis.candidates)} cut candidates" if analysis.candidates else ""),
            max_k=1,
        )
    priced = dict(model_name=analyzed.model_name, aux=aux, memory=memory, input_window=method.input_window)
    if plan is None and cuts is None:
        plan = partition(
            gm, k, balance, analysis=analysis, head_cost=heads.cost, allowed=allowed,
            head_cost_handing_on=None if method.cuts_at_units else heads.handing_on_cost,
            heads_vary_by_block=method.heads_vary_by_block,
            first_part_cost=heads.first_part_cost if method.backpropagates_blocks_twice else None, **priced,
        )
    else:
        given = plan
        cut_nodes = plan.cuts if plan is not None else _cut_nodes_at_modules(cuts, k, analysis, analyzed.model_name)
        plan = _plan_at(cut_nodes, gm, analyzed, heads, allowed, balance if given is None else given.balance, priced)
        if given is not None and plan.balance == "time" and not analyzed.timed:
            for block, measured in zip(plan.blocks, given.blocks):  # a saved plan's times, not re-measured
                block.cost = measured.cost
    return _assemble(analyzed, plan, heads, aux, aux_options, backbone_recompute)


def _outside_replaced_units(analysis: GraphAnalysis, replacement: ReplacementPlan, allowed: list[int] | None) -> list[int]:
    """The candidate positions of ``allowed`` (all if None) not inside a replaced unit: its two
    coefficients must train in one block."""
    replaced = {r.unit for r in replacement.replaced}
    inside: set[int] = set()
    for before, unit in zip([None, *analysis.units], analysis.units):
        if unit.name in replaced:
            inside.update(range(before.cut_position + 1 if before else 0, unit.cut_position))
    return [p for p in (allowed if allowed is not None else range(len(analysis.candidates))) if p not in inside]


def _plan_at(cut_nodes: list[str], gm, analyzed: AnalyzedModel, heads: _Heads, allowed: list[int] | None,
             balance: str, priced: dict) -> Plan:
    """The plan for cutting after the nodes ``cut_nodes`` (a saved plan's, or a paper's split),
    each block priced with its real head; the cuts must be cut candidates (unit boundaries for a
    method that copies units) of this model at this input size."""
    analysis = analyzed.analysis
    position = {c.node: i for i, c in enumerate(analysis.candidates)}
    missing = [c for c in cut_nodes if c not in position or (allowed is not None and position[c] not in allowed)]
    if missing:
        raise PlanMismatchError(
            f"the plan cuts after {missing[0]!r}, which is not a "
            f"{'unit boundary' if allowed is not None else 'cut candidate'} of {analyzed.model_name} "
            f"at input size {analyzed.input_size}; re-run the partition"
        )
    cut_idx = [position[c] for c in cut_nodes]
    head_costs = [Cost()] * len(analysis.candidates)
    first_parts = [Cost()] * len(analysis.candidates)
    for b, (after, i) in enumerate(zip([None, *cut_idx], cut_idx)):
        hands_on = hands_on_carried(analysis.candidates, i, after)
        head_costs[i] = heads.cost(i, b, hands_on)
        first_parts[i] = heads.first_part_cost(i, b, hands_on)
    twice = heads.method.backpropagates_blocks_twice
    return plan_from_cuts(gm, analysis, cut_idx, balance, head_costs, first_parts=first_parts if twice else None, **priced)


def _assemble(analyzed: AnalyzedModel, plan: Plan, heads: _Heads, aux: str, aux_options: dict,
              backbone_recompute: str) -> LocalModel:
    """Split the graph at the plan's cuts, build each block's head, and make the LocalModel."""
    model, gm, analysis = analyzed.model, analyzed.gm, analyzed.analysis
    position = {c.node: i for i, c in enumerate(analysis.candidates)}
    carries = {c: analysis.candidates[position[c]].carried for c in plan.cuts}
    blocks = split_graph(gm, plan.cuts, {c: carried[0].node for c, carried in carries.items() if carried})
    detach_other_blocks(model, blocks)
    built = []
    for b, block_plan in enumerate(plan.blocks[:-1]):
        after = position[plan.blocks[b - 1].cut_node] if b else None
        hands_on = hands_on_carried(analysis.candidates, position[block_plan.cut_node], after)
        with model_device(model):  # heads live with the weights (the meta device for a sweep)
            head = heads.build(position[block_plan.cut_node], b, hands_on)
        describe = heads.method.describe
        block_plan.head = head.describe(describe) if isinstance(head, JointHead) else describe(head)
        built.append(head)
    config = dict(
        model=analyzed.model_name if analyzed.from_name else None,
        k=plan.k,
        aux=aux,
        input_size=list(analyzed.input_size),
        balance=plan.balance,
        num_classes=analyzed.num_classes,
        model_kwargs=dict(analyzed.model_kwargs or {}),
        aux_options=dict(aux_options),
        backbone_recompute=backbone_recompute,
    )
    if analyzed.replacement is not None:
        config["replace"] = dataclasses.asdict(analyzed.replacement.options)
    final_objective = heads.method.final_objective()
    if analyzed.task is not None:
        config["task"] = analyzed.task.name
        with model_device(model):
            final_objective = task_objective(analyzed.task, model, analyzed.input_size)
        plan.blocks[-1].head = final_objective.summary
    backbone_map, untraced = map_backbone(model, blocks)
    unit_ends = {u.cut for u in analysis.units}
    local = LocalModel(
        blocks, built, plan, config, final_objective=final_objective, backbone=(backbone_map, untraced),
        backbone_recompute=backbone_recompute, task=analyzed.task,
        # unit boundaries inside each block (not its input, not its own end)
        region_ends=[
            [n.name for n in block.graph.nodes if n.name in unit_ends and n.op != "placeholder" and n.name not in plan.cuts]
            for block in blocks
        ],
    )
    local.trace_report = gm.meta["fxlocal_trace"]
    local.replacement = analyzed.replacement
    local.train(model.training)
    return local
