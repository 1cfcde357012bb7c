"""Measure what a piece of computation costs for one training step.

``Cost`` is per sample: forward+backward FLOPs counted by :class:`torch.utils.flop_counter.
FlopCounterMode`, the bytes autograd saves for backward (activations, parameters excluded), and
parameter bytes. Counted without computing where it matters: on the meta device or on fake
copies; a graph small enough (:data:`REAL_RUN_MAX_BYTES`) runs for real at batch 2, which gives
the same counts sooner.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from ..errors import PartitionError
from .recompute import KEPT_OPS

__all__ = ["Cost", "MemoryModel", "measure_module", "measure_nodes", "time_segments", "traced_activation_bytes"]

COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Cost:
    """Per-sample training cost of a piece of a model."""

    flops: float = 0.0  # forward + backward
    activation_bytes: float = 0.0  # saved for backward
    param_bytes: float = 0.0
    params: int = 0
    # the largest activation computed: its gradient and its input's coexist in backward, so a
    # piece's transient need is set by its largest tensor (combined by max, not sum)
    largest_activation_bytes: float = 0.0
    # forward + backward wall time, measured for real (:func:`time_nodes`); 0 when not measured
    seconds: float = 0.0
    # the FLOPs whose time ``seconds`` holds: a sum of timed and untimed parts (a head of unit
    # copies and a pooled classifier) knows which part still needs pricing
    timed_flops: float = 0.0
    # resident tensors that get no gradient and no optimizer state (an EMA twin's weights)
    buffer_bytes: float = 0.0
    # outputs of its convolutions, matrix products and attention: what backbone_recompute="cheap"
    # keeps of it (:data:`fxlocal.graph.recompute.KEPT_OPS`)
    kept_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            flops=self.flops + other.flops,
            activation_bytes=self.activation_bytes + other.activation_bytes,
            param_bytes=self.param_bytes + other.param_bytes,
            params=self.params + other.params,
            largest_activation_bytes=max(self.largest_activation_bytes, other.largest_activation_bytes),
            seconds=self.seconds + other.seconds,
            timed_flops=self.timed_flops + other.timed_flops,
            buffer_bytes=self.buffer_bytes + other.buffer_bytes,
            kept_bytes=self.kept_bytes + other.kept_bytes,
        )

    def metric(self, balance: str) -> float:
        """The additive metrics; ``balance="memory"`` is priced by :class:`MemoryModel`."""
        return {
            "flops": self.flops,
            "params": self.param_bytes,
            "activations": self.activation_bytes,
            "time": self.seconds,
        }[balance]


@dataclass(frozen=True)
class MemoryModel:
    """What one block (with its head) adds to a training step's peak, for ``balance="memory"``.

    Its activations at ``batch`` plus the resident parameters, gradients and optimizer state
    (``optimizer_states`` tensors per parameter: 1 for SGD momentum, 2 for Adam) of what lives
    on its device: in one process only the aux head's count here (the backbone's are resident
    whatever the cuts); in pipeline mode, one block per device, the block's own count too.
    With ``per_block`` optimizers (the trainer's default) a block's gradients exist only while
    the losses that reach it are backpropagated, so they count toward that block alone.
    ``recompute`` is the conversion's ``backbone_recompute``: a block then keeps its regions'
    inputs (and, for ``"cheap"``, its ``kept_bytes``) and one region's recompute at a time
    (priced per segment by :func:`fxlocal.graph.partition.partition`).
    """

    batch: int = 64
    optimizer_states: int = 1
    pipeline: bool = False
    per_block: bool = True
    # gradient buffers alive at once in backward, in units of the largest activation
    transient_factor: float = 2.0
    # the blocks' activations recomputed in backward, unit by unit (fxlocal.graph.recompute's policies)
    recompute: str = "none"

    def bytes(self, cost: "Cost", head: bool = False) -> float:
        """The additive part: saved activations and, where they count, resident parameters."""
        if head or self.pipeline:
            resident = cost.param_bytes * (2 + self.optimizer_states) + cost.buffer_bytes
        else:
            resident = cost.param_bytes if self.per_block else 0.0  # its gradients, during its step
        return cost.activation_bytes * self.batch + resident

    def boundary(self, nbytes_per_sample: float) -> float:
        """A block's output is held for the next block throughout the block's own step."""
        return nbytes_per_sample * self.batch

    def transient(self, cost: "Cost") -> float:
        """The non-additive part: backward's gradient buffers around the largest activation."""
        return self.transient_factor * cost.largest_activation_bytes * self.batch


# "time" balances measured wall time: what a pipeline's throughput depends on (its slowest
# stage). FLOPs miss what convolutions on large maps, normalisation and elementwise ops cost.
BALANCE_METRICS = ("flops", "params", "activations", "memory", "time")


def checked_balance(balance: str) -> str:
    """``balance`` if it is one of :data:`BALANCE_METRICS`, else a :class:`PartitionError` naming them."""
    if balance not in BALANCE_METRICS:
        raise PartitionError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_METRICS)}")
    return balance


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Meter:
    """Counts FLOPs and saved-for-backward bytes of whatever runs inside :meth:`measure`."""

    def __init__(self, exclude_storages: Iterable[int] = ()):
        self.seen: set[int] = set(exclude_storages)
        self.alias: dict[int, int] = {}  # storage of a clone -> storage it stands for
        # Storages are keyed by address: keep every keyed tensor alive so that no address is
        # reused by a later, different storage (fake tensors allocate nothing, this is free).
        self.keep_alive: list[torch.Tensor] = []

    def measure(self, fn: Callable[[], Any], batch: int | None = None) -> _Measured:
        """What a forward and backward of ``fn`` costs; ``batch``: the batch it runs, for the
        largest activation (see :class:`_Outputs`)."""
        saved = 0.0
        outputs = _Outputs(batch)

        def forward():
            with outputs:
                return fn()

        def pack(t: torch.Tensor):
            nonlocal saved
            self.keep_alive.append(t)
            key = _storage_key(t)
            key = self.alias.get(key, key)
            if key not in self.seen:
                self.seen.add(key)
                saved += t.untyped_storage().nbytes()
            return t

        flop_counter = FlopCounterMode(display=False)  # entering one resets its counts
        with flop_counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _forward_backward(forward)
        return _Measured(out, flop_counter.get_total_flops(), saved, outputs.kept, outputs.largest)


