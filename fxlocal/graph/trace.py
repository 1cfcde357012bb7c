"""Trace any timm / torchvision model into a torch.fx graph whose nodes know their module path
and output shape.

Contract of :func:`trace`:

* timm's own not-traceable modules are leaves and its not-traceable functions are wrapped
  (the same lists timm's FX feature extraction uses);
* forward arguments after the input that have non-tensor defaults (``attn_mask=None``,
  ``is_causal=False``) are fixed through ``concrete_args`` and their placeholders removed, so the
  graph takes exactly one input;
* ``self.training`` read during tracing becomes a graph value (a ``get_attr`` of the module's
  ``training`` flag), so ``F.dropout(x, p, self.training)`` still follows ``train()``/``eval()``
  after tracing. A module whose *control flow* branches on ``self.training`` cannot be captured
  that way: it becomes a leaf module;
* a module whose forward still fails to trace becomes a leaf (all modules of its class), and the
  trace is retried a bounded number of times;
* every node gets ``meta["module_path"]`` (the module whose forward created it, e.g.
  ``layer1.0``; for a leaf module call, the module itself), ``meta["qualname"]`` (torchvision's
  node-path name, e.g. ``layer1.0.add``) and ``meta["val"]`` (a fake tensor, or a plain value
  for shape arithmetic) from :class:`~torch.fx.passes.fake_tensor_prop.FakeTensorProp`.

What happened is reported on ``gm.meta["fxlocal_trace"]`` as a :class:`TraceReport`.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
)
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_flatten
from torchvision.models.feature_extraction import NodePathTracer

from ..errors import InputSizeError, TraceError
from .atoms import unit_atoms
from .cost import model_device

__all__ = ["TraceReport", "propagate_shapes", "trace", "traced_input_size", "values_at_batch"]

MAX_TRACE_RETRIES = 12
# Shapes are propagated with a batch of 2: batch 1 hides batch/feature dimension mix-ups and
# some layers (BatchNorm1d in train mode) reject it.
SHAPE_BATCH = 2


@dataclass
class TraceReport:
    """What :func:`trace` had to do to get a graph."""

    concrete_args: dict[str, Any] = field(default_factory=dict)
    leaf_modules: list[str] = field(default_factory=list)  # module paths made leaves
    leaf_reasons: dict[str, str] = field(default_factory=dict)  # path -> why
    retries: int = 0
    # The root's forward branches on self.training; its inference path was traced.
    root_branches_on_mode: bool = False


def _timm_notrace() -> tuple[list[type], list[Any]]:
    # timm.models' public re-export (timm 1.0 on); the implementation moved to timm.layers._fx in 1.0.17
    from timm.models import get_notrace_functions, get_notrace_modules

    return list(get_notrace_modules()), list(get_notrace_functions())


class _TrainingFlag(fx.Proxy):
    """``module.training`` while tracing: a graph value when used as an argument.

    Used in control flow inside a submodule it answers ``True`` and records the module, which the
    tracer then makes a leaf so that both modes stay correct; in the root's own forward it
    answers ``False`` (the inference path).
    """

    def __init__(self, node: fx.Node, tracer: "LocalTracer", owner: str):
        super().__init__(node, tracer)
        self.owner = owner

    def __bool__(self) -> bool:
        if not self.owner:
            # The root cannot become a leaf: take its inference path, the function the
            # converted model must reproduce (e.g. GoogLeNet's aux logits exist only in training).
            self.tracer.root_branches_on_mode = True
            return False
        self.tracer.mode_branching.add(self.owner)
        return True


_FX_POSTFIX = re.compile(r".+_[0-9]+$")


class LocalTracer(NodePathTracer):
    """NodePathTracer with timm's leaves, leaf-by-path, a traced training flag and failure capture."""

    def __init__(self, leaf_types: list[type], leaf_paths: set[str], autowrap_functions):
        super().__init__(leaf_modules=leaf_types, autowrap_functions=tuple(autowrap_functions))
        self.leaf_paths = leaf_paths
        self.mode_branching: set[str] = set()
        self.root_branches_on_mode = False
        self.failed_module: tuple[str, nn.Module] | None = None
        self._patched: list[tuple[nn.Module, Any]] = []
        self._last_postfix: dict[str, int] = {}  # qualname stem -> postfix of its latest use

    def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
        """torchvision's names (the op under its module, ``_N`` counting repeats within it), in
        constant time: torchvision's own matches a regex against every earlier name (a million
        matches on CoaT's 2,600 nodes). With fx's postfix cut off, a stem rarely ends in
        ``_<digits>``; for those, the latest name from a stem is the one torchvision's reverse
        search finds. A stem that still does (a module ``conv_1_1``) takes torchvision's search."""
        name = module_qualname
        if node.op != "call_module":
            name = f"{name}.{node}" if name else str(node)
        if _FX_POSTFIX.match(name):
            name = name.rsplit("_", 1)[0]
        if _FX_POSTFIX.match(name):
            qualname = super()._get_node_qualname(module_qualname, node)
            stem, postfix = qualname.rsplit("_", 1)
            if not _FX_POSTFIX.match(stem):  # e.g. conv_1: torchvision's next conv counts on from it
                self._last_postfix[stem] = int(postfix)
            return qualname
        last = self._last_postfix.get(name)
        self._last_postfix[name] = 0 if last is None else last + 1
        return name if last is None else f"{name}_{last + 1}"

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        return module_qualname in self.leaf_paths or super().is_leaf_module(m, module_qualname)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        node = proxy.node
        node.meta["module_path"] = target if kind == "call_module" else self.current_module_qualname
        node.meta["qualname"] = self.node_to_qualname[node]
        return proxy

    def _install_training_flag(self, m: nn.Module, path: str) -> None:
        target = f"{path}.training" if path else "training"
        node = self.create_node("get_attr", target, (), {})
        node.meta["module_path"] = path
        node.meta["qualname"] = target
        self._patched.append((m, m.__dict__["training"]))
        m.__dict__["training"] = _TrainingFlag(node, self, path)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # Called once the graph exists and before the root's forward runs.
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module:
            self._install_training_flag(self.root, "")
        return out

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        leaf = self.is_leaf_module(m, path)
        if not leaf:
            self._install_training_flag(m, path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None and not leaf:
                self.failed_module = (path, m)  # the innermost module fails first
            raise

    def restore_training_flags(self) -> None:
        for m, flag in reversed(self._patched):
            m.__dict__["training"] = flag
        self._patched.clear()


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Forward arguments after the first that have a non-tensor default: fix them to it."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r} besides the input; "
                "wrap the model so that forward takes one tensor"
            )
        if not isinstance(p.default, torch.Tensor):
            concrete[p.name] = p.default
    return concrete


