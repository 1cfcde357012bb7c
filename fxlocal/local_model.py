"""``LocalModel``: K gradient-isolated blocks, their aux heads, and the block-by-block step."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .aux.base import AuxHead
from .aux.tasks import TaskSpec, task_criterion
from .errors import IncompatibleOptionsError
from .graph.plan import Plan
from .graph.recompute import checked_policy
from .graph.regions import recomputing_block, runner_key

__all__ = ["LocalModel", "StepContext"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tensors(values: tuple) -> list[torch.Tensor]:
    """The tensors among what crosses a boundary (the cut's, and the one it carries if any)."""
    return [v for v in values if isinstance(v, torch.Tensor)]


def _gradient_leaves(inputs: list) -> list[torch.Tensor]:
    """Replace each floating tensor of ``inputs`` (in place) by a detached copy that requires
    grad, so that a backward leaves there the gradient reaching it; returns those leaves."""
    leaves = []
    for i, v in enumerate(inputs):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            inputs[i] = v.detach().requires_grad_()
            leaves.append(inputs[i])
    return leaves


def isolated(carried: tuple) -> tuple:
    """What crosses a boundary: the tensors detached (no gradient flows back), plain values as is."""
    return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in carried)


class _TakingCodeGen(fx.CodeGen):
    """Code for ``forward(self, inputs)``: takes its arguments out of the list ``inputs``, empties it."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **_: Any) -> str:
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        take = f"\n    {', '.join(names)}, = inputs\n    inputs.clear()" if names else ""
        return f"def {self._func_name}(self, inputs){maybe_return_annotation}:{take}"


_taking_forwards: weakref.WeakKeyDictionary[nn.Module, tuple[str, Callable]] = weakref.WeakKeyDictionary()
# block -> (what it was built from, the block cut into recompute regions); kept out of the
# LocalModel's attributes so that its state_dict, copies and repr stay the block's own
_recomputing: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, fx.GraphModule]] = weakref.WeakKeyDictionary()


def _scaled_backward(scaler: torch.amp.GradScaler | None) -> Callable[..., None]:
    """``loss.backward()``, scaled for fp16 autocast when there is a scaler; a loss without a
    graph (a block with nothing to train) is skipped."""

    def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
        if loss.requires_grad:
            (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=retain_graph)

    return backward


def _run_taking(block: nn.Module, inputs: list) -> Any:
    """``block(*inputs)``, but ``inputs`` is emptied before the block runs, so that no caller's
    reference keeps an input alive: each is freed as soon as the block's code is done with it
    (GraphModule code drops dead values) unless its graph saved it, not when the call returns.
    A block that is not a plain GraphModule, or has hooks of its own, is called as usual."""
    if not isinstance(block, fx.GraphModule) or type(block.graph._codegen) is not fx.CodeGen \
            or block._forward_pre_hooks or block._forward_hooks or block._compiled_call_impl is not None:
        return block(*inputs)  # compiled (nn.Module.compile): its compiled call, not the source
    code, forward = _taking_forwards.get(block, (None, None))
    if code is not block.code:  # first call, or the graph was recompiled
        graph = fx.Graph()
        graph.output(graph.graph_copy(block.graph, {}))
        graph.set_codegen(_TakingCodeGen())
        python = graph.python_code(root_module="self")
        namespace = dict(python.globals)
        # code generated from the block's own graph, compiled as GraphModule.recompile does
        exec(compile(python.src, f"<{block._get_name()}, taking its inputs>", "exec"), namespace)  # noqa: S102
        forward = namespace["forward"]
        _taking_forwards[block] = (block.code, forward)
    return forward(block, inputs)


@dataclass
class StepContext:
    """What a block's objective may use during :meth:`LocalModel.train_step`.

    ``inputs`` holds the detached inputs of the current block and of the few before it that an
    objective asked for (``LocalModel.input_window``), so a cascaded objective can re-run them.
    """

    model: "LocalModel"
    target: torch.Tensor
    criterion: Criterion
    # the step's model input (the first block's), for objectives that reconstruct it (InfoPro);
    # None where a step trains one block on its own input (a pipeline stage past the first)
    input: torch.Tensor | None = None
    inputs: dict[int, tuple] = field(default_factory=dict)
    backward: Callable[..., None] | None = None  # set by train_step: backward(loss, retain_graph=False)
    # Training with a cascade: the current block's input tensors (the cut's, and the one it
    # carries), made to require grad so that a cascaded loss can be carried back into the blocks
    # before it.
    input_leaves: list[torch.Tensor] = field(default_factory=list)
    # Where the gradient reaching the block's input goes when the block before is not in this
    # process (a pipeline stage, :meth:`LocalModel.train_block`): it takes one entry per input
    # leaf (None where the loss did not reach it) and whether the loss cascaded at all, and the
    # block before is trained elsewhere.
    send_input_gradient: Callable[[list[torch.Tensor | None], bool], None] | None = None
    _cascade: tuple[int, int] | None = None  # (first, last) of the cascade being trained

    def backward_now(self, part: torch.Tensor) -> torch.Tensor:
        """Backpropagate one part of a block's loss at once, into the block and its head only,
        before the objective builds the next part on the same block output (gradients add up,
        so the result is the same). The block's graph is kept for that next part; the gradient
        this part sends into the block's input is dropped, since only a cascaded part trains the
        blocks before. Returns the part for the reported total: detached when backpropagated."""
        if self.backward is None:  # local_losses(): keep every graph
            return part
        self.backward(part, retain_graph=True)
        for leaf in self.input_leaves:
            leaf.grad = None
        return part.detach()

    def run_connected(self, first: int, last: int) -> Any:
        """Re-run blocks ``first..last`` from block ``first``'s input, *without* detaching between."""
        carried = self.inputs[first]
        for b in range(first, last + 1):
            carried = self.model.blocks[b](*carried)
        return carried

    def run_cascaded(self, first: int, last: int, out: Any) -> Any:
        """Block ``last``'s output for a loss that also trains blocks ``first..last-1`` (a cascade);
        ``out`` is that block's output in this step.

        Keeping graphs (``local_losses``), blocks ``first..last`` re-run connected (``out`` when
        there is no earlier block). Training, it is ``out`` itself, computed from inputs that
        require grad (``input_leaves``): :meth:`backward_cascaded` carries the gradient reaching
        that input back through the earlier blocks by recomputing them one at a time, so at most
        one block's graph is alive (same gradients, since the recomputed forward is the connected
        one)."""
        if self.backward is None:
            return out if first == last else self.run_connected(first, last)
        if last > first + 1 and self.send_input_gradient is not None:
            raise IncompatibleOptionsError(
                f"block {last}'s loss cascades into blocks {first}..{last - 1}, but only the block before is "
                "reached from a pipeline stage: set the cascade's span to 2"
            )
        if last > first and not self.input_leaves:
            raise IncompatibleOptionsError(
                f"block {last}'s loss cascades into blocks {first}..{last - 1}, but its objective's "
                f"input_window is below {last - first + 1}: set it to the cascade's span"
            )
        self._cascade = (first, last)
        return out

    def backward_cascaded(self, part: torch.Tensor, input_share: float = 1.0) -> torch.Tensor:
        """Backpropagate a loss built on :meth:`run_cascaded`'s output into the cascade's blocks.

        ``input_share`` is the fraction of the gradient reaching block ``last``'s input that is
        the cascade's, when ``part`` also holds a loss that trains block ``last`` alone (the
        same function of the same output, so one backward serves both)."""
        if self.backward is None:
            return part
        first, last = self._cascade
        self._cascade = None
        self.backward(part)
        grads: list[torch.Tensor | None] = []
        if last > first:
            # the block's graph, held by its output until the next block, reaches the leaves: let go of their gradients
            grads = [leaf.grad for leaf in self.input_leaves]
            for leaf in self.input_leaves:
                leaf.grad = None
            if input_share != 1.0:
                grads = [g * input_share if g is not None else None for g in grads]
            if self.send_input_gradient is not None:  # block last - 1 is trained on another stage
                self.send_input_gradient(grads, True)
                return part.detach()
        for b in range(last - 1, first - 1, -1):
            grads = self.model.backpropagate_rerun(b, self.inputs[b], grads, to_input=b > first)
            if grads is None:  # the loss did not depend on the earlier blocks, or they have nothing
                break          # to train (TNT's unfold is a first block without parameters)
        return part.detach()


