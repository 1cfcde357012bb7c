"""Recompute in backward what forward would keep for it: ``torch.utils.checkpoint`` regions.

A region run through :func:`checkpointed` keeps its inputs and, by policy, some of its ops'
outputs; backward runs its forward again to get the rest back, one region at a time. Policies
(:data:`RECOMPUTE_POLICIES`):

* ``"none"``: nothing recomputed (the region runs as it is);
* ``"cheap"``: the outputs of convolutions, matrix products and attention are kept, everything
  between them (normalisation, activations, pooling, residual adds) is recomputed: a
  selective-checkpoint policy (``create_selective_checkpoint_contexts``), the split that
  ``torch.compile``'s min-cut partitioner makes by default. Backward pays those cheap ops again;
* ``"all"``: only the region's inputs are kept; backward pays the region's whole forward again.

The gradients are the recompute-free ones: same inputs, same weights, RNG state replayed, and
BatchNorm running statistics put back after the recompute (else each batch would move them twice).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ..errors import IncompatibleOptionsError

__all__ = ["RECOMPUTE_POLICIES", "KEPT_OPS", "checkpointed", "checked_policy"]

RECOMPUTE_POLICIES = ("none", "cheap", "all")


def _ops(*names: str) -> frozenset:
    """The aten overloads named (those this build of torch has)."""
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            found.add(getattr(op, overload or "default"))
    return frozenset(found)


# What "cheap" keeps: the ops whose FLOPs dominate a step (recomputing them would cost about a
# forward); their outputs are what the cheap ops after them are recomputed from.
KEPT_OPS = _ops(
    "convolution", "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)


def checked_policy(value: Any) -> str:
    if value not in RECOMPUTE_POLICIES:
        raise IncompatibleOptionsError(f"unknown backbone recompute {value!r}: choose one of {', '.join(RECOMPUTE_POLICIES)}")
    return value


def _keep_expensive(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(module: nn.Module, *args: Any, policy: str = "all") -> Any:
    """``module(*args)``; while training with gradients and ``policy`` is not ``"none"``, as a
    region whose activations backward recomputes (see the module docstring)."""
    if policy == "none" or not (module.training and torch.is_grad_enabled()):
        return module(*args)
    contexts: Callable = functools.partial(_contexts, module, policy)
    return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)


def _contexts(module: nn.Module, policy: str):
    """checkpoint's (forward, recompute) contexts: the policy's, and the recompute's inside
    :class:`_RunningStatisticsKept` (entered first: its copies are not the region's ops)."""
    forward, recompute = (
        create_selective_checkpoint_contexts(_keep_expensive) if policy == "cheap" else (nullcontext(), nullcontext())
    )
    return forward, _Entered(_RunningStatisticsKept(module), recompute)


class _Entered:
    """Context managers entered in order, exited in reverse; re-enterable, since a graph kept for
    a second backward (``retain_graph``) recomputes its regions again."""

    def __init__(self, *contexts):
        self.contexts = contexts
        self.stacks: list[ExitStack] = []

    def __enter__(self):
        stack = ExitStack()
        for c in self.contexts:
            stack.enter_context(c)
        self.stacks.append(stack)

    def __exit__(self, *exc) -> bool:
        return self.stacks.pop().__exit__(*exc)


class _RunningStatisticsKept:
    """Recomputing a training-mode forward updates BatchNorm's running statistics a second time
    with the same batch: put back what the first forward left (taken when the recompute starts,
    in backward; a recompute that stops early leaves the rest untouched)."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self.saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self):
        self.saved.append([(b, b.clone()) for m in self.norms for b in m.buffers(recurse=False)])

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buffer, value in self.saved.pop():
                buffer.copy_(value)