def _drop_specialised_placeholders(graph: fx.Graph) -> None:
    """Remove the placeholders of concrete args and the asserts fx adds for them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        doomed, frontier = [], [ph]
        while frontier:
            n = frontier.pop()
            doomed.append(n)
            frontier.extend(n.users)
        for n in reversed(doomed):
            if n.op != "output":
                graph.erase_node(n)


def _prune_dead_values(graph: fx.Graph) -> None:
    """Drop unused pure values: training-flag reads, shape lookups fx records for unpacking."""
    pure_targets = {getattr, __import__("operator").getitem}
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users:
                continue
            if n.op == "get_attr" or (n.op == "call_function" and n.target in pure_targets) or (
                n.op == "call_method" and n.target in ("size", "dim")
            ):
                graph.erase_node(n)
                changed = True


def _hoist_shape_reads(graph: fx.Graph) -> None:
    """Move each read of a tensor's shape (``x.shape``, ``x.size()``, ``x.dim()``) to right after
    the tensor: shapes are fixed at trace time, and a read at the end of the forward
    (torchvision's LRASPP upsamples to ``input.shape[-2:]``) would otherwise keep the whole
    tensor live to there, and no point in between could be cut."""
    for n in list(graph.nodes):
        shape_read = (n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",)) or (
            n.op == "call_method" and n.target in ("size", "dim")
        )
        if not shape_read or not isinstance(n.args[0], fx.Node) or n.kwargs:
            continue
        if any(isinstance(a, fx.Node) for a in n.args[1:]) or n.args[0].op == "output":
            continue
        n.args[0].append(n)


def _trace_once(model: nn.Module, tracer: LocalTracer, concrete: dict[str, Any]) -> fx.Graph:
    try:
        return tracer.trace(model, concrete_args=concrete or None)
    finally:
        tracer.restore_training_flags()


def trace(model: nn.Module, input_size: tuple[int, ...] = (3, 224, 224)) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with module paths and fake-tensor shapes on every node.

    Args:
        model: the model (any device, the meta device included).
        input_size: per-sample input shape.

    Returns:
        The GraphModule; ``gm.meta["fxlocal_trace"]`` (a :class:`TraceReport`) says which modules
        became leaves and why. See the module docstring for the contract.

    Raises:
        TraceError: the model cannot be traced even with leaves.
        InputSizeError: it rejects ``input_size``.
    """
    leaf_types, autowrap = _timm_notrace()
    concrete = _concrete_args(model)
    report = TraceReport(concrete_args=dict(concrete))
    leaf_paths: set[str] = set()
    for attempt in range(MAX_TRACE_RETRIES + 1):
        tracer = LocalTracer(leaf_types, leaf_paths, autowrap)
        try:
            graph = _trace_once(model, tracer, concrete)
        except Exception as exc:  # any failure inside a submodule's forward: make it a leaf
            if tracer.failed_module is None:
                raise TraceError(
                    f"cannot trace {type(model).__name__}: {type(exc).__name__}: {_first_line(exc)}"
                ) from exc
            path, failed = tracer.failed_module
            same_type = [
                p for p, m in model.named_modules() if type(m) is type(failed) and p not in leaf_paths
            ]
            for p in same_type:
                report.leaf_reasons[p] = f"trace failed: {type(exc).__name__}: {_first_line(exc)}"
            leaf_paths.update(same_type)
            report.retries = attempt + 1
            continue
        branching = {p for p in tracer.mode_branching if p}
        if branching - leaf_paths:
            for p in sorted(branching - leaf_paths):
                report.leaf_reasons[p] = "forward branches on self.training"
            leaf_paths.update(branching)
            report.retries = attempt + 1
            continue
        break
    else:
        raise TraceError(
            f"cannot trace {type(model).__name__}: still failing after {MAX_TRACE_RETRIES} "
            f"retries; modules made leaves so far: {sorted(leaf_paths)[:5]}"
        )
    report.leaf_modules = sorted(leaf_paths)
    report.root_branches_on_mode = tracer.root_branches_on_mode
    _drop_specialised_placeholders(graph)
    _prune_dead_values(graph)
    _hoist_shape_reads(graph)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.meta["fxlocal_trace"] = report
    gm.meta["fxlocal_unit_atoms"] = unit_atoms(model)
    propagate_shapes(gm, input_size)
    return gm


def propagate_shapes(gm: fx.GraphModule, input_size: tuple[int, ...], batch: int = SHAPE_BATCH) -> None:
    """Store a fake value on every node's ``meta["val"]`` for ``batch`` inputs of ``input_size``.

    Runs in eval mode so that no real buffer (BatchNorm statistics) is touched by fake tensors.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    was_training = gm.training
    gm.eval()
    state = _plain_attributes(gm)
    # FakeTensorMode logs a traceback for an op that fails before raising; the failure becomes
    # the one-line error below (the CLI prints no traceback)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    log_was_disabled, fake_log.disabled = fake_log.disabled, True
    try:
        example = mode.from_tensor(torch.empty(batch, *input_size, device=model_device(gm)))
        with torch.no_grad():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(example)
    except DataDependentOutputException as exc:
        raise TraceError(
            f"{gm.__class__.__name__} has a module whose control flow depends on tensor values, "
            "which shape propagation on fake tensors cannot follow"
        ) from exc
    except Exception as exc:
        raise InputSizeError(
            f"{gm.__class__.__name__} rejects input size {tuple(input_size)}: "
            f"{type(exc).__name__}: {_first_line(exc)}; pass --input-size C H W that the model accepts"
        ) from exc
    finally:
        fake_log.disabled = log_was_disabled
        gm.train(was_training)
        _restore_plain_attributes(state)


def _plain_attributes(root: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """Every submodule's plain attributes and buffers, as they are."""
    return [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}, dict(m._buffers)) for m in root.modules()]