class LocalModel(nn.Module):
    """A model cut into gradient-isolated blocks, each but the last trained by its own aux head.

    ``forward(x)`` computes exactly what the original model computes (the blocks hold the
    original parameters). ``train_step`` trains block by block: forward one block, its local
    loss, backward at once, hand the detached output on, so autograd only ever holds one
    block's graph (or the few blocks a cascaded objective re-runs).

    A head's local loss is ``criterion(head(output), target)``. A head that computes its block's
    loss itself, acts after each backward (EMA updates) or re-runs earlier blocks subclasses
    :class:`fxlocal.aux.AuxHead` (``owns_loss`` and ``local_loss(ctx, block, output) -> (loss,
    logits)``, ``after_backward()``, ``input_window``); any other module is a plain head.
    ``final_objective``, when set, is an ``AuxHead`` whose ``local_loss`` is the last block's.

    ``backbone_recompute`` (``"none"``, ``"cheap"``, ``"all"``: :mod:`fxlocal.graph.recompute`) has
    training recompute the blocks' activations in backward, region by region, a region ending
    after each node of ``region_ends[b]`` in block ``b`` (the model's unit boundaries).
    """

    def __init__(
        self,
        blocks: list[fx.GraphModule],
        heads: list[nn.Module],
        plan: Plan,
        config: dict | None = None,
        final_objective: nn.Module | None = None,
        backbone: tuple[dict, nn.Module] | None = None,
        backbone_recompute: str = "none",
        region_ends: Sequence[Sequence[str]] = (),
        task: TaskSpec | None = None,
    ):
        super().__init__()
        if len(heads) != len(blocks) - 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) - 1} heads, got {len(heads)}")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.final_objective = final_objective
        self.plan = plan
        # The convert() arguments that rebuild this model (see fxlocal.training.checkpoint).
        self.config = dict(config or {})
        # Where the original model's state_dict entries live (see fxlocal.backbone).
        self.backbone_map, self.untraced = backbone if backbone is not None else ({}, None)
        # Called with b as block b's part of a step begins (instrumentation: which block binds a
        # step's peak, fxlocal.memory.block_step_peaks).
        self.block_started: Callable[[int], None] | None = None
        self.region_ends = [list(ends) for ends in region_ends] or [[] for _ in blocks]
        self.backbone_recompute = backbone_recompute
        self.trace_report = None  # what tracing had to do (convert sets it: a TraceReport)
        self.replacement = None  # the units Replacement Learning replaced (convert sets it: a ReplacementPlan)
        # the task when not classification: the last block's loss is final_objective's (a
        # TaskObjective), and plain heads are trained on the task's global target
        self.task = task

    @property
    def backbone_recompute(self) -> str:
        """``"none"``, ``"cheap"`` or ``"all"`` (:mod:`fxlocal.graph.recompute`); settable, and kept in
        ``config`` so that a checkpoint rebuilds it."""
        return self._backbone_recompute

    @backbone_recompute.setter
    def backbone_recompute(self, policy: str) -> None:
        checked_policy(policy)
        if policy == "cheap" and any(isinstance(head, AuxHead) and head.backpropagates_block_twice for head in self.heads):
            raise IncompatibleOptionsError(
                f"aux={self.plan.aux!r} backpropagates each block twice per step (its heads' losses in two "
                "parts), and backbone_recompute='cheap' allows one backward per block (selective "
                "checkpointing): use backbone_recompute='all'"
            )
        self._backbone_recompute = self.config["backbone_recompute"] = policy

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        """Width of the model's output (as traced); a task's classes (0 for super-resolution)."""
        if self.task is not None:
            return self.task.num_classes
        out = next(n for n in self.blocks[-1].graph.nodes if n.op == "output").args[0]
        return int(out.meta["val"].shape[-1])

    @property
    def needs_model_input(self) -> list[int]:
        """The blocks whose objective reads the step's model input (InfoPro's decoder)."""
        objectives = [*self.heads, self.final_objective]
        return [b for b, o in enumerate(objectives) if isinstance(o, AuxHead) and o.needs_model_input]

    @property
    def input_window(self) -> int:
        objectives = [*self.heads, self.final_objective]
        return max((o.input_window for o in objectives if isinstance(o, AuxHead)), default=1) if self.k > 1 else 1

    def forward(self, x: torch.Tensor):
        carried: tuple = (x,)
        for b, block in enumerate(self.blocks):
            carried = block(*(isolated(carried) if b else carried))
        return carried

    def training_block(self, b: int) -> nn.Module:
        """What training runs as block ``b``: the block itself, or with ``backbone_recompute`` the
        block cut into recompute regions (same modules, same results). A block without a unit
        boundary inside is one region: its backward brings all of it back at once, but its
        head's forward and backward run beside what it keeps, not beside all of it."""
        block = self.blocks[b]
        if self.backbone_recompute == "none" or not isinstance(block, fx.GraphModule):
            return block
        key = (self.backbone_recompute, tuple(self.region_ends[b]), block.code, runner_key(block))
        cached = _recomputing.get(block)
        if cached is None or cached[0] != key:
            cached = key, recomputing_block(block, self.region_ends[b], self.backbone_recompute)
            _recomputing[block] = cached
        return cached[1]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained backbone under the original model's own keys (aux heads, EMA twins and
        boundaries gone): ``original.load_state_dict(local.backbone_state_dict())`` is strict."""
        block_states = [block.state_dict() for block in self.blocks]
        untraced = self.untraced.state_dict() if self.untraced is not None else {}
        out: dict[str, torch.Tensor] = OrderedDict()
        for key, where in self.backbone_map.items():
            if where[0] == "computed":  # a replaced unit's parameter: its current a·θ_before + b·θ_after
                with torch.no_grad():
                    out[key] = getattr(self.blocks[where[1]].get_submodule(where[2]), where[3]).detach().clone()
            else:
                out[key] = block_states[where[1]][where[2]] if where[0] == "block" else untraced[where[1]]
        if isinstance(self.final_objective, AuxHead):
            out.update(self.final_objective.exported_state())
        # each module's _version, as nn.Module.state_dict() records it: MNASNet refuses to load without
        out._metadata = OrderedDict(getattr(self.untraced, "metadata", {}))
        return out

    def block_parameters(self, b: int) -> Iterator[nn.Parameter]:
        """Parameters block ``b``'s optimizer steps: the block's and its head's (the last block's
        objective's, for the last).

        A parameter several blocks hold (*tied*: a table each of them recomputes is made from it,
        see :func:`~fxlocal.split_graph`) is trained by each of their losses and stepped by the
        last of them, once all those gradients are in.
        """
        holders = self._holders()
        # a frozen parameter (a replaced unit's stand-in original) is no optimizer's
        yield from (p for p in self.blocks[b].parameters() if holders[id(p)][-1] == b and p.requires_grad)
        if b < len(self.heads):
            yield from (p for p in self.heads[b].parameters() if p.requires_grad)
        elif self.final_objective is not None:  # the parameters it holds (a detector's box heads) train with it
            yield from (p for p in self.final_objective.parameters() if p.requires_grad)

    def tied_parameters(self) -> dict[str, list[int]]:
        """Parameters held by more than one block, by name, with the blocks that hold them."""
        holders = self._holders()
        names = {id(p): name for block in reversed(self.blocks) for name, p in block.named_parameters()}
        return {names[i]: blocks for i, blocks in holders.items() if len(blocks) > 1}

    def _holders(self) -> dict[int, list[int]]:
        """The blocks holding each parameter (by id), in order."""
        holders: dict[int, list[int]] = {}
        for b, block in enumerate(self.blocks):
            for p in block.parameters():
                holders.setdefault(id(p), []).append(b)
        return holders

    @property
    def criterion(self) -> Criterion:
        """A plain head's loss on its logits: cross-entropy, or under a task its global loss."""
        return task_criterion(self.task) if self.task is not None else nn.functional.cross_entropy

    def head_logits(self, b: int, out: tuple) -> torch.Tensor:
        """Head ``b`` on block ``b``'s output: the cut's tensor, and the one the cut carries beside
        it if any (plain values never are tensors)."""
        return self.heads[b](*_tensors(out))

    def _objective(self, b: int) -> Callable:
        """``(ctx, block, output) -> (loss, logits)`` for block ``b``."""
        head = self.heads[b] if b < len(self.heads) else self.final_objective
        if isinstance(head, AuxHead) and head.owns_loss:
            return head.local_loss
        if b < len(self.heads):

            def head_loss(ctx, _, out):
                logits = self.head_logits(b, out)
                return ctx.criterion(logits, ctx.target), logits

            return head_loss
        return lambda ctx, _, out: (ctx.criterion(out, ctx.target), out)

    def iter_block_losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        criterion: Criterion | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(block, local loss, logits)`` block by block; the next block runs when asked for.

        Backpropagating each loss before asking for the next is what keeps only one block's
        graph alive (:meth:`train_step` does exactly that).
        """
        ctx = StepContext(self, y, criterion or self.criterion, input=x, backward=backward)
        window = self.input_window
        carried: tuple = (x,)
        for b in range(self.k):
            if self.block_started is not None:
                self.block_started(b)
            inputs = list(isolated(carried) if b else carried)
            carried = ()
            ctx.input_leaves = []
            if window > 1:  # a cascade may re-run this block from its input
                ctx.inputs[b] = tuple(inputs)
                ctx.inputs.pop(b - window, None)
                if b and backward is not None:  # and train through it
                    ctx.input_leaves = _gradient_leaves(inputs)
            # the block alone holds its input: freed once used, unless its graph saved it
            outs = [_run_taking(self.training_block(b), inputs)]
            carried = outs[0] if b < len(self.heads) else ()
            # (loss, logits) are held by the caller alone, and the last block's output (the
            # model's: a segmenter's full-resolution logits) by nothing here while the caller
            # backpropagates: its loss's graph keeps what it needs (log-softmax its own output)
            yield (b, *self._objective(b)(ctx, b, outs.pop()))

    def local_losses(self, x: torch.Tensor, y: torch.Tensor, criterion: Criterion | None = None) -> list[torch.Tensor]:
        """Every block's local loss for one batch, graphs kept (for evaluation and tests)."""
        return [loss for _, loss, _ in self.iter_block_losses(x, y, criterion)]

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        criterion: Criterion | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        grad_hook: Callable[[list[nn.Parameter]], None] | None = None,
        metrics: dict | None = None,
        as_tensors: bool = False,
    ) -> list[float] | list[torch.Tensor]:
        """One local-learning step; returns each block's loss (the last block's is the model's).

        Each block's loss is backpropagated before the next block runs, so only one block's
        activations are alive at a time. ``optimizer`` is one optimizer, stepped once all blocks
        are done, or one per block (DGL style), each stepped as soon as its gradient is complete
        (right after its backward; for a cascade, after the last loss that reaches it) and its
        gradients then released, so only one block's (or one cascade's) gradients ever exist.
        The updates are the same either way: each parameter's depends on its own gradient and
        state only.
        ``scaler`` scales the losses for fp16 autocast; ``grad_hook(params)`` runs before
        parameters are stepped (data-parallel gradient averaging); ``metrics``, if given,
        receives each block's top-1 ``accuracy`` on this batch (classification only). ``as_tensors`` returns the losses
        as detached tensors: no host synchronisation per block (GPU), and it runs on fake tensors.
        """
        per_block = isinstance(optimizer, (list, tuple))
        if per_block and len(optimizer) != self.k:
            raise IncompatibleOptionsError(f"{self.k} blocks need {self.k} per-block optimizers, got {len(optimizer)}")
        optimizers = list(optimizer) if per_block else [optimizer]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses, correct = [], []
        stepped = 0  # per-block optimizers: blocks 0..stepped-1 are updated

        backward = _scaled_backward(scaler)

        for b, loss, logits in self.iter_block_losses(x, y, criterion, backward):
            if metrics is not None and self.task is None:  # a task's metric needs its whole test set
                correct.append((logits.detach().argmax(-1) == y).float().mean().item())
            del logits  # not kept through the backward: a dense task's can be the block's largest tensor
            backward(loss)
            self._after_backward(b)
            losses.append(loss.detach())
            # A block's gradient is complete once the last loss reaching it (a cascade reaches
            # input_window - 1 blocks back) is backpropagated; it is stepped then, not before,
            # since the cascade recomputes it with the weights of this step.
            complete = self.k if b == self.k - 1 else b - self.input_window + 2
            while per_block and stepped < complete:
                self._step(optimizers[stepped], list(self.block_parameters(stepped)), scaler, grad_hook)
                optimizers[stepped].zero_grad(set_to_none=True)
                stepped += 1
            del loss
        if not per_block:
            self._step(optimizers[0], list(self.parameters()), scaler, grad_hook)
        if scaler is not None:
            scaler.update()
        if metrics is not None and self.task is None:
            metrics["accuracy"] = correct
        return losses if as_tensors else [loss.item() for loss in losses]

    def _after_backward(self, b: int) -> None:
        """Heads that follow the backbone (EMA twins) update once block ``b``'s loss is backpropagated."""
        if b < len(self.heads) and isinstance(self.heads[b], AuxHead):
            self.heads[b].after_backward()

    def backpropagate_rerun(self, b: int, inputs: tuple, grads: list[torch.Tensor | None],
                            to_input: bool = False) -> list[torch.Tensor | None] | None:
        """Re-run block ``b`` on ``inputs`` and backpropagate ``grads`` (one per floating tensor it
        hands on, None where nothing reached it) into its weights: a cascade's share of block
        ``b``'s gradient. The re-run is a training forward (BatchNorm statistics update again).

        Args:
            b: the block.
            inputs: what block ``b`` took (detached).
            grads: the gradient reaching each floating tensor the block hands on.
            to_input: also compute the gradient reaching the block's floating inputs.

        Returns:
            The gradient reaching each floating input (an empty list without ``to_input``), or
            None when no gradient reached anything the block computed.
        """
        inputs = list(inputs)
        leaves = _gradient_leaves(inputs) if to_input else []
        # what block b hands on and what reaches it: both in the next block's input order
        outs = [t for t in _tensors(self.training_block(b)(*inputs)) if t.is_floating_point()]
        reached = [(out, g) for out, g in zip(outs, grads) if g is not None and out.requires_grad]
        if not reached:
            return None
        torch.autograd.backward([out for out, _ in reached], [g for _, g in reached])
        return [leaf.grad for leaf in leaves]

    @staticmethod
    def _step(optimizer, params, scaler, grad_hook) -> None:
        if grad_hook is not None:
            grad_hook(params)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()

    def train_block(
        self,
        b: int,
        inputs: tuple,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        criterion: Criterion | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        before_heads_follow: Callable[[], None] | None = None,
        model_input: torch.Tensor | None = None,
        hand_on: Callable[[tuple], None] | None = None,
        send_input_gradient: Callable[[list[torch.Tensor | None], bool], None] | None = None,
        receive_output_gradient: Callable[[], tuple[tuple, list[torch.Tensor | None]] | None] | None = None,
    ) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """Train block ``b`` alone on its input, as :meth:`train_step` trains it in turn: forward,
        local loss, backward, step of the block's own ``optimizer``, gradients released.

        What one stage of a pipeline does (:mod:`fxlocal.training.pipeline`). An objective that
        re-runs the block before (a cascade, ``input_window == 2``) is served by messages instead:
        the gradient its loss sends into this block's input goes to ``send_input_gradient``, and
        the gradient the next block's cascade sends into this block's output comes from
        ``receive_output_gradient``, with the input it was computed on; the block is re-run on
        that input and backpropagated (:meth:`backpropagate_rerun`) before its step, as
        :meth:`train_step` does it.

        Args:
            b: the block.
            inputs: what block ``b`` takes (detached).
            y: the labels.
            optimizer: block ``b``'s own optimizer.
            criterion: a plain head's loss (default :attr:`criterion`).
            scaler: this block's gradient scaler (fp16 autocast), or None.
            before_heads_follow: runs after the backward and before the head's EMA twins follow
                the backbone (a pipeline stage receives there the next stage's weights its twins
                follow, so that its forward and backward overlap the next stage's step).
            model_input: the step's model input, for objectives that read it (InfoPro's heads;
                block 0's input is it).
            hand_on: called with what block ``b + 1`` takes (detached) as soon as the backward
                is done, before the step (a pipeline sends it on there).
            send_input_gradient: with a cascade and ``b > 0``, takes the gradient reaching each
                floating input tensor (None where none did) and whether the loss cascaded at all
                (False: all None, and the block before is not re-run for it); called once a step.
            receive_output_gradient: with a cascade and ``b`` before the last, returns ``(input,
                gradient per floating output tensor)`` of the step the next block's cascade
                trained, or None where there is none to apply at this step.

        Returns:
            What block ``b + 1`` takes (detached; empty for the last block), the loss and the
            logits, both detached.
        """
        window = self.input_window
        if window > 2:
            raise IncompatibleOptionsError(
                f"block {b}'s objective re-runs {window - 1} earlier blocks: trained alone, a block reaches the "
                "block before only; use train_step, or a span of 2"
            )
        cascaded_into = window > 1 and b > 0
        cascaded_from = window > 1 and b < self.k - 1
        if (cascaded_into and send_input_gradient is None) or (cascaded_from and receive_output_gradient is None):
            raise IncompatibleOptionsError(
                f"block {b}'s objective cascades across blocks: train_block needs send_input_gradient "
                "(after the first block) and receive_output_gradient (before the last)"
            )

        backward = _scaled_backward(scaler)

        optimizer.zero_grad(set_to_none=True)
        if model_input is None and b == 0:
            model_input = inputs[0]
        sent: list[bool] = []

        def send_once(grads: list[torch.Tensor | None], cascaded: bool) -> None:
            sent.append(True)
            send_input_gradient(grads, cascaded)

        ctx = StepContext(self, y, criterion or self.criterion, input=model_input, backward=backward,
                          send_input_gradient=send_once if cascaded_into else None)
        if cascaded_into:  # the loss's gradient reaching the input goes to the block before
            inputs = list(inputs)
            ctx.input_leaves = _gradient_leaves(inputs)
        out = self.training_block(b)(*inputs)
        loss, logits = self._objective(b)(ctx, b, out)
        backward(loss)
        if cascaded_into and not sent:  # an objective that did not cascade: the block before still hears of it
            send_input_gradient([None] * len(ctx.input_leaves), False)
        handed_on = isolated(out) if b < len(self.heads) else ()
        del out
        if hand_on is not None and handed_on:
            hand_on(handed_on)
        if before_heads_follow is not None:
            before_heads_follow()
        self._after_backward(b)
        if cascaded_from:
            received = receive_output_gradient()
            if received is not None:
                self.backpropagate_rerun(b, *received)
        self._step(optimizer, list(self.block_parameters(b)), scaler, None)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # the block's own scaler (fp16): its scale follows its own steps
            scaler.update()
        return handed_on, loss.detach(), logits.detach()

    def extra_repr(self) -> str:
        recompute = f", backbone_recompute={self.backbone_recompute!r}" if self.backbone_recompute != "none" else ""
        return f"k={self.k}, aux={self.plan.aux!r}, balance={self.plan.balance!r}{recompute}"
