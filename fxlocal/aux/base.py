"""The contract between fxlocal and an aux method: what a head is built from (:class:`HeadSpec`),
what a method declares and may override (:class:`AuxMethod`), the hooks a head may have
(:class:`AuxHead`), and the registry of methods by name.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ..errors import UnknownAuxError
from ..graph.cost import Cost, measure_module
from .tasks import TaskSpec
from .unit_copies import UnitLibrary, handed_on

__all__ = ["AuxHead", "AuxMethod", "HeadSpec", "head_loss", "register_aux", "get_aux", "available_aux", "combinations"]


@dataclass(frozen=True)
class HeadSpec:
    """What a head is built from: the real boundary tensor of one cut, and the graph around it."""

    shape: tuple[int, ...]  # per-sample shape of the boundary tensor
    layout: str  # "nchw", "nhwc", "nlc" or "nc"
    num_classes: int
    block: int  # index of the block the head trains
    num_blocks: int = 0  # K
    unit: int | None = None  # index of the unit this cut closes (methods that copy units)
    units: "UnitLibrary | None" = None  # the graph's units, for methods that copy them
    # (shape, layout) of a second tensor the cut carries beside it: only methods that copy units
    # see one (their copies take both); the others get one head per tensor (``JointHead``)
    carried: tuple[tuple[tuple[int, ...], str], ...] = ()
    input_shape: tuple[int, ...] = ()  # per-sample shape of the model's input (heads that reconstruct it)
    # the task the model serves, when not classification: ``num_classes`` is then the width of
    # its global target (what a plain head predicts), and task heads (GLCAN's) read the rest here
    task: "TaskSpec | None" = None

    def on(self, shape: tuple[int, ...], layout: str) -> "HeadSpec":
        """The spec of a base head on a tensor a plug-in's path hands on, not the cut's own: same
        block, classes and model input; no units to copy, nothing carried."""
        return replace(self, shape=tuple(shape), layout=layout, carried=(), unit=None, units=None)

    @property
    def tensors(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """(shape, layout) of every tensor crossing the cut: its own, then the carried one."""
        return ((self.shape, self.layout), *self.carried)


class AuxMethod:
    """Base class of every aux method: each hook is declared here with its default, and a method
    overrides what it needs. A method is registered under a name with :func:`register_aux`.

    A method must implement :meth:`build_head`. The class attributes tell ``convert`` and the
    partition how the method's heads behave; the other hooks refine what they cost and how the
    last block is trained.
    """

    name: str = ""
    #: heads copy the graph's units, so cuts must be at unit boundaries
    cuts_at_units: bool = False
    #: the head at a cut depends on the block it trains: the partition then prices each block's
    #: own head; a method whose head (or its cost) depends on ``spec.block`` or
    #: ``spec.num_blocks`` must say so, or every block is priced as block 0
    heads_vary_by_block: bool = False
    #: heads backpropagate their block twice per step (MLAAN): ``backbone_recompute="cheap"``
    #: (one backward per block) is refused, and ``balance="memory"`` prices
    #: :meth:`first_part_cost`, what a head's first part holds through the first backward
    backpropagates_blocks_twice: bool = False
    #: how many blocks' inputs a block's loss runs from: above 1 it also trains the blocks before
    #: it, which backward re-runs (MLAAN's cascade; ``balance="memory"`` prices the re-run)
    input_window: int = 1
    #: its heads can end a plug-in's aux path (``--aux dgl+man``): ``build_head`` makes a head for
    #: any tensor, not only a cut's
    can_be_base: bool = False
    #: a plug-in: it takes ``base=`` (a method that :attr:`can_be_base`) for the head its path ends in
    takes_base: bool = False
    #: its heads reconstruct the model's input (InfoPro): they take ``input_mean`` / ``input_std``,
    #: the normalisation the data applied, which training fills in from the dataset
    reconstructs_input: bool = False

    def build_head(self, spec: HeadSpec) -> nn.Module:
        """The head that trains block ``spec.block`` from the tensor(s) at its cut.

        Args:
            spec: the cut's tensor shape and layout, the class count, the block, the units.

        Returns:
            A module mapping the cut's tensor(s) to (batch, classes) logits; an :class:`AuxHead`
            to compute its block's loss itself or to act after each backward.
        """
        raise NotImplementedError(f"{type(self).__name__} does not build heads")

    def describe(self, head: nn.Module) -> str:
        """One line about a head this method built (``fxlocal convert`` prints it per block)."""
        return type(head).__name__

    def head_cost(self, spec: HeadSpec) -> Cost:
        """What the head for ``spec`` costs to train, per sample (the partition adds it to its block).

        Args:
            spec: as for :meth:`build_head`.

        Returns:
            The default builds the head on the meta device and measures one training step of it,
            once per head structure and input shape; a method overrides this when its cost is not
            its module's alone (recomputation, EMA twins that take no gradient).
        """
        with torch.device("meta"):
            head = self.build_head(spec)
        key = (spec.shape, spec.layout, repr(head), torch.get_default_dtype())
        if key not in _MEASURED:
            _MEASURED[key] = measure_module(head, spec.shape)
        return _MEASURED[key]

    def first_part_cost(self, spec: HeadSpec) -> Cost:
        """What a head's first part holds through its first backward (methods that
        :attr:`backpropagates_blocks_twice`); nothing by default."""
        return Cost()

    def final_objective(self) -> nn.Module | None:
        """The last block's objective, when it is not cross-entropy on the model's output (an
        :class:`AuxHead` whose ``local_loss`` runs on the last block's output); None by default."""
        return None


# head structure, input shape and dtype -> measured cost: heads of one structure at cuts of one shape
# (every block of a ConvMixer, a ViT; DGL's heads of one stage) are the same computation
_MEASURED: dict[tuple, Cost] = {}


class AuxHead(nn.Module):
    """Base class of heads with hooks beyond ``forward`` (plain ``nn.Module`` heads need none:
    their block's loss is the criterion on their logits).

    Attributes:
        owns_loss: :meth:`local_loss` computes the block's loss (cascades, blocks without a loss).
        input_window: how many blocks' inputs :meth:`local_loss` re-runs (1: its own block only).
        backpropagates_block_twice: :meth:`local_loss` backpropagates its block in two parts.
    """

    owns_loss: bool = False
    input_window: int = 1
    backpropagates_block_twice: bool = False
    #: :meth:`local_loss` reads the step's model input (``ctx.input``): a pipeline's first stage
    #: sends it on to this head's stage
    needs_model_input: bool = False

    def local_loss(self, ctx, b: int, out) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``b``'s loss and logits from its output ``out`` (``ctx``: the step's
        :class:`~fxlocal.local_model.StepContext`: target, criterion, cascaded re-runs, early
        backward). Used when :attr:`owns_loss`."""
        raise NotImplementedError(f"{type(self).__name__} does not compute its own loss")

    def after_backward(self) -> None:
        """Called once block ``b``'s loss is backpropagated (EMA twins follow the backbone here)."""

    def exported_state(self) -> dict[str, torch.Tensor]:
        """State of the original model this objective holds, under the original's keys (a
        two-stage detector's region proposal network and box heads, which the last block's
        objective runs): part of the exported backbone. Nothing by default."""
        return {}


