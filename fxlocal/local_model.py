"""``LocalModel``: K gradient-isolated blocks, their aux heads, and the block-by-block step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import IncompatibleOptionsError
from .plan import Plan

__all__ = ["LocalModel", "StepContext"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _isolated(carried: tuple) -> tuple:
    """What crosses a boundary: the tensor detached (no gradient flows back), plain values as is."""
    return (carried[0].detach(), *carried[1:])


@dataclass
class StepContext:
    """What a block's objective may use during :meth:`LocalModel.train_step`.

    ``inputs`` holds the detached inputs of the current block and of the few before it that an
    objective asked for (``LocalModel.input_window``), so a cascaded objective can re-run them.
    """

    model: "LocalModel"
    target: torch.Tensor
    criterion: Criterion
    inputs: dict[int, tuple] = field(default_factory=dict)
    backward: Callable[[torch.Tensor], None] | None = None  # set by train_step
    _cascade: tuple | None = None  # (first, last, input) of the cascade being trained

    def backward_now(self, part: torch.Tensor) -> torch.Tensor:
        """Backpropagate one part of a block's loss at once, freeing its graph before the
        objective builds the next part (gradients add up, so the result is the same). Returns
        the part for the reported total: detached when it was backpropagated here."""
        if self.backward is None:  # local_losses(): keep every graph
            return part
        self.backward(part)
        return part.detach()

    def run_connected(self, first: int, last: int) -> Any:
        """Re-run blocks ``first..last`` from block ``first``'s input, *without* detaching between."""
        carried = self.inputs[first]
        for b in range(first, last + 1):
            carried = self.model.blocks[b](*carried)
        return carried

    def run_cascaded(self, first: int, last: int) -> Any:
        """Block ``last``'s output for a loss that also trains blocks ``first..last-1`` (a cascade).

        Keeping graphs (``local_losses``), blocks ``first..last`` re-run connected. Training, only
        block ``last`` re-runs, from its input made to require grad; :meth:`backward_cascaded`
        then carries the gradient reaching that input back through the earlier blocks by
        recomputing them one at a time, so at most one block's graph is alive (same gradients,
        since the recomputed forward is the connected one)."""
        if self.backward is None:
            return self.run_connected(first, last)
        x, *rest = self.inputs[last]
        if last > first:
            x = x.detach().requires_grad_()
        self._cascade = (first, last, x)
        return self.model.blocks[last](x, *rest)

    def backward_cascaded(self, part: torch.Tensor) -> torch.Tensor:
        """Backpropagate a loss built on :meth:`run_cascaded`'s output into the cascade's blocks."""
        if self.backward is None:
            return part
        first, last, x = self._cascade
        self._cascade = None
        self.backward(part)
        grad = x.grad
        for b in range(last - 1, first - 1, -1):
            if grad is None:  # the loss did not depend on the earlier blocks
                break
            x, *rest = self.inputs[b]
            if b > first:
                x = x.detach().requires_grad_()
            torch.autograd.backward(self.model.blocks[b](x, *rest)[0], grad)
            grad = x.grad
        return part.detach()