@dataclass
class _Measured:
    """One forward and backward of a piece, at the batch it ran."""

    output: Any
    flops: float
    saved: float = 0.0  # bytes saved for backward
    kept: float = 0.0  # bytes output by the ops a "cheap" recompute keeps (fxlocal.graph.recompute.KEPT_OPS)
    largest: float = 0.0  # bytes of the largest activation an op output


class _Outputs(TorchDispatchMode):
    """Watches what the ops output: the bytes of those a "cheap" recompute keeps and of the
    largest activation, told apart from the weights' transposes and copies by its leading
    dimension, the ``batch`` (none counted without one)."""

    def __init__(self, batch: int | None = None):
        super().__init__()
        self.batch = batch
        self.kept = self.largest = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in KEPT_OPS:
            self.kept += sum(t.untyped_storage().nbytes() for t in tensors)
        activations = [t for t in tensors if t.is_floating_point() and t.dim() and t.shape[0] == self.batch]
        self.largest = max([self.largest, *(t.untyped_storage().nbytes() for t in activations)])
        return out


def _forward_backward(fn: Callable[[], Any]) -> Any:
    out = fn()
    grads_for = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    if grads_for:
        torch.autograd.backward(grads_for, [torch.ones_like(t) for t in grads_for])
    return out


def _trainable_leaf(meter: _Meter, value: Any, needs_grad: bool) -> Any:
    """A fresh autograd leaf standing for ``value`` (its storage counts as the original's)."""
    if not isinstance(value, torch.Tensor):
        return value
    if not (needs_grad and value.is_floating_point()):
        return value.detach()
    # A non-leaf view of a leaf, so that in-place ops (relu_) are allowed on it.
    standin = value.detach().requires_grad_().clone()
    meter.keep_alive += [value, standin]
    meter.alias[_storage_key(standin)] = meter.alias.get(_storage_key(value), _storage_key(value))
    return standin


