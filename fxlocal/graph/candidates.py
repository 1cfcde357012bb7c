"""Find where a traced graph can be cut: its cut candidates.

A *cut candidate* is a node after which exactly one tensor value is live: the node's own
output. ``get_attr`` values (parameters, buffers, training flags) are not live values (each block
fetches its own) and neither are shape values (ints, ``torch.Size``), which are carried across a
cut as plain values, nor tensors computed from parameters, buffers and shape values alone (a ViT's
rotary table, built from the patch grid and a frequency buffer or from learned frequencies; a
position bias made by a small MLP): each block that uses one recomputes it
(:func:`recomputable_values`), and a parameter it is made from is then *tied* between those
blocks (each block's local loss trains it; see :class:`~fxlocal.LocalModel`). One linear sweep
over the topological order finds them all. A candidate is refused when a parameter is used on
both sides of it on the way from the input (torchvision's shared modules, tied weights): cutting
there would cut through the blocks that share it, and when its tensor does not have
the batch first (EfficientViM stacks its per-stage logits as (heads, B, classes)): aux heads,
unit copies and per-sample costs all read dim 0 as the batch, and a head there would mix samples.

Where two branches run side by side from one block to the next (CrossViT's two token streams,
the two cell inputs of NASNet), no point leaves a single tensor live; there a block's last node
is a candidate that *carries* the one other live tensor across the cut as well
(:attr:`CutCandidate.carried`): both are detached, and a head is trained on both (on the other
only in a block that computes it: EDSR's long skip, carried across every cut, is computed in the
first). Not where the
other tensor is a skip that the enclosing block itself still uses (a residual block's identity,
an inception block's input): that would cut the block in two.

"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import FxLocalError
from .atoms import has_parameterised_children
from .cost import node_parameters
from .trace import values_at_batch

__all__ = [
    "CarriedTensor",
    "CutCandidate",
    "find_cut_candidates",
    "recomputable_values",
    "covered_module_paths",
    "tensor_layout",
    "hands_on_carried",
]

COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class CarriedTensor:
    """A second tensor live at a cut, carried across it beside the cut node's own."""

    node: str
    shape: tuple[int, ...]  # per sample
    layout: str
    index: int = -1  # its node's position in the graph's topological order (where it is computed)


@dataclass(frozen=True)
class CutCandidate:
    """A node after which the graph can be cut."""

    node: str  # fx node name (stable for the same architecture)
    index: int  # position in the graph's topological order
    module_path: str  # module whose forward produced it, e.g. "layer3.4"
    shape: tuple[int, ...]  # per-sample shape of the single live tensor
    layout: str  # "nchw", "nhwc", "nlc" (tokens) or "nc"
    closes: str | None = None  # the largest module whose last node this is (a natural cut)
    nbytes: int = 0  # per-sample bytes of what crosses the cut (that tensor and any carried)
    carried: tuple[CarriedTensor, ...] = ()  # other live tensors that cross with it


def _tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def holds_tensor(node: fx.Node) -> bool:
    return node.op != "get_attr" and bool(_tensors_in(node.meta.get("val")))


# ops whose result a second run would not reproduce
_RANDOM_OPS = ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial", "dropout", "uniform")


