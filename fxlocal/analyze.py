"""Find where a traced graph can be cut, and what each piece between cuts costs.

A *cut candidate* is a node after which exactly one tensor value is live: the node's own
output. ``get_attr`` values (parameters, buffers, training flags) are not live values (each block
fetches its own) and neither are shape values (ints, ``torch.Size``), which are carried across a
cut as plain values. One linear sweep over the topological order finds them all. A candidate is
refused when a parameter is used on both sides of it (torchvision's shared modules, tied weights):
cutting there would train one parameter with two local losses.

A *segment* is the run of nodes after one candidate up to and including the next; with ``C``
candidates there are ``C + 1`` segments, the last one ending at the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .cost import Cost, measure_nodes, node_parameters

__all__ = [
    "CutCandidate",
    "GraphAnalysis",
    "analyze",
    "find_cut_candidates",
    "covered_module_paths",
    "tensor_layout",
]

COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class CutCandidate:
    """A node after which the graph can be cut."""

    node: str  # fx node name (stable for the same architecture)
    index: int  # position in the graph's topological order
    module_path: str  # module whose forward produced it, e.g. "layer3.4"
    shape: tuple[int, ...]  # per-sample shape of the single live tensor
    layout: str  # "nchw", "nhwc", "nlc" (tokens) or "nc"
    closes: str | None = None  # the largest module whose last node this is (a natural cut)
    nbytes: int = 0  # per-sample bytes of that tensor


def _tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _holds_tensor(node: fx.Node) -> bool:
    return node.op != "get_attr" and bool(_tensors_in(node.meta.get("val")))


def _param_spans(gm: fx.GraphModule, index: dict[fx.Node, int]) -> list[tuple[int, int]]:
    """(first, last) index of the nodes using each parameter that is used at more than one node.

    A ``get_attr`` parameter is used where its users are; a module's parameters where it is called.
    """
    uses: dict[int, list[int]] = {}
    for node, i in index.items():
        at = [index[u] for u in node.users] if node.op == "get_attr" else [i]
        for p in node_parameters(gm, node):
            uses.setdefault(id(p), []).extend(at)
    return [(min(v), max(v)) for v in uses.values() if min(v, default=0) != max(v, default=0)]


def tensor_layout(node: fx.Node) -> str:
    """How a 2-4D activation is laid out, read from the graph where possible.

    A consumer that fixes the layout decides (a conv or BatchNorm module -> channels first, a
    LayerNorm/Linear on the last dim -> channels last); otherwise square spatial dims decide.
    """
    val = node.meta["val"]
    if val.dim() == 2:
        return "nc"
    if val.dim() == 3:
        return "nlc"
    channels_last = _consumer_says_channels_last(node)
    if channels_last is None:
        _, a, b, c = val.shape
        channels_last = a == b and b != c
    return "nhwc" if channels_last else "nchw"


def _consumer_says_channels_last(node: fx.Node) -> bool | None:
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop(0)
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if user.op == "call_module":
            mod = user.graph.owning_module.get_submodule(user.target)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
                return False
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear)):
                return True
            # a module we do not know (e.g. a leaf block): ask no further
            return None
        if user.op in ("call_function", "call_method") and len(seen) < 4:
            # look through cheap elementwise ops (add, act, dropout) only
            name = getattr(user.target, "__name__", str(user.target))
            if name in ("add", "iadd", "mul", "relu", "gelu", "silu", "dropout", "contiguous"):
                frontier.extend(user.users)
    return None


def find_cut_candidates(gm: fx.GraphModule) -> list[CutCandidate]:
    """Nodes after which exactly one tensor is live, with their module path, shape and layout.

    ``gm`` must come from :func:`fxlocal.trace` (nodes need ``meta["val"]``).
    """
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in order}
    compute_after = [False] * len(order)
    seen_compute = False
    for i in range(len(order) - 1, -1, -1):
        compute_after[i] = seen_compute
        seen_compute = seen_compute or order[i].op in COMPUTE_OPS
    spans = _param_spans(gm, index)
    last_of_module: dict[str, int] = {}
    for i, node in enumerate(order):
        if node.op in COMPUTE_OPS:
            for prefix in _prefixes(node.meta.get("module_path", "")):
                last_of_module[prefix] = i

    live: set[fx.Node] = set()
    dying: dict[int, list[fx.Node]] = {}
    candidates = []
    for i, node in enumerate(order):
        if _holds_tensor(node) and last_use[node] > i:
            live.add(node)
            dying.setdefault(last_use[node], []).append(node)
        for done in dying.pop(i, []):
            live.discard(done)
        if (
            live == {node}
            and node.op in COMPUTE_OPS
            and compute_after[i]
            and isinstance(node.meta["val"], torch.Tensor)
            and node.meta["val"].is_floating_point()
            and 2 <= node.meta["val"].dim() <= 4
            and not any(first <= i < last for first, last in spans)
        ):
            val = node.meta["val"]
            candidates.append(
                CutCandidate(
                    node=node.name,
                    index=i,
                    module_path=node.meta.get("module_path", ""),
                    shape=tuple(int(s) for s in val.shape[1:]),
                    nbytes=val[0].numel() * val.element_size(),
                    layout=tensor_layout(node),
                    closes=next(
                        (p for p in _prefixes(node.meta.get("module_path", "")) if last_of_module[p] == i),
                        None,
                    ),
                )
            )
    return candidates


def _prefixes(path: str) -> list[str]:
    """``"layer1.0.conv1"`` -> ``["layer1", "layer1.0", "layer1.0.conv1"]``."""
    parts = path.split(".") if path else []
    return [".".join(parts[: j + 1]) for j in range(len(parts))]


def covered_module_paths(gm: fx.GraphModule, node_names: set[str]) -> list[str]:
    """The coarsest module paths all of whose nodes lie in ``node_names``, in graph order.

    Turns a block's node set into what a person reads: ``["conv1", "bn1", "layer1", "layer2.0"]``.
    """
    total: dict[str, int] = {}
    inside: dict[str, int] = {}
    ordered: list[str] = []
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        prefixes = _prefixes(node.meta.get("module_path", "")) or [""]
        for prefix in prefixes:
            total[prefix] = total.get(prefix, 0) + 1
            if node.name in node_names:
                if prefix not in inside:
                    ordered.append(prefix)
                inside[prefix] = inside.get(prefix, 0) + 1
    covered = [p for p in ordered if inside[p] == total[p]]
    # keep only maximal prefixes: drop a path whose parent is covered too
    covered_set = set(covered)
    result = []
    for p in covered:
        parts = p.split(".")
        if any(".".join(parts[:j]) in covered_set for j in range(1, len(parts))):
            continue
        if p == "" and len(covered_set) > 1:
            continue
        result.append(p or "<root>")
    return result


@dataclass
class GraphAnalysis:
    """Cut candidates and the cost of each segment between them (``len(candidates) + 1``)."""

    candidates: list[CutCandidate]
    segment_costs: list[Cost]
    segment_nodes: list[list[str]]
    input_size: tuple[int, ...]
    units: list = field(default_factory=list)  # list[fxlocal.units.Unit]

    @property
    def max_k(self) -> int:
        return len(self.candidates) + 1


def analyze(gm: fx.GraphModule, input_size: tuple[int, ...]) -> GraphAnalysis:
    """Cut candidates of ``gm`` and the per-sample training cost of every segment."""
    candidates = find_cut_candidates(gm)
    node_costs = measure_nodes(gm, input_size)
    cut_at = {c.index for c in candidates}
    segments: list[list[str]] = [[]]
    costs: list[Cost] = [Cost()]
    for i, node in enumerate(gm.graph.nodes):
        if node.op not in ("placeholder", "output"):
            segments[-1].append(node.name)
            costs[-1] = costs[-1] + node_costs[node.name]
        if i in cut_at:
            segments.append([])
            costs.append(Cost())
    from .units import find_units  # units build on candidates

    return GraphAnalysis(candidates, costs, segments, tuple(input_size), find_units(gm, candidates))
