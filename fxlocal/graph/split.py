"""Split a traced graph at cut nodes into K gradient-isolated block GraphModules.

Contract of :func:`split_graph`:

* block ``b`` holds the nodes after cut ``b-1`` up to and including cut ``b``; its modules and
  parameters are the original objects (shared, never copied);
* a block takes what crosses into it: the cut tensor first, then the tensor the cut carries
  beside it, if any (``carries``; see :class:`~fxlocal.graph.candidates.CutCandidate`), then any plain
  values computed earlier (shapes, ints). Non-last blocks return a tuple
  ``(tensor, *values)``; the last block returns what the model returns. The blocks stay
  connectable: :class:`~fxlocal.LocalModel` detaches the tensors at every boundary, and aux
  methods that re-run earlier blocks (MLAAN's cascade) chain them without;
* ``get_attr`` values (parameters, buffers, training flags) are fetched inside the block that
  uses them: passing a parameter in as an input and detaching it would silently freeze it;
  tensors computed from parameters, buffers and plain values alone (a rotary table) are
  recomputed inside every block that uses them, from the plain values that cross
  (:func:`~fxlocal.graph.candidates.recomputable_values`); the parameters such a table is made from are
  then *tied*: held by each of those blocks, and trained by each one's local loss;
* ops that consume a block's input in place (``relu_``, ``inplace=True``, ``+=``) are rewritten
  out of place, because the tensor they would overwrite is still the previous block's output;
* any other parameter used by two blocks raises :class:`SharedParameterError`.
"""

from __future__ import annotations

import copy
import inspect
import operator
from operator import attrgetter
from typing import Any

import torch
import torch.fx as fx

from ..errors import PlanMismatchError, SharedParameterError
from .candidates import holds_tensor, recomputable_values
from .cost import node_parameters

__all__ = ["make_out_of_place", "split_graph"]

_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}




def _block_of(gm: fx.GraphModule, cuts: list[str], fetched: set[fx.Node]) -> dict[fx.Node, int]:
    """Block index of every node; -1 for ``fetched`` ones, which each block makes for itself."""
    names = {n.name: n for n in gm.graph.nodes}
    missing = [c for c in cuts if c not in names]
    if missing:
        raise PlanMismatchError(
            f"the plan cuts at {missing[0]!r}, which this graph does not have; "
            "re-run the partition for this model and input size"
        )
    cut_set = set(cuts)
    block, owner = 0, {}
    for node in gm.graph.nodes:
        owner[node] = -1 if node in fetched else block
        if node.name in cut_set:
            block += 1
    if block != len(cuts):
        raise PlanMismatchError("the plan's cuts are not in graph order")
    return owner


def make_out_of_place(node: fx.Node, modules: dict[str, Any]) -> None:
    """Rewrite ``node`` (in a block graph) so that it does not write into its inputs; a module
    called in place is replaced by an out-of-place copy added to ``modules``."""
    if node.op == "call_function" and node.target in _OUT_OF_PLACE:
        node.target = _OUT_OF_PLACE[node.target]
    elif node.op == "call_method" and node.target.endswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and hasattr(torch, name[:-1]):
            node.target = getattr(torch, name[:-1])
            return
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return
        if bound.arguments.get("inplace") is True:
            bound.arguments["inplace"] = False
            node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
    elif node.op == "call_module":
        module = modules[node.target]
        if getattr(module, "inplace", False) is True:
            safe = copy.copy(module)  # shares parameters; only the flag differs
            safe.inplace = False
            new_target = f"{node.target}.out_of_place".replace(".", "_")
            modules[new_target] = safe
            node.target = new_target


