"""MLAAN (Zhang et al., arXiv 2406.16633): multilaminar local modules (MLM) + LAM's EMA twins.

For block ``b`` the local loss is ``w_x·CE(independent(x_b)) + w_y·CE(cascade)``:

* *independent*: pool + Linear on the block's own output (a small conv1×1 stem first when the
  map is narrow);
* every pool + Linear (the independent head and the chain's end) has a BatchNorm1d between the
  two (``pool_norm``, default on; the reference has none, ``pool_norm=False``: without it the
  last stage's chains diverge at lr 0.1 without warm-up, measured in ``docs/accuracy.md``);
* *cascade*: the same output (the reference's second stream re-runs the blocks to the same
  values), with a loss that also trains the previous ``span - 1`` blocks
  (``StepContext.run_cascaded``: their share of the gradient comes from recomputing them one
  at a time, so the cascade never holds more than one block's graph); then an
  augmented chain of fresh copies of later units — the "leap" to the first unit of every later
  stage, then the last unit (``leap_chain``), so earlier blocks get longer chains — then
  pool + Linear. The reference hand-writes these chains per net and K (ResNet-101 on ImageNet:
  4, 3 and 2 units from the first three stages, as here; on CIFAR it makes them up to 4 units,
  ``fill=True``); we derive them from the graph's units and stages;
* *LAM*: a frozen EMA twin of the live backbone unit that the chain's first copy mirrors runs
  beside that copy (their outputs add) and is updated after the block's backward.

MLAAN is a plug-in: its paper reports DGL+MLAAN and InfoPro+MLAAN, where both paths end in the
base method's head instead of pool + Linear (``--aux dgl+mlaan``, ``--aux infopro+mlaan``, or
``base=``; the options MLAAN does not take are the base's).

The last block's loss is the model's own, cascaded the same way (the reference computes the
x-path loss there and overwrites it with the y-path loss, a bug we do not copy: both count;
on one output they are one loss, backpropagated once).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch
from torch import nn

from ..errors import FxLocalError, UnknownAuxError
from ..graph.cost import Cost, measure_module
from ..graph.replace import materialised_copy
from .adapters import make_adapter, make_tensors_adapter
from .auglocal import sampled_units
from .base import AuxHead, AuxMethod, HeadSpec, get_base, head_loss, register_aux
from .ema import EMATwin, ParallelSum, twin_cost
from .joint import JointHead, one_per_tensor
from .recompute import checked_flag, forward_flops, recomputed_cost
from .unit_copies import UnitChain, handed_on

__all__ = ["leap_chain", "PoolLinear", "MLAAN"]


def leap_chain(hidden: int, stages: list[int], length: int = 4, fill: bool = False) -> list[int]:
    """Units MLAAN's augmented chain copies for hidden unit ``hidden`` (``stages[u]`` = stage of u).

    Outside the last stage: the first unit of each later stage (the leaps), then the last unit,
    so a unit ``n`` stages before the last gets ``n + 1`` copies, at most ``length`` (then the
    first ``length - 1`` leaps) — the reference's ImageNet chains. With ``fill``, units sampled
    uniformly after the last leap make up ``length`` — its CIFAR chains. In the last stage: up to
    ``length - 1`` of the remaining units, sampled uniformly, ending at the last one.
    """
    last = len(stages) - 1
    if hidden >= last:
        return []
    if stages[hidden] == stages[-1]:
        return sampled_units(hidden, len(stages), max(1, min(length - 1, last - hidden)))
    leaps = [u for u in range(hidden + 1, last + 1) if stages[u] != stages[u - 1] and stages[u] > stages[hidden]]
    if not fill:
        return [u for u in leaps[: length - 1] if u != last] + [last]
    leaps = leaps[: max(1, length - 1)]
    rest = length - len(leaps)
    return leaps + (sampled_units(leaps[-1], len(stages), rest) if rest > 0 and leaps[-1] < last else [])


@lru_cache(maxsize=None)
def pool_linear_cost(shape: tuple[int, ...], layout: str, num_classes: int, narrow_width: int, norm: bool) -> Cost:
    """What training a :class:`PoolLinear` on ``shape`` costs, per sample: built on the meta device
    and measured once per structure (every cut of a stage gets the same one)."""
    with torch.device("meta"):
        head = PoolLinear(shape, layout, num_classes, narrow_width, norm)
    return measure_module(head, shape)


class PoolLinear(nn.Module):
    """Global average pool + Linear, with two conv1×1 first when the map is narrow; with ``norm``
    a BatchNorm1d between the pool and the Linear."""

    def __init__(self, shape: tuple[int, ...], layout: str, num_classes: int, narrow_width: int = 64, norm: bool = False):
        super().__init__()
        channels = shape[0] if layout == "nchw" else shape[-1]
        stem: list[nn.Module] = []
        if layout in ("nchw", "nhwc") and channels < narrow_width:
            if layout == "nhwc":
                stem.append(make_adapter(shape, "nhwc", (channels, *shape[:-1]), "nchw"))
                shape, layout = (channels, *shape[:-1]), "nchw"
            stem += [nn.Conv2d(channels, narrow_width, 1, bias=False), nn.BatchNorm2d(narrow_width), nn.ReLU()]
            stem += [nn.Conv2d(narrow_width, narrow_width, 1, bias=False), nn.BatchNorm2d(narrow_width), nn.ReLU()]
            channels, shape = narrow_width, (narrow_width, *shape[1:])
        pool = make_adapter(shape, layout, (channels,), "nc")  # pooling only: same width
        self.layers = nn.Sequential(*stem, pool, *([nn.BatchNorm1d(channels)] if norm else []), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.layers(x)


class MLAANHead(AuxHead):
    owns_loss = True
    # local_loss backpropagates its block twice: the independent part at once (backward_now),
    # then the cascade's, which must not reach the earlier blocks
    backpropagates_block_twice = True

    def __init__(self, independent: nn.Module, cascade: nn.Module, cascade_head: nn.Module, span: int, wx: float,
                 wy: float, summary: str, update_twins: bool = True, chain_units: tuple[str, ...] = ()):
        super().__init__()
        self.chain_units = chain_units  # names of the units the cascade's chain copies, in order
        self.independent = independent
        self.cascade = cascade  # the chain of unit copies
        self.cascade_head = cascade_head  # the head it ends in
        self.needs_model_input = any(isinstance(h, AuxHead) and h.needs_model_input for h in (independent, cascade_head))
        self.input_window = span
        self.wx, self.wy = wx, wy
        self.summary = summary
        self.update_twins = update_twins  # False: the twin keeps its starting weights (ema_twins="last")

    def forward(self, *tensors):
        """The cascaded path's logits for a block output (evaluation)."""
        return self.cascade_head(*handed_on(self.cascade(*tensors)))

    def local_loss(self, ctx, b: int, out):
        # the x path is backpropagated before the cascade's chain runs on the same output
        weighted_x = ctx.backward_now(self.wx * head_loss(self.independent, ctx, b, out)[0])
        z = ctx.run_cascaded(max(0, b - self.input_window + 1), b, out)
        loss_y, logits = head_loss(self.cascade_head, ctx, b, self.cascade(*handed_on(z)))
        return weighted_x + ctx.backward_cascaded(self.wy * loss_y), logits

    def after_backward(self) -> None:
        if not self.update_twins:
            return
        for m in self.modules():
            if isinstance(m, EMATwin):
                m.update()


