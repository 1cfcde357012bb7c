"""AugLocal (Ma et al., ICLR 2024): each block's aux net is a chain of fresh copies of units
*sampled uniformly from the rest of the network*, ending with a copy of the model's own head.

For the hidden unit ``j`` of ``L`` units and depth ``d``, the sampled units are
``[round(j + (L-j-1)/d * i) for i in 1..d]`` (Python's round, half to even), or all later units
when ``d >= L-1-j``; the last pick is always the last unit. Depth shrinks with the block index
on a pyramidal schedule (``pyramid_depths``). Unlike the reference, which rebuilds CIFAR
BasicBlocks and infers strides from channel doubling, the copies here are taken from the traced
graph, so any model works; where a tensor does not fit the next copy an adapter decided from
the real shapes is inserted (``adapters.make_adapter``).
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import FxLocalError
from ..graph.cost import Cost
from .adapters import make_tensors_adapter
from .base import AuxMethod, HeadSpec, register_aux
from .recompute import checked_flag, forward_flops, recomputed_cost
from .unit_copies import UnitChain

__all__ = ["sampled_units", "pyramid_depths", "he_initialised", "AugLocal"]


def sampled_units(hidden: int, num_units: int, depth: int) -> list[int]:
    """Units sampled for the aux net of hidden unit ``hidden`` (of ``num_units``) at ``depth``."""
    j, last = hidden, num_units - 1
    if depth >= last - j:
        return list(range(j + 1, num_units))
    return [round(j + (last - j) / depth * i) for i in range(1, depth + 1)]


def pyramid_depths(num_aux: int, depth: int, tau: float = 0.5) -> list[int]:
    """Depth of each of ``num_aux`` aux nets: ``max(1, round(d(1 - iτ/(n-1)) + iτ/(n-1)))``.

    The reference's ``K' - 2`` is ``num_aux - 1`` here (it has ``K' - 1`` aux nets). ``tau=0``
    keeps every depth at ``depth``.
    """
    if num_aux <= 1:
        return [depth] * num_aux
    step = tau / (num_aux - 1)
    return [max(1, round(depth * (1 - i * step) + i * step)) for i in range(num_aux)]


def he_initialised(module: nn.Module) -> nn.Module:
    """Every convolution of ``module`` drawn from normal(0, sqrt(2/n)), n = kernel area × output
    channels (the reference's init), every BatchNorm at weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


@register_aux("auglocal")
class AugLocal(AuxMethod):
    cuts_at_units = True
    heads_vary_by_block = True  # pyramidal depth: a later block's head copies fewer units

    def __init__(self, aux_depth: int = 3, pyramid: float = 0.5, recompute: bool = False, init: str = "pytorch"):
        if init not in ("pytorch", "he"):
            raise FxLocalError(f"auglocal init is 'pytorch' or 'he', got {init!r}")
        # How the copies' convolutions start: PyTorch's defaults, or normal(0, sqrt(2/n)) with
        # n = kernel area × output channels ("he", the reference's)
        self.init = init
        if aux_depth < 1:
            raise FxLocalError(f"aux_depth must be at least 1, got {aux_depth}")
        if not 0 <= pyramid <= 1:
            raise FxLocalError(f"pyramid (tau) must be between 0 and 1, got {pyramid}")
        self.aux_depth = aux_depth
        self.pyramid = pyramid
        self.recompute = checked_flag(recompute)  # the copies recomputed in backward (see .recompute)

    def picks(self, spec: HeadSpec) -> list[int]:
        if spec.units is None or spec.unit is None:
            raise FxLocalError("auglocal heads copy units: the cut must be at a unit boundary")
        depths = pyramid_depths(max(spec.num_blocks - 1, 1), self.aux_depth, self.pyramid)
        return sampled_units(spec.unit, len(spec.units), depths[min(spec.block, len(depths) - 1)])

    def build_head(self, spec: HeadSpec) -> nn.Module:
        library = spec.units
        picks = self.picks(spec)
        stages: list[nn.Module] = []
        tensors, adapters = spec.tensors, 0
        for u in picks + [None]:  # None: the model's own head, after the last unit
            want = library.units[u - 1] if u is not None else library.units[-1]
            adapter = make_tensors_adapter(tensors, want.tensors)
            if not isinstance(adapter, nn.Identity):
                stages.append(adapter)
                adapters += 1
            if u is None:
                stages.append(library.fresh_tail())
            else:
                stages.append(he_initialised(library.fresh_unit(u)) if self.init == "he" else library.fresh_unit(u))
                tensors = library.units[u].tensors
        head = UnitChain(stages, recompute=self.recompute)
        names = ", ".join(library.units[u].name for u in picks)
        head.summary = (
            f"AugLocal d={len(picks)}: copies units {picks} ({names})"
            + (f" + {adapters} adapter{'s' * (adapters > 1)}" if adapters else "")
            + " → model head"
            + ("; recomputed in backward" if self.recompute else "")
        )
        return head

    def head_cost(self, spec: HeadSpec) -> Cost:
        """The copies cost what the units they copy cost (adapters are negligible); recomputed,
        their forward runs again."""
        library = spec.units
        picks = self.picks(spec)
        copies = [*(library.unit_costs[u] for u in picks), library.tail_cost]
        if not self.recompute:
            return sum(copies, Cost())
        return recomputed_cost(copies, forward_flops(copies), library.chain_kept_bytes(spec.tensors, picks, tail=True))

    def describe(self, head: nn.Module) -> str:
        return head.summary
