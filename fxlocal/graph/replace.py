"""Replacement Learning as a pass over a model's units (Zhang et al., arXiv 2410.01239, 2605.19533).

In each *run* of consecutive units whose parameters have identical names and shapes (a ResNet
stage's blocks after its first, a ViT's blocks), every ``interval``-th unit is replaced: it
keeps its structure and its buffers (BatchNorm running statistics), but every parameter becomes

    θ_i = a_i · θ_{i-1} + b_i · θ_{i+1},

computed from its neighbours' live parameters at each forward; ``a_i`` and ``b_i`` (0.5 each at
the start) are the unit's only trainable parameters. The first and last unit of a run are never
replaced (one of their neighbours has other shapes), nor are two neighbours ever both replaced.

The mechanism is torch's own :mod:`torch.nn.utils.parametrize`: each parameter of a replaced
unit gets a :class:`NeighbourBlend` parametrization (its stored original is emptied: it is never
read), so the model keeps its module tree, traces as before (a parametrized layer is a leaf of
the trace) and :func:`materialise` turns it back into the plain architecture with θ_i as ordinary
parameters.

Two passes over plain data and the model:
:func:`plan_replacement` (units in, a :class:`ReplacementPlan` out) and
:func:`apply_replacement` (the plan applied to the model, in place).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import FxLocalError
from .units import Unit

__all__ = [
    "NeighbourBlend",
    "ReplaceError",
    "ReplacementCoefficients",
    "ReplacementOptions",
    "ReplacementPlan",
    "UnitReplacement",
    "apply_replacement",
    "blends",
    "checked_options",
    "detach_other_blocks",
    "effective_parameters",
    "materialise",
    "materialised_copy",
    "plan_replacement",
]


class ReplaceError(FxLocalError, ValueError):
    """Replacement options that do not apply to the model (or are malformed)."""


@dataclass(frozen=True)
class ReplacementOptions:
    """What ``--replace`` / ``convert(replace=...)`` / a recipe's ``convert.replace`` set.

    ``interval``: every interval-th unit of a run is replaced (2: every other one).
    ``neighbour_grad``: gradients flow through θ_i into the neighbours' parameters (when the
    neighbour trains in the same block); False (the default: it learned better on ResNet-32 and
    ViT-Tiny, docs/replace.md) uses the neighbours' values only.
    """

    interval: int = 2
    neighbour_grad: bool = False


def checked_options(options: dict | ReplacementOptions) -> ReplacementOptions:
    """``options`` as :class:`ReplacementOptions`, or a one-line :class:`ReplaceError`."""
    if isinstance(options, ReplacementOptions):
        given = asdict(options)
    elif isinstance(options, dict):
        given = dict(options)
    else:
        raise ReplaceError(f"replace takes options interval=N, neighbour_grad=true|false; got {options!r}")
    known = set(asdict(ReplacementOptions()))
    unknown = sorted(set(given) - known)
    if unknown:
        raise ReplaceError(f"unknown replace option {unknown[0]!r}: replace takes {', '.join(sorted(known))}")
    interval = given.get("interval", 2)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
        raise ReplaceError(
            f"replace interval must be an integer of at least 2 (every 2nd unit or sparser: a replaced unit needs "
            f"two live neighbours), got {interval!r}"
        )
    neighbour_grad = given.get("neighbour_grad", False)
    if not isinstance(neighbour_grad, bool):
        raise ReplaceError(f"replace neighbour_grad must be true or false, got {neighbour_grad!r}")
    return ReplacementOptions(interval, neighbour_grad)


@dataclass(frozen=True)
class UnitReplacement:
    """One replaced unit and the two units its parameters are made from (module paths)."""

    unit: str
    before: str
    after: str


@dataclass
class ReplacementPlan:
    """Which units are replaced, and why each other unit is not (plain data)."""

    options: ReplacementOptions
    replaced: list[UnitReplacement] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # unit name -> why it is not replaced

    def why(self, unit: Unit) -> str:
        """``a·before + b·after`` for a replaced unit, else why it is kept: ``first of its run`` /
        ``last of its run`` (the unit before / after it has other parameter shapes), ``neighbours
        differ in shape``, ``off the interval``, ``several modules``, ``no parameters``, ``two
        tensors`` (it hands on or takes a second tensor)."""
        done = next((r for r in self.replaced if r.unit == unit.name), None)
        return f"a·{done.before} + b·{done.after}" if done else self.kept.get(unit.name, "")


def _signature(module: nn.Module) -> tuple:
    return type(module), tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())


def plan_replacement(model: nn.Module, units: list[Unit], options: ReplacementOptions) -> ReplacementPlan:
    """Which of ``units`` to replace (see the module docstring).

    Args:
        model: the model the units were found in (their modules are read, not changed).
        units: its units (:func:`fxlocal.graph.units.find_units`).
        options: the interval (and the gradient option, recorded on the plan).

    Returns:
        The :class:`ReplacementPlan`; it may replace nothing (:func:`apply_replacement` refuses
        that, :command:`fxlocal inspect` shows why).
    """
    plan = ReplacementPlan(options)
    # one run: consecutive single-module units of one class with the same parameters and shapes
    runs: list[list[Unit]] = []
    last_key = None
    for unit in units:
        if len(unit.modules) != 1:
            plan.kept[unit.name] = "several modules"
            last_key = None
            continue
        module = model.get_submodule(unit.modules[0])
        if not any(True for _ in module.parameters()):
            plan.kept[unit.name] = "no parameters"
            last_key = None
            continue
        if unit.carried or unit.in_carried:
            plan.kept[unit.name] = "two tensors"
            last_key = None
            continue
        key = (_signature(module), unit.in_shape, unit.out_shape)
        if key == last_key:
            runs[-1].append(unit)
        else:
            runs.append([unit])
        last_key = key
    for run in runs:
        for j, unit in enumerate(run):
            if len(run) < 3:
                plan.kept[unit.name] = "neighbours differ in shape"
            elif j == 0:
                plan.kept[unit.name] = "first of its run"
            elif j == len(run) - 1:
                plan.kept[unit.name] = "last of its run"
            elif (j + 1) % options.interval:
                plan.kept[unit.name] = "off the interval"
            else:
                plan.replaced.append(UnitReplacement(unit.modules[0], run[j - 1].modules[0], run[j + 1].modules[0]))
    return plan


class ReplacementCoefficients(nn.Module):
    """A replaced unit's two trainable scalars, shared by all its parameters' blends."""

    def __init__(self, a: float = 0.5, b: float = 0.5):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))


class NeighbourBlend(nn.Module):
    """The parametrization of one parameter of a replaced unit: ``a·θ_before + b·θ_after``.

    The neighbours' modules are held in a plain tuple, not as submodules: their parameters are
    theirs (trained, saved and moved with them), read live at every forward.
    ``attached[i]``: gradients flow into neighbour i's parameter (``neighbour_grad``, and the
    neighbour trains in the same block: :func:`detach_other_blocks`).
    """

    def __init__(self, coefficients: ReplacementCoefficients, before: nn.Module, after: nn.Module, name: str,
                 neighbour_grad: bool):
        super().__init__()
        self.coefficients = coefficients
        self.sources = (before, after)
        self.name = name
        self.attached = [neighbour_grad, neighbour_grad]

    def neighbour_values(self) -> list[torch.Tensor]:
        values = [getattr(m, self.name) for m in self.sources]
        return [v if attached else v.detach() for v, attached in zip(values, self.attached)]

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        before, after = self.neighbour_values()
        c = self.coefficients
        return c.a.to(before.dtype) * before + c.b.to(after.dtype) * after

    def extra_repr(self) -> str:
        return f"{self.name}, attached={self.attached}"


def apply_replacement(model: nn.Module, plan: ReplacementPlan) -> nn.Module:
    """Replace the plan's units of ``model`` in place (and return it).

    Raises:
        ReplaceError: the plan replaces nothing (the model has no run of three units with one
            parameter structure).
    """
    if not plan.replaced:
        raise ReplaceError(
            "no unit can be replaced: Replacement Learning needs three consecutive units with identical parameter "
            f"shapes at interval {plan.options.interval}; `fxlocal inspect MODEL` says why each unit is kept"
        )
    for r in plan.replaced:
        unit, before, after = (model.get_submodule(p) for p in (r.unit, r.before, r.after))
        params = list(unit.named_parameters())
        coefficients = ReplacementCoefficients().to(device=params[0][1].device)
        for name, p in params:
            owner_path, _, tensor = name.rpartition(".")
            owner = unit.get_submodule(owner_path)
            sources = (before.get_submodule(owner_path), after.get_submodule(owner_path))
            blend = NeighbourBlend(coefficients, *sources, tensor, plan.options.neighbour_grad)
            parametrize.register_parametrization(owner, tensor, blend, unsafe=True)
            # the stored original is never read: keep an empty frozen stand-in instead of stale weights
            owner.parametrizations[tensor].original = nn.Parameter(p.new_empty(0), requires_grad=False)
    return model


def blends(module: nn.Module) -> list[NeighbourBlend]:
    """Every :class:`NeighbourBlend` in ``module`` (none if nothing in it is replaced)."""
    return [m for m in module.modules() if isinstance(m, NeighbourBlend)]


def detach_other_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Cut the gradient into a neighbour that another block trains: block b's loss trains only
    block b's parameters (a replaced unit may sit next to a cut)."""
    block_of = {id(p): b for b, block in enumerate(blocks) for p in block.parameters()}
    for blend in blends(model):
        own = block_of.get(id(blend.coefficients.a))
        for i, source in enumerate(blend.sources):
            if block_of.get(id(getattr(source, blend.name))) != own:
                blend.attached[i] = False