def split_graph(gm: fx.GraphModule, cuts: list[str], carries: dict[str, str] | None = None) -> list[fx.GraphModule]:
    """Split ``gm`` into one GraphModule per block (see the module docstring).

    Args:
        gm: the traced graph.
        cuts: the nodes to cut after, in graph order.
        carries: cut node -> the second tensor that cut carries across, where it carries one.

    Returns:
        The K blocks; each takes what the one before hands on (detached by the LocalModel).
    """
    carries = carries or {}
    order = list(gm.graph.nodes)
    recomputed = recomputable_values(gm)
    fetched = {n for n in order if n.op == "get_attr"} | recomputed
    owner = _block_of(gm, cuts, fetched)
    k = len(cuts) + 1
    needed_in: dict[fx.Node, list[int]] = {}

    def blocks_needing(node: fx.Node) -> list[int]:
        # a fetched user is made where it is used, so this value is needed there
        if node not in needed_in:
            needed_in[node] = [
                k - 1 if u.op == "output" else owner[u] if u not in fetched else max(blocks_needing(u), default=-1)
                for u in node.users
            ]
        return needed_in[node]

    # Values defined in a block <= b and used in a block > b cross boundary b.
    crossing: list[list[fx.Node]] = [[] for _ in range(k - 1)]
    for node in order:
        if node in fetched or node.op == "output":
            continue
        last = max(blocks_needing(node), default=owner[node])
        for b in range(owner[node], last):
            crossing[b].append(node)
    for b, cut in enumerate(cuts):
        # the cut tensor travels first, then the one it carries; anything else must be a plain value (a shape)
        crossing[b].sort(key=lambda n: (n.name != cut, n.name != carries.get(cut)))
        for node in crossing[b][1 + (cut in carries):]:
            if isinstance(node.meta.get("val"), torch.Tensor):
                raise PlanMismatchError(
                    f"cut {cut!r} leaves tensor {node.name!r} live as well; it is not a cut candidate"
                )

    blocks = []
    for b in range(k):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        modules: dict[str, Any] = {}
        inputs = [n for n in order if n.op == "placeholder"] if b == 0 else crossing[b - 1]
        for node in inputs:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env and n in fetched:  # made where used
                env[n] = graph.node_copy(n, lookup)
                if n.op == "get_attr":
                    modules[n.target] = attrgetter(n.target)(gm)
                elif n.op == "call_module":
                    modules[n.target] = gm.get_submodule(n.target)
            return env[n]

        for node in order:
            if owner[node] != b or node.op in ("placeholder", "output"):
                continue
            new = graph.node_copy(node, lookup)
            if new.op == "call_module":
                modules[new.target] = gm.get_submodule(new.target)
            env[node] = new
        if b < k - 1:
            graph.output(tuple(env[n] for n in crossing[b]))
        else:
            out = next(n for n in order if n.op == "output")
            graph.output(torch.fx.map_arg(out.args[0], lookup))
        if b > 0:
            for tensor in crossing[b - 1][: 1 + (cuts[b - 1] in carries)]:
                for user in list(env[tensor].users):
                    make_out_of_place(user, modules)
        graph.lint()
        blocks.append(fx.GraphModule(modules, graph, class_name=f"Block{b}"))
    # parameters the recomputed tables are made from, and nothing else (reading a plain value
    # off one, ``weight.dtype``, passes no gradient)
    tied = {
        id(p)
        for n in fetched
        if n in recomputed or all(u in recomputed or not holds_tensor(u) for u in n.users)
        for p in node_parameters(gm, n)
    }
    _check_no_shared_parameters(blocks, tied)
    return blocks


def _check_no_shared_parameters(blocks: list[fx.GraphModule], tied: set[int]) -> None:
    """Raise unless every parameter two blocks hold is one of ``tied`` (the recomputed tables')."""
    first_seen: dict[int, tuple[int, str]] = {}
    for b, block in enumerate(blocks):
        for name, p in block.named_parameters(remove_duplicate=True):
            if id(p) in first_seen and first_seen[id(p)][0] != b and id(p) not in tied:
                other, other_name = first_seen[id(p)]
                raise SharedParameterError(
                    f"parameter {name!r} is used by block {other} ({other_name}) and block {b}; "
                    "choose cuts that keep the module that owns it in one block"
                )
            first_seen.setdefault(id(p), (b, name))