def _param_storages(module: nn.Module) -> set[int]:
    return {_storage_key(p) for p in module.parameters()}


def measure_module(module: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> Cost:
    """Cost of training ``module`` on one input of ``input_shape``, computing nothing.

    A module on the meta device (how heads are built to be priced) runs as it is, on meta
    tensors, and is left as it was (training flag, gradients); any other runs as a fake copy.

    Args:
        module: the module, on the meta device or with weights.
        input_shape: one sample's input shape (no batch dimension). The input itself needs no
            gradient (a block's input is detached), so its gradient is not counted.
        batch: the batch it is counted at; the cost is divided by it.

    Returns:
        Its per-sample :class:`Cost`.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if tensors and all(t.device.type == "meta" for t in tensors):
        # meta tensors dispatch in C++, without fake tensors' Python layer: the same counts, sooner
        grads = [(p, p.grad) for p in module.parameters()]
        was_training = module.training
        try:
            module.train()
            meter = _Meter(_param_storages(module))
            x = torch.empty(batch, *input_shape, device="meta")  # made outside: not an activation
            measured = meter.measure(lambda: module(x), batch)
        finally:
            module.train(was_training)
            for param, grad in grads:
                param.grad = grad
    else:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = _fake_copy(module, mode)
            fake.train()
            meter = _Meter(_param_storages(fake))
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            x = torch.empty(batch, *input_shape, device=device)
            measured = meter.measure(lambda: fake(x), batch)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    params = sum(p.numel() for p in module.parameters())
    return Cost(measured.flops / batch, measured.saved / batch, float(param_bytes), params, measured.largest / batch)


def _fake_copy(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    with FakeCopyMode(mode):
        return copy.deepcopy(module)


def node_parameters(gm: fx.GraphModule, node: fx.Node) -> list[nn.Parameter]:
    """Parameters a node uses directly: a called module's, or a fetched parameter."""
    if node.op == "call_module":
        return list(gm.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        value = attrgetter(node.target)(gm)
        return [value] if isinstance(value, nn.Parameter) else []
    return []




class _CostInterpreter(fx.Interpreter):
    """Runs every node alone, as its own autograd graph, to attribute costs to nodes.

    A value gets a gradient only if it depends on a parameter, as in real training: the graph
    input and whatever is computed from it alone (a stem's reshapes) need none.
    """

    def __init__(self, gm: fx.GraphModule, meter: _Meter):
        super().__init__(gm)
        self.meter = meter
        self.node_costs: dict[str, _Measured] = {}  # without their outputs
        self.depends_on_params: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            self.depends_on_params[n] = n.op == "get_attr" and bool(node_parameters(self.module, n))
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        # not through a value that carries no gradient: a shape read from a parameter's output
        # (DINOv3's RoPE grid, built from the patch grid's size) gives none to what it sizes
        needs_grad = {id(self.env[p]): self.depends_on_params[p] and not _carries_no_gradient(self.env[p]) for p in n.all_input_nodes}
        as_leaf = lambda v: _trainable_leaf(self.meter, v, needs_grad.get(id(v), False))  # noqa: E731
        args, kwargs = tree_map(as_leaf, args), tree_map(as_leaf, kwargs)
        self.depends_on_params[n] = any(needs_grad.values()) or bool(node_parameters(self.module, n))
        measured = self.meter.measure(lambda: getattr(self, n.op)(n.target, args, kwargs))
        out, measured.output = measured.output, None
        self.node_costs[n.name] = measured
        return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)


_GRADIENT_FREE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _carries_no_gradient(value: Any) -> bool:
    """Whether ``value`` is known to carry no gradient: every part of it (a tuple, list or dict
    flattened; a shape is a tuple of ints) a plain number, string, dtype or device, or an integer
    or boolean tensor. Anything else (a floating or complex tensor, an object whose parts are not
    known) may carry one."""

    def free(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return not (v.is_floating_point() or v.is_complex())
        return isinstance(v, _GRADIENT_FREE)

    return all(free(v) for v in tree_flatten(value)[0])


def model_device(module: nn.Module) -> torch.device:
    """Where the module's weights live: inputs are made there, so that a model built on the
    meta device (no weights allocated, for models too large to build here) can be analysed."""
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))