class WithoutOwnLoss(AuxHead):
    """The head of a block that has no loss of its own (the reference's first block on CIFAR):
    the block is trained only by the next block's cascade. Its logits are zeros."""

    owns_loss = True

    def __init__(self, num_classes: int, summary: str):
        super().__init__()
        self.num_classes = num_classes
        self.summary = summary

    def forward(self, *tensors):
        return tensors[0].new_zeros(tensors[0].shape[0], self.num_classes)

    def local_loss(self, ctx, b: int, out):
        logits = self(*handed_on(out))
        return logits.new_zeros(()), logits


class CascadedFinalLoss(AuxHead):
    """The last block's loss: its own output and the cascaded re-run both through the model head."""

    owns_loss = True

    def __init__(self, span: int, wx: float, wy: float):
        super().__init__()
        self.input_window = span
        self.wx, self.wy = wx, wy

    def local_loss(self, ctx, b: int, out):
        y_out = ctx.run_cascaded(max(0, b - self.input_window + 1), b, out)
        if y_out is out:  # training: both paths are the model's loss on this output, one backward
            total = self.wx + self.wy
            return ctx.backward_cascaded(total * ctx.criterion(out, ctx.target), input_share=self.wy / total), out
        return self.wx * ctx.criterion(out, ctx.target) + self.wy * ctx.criterion(y_out, ctx.target), out


