"""Aux-head methods, by name. Each method registers itself with :func:`register_aux`.

A method builds the head that trains block ``b`` from what is known at its cut
(:class:`HeadSpec`: the boundary tensor's per-sample shape and layout, the class count). The
last block keeps the model's own head, so methods build K-1 heads.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

from torch import nn

from ..errors import UnknownAuxError
from .unit_copies import UnitLibrary

__all__ = ["AuxMethod", "HeadSpec", "UnitLibrary", "register_aux", "get_aux", "available_aux"]


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

    @property
    def tensors(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """(shape, layout) of every tensor crossing the cut: its own, then the carried one."""
        return ((self.shape, self.layout), *self.carried)


class AuxMethod(Protocol):
    name: str
    # Methods that copy units need their cuts at unit boundaries.
    cuts_at_units: bool
    # Methods whose head at a cut depends on the block it trains (balance prices each block's).
    heads_vary_by_block: bool
    # Methods whose heads backpropagate their block twice per step (MLAAN): a block recomputed
    # with backbone_recompute="cheap" (selective checkpointing) allows one backward only. The
    # first backward keeps the block's graph; such a method says what its head's first part
    # holds through it: ``first_part_cost(spec) -> Cost`` (balance="memory" prices it).
    backpropagates_blocks_twice: bool
    # How many blocks' inputs a block's loss runs from: above 1, it also trains the blocks
    # before it, which backward re-runs (MLAAN's cascade; balance="memory" prices the re-run).
    input_window: int

    def build_head(self, spec: HeadSpec) -> nn.Module: ...

    def describe(self, head: nn.Module) -> str: ...


_REGISTRY: dict[str, Callable[[], AuxMethod]] = {}


def register_aux(name: str):
    """Class decorator: make an aux method available under ``name``."""

    def wrap(cls):
        cls.name = name
        cls.cuts_at_units = getattr(cls, "cuts_at_units", False)
        cls.heads_vary_by_block = getattr(cls, "heads_vary_by_block", False)
        cls.backpropagates_blocks_twice = getattr(cls, "backpropagates_blocks_twice", False)
        cls.input_window = getattr(cls, "input_window", 1)
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_aux() -> list[str]:
    return sorted(_REGISTRY)


def get_aux(name: str, **options) -> AuxMethod:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownAuxError(f"unknown aux method {name!r}{hint}; choose one of {', '.join(available_aux())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "self"]
        raise UnknownAuxError(
            f"aux {name!r} does not take {sorted(options)}; its options are: {', '.join(accepted) or 'none'}"
        ) from exc


# Methods register on import.
from . import auglocal, dgl, man, mlaan, none  # noqa: E402,F401