def time_segments(gm: fx.GraphModule, input_size: tuple[int, ...], boundaries: Sequence[Sequence[str]], batch: int = 32,
                  repeats: int = 3) -> list[float]:
    """Wall time of each segment of one real training step of ``gm`` (seconds per sample).

    The step runs as training runs it: one forward of the whole graph, then one backward, with
    the allocator warm. Timing each node as its own forward and backward instead (as
    :func:`measure_nodes` counts) overprices memory-bound layers on large maps by half: every
    node's output is freshly allocated, its inputs cold. A segment's forward ends when the last
    node before its boundary has run; its backward ends when the gradient of every tensor
    crossing that boundary is complete (a tensor hook): with only those tensors live there, no
    earlier node's backward can have started. The median of ``repeats`` steps after one warm-up.
    The model is left as it was: BatchNorm statistics, gradients and the RNG are restored.

    Args:
        gm: a traced graph with weights.
        input_size: one sample's input shape.
        boundaries: per boundary between two segments, in graph order, the nodes whose values
            cross it (a cut candidate's node and any it carries).
        batch: the batch the step runs at; the times are divided by it.
        repeats: the steps timed.

    Returns:
        ``len(boundaries) + 1`` times: the segment before each boundary, then the one after the last.
    """
    device = model_device(gm)
    if device.type == "meta":
        raise PartitionError("balance='time' times the model for real, but it was built without weights (meta device)")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ends = {name: b for b, names in enumerate(boundaries) for name in names[:1]}
    crossing = {name: b for b, names in enumerate(boundaries) for name in names}
    steps: list[list[float]] = []
    with _left_as_it_was(gm, device):
        gm.train()
        for _ in range(repeats + 1):
            forward_ends = [0.0] * len(boundaries)
            gradients_done = [0.0] * len(boundaries)

            def completes(b: int) -> Callable[[torch.Tensor], None]:
                def hook(grad: torch.Tensor) -> None:
                    sync()
                    gradients_done[b] = max(gradients_done[b], time.perf_counter())
                return hook

            def ran(n: fx.Node, out: Any) -> None:
                if n.name in crossing:
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, torch.Tensor) and t.requires_grad:
                            t.register_hook(completes(crossing[n.name]))
                if n.name in ends:
                    sync()
                    forward_ends[ends[n.name]] = time.perf_counter()

            x = torch.randn(batch, *input_size, device=device)
            sync()
            started = time.perf_counter()
            out = _Watched(gm, ran).run(x)
            sync()
            backward_starts = time.perf_counter()
            _forward_backward(lambda: out)
            sync()
            finished = time.perf_counter()
            for p in gm.parameters():
                p.grad = None
            # a boundary whose tensors took no gradient (before the first parameter) has nothing
            # before it to backpropagate: it completes as the backward does
            done = [t or finished for t in gradients_done]
            forward = [b - a for a, b in zip([started, *forward_ends], [*forward_ends, backward_starts])]
            backward = [a - b for a, b in zip([finished, *done], [*done, backward_starts])]
            steps.append([f + b for f, b in zip(forward, backward)])
    return [statistics.median(step[s] for step in steps[1:]) / batch for s in range(len(boundaries) + 1)]