def _restore_plain_attributes(state: list[tuple[nn.Module, dict, dict]]) -> None:
    """Undo what a fake run cached on the modules: some forwards memoise tensors they compute
    (ConViT re-assigns its ``rel_indices`` buffer), which would leave fake tensors behind for
    the real run."""

    def fake(value) -> bool:
        return any(isinstance(t, FakeTensor) for t in tree_flatten(value)[0])

    for module, attributes, buffers in state:
        for key, value in list(module._buffers.items()):
            if fake(value):
                module._buffers[key] = buffers.get(key)
        for key, value in list(vars(module).items()):
            if key.startswith("_") or not fake(value):
                continue
            if key in attributes:
                setattr(module, key, attributes[key])
            else:
                delattr(module, key)


def values_at_batch(gm: fx.GraphModule, batch: int) -> dict[str, Any]:
    """Every node's fake value (by node name) for ``batch`` inputs of the traced size; the
    graph's own ``meta["val"]`` stays as it is. Comparing two batches tells which plain values
    (shapes, ints) are the batch size and which are constants of the architecture."""
    saved = {n: n.meta.get("val") for n in gm.graph.nodes}
    try:
        propagate_shapes(gm, traced_input_size(gm), batch)
        return {n.name: n.meta.get("val") for n in gm.graph.nodes}
    finally:
        for n, val in saved.items():
            n.meta["val"] = val


def traced_input_size(gm: fx.GraphModule) -> tuple[int, ...]:
    """The per-sample input size ``gm`` was traced (and its shapes propagated) at."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return tuple(int(s) for s in placeholder.meta["val"].shape[1:])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