def materialise(module: nn.Module) -> nn.Module:
    """Turn every replaced unit in ``module`` back into ordinary parameters holding θ_i's current
    value (in place): the plain architecture, every parameter trainable.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the parametrized
    class, which a deep copy of the model shares (every copy's replaced layers would break).
    """
    for owner in list(module.modules()):
        if parametrize.is_parametrized(owner):
            with torch.no_grad():
                values = {t: getattr(owner, t).detach().clone() for t in owner.parametrizations.keys()}
            del owner._modules["parametrizations"]
            owner.__class__ = type(owner).__bases__[0]  # the class parametrize derived its own from
            for tensor, value in values.items():
                owner.register_parameter(tensor, nn.Parameter(value))
    return module


def materialised_copy(module: nn.Module) -> nn.Module:
    """A plain copy of ``module`` (a unit, a piece of a block) with θ_i's current values: a copy
    reads no neighbour of the original, which are shared with it, not copied."""
    memo = {id(s): s for blend in blends(module) for s in blend.sources}
    return materialise(copy.deepcopy(module, memo))


def effective_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters as :func:`materialised_copy` would name them, with their current
    values (θ_i for a replaced unit's)."""
    out: list[tuple[str, torch.Tensor]] = []
    for path, owner in module.named_modules():
        prefix = f"{path}." if path else ""
        if parametrize.is_parametrized(owner):
            own = [(n, p) for n, p in owner.named_parameters(recurse=False)]
            out += [(prefix + n, p) for n, p in own]
            out += [(prefix + t, getattr(owner, t)) for t in owner.parametrizations.keys()]
        elif "parametrizations" not in path.split("."):
            out += [(prefix + n, p) for n, p in owner.named_parameters(recurse=False)]
    return out