class LocalModel(nn.Module):
    """A model cut into gradient-isolated blocks, each but the last trained by its own aux head.

    ``forward(x)`` computes exactly what the original model computes (the blocks hold the
    original parameters). ``train_step`` trains block by block: forward one block, its local
    loss, backward at once, hand the detached output on, so autograd only ever holds one
    block's graph (or the few blocks a cascaded objective re-runs).

    A head's local loss is ``criterion(head(output), target)`` unless the head defines
    ``local_loss(ctx, block, output) -> (loss, logits)``; heads may define ``after_backward()``
    (EMA updates) and ``input_window`` (how many block inputs their loss re-runs).
    ``final_objective``, when set, is the last block's ``local_loss``.
    """

    def __init__(
        self,
        blocks: list[fx.GraphModule],
        heads: list[nn.Module],
        plan: Plan,
        config: dict | None = None,
        final_objective: nn.Module | None = None,
        backbone: tuple[dict, nn.Module] | None = None,
    ):
        super().__init__()
        if len(heads) != len(blocks) - 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) - 1} heads, got {len(heads)}")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.final_objective = final_objective
        self.plan = plan
        # The convert() arguments that rebuild this model (see fxlocal.checkpoint).
        self.config = dict(config or {})
        # Where the original model's state_dict entries live (see fxlocal.backbone).
        self.backbone_map, self.untraced = backbone if backbone is not None else ({}, None)

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        """Width of the model's output (as traced)."""
        out = next(n for n in self.blocks[-1].graph.nodes if n.op == "output").args[0]
        return int(out.meta["val"].shape[-1])

    @property
    def input_window(self) -> int:
        objectives = [*self.heads, self.final_objective]
        return max(getattr(o, "input_window", 1) for o in objectives if o is not None) if self.k > 1 else 1

    def forward(self, x: torch.Tensor):
        carried: tuple = (x,)
        for b, block in enumerate(self.blocks):
            carried = block(*(_isolated(carried) if b else carried))
        return carried

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained backbone under the original model's own keys (aux heads, EMA twins and
        boundaries gone): ``original.load_state_dict(local.backbone_state_dict())`` is strict."""
        block_states = [block.state_dict() for block in self.blocks]
        untraced = self.untraced.state_dict() if self.untraced is not None else {}
        out = {}
        for key, where in self.backbone_map.items():
            out[key] = block_states[where[1]][where[2]] if where[0] == "block" else untraced[where[1]]
        return out

    def block_parameters(self, b: int) -> Iterator[nn.Parameter]:
        """Parameters trained by block ``b``'s local loss: the block's and its head's."""
        yield from self.blocks[b].parameters()
        if b < len(self.heads):
            yield from self.heads[b].parameters()

    def _objective(self, b: int) -> Callable:
        """``(ctx, block, output) -> (loss, logits)`` for block ``b``."""
        head = self.heads[b] if b < len(self.heads) else self.final_objective
        if head is not None and hasattr(head, "local_loss"):
            return head.local_loss
        if b < len(self.heads):

            def head_loss(ctx, _, out):
                logits = head(out[0])
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
        ctx = StepContext(self, y, criterion or nn.functional.cross_entropy, backward=backward)
        window = self.input_window
        carried: tuple = (x,)
        for b, block in enumerate(self.blocks):
            ctx.inputs[b] = _isolated(carried) if b else carried
            ctx.inputs.pop(b - window, None)
            out = block(*ctx.inputs[b])
            if window == 1:  # nothing re-runs this block: its graph keeps the input if it needs it
                del ctx.inputs[b]
            carried = ()  # nor does this loop
            loss, logits = self._objective(b)(ctx, b, out)
            yield b, loss, logits
            carried = out if b < len(self.heads) else ()
            del out

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
        receives each block's top-1 ``accuracy`` on this batch. ``as_tensors`` returns the losses
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

        def backward(loss: torch.Tensor) -> None:
            if loss.requires_grad:
                (scaler.scale(loss) if scaler is not None else loss).backward()

        for b, loss, logits in self.iter_block_losses(x, y, criterion, backward):
            backward(loss)
            if b < len(self.heads) and hasattr(self.heads[b], "after_backward"):
                self.heads[b].after_backward()
            losses.append(loss.detach())
            if metrics is not None:
                correct.append((logits.detach().argmax(-1) == y).float().mean().item())
            # A block's gradient is complete once the last loss reaching it (a cascade reaches
            # input_window - 1 blocks back) is backpropagated; it is stepped then, not before,
            # since the cascade recomputes it with the weights of this step.
            complete = self.k if b == self.k - 1 else b - self.input_window + 2
            while per_block and stepped < complete:
                self._step(optimizers[stepped], list(self.block_parameters(stepped)), scaler, grad_hook)
                optimizers[stepped].zero_grad(set_to_none=True)
                stepped += 1
            del loss, logits
        if not per_block:
            self._step(optimizers[0], list(self.parameters()), scaler, grad_hook)
        if scaler is not None:
            scaler.update()
        if metrics is not None:
            metrics["accuracy"] = correct
        return losses if as_tensors else [loss.item() for loss in losses]

    @staticmethod
    def _step(optimizer, params, scaler, grad_hook) -> None:
        if grad_hook is not None:
            grad_hook(params)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()

    def extra_repr(self) -> str:
        return f"k={self.k}, aux={self.plan.aux!r}, balance={self.plan.balance!r}"