def recomputable_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Tensor values computed from parameters, buffers, constants and plain values (shapes) alone.

    None of their inputs depends on the graph input's values, so any block can recompute one from
    what it fetches and the plain values it is handed; that keeps them from being live at a cut
    (a ViT's rotary table built from the patch grid, a position bias made by a small MLP). Made
    from parameters, a recomputed table ties them between the blocks that use it. Nothing random
    is recomputed, nothing written in place, and no module that updates state when called.

    Args:
        gm: a traced graph.

    Returns:
        The nodes whose values every block may recompute.
    """
    recomputable: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS or not _tensors_in(node.meta.get("val")):
            continue
        name = str(getattr(node.target, "__name__", node.target)).lower()
        if any(r in name for r in _RANDOM_OPS):
            continue
        if node.op == "call_module" and not _is_pure(gm.get_submodule(node.target)):
            continue
        if any(_writes_into(u, node) for u in node.users):
            continue
        if all(_is_fixed_input(i, recomputable) for i in node.all_input_nodes):
            recomputable.add(node)
    return recomputable


def _is_pure(module: nn.Module) -> bool:
    """Whether calling ``module`` twice gives the same result and changes nothing (timm's MLPs
    hold ``Dropout(0.0)``: no dropout at all)."""
    return not any(
        (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        or (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats)
        for m in module.modules()
    )


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def _writes_into(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` may write into ``value`` (its first argument, for in-place ops)."""
    if user.op == "call_module":
        return getattr(user.graph.owning_module.get_submodule(user.target), "inplace", False) is True
    name = str(getattr(user.target, "__name__", user.target))
    first = user.args[0] if user.args else None
    in_place = user.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    return first is value and (in_place or user.kwargs.get("inplace") is True)


def _is_fixed_input(node: fx.Node, recomputable: set[fx.Node]) -> bool:
    return node.op == "get_attr" or node in recomputable or (
        node.op != "placeholder" and not _tensors_in(node.meta.get("val"))
    )


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
    """Where ``gm`` can be cut: nodes after which exactly one tensor is live, and unit ends after
    which two are (the other one carried; see the module docstring).

    Args:
        gm: a graph from :func:`fxlocal.trace` (nodes need ``meta["val"]``).

    Returns:
        The :class:`CutCandidate` list in graph order, each with its module path, shape and layout.
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

    batch = next(int(n.meta["val"].shape[0]) for n in order if n.op == "placeholder")
    recomputed = recomputable_values(gm)
    # modules that run code of their own (functions, methods), not only their children
    glue = {n.meta.get("module_path", "") for n in order if n.op in ("call_function", "call_method")}
    live: set[fx.Node] = set()
    dying: dict[int, list[fx.Node]] = {}
    candidates = []
    for i, node in enumerate(order):
        if holds_tensor(node) and node not in recomputed and last_use[node] > i:
            live.add(node)
            dying.setdefault(last_use[node], []).append(node)
        for done in dying.pop(i, []):
            live.discard(done)
        if node not in live or len(live) > 2 or not _crossable(node, batch):
            continue
        if node.op not in COMPUTE_OPS or not compute_after[i] or any(first <= i < last for first, last in spans):
            continue
        closes = next((p for p in _prefixes(node.meta.get("module_path", "")) if last_of_module[p] == i), None)
        others = [n for n in live if n is not node]
        if others and not (
            others[0].op in COMPUTE_OPS
            and _crossable(others[0], batch)
            and _branches_side_by_side(gm, node, others[0], index, last_of_module, glue)
        ):
            continue
        candidates.append(
            CutCandidate(
                node=node.name,
                index=i,
                module_path=node.meta.get("module_path", ""),
                shape=_per_sample_shape(node),
                nbytes=sum(_per_sample_bytes(n) for n in [node, *others]),
                layout=tensor_layout(node),
                closes=closes,
                carried=tuple(
                    CarriedTensor(n.name, _per_sample_shape(n), tensor_layout(n), index[n]) for n in others
                ),
            )
        )
    return _batch_first(gm, candidates, batch)


def hands_on_carried(candidates: list[CutCandidate], position: int, after: int | None) -> bool:
    """Whether a block that ends at candidate ``position`` and starts after candidate ``after``
    (None: at the model's input) only hands on what its end carries beside its own tensor: it was
    computed before the block starts (EDSR's long skip, after the first block), so a head on it
    would train nothing of the block.

    Args:
        candidates: the graph's cut candidates.
        position: the index of the block's last cut candidate.
        after: the index of the candidate before the block, or None for the first block.

    Returns:
        False where the cut carries nothing.
    """
    carried = candidates[position].carried
    return bool(carried) and after is not None and all(t.index <= candidates[after].index for t in carried)


def _crossable(node: fx.Node, batch: int) -> bool:
    """A batch-first float tensor of 2-4 dims: what a head and the per-sample costs can read."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point() and 2 <= val.dim() <= 4 and val.shape[0] == batch


def _per_sample_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape[1:])


def _per_sample_bytes(node: fx.Node) -> int:
    val = node.meta["val"]
    return val[0].numel() * val.element_size()


def _branches_side_by_side(
    gm: fx.GraphModule, node: fx.Node, other: fx.Node, index: dict[fx.Node, int], last_of_module: dict[str, int],
    glue: set[str],
) -> bool:
    """Whether ``other`` crosses the end of ``node``'s block as a branch of its own, not as a skip.

    ``node`` must be the last node of a block (a module of parameterised modules: a cell, a
    transformer block), and ``other`` must not be used after it inside any module around ``node``
    that runs code of its own: a residual block's skip, or an inception block's input, is used by its
    block's own ``forward`` (the add, the concatenation), so cutting there would cut a block in
    two. Plain containers (a ``Sequential`` of blocks, a ``ModuleList``) run no code of their own.
    """
    i = index[node]
    enclosing = _prefixes(node.meta.get("module_path", ""))
    if not any(last_of_module[p] == i and _is_composite(gm, p) for p in enclosing):
        return False
    running = [p for p in enclosing if p in glue]
    return not any(
        u.meta.get("module_path", "") == p or u.meta.get("module_path", "").startswith(p + ".")
        for u in other.users
        if index[u] > i
        for p in running
    )


def _is_composite(gm: fx.GraphModule, path: str) -> bool:
    try:
        return has_parameterised_children(gm.get_submodule(path))
    except AttributeError:  # a container the graph does not keep
        return False


# Ops that work on each sample where it is: computed from batch-first tensors only, their
# output is batch-first too (a CNN's 2x2 maps at the traced batch of 2 need no second look).
_PER_SAMPLE_MODULES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_PER_SAMPLE_OPS = {
    "add", "sub", "mul", "truediv", "iadd", "isub", "imul", "itruediv", "neg", "abs", "exp", "sqrt",
    "rsqrt", "pow", "clamp", "contiguous", "clone", "float", "type_as", "relu", "relu_", "relu6",
    "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu",
    "mish", "softplus", "dropout", "conv2d", "linear", "batch_norm", "layer_norm", "group_norm",
    "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "interpolate", "softmax", "stochastic_depth",
    "drop_path", "matmul", "bmm",
}


def _arg(n: fx.Node, position: int, keyword: str, default: Any) -> Any:
    return n.args[position] if len(n.args) > position else n.kwargs.get(keyword, default)


def _keeps_batch_first(gm: fx.GraphModule, n: fx.Node, rank: int) -> bool:
    """Whether ``n`` leaves dim 0 of its batch-first inputs (of ``rank`` dims) where it is: a per-sample op, or a
    reduction, flatten, concatenation or permutation that does not touch dim 0."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Flatten):
            return m.start_dim != 0
        return isinstance(m, _PER_SAMPLE_MODULES) or type(m).__module__ == "torch.nn.modules.padding" or (
            type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention)
        )
    if n.op not in ("call_function", "call_method"):
        return False
    name = getattr(n.target, "__name__", n.target)
    if name in _PER_SAMPLE_OPS:
        return True
    if name == "getitem":  # x[:, 1:]: every sample kept, in place
        index = _arg(n, 1, "", None)
        return isinstance(index, tuple) and bool(index) and index[0] == slice(None)
    if name == "pad":  # pads the last len(pad) // 2 dims
        return len(_arg(n, 1, "pad", ())) < 2 * rank
    if name == "permute":
        dims = n.args[1:] if len(n.args) > 1 and isinstance(n.args[1], int) else _arg(n, 1, "dims", ())
        return bool(dims) and dims[0] == 0
    dims = {
        "transpose": lambda: [_arg(n, 1, "dim0", 0), _arg(n, 2, "dim1", 0)],
        "mean": lambda: _arg(n, 1, "dim", None),
        "sum": lambda: _arg(n, 1, "dim", None),
        "amax": lambda: _arg(n, 1, "dim", None),
        "flatten": lambda: _arg(n, 1, "start_dim", 0),
        "cat": lambda: _arg(n, 1, "dim", 0),
    }.get(name, lambda: None)()
    if dims is None:  # not a known op, or a reduction over every dim
        return False
    return all(isinstance(d, int) and d % rank != 0 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))


def _surely_batch_first(gm: fx.GraphModule, batch: int) -> set[fx.Node]:
    """Values whose dim 0 is the batch by construction: the input, and what per-sample ops
    compute from such values alone (values computed from parameters alone aside: a layer
    scale reshaped to broadcast)."""
    sure: set[fx.Node] = set()
    from_input: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(i in from_input for i in n.all_input_nodes):
            from_input.add(n)
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[0] != batch:
            continue
        if n.op == "placeholder":
            sure.add(n)
            continue
        inputs = [i for i in n.all_input_nodes if i in from_input and isinstance(i.meta.get("val"), torch.Tensor)]
        if inputs and all(i in sure for i in inputs) and _keeps_batch_first(gm, n, inputs[0].meta["val"].dim()):
            sure.add(n)
    return sure


def _batch_first(gm: fx.GraphModule, candidates: list[CutCandidate], batch: int) -> list[CutCandidate]:
    """The candidates whose dim 0 is the batch. A dim 0 of the traced batch size is, unless the
    batch size appears among the other dims too (CrossViT stacks its two branches' logits as
    (2, B, classes)) and the value does not come from per-sample ops on the input: those are
    told apart by the values at another batch size."""
    node = {n.name: n for n in gm.graph.nodes}
    unsure = {name for c in candidates for name in [c.node, *(t.node for t in c.carried)]
              if batch in node[name].meta["val"].shape[1:]}
    if unsure:
        sure = _surely_batch_first(gm, batch)
        unsure = {name for name in unsure if node[name] not in sure}
    if not unsure:
        return candidates
    try:
        other = values_at_batch(gm, batch + 1)
    except FxLocalError:  # the model takes no other batch size: keep them
        return candidates
    wrong = {name for name in unsure if other[name].shape[0] != batch + 1}
    return [c for c in candidates if c.node not in wrong and not any(t.node in wrong for t in c.carried)]


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