class _Watched(fx.Interpreter):
    """Runs a graph as it is, telling ``ran(node, value)`` after each node."""

    def __init__(self, gm: fx.GraphModule, ran: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        self.ran = ran

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.ran(n, out)
        return out


# measure_nodes runs a graph with weights as it is, for real, when its activations at the
# measured batch fit in this many bytes: a real op costs its FLOPs, a fake one a fixed Python
# dispatch (several times more on the small inputs of most conversions), and the counts are the
# same (tested). Above it, fake tensors: the real run keeps every activation alive, and large maps
# cost more to compute than to dispatch.
REAL_RUN_MAX_BYTES = 128 * 2**20


def measure_nodes(gm: fx.GraphModule, input_size: tuple[int, ...], batch: int = 2) -> dict[str, Cost]:
    """Per-node cost of one training step of ``gm`` at ``input_size`` (per sample).

    Saved activations are counted once, at the first node that saves them; parameters are
    attributed to the node that uses them (call_module or get_attr). The counts do not depend on
    how the graph runs, so it runs the cheapest way: on the meta device, as it is (meta tensors
    dispatch in C++); with weights whose traced activations (``node.meta["val"]``) at ``batch``
    take at most :data:`REAL_RUN_MAX_BYTES`, as it is, for real; otherwise as a fake copy. A
    graph run as it is is left as it was (buffers, gradients, training flag, RNG).

    Args:
        gm: a traced graph (:func:`fxlocal.trace`), on any device, the meta device included.
        input_size: one sample's input shape.
        batch: the batch the step is counted at; the costs are divided by it.

    Returns:
        Every node's :class:`Cost`, by node name.
    """
    device = model_device(gm)
    if device.type == "meta" or batch * traced_activation_bytes(gm) <= REAL_RUN_MAX_BYTES:
        with _left_as_it_was(gm, device):
            gm.train()
            interp = _CostInterpreter(gm, _Meter(_param_storages(gm)))
            interp.run(torch.randn(batch, *input_size, device=device))
    else:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = _fake_copy(gm, mode)
            fake.train()
            interp = _CostInterpreter(fake, _Meter(_param_storages(fake)))
            interp.run(torch.empty(batch, *input_size, device=device))
    costs: dict[str, Cost] = {}
    for node in gm.graph.nodes:
        measured = interp.node_costs.get(node.name, _Measured(None, 0.0))
        params = node_parameters(gm, node)
        val = node.meta.get("val")  # traced shapes: per sample is a 1/len(batch) share
        largest = (
            float(val.numel() * val.element_size()) / max(val.shape[0], 1)
            if isinstance(val, torch.Tensor) and val.dim() > 0 and val.is_floating_point() and node.op in COMPUTE
            else 0.0
        )
        costs[node.name] = Cost(
            measured.flops / batch,
            measured.saved / batch,
            float(sum(p.numel() * p.element_size() for p in params)),
            sum(p.numel() for p in params),
            largest,
            kept_bytes=measured.kept / batch,
        )
    return costs


def traced_activation_bytes(gm: fx.GraphModule) -> float:
    """Per-sample bytes of every floating-point value the graph computes, from the shapes
    tracing stored (``inf`` if it stored none: then nothing is known)."""
    if not any("val" in node.meta for node in gm.graph.nodes):
        return float("inf")
    total = 0.0
    for node in gm.graph.nodes:
        if node.op in COMPUTE:  # a node whose value is no tensor (an assert) has no "val"
            for value in tree_flatten(node.meta.get("val"))[0]:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                    total += value.numel() * value.element_size() / max(value.shape[0], 1)
    return total


@contextlib.contextmanager
def _left_as_it_was(gm: fx.GraphModule, device: torch.device) -> Iterator[None]:
    """Runs inside leave ``gm`` as they found it: its buffers (BatchNorm statistics), its
    parameters' gradients, its training flag and the RNG (``device``'s too, if CUDA)."""
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    grads = [(p, p.grad) for p in gm.parameters()]
    was_training = gm.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        gm.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for param, grad in grads:
            param.grad = grad
