"""Cut a block's graph into recompute regions, each run as a checkpoint region.

Recomputing a whole block at once would bring all its activations back together at the start
of its backward: the peak would not drop. Regions end at the model's unit boundaries (a
residual block, a transformer block: :mod:`fxlocal.graph.units`), so backward holds what every region
keeps plus one region's recomputed activations. A unit boundary keeps one tensor live (two where
a unit hands on two), the least a region can keep as its input.

:func:`recomputing_block` returns a GraphModule that computes what the block computes, calling
one submodule per region; the submodules hold the block's own modules and parameters (shared,
not copied), so the block's state_dict and optimizer see no difference. What the block fetches
itself (``get_attr``: buffers, training flags) is read into the runner when it is built:
:func:`runner_key` says when it must be built again.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Hashable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from .recompute import checkpointed
from .split import make_out_of_place

__all__ = ["RecomputedRegion", "recomputing_block", "runner_key"]


class RecomputedRegion(nn.Module):
    """One region of a block, run by :func:`~fxlocal.graph.recompute.checkpointed` under ``policy``."""

    def __init__(self, region: nn.Module, policy: str):
        super().__init__()
        self.region = region
        self.policy = policy

    def forward(self, *args):
        return checkpointed(self.region, *args, policy=self.policy)


def runner_key(block: fx.GraphModule) -> tuple[Hashable, ...]:
    """What a runner built from ``block`` depends on besides its graph: its mode and the values it
    fetches (a buffer replaced by ``.to()``, a training flag), by identity for tensors."""
    fetched = [attrgetter(n.target)(block) for n in block.graph.nodes if n.op == "get_attr"]
    return (block.training, *(id(v) if isinstance(v, torch.Tensor) else repr(v) for v in fetched))


def recomputing_block(block: fx.GraphModule, region_ends: Sequence[str], policy: str) -> fx.GraphModule:
    """``block`` with its nodes grouped into regions, a region ending after each node named in
    ``region_ends`` (names the block does not have are ignored), each region run under
    ``policy`` (see :mod:`fxlocal.graph.recompute`)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(block.graph, {}))
    own = fx.GraphModule(block, graph)
    ends = set(region_ends)
    region_of: dict[fx.Node, int] = {}
    region = 0
    for node in own.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        region_of[node] = region
        if node.name in ends:
            region += 1
    # Ops that write into a value backward recomputes from run out of place here (the block
    # itself is untouched): a region's input (the checkpoint keeps it for the recompute) and,
    # under "cheap", any kept output (a convolution's, then ReLU(inplace=True)).
    modules = dict(own.named_modules())
    present = set(modules)
    for node in own.graph.nodes:
        written = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        crosses = written is not None and region_of.get(written, -1) != region_of.get(node)
        if node in region_of and (policy == "cheap" or crosses):
            make_out_of_place(node, modules)
    for name in modules.keys() - present:
        own.add_submodule(name, modules[name])
    own.recompile()
    runner = split_module(own, own, lambda node: region_of[node], keep_original_order=True)
    for name, submodule in list(runner.named_children()):
        if name.startswith("submod_"):
            setattr(runner, name, RecomputedRegion(submodule, policy))
    return runner.train(block.training)