@register_aux("mlaan")
class MLAAN(AuxMethod):
    cuts_at_units = True
    takes_base = True
    backpropagates_blocks_twice = MLAANHead.backpropagates_block_twice

    def __init__(
        self,
        span: int = 2,
        wx: float = 0.001,
        wy: float = 0.999,
        momentum: float = 0.995,
        chain_length: int = 4,
        narrow_width: int = 64,
        fill: bool = False,
        recompute: bool = False,
        pool_norm: bool = True,
        ema_twins: str = "all",
        copy_init: str = "fresh",
        blocks_without_own_loss: int = 0,
        chains: dict[str, list[str]] | None = None,
        base: str | AuxMethod | None = None,
        **base_options,
    ):
        if span < 1 or chain_length < 1:
            raise FxLocalError(f"span and chain_length must be at least 1, got {span} and {chain_length}")
        if ema_twins not in ("all", "last"):
            raise FxLocalError(f"mlaan ema_twins is 'all' or 'last', got {ema_twins!r}")
        if copy_init not in ("fresh", "backbone"):
            raise FxLocalError(f"mlaan copy_init is 'fresh' or 'backbone', got {copy_init!r}")
        if not isinstance(blocks_without_own_loss, int) or blocks_without_own_loss < 0:
            raise FxLocalError(f"mlaan blocks_without_own_loss is a count of blocks, got {blocks_without_own_loss!r}")
        if chains is not None and not (isinstance(chains, dict) and all(isinstance(v, list) for v in chains.values())):
            raise FxLocalError("mlaan chains maps the unit a block ends at to the list of units its chain copies")
        if blocks_without_own_loss and span < 2:
            raise FxLocalError("mlaan blocks_without_own_loss needs span >= 2: only the next block's cascade trains them")
        if base is None and base_options:
            raise UnknownAuxError(f"aux 'mlaan' does not take {sorted(base_options)}: give a base (dgl+mlaan, infopro+mlaan) for its options")
        # the head both paths end in: pool + Linear (None, the paper's MLAAN alone) or a base method's
        self.base = None if base is None else get_base("mlaan", base, **base_options)
        self.span, self.wx, self.wy = span, wx, wy
        self.momentum, self.chain_length, self.narrow_width = momentum, chain_length, narrow_width
        self.fill = fill  # chains made up to chain_length, as the reference's CIFAR ones (see leap_chain)
        self.recompute = checked_flag(recompute)  # the chain's copies recomputed in backward (see .recompute)
        self.pool_norm = checked_flag(pool_norm, "pool_norm")
        # The reference's CIFAR code updates only the last block's EMA twin ("last"; the paper: all)
        self.ema_twins = ema_twins
        # Chain copies start re-initialised ("fresh") or as the initialised backbone units ("backbone",
        # the reference's deep copies)
        self.copy_init = copy_init
        # The first blocks with no loss of their own, trained by the next block's cascade only
        # (the reference: 1 on CIFAR, 2 on ImageNet)
        self.blocks_without_own_loss = blocks_without_own_loss
        # The unit a block ends at -> the units its chain copies (the reference's hand-written
        # tables, by unit name); None: derived from the graph's stages (leap_chain)
        self.chains = chains

    @property
    def input_window(self) -> int:
        return self.span

    @property
    def heads_vary_by_block(self) -> bool:
        # the first blocks' heads (no loss of their own) cost almost nothing
        return self.blocks_without_own_loss > 0 or (self.base is not None and self.base.heads_vary_by_block)

    @property
    def reconstructs_input(self) -> bool:
        return self.base is not None and self.base.reconstructs_input

    def chain(self, spec: HeadSpec) -> list[int]:
        if spec.units is None or spec.unit is None:
            raise FxLocalError("mlaan heads copy units: the cut must be at a unit boundary")
        if self.chains is None:
            return leap_chain(spec.unit, [u.stage for u in spec.units.units], self.chain_length, self.fill)
        return self._table_chain(spec)

    def _table_chain(self, spec: HeadSpec) -> list[int]:
        """The units ``chains`` names for the block ending at ``spec.unit``, checked against the graph."""
        units = spec.units.units
        end = units[spec.unit].name
        if end not in self.chains:
            raise FxLocalError(
                f"mlaan chains has no entry for block {spec.block}, which ends at unit {end!r}: "
                "give one for every block but the last"
            )
        index = {u.name: u.index for u in units}
        unknown = [name for name in self.chains[end] if name not in index]
        if unknown:
            raise FxLocalError(f"mlaan chains[{end!r}] names {unknown[0]!r}, not a unit of this model; units: {', '.join(index)}")
        picks = [index[name] for name in self.chains[end]]
        if not picks or picks != sorted(set(picks)) or picks[0] <= spec.unit:
            raise FxLocalError(f"mlaan chains[{end!r}] must list units after {end!r}, in order, each once")
        return picks

    def _copy(self, library, u: int) -> nn.Module:
        return library.fresh_unit(u) if self.copy_init == "fresh" else materialised_copy(library.live(u))

    def build_head(self, spec: HeadSpec) -> nn.Module:
        if spec.block < self.blocks_without_own_loss:
            return WithoutOwnLoss(spec.num_classes, f"MLAAN: no loss of its own; trained by block {spec.block + 1}'s cascade")
        library = spec.units
        picks = self.chain(spec)
        stages: list[nn.Module] = []
        tensors = spec.tensors
        for i, u in enumerate(picks):
            adapter = make_tensors_adapter(tensors, library.units[u - 1].tensors)
            if not isinstance(adapter, nn.Identity):
                stages.append(adapter)
            stage = self._copy(library, u)
            if i == 0:  # LAM: the frozen EMA twin of the live unit, beside the first copy
                stage = ParallelSum(stage, EMATwin(library.pieces[u], self.momentum), recompute=self.recompute)
            stages.append(stage)
            tensors = library.units[u].tensors
        end = self._end_head(spec, tensors)
        names = ", ".join(library.units[u].name for u in picks)
        first = max(0, spec.block - self.span + 1)
        summary = (
            f"MLAAN: independent pool→fc + cascade re-running blocks {first}..{spec.block} → units {picks} "
            f"({names}), EMA twin on unit {picks[0]} (m={self.momentum}) → {self._end_name(end)}; "
            f"loss {self.wx}·x + {self.wy}·y" + ("; chain recomputed in backward" if self.recompute else "")
        )
        update_twins = self.ema_twins == "all" or spec.block == spec.num_blocks - 2
        if not update_twins:
            summary += "; twin not updated (ema_twins=last)"
        independent = self._end_head(spec, spec.tensors)
        if self.base is not None:
            summary = summary.replace("independent pool→fc", f"independent {self._end_name(independent)}")
        cascade = UnitChain(stages, recompute=self.recompute)
        chain_units = tuple(library.units[u].name for u in picks)
        return MLAANHead(independent, cascade, end, self.span, self.wx, self.wy, summary, update_twins, chain_units)

    def _end_head(self, spec: HeadSpec, tensors) -> nn.Module:
        """The head a path ends in, on each tensor handed on (their logits averaged where there
        are two): pool + Linear, or the base method's."""
        if self.base is None:
            heads = [PoolLinear(shape, layout, spec.num_classes, self.narrow_width, self.pool_norm) for shape, layout in tensors]
        else:
            heads = [self.base.build_head(spec.on(shape, layout)) for shape, layout in tensors]
        return one_per_tensor(heads)

    def _end_name(self, head: nn.Module) -> str:
        if self.base is None:
            return "pool→fc"
        return head.describe(self.base.describe) if isinstance(head, JointHead) else self.base.describe(head)

    def final_objective(self) -> nn.Module:
        return CascadedFinalLoss(self.span, self.wx, self.wy)

    def head_cost(self, spec: HeadSpec) -> Cost:
        """The cascade's chain (:meth:`chain_cost`) and the independent head
        (:meth:`first_part_cost`): the latter's activations are freed by its backward before
        the chain runs, so the two hold theirs one at a time."""
        if spec.block < self.blocks_without_own_loss:
            return Cost()
        chain, independent = self.chain_cost(spec), self.first_part_cost(spec)
        return replace(chain + independent, activation_bytes=max(chain.activation_bytes, independent.activation_bytes))

    def chain_cost(self, spec: HeadSpec) -> Cost:
        """The copies cost what the units they copy cost, the EMA twin beside the first what
        :func:`twin_cost` says, the pool→fc head what it measures. Recomputed, each copy's and
        the twin's forward runs again."""
        picks = self.chain(spec)
        copies = [spec.units.unit_costs[u] for u in picks]
        twin = twin_cost(copies[0])
        if self.recompute:
            # the twin's forward is the first copy's again
            forward = forward_flops([*copies, copies[0]])
            # the last copy's output goes to the end head, outside the recomputed chain: what that
            # head keeps of it is in its own measured cost
            kept = spec.units.chain_kept_bytes(spec.tensors, picks) - spec.units.handed_bytes(picks[-1])
            chain = recomputed_cost([*copies, twin], forward, kept)
        else:
            chain = sum(copies, twin)
        return chain + self._end_cost(spec, spec.units.units[picks[-1]].tensors)

    def first_part_cost(self, spec: HeadSpec) -> Cost:
        """The independent head, whose backward keeps the block's graph for the cascade's. On a
        narrow map it is not negligible: it starts with two conv1×1 to ``narrow_width``
        channels at full resolution (on ResNet-32's 16-channel maps it saves twice what the
        cascade's chain does)."""
        if spec.block < self.blocks_without_own_loss:
            return Cost()
        return self._end_cost(spec, spec.tensors)

    def _end_cost(self, spec: HeadSpec, tensors) -> Cost:
        if self.base is None:
            return sum((pool_linear_cost(tuple(shape), layout, spec.num_classes, self.narrow_width, self.pool_norm)
                        for shape, layout in tensors), Cost())
        return sum((self.base.head_cost(spec.on(shape, layout)) for shape, layout in tensors), Cost())

    def describe(self, head: nn.Module) -> str:
        return head.summary