def head_loss(head: nn.Module, ctx, b: int, features) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's loss and logits on ``features`` (a tensor, or the tuple a unit hands on): its own
    :meth:`AuxHead.local_loss` where it owns its loss, else the criterion on its logits. How a
    plug-in's path ends in its base head, whichever the base is.

    Args:
        head: the head.
        ctx: the step's :class:`~fxlocal.local_model.StepContext`.
        b: the block being trained.
        features: what the head takes.

    Returns:
        ``(loss, logits)``.
    """
    if isinstance(head, AuxHead) and head.owns_loss:
        return head.local_loss(ctx, b, features)
    logits = head(*handed_on(features))
    return ctx.criterion(logits, ctx.target), logits


_REGISTRY: dict[str, Callable[[], AuxMethod]] = {}


def register_aux(name: str):
    """Class decorator: make an :class:`AuxMethod` subclass available under ``name``.

    Args:
        name: what ``--aux`` and recipes call it.

    Returns:
        The decorator; it refuses anything but an :class:`AuxMethod` subclass.
    """

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, AuxMethod)):
            raise TypeError(f"register_aux({name!r}) decorates a subclass of fxlocal.aux.AuxMethod, not {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_aux() -> list[str]:
    """The names of the registered aux methods, sorted."""
    return sorted(_REGISTRY)


def combinations() -> list[str]:
    """Every ``base+plugin`` name (``dgl+man``, ``infopro+mlaan``, ...), sorted."""
    bases = [name for name, cls in _REGISTRY.items() if cls.can_be_base]
    return sorted(f"{base}+{name}" for name, cls in _REGISTRY.items() if cls.takes_base for base in bases)


def _registered(name: str) -> Callable[..., AuxMethod]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, [*_REGISTRY, *combinations()], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownAuxError(
            f"unknown aux method {name!r}{hint}; choose one of {', '.join(available_aux())} "
            f"or a combination {', '.join(combinations())}"
        )
    return _REGISTRY[name]


def get_aux(name: str, **options) -> AuxMethod:
    """An aux method by name, made with its options.

    Args:
        name: a registered name (:func:`available_aux`), or ``base+plugin`` (:func:`combinations`),
            the same as ``plugin`` with ``base=base``.
        **options: the method's constructor arguments (``aux_depth=3`` for ``auglocal``); a
            plug-in passes the ones it does not take to its base.

    Returns:
        The :class:`AuxMethod`.

    Raises:
        UnknownAuxError: an unknown name (with the closest one), a base that cannot be combined,
            or options it does not take.
    """
    base, plus, plugin = name.rpartition("+")
    if plus:
        if not base or "base" in options:
            raise UnknownAuxError(f"aux {name!r}: give the base once, as BASE+PLUGIN (e.g. dgl+man) or base=BASE")
        if not _registered(plugin).takes_base:
            plugins = sorted(n for n, cls in _REGISTRY.items() if cls.takes_base)
            raise UnknownAuxError(f"aux {plugin!r} is not a plug-in and takes no base: the plug-ins are {', '.join(plugins)}")
        return get_aux(plugin, base=base, **options)
    cls = _registered(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise UnknownAuxError(
            f"aux {name!r} does not take {sorted(options)}; its options are: {', '.join(_option_names(cls)) or 'none'}"
        ) from exc


def _option_names(cls: type) -> list[str]:
    return [p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]


def get_base(plugin: str, base: "str | AuxMethod", **options) -> AuxMethod:
    """The base method a plug-in's aux path ends in.

    Args:
        plugin: the plug-in's name (for the error).
        base: a method name (with ``options``) or a method.
        **options: the base's options.

    Returns:
        The base :class:`AuxMethod`.

    Raises:
        UnknownAuxError: an unknown base, one that cannot be a base, or options it does not take.
    """
    bases = sorted(n for n, cls in _REGISTRY.items() if cls.can_be_base)
    if isinstance(base, AuxMethod):
        method = base
    elif not isinstance(base, str) or "+" in base:
        raise UnknownAuxError(f"{plugin} base is the name of one method: {', '.join(bases)}; got {base!r}")
    else:
        if base not in _REGISTRY:
            raise UnknownAuxError(f"unknown base {base!r} for {plugin}; choose one of {', '.join(bases)}")
        if not _REGISTRY[base].can_be_base:
            raise UnknownAuxError(f"aux {base!r} cannot be a base for {plugin}; choose one of {', '.join(bases)}")
        unknown = sorted(set(options) - set(_option_names(_REGISTRY[base])))
        if unknown:
            raise UnknownAuxError(
                f"{plugin} with base {base} does not take {unknown}; its options are: "
                f"{', '.join(_option_names(_REGISTRY[plugin]) + _option_names(_REGISTRY[base]))}"
            )
        method = get_aux(base, **options)
    if not method.can_be_base:
        raise UnknownAuxError(f"aux {method.name!r} cannot be a base for {plugin}; choose one of {', '.join(bases)}")
    if options and isinstance(base, AuxMethod):
        raise UnknownAuxError(f"{plugin} does not take {sorted(options)}")
    return method
