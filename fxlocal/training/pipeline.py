"""Pipeline-parallel local training (PPLL): one block per process, activations flowing forward.

Under ``torchrun --nproc-per-node K``, rank ``r`` owns block ``r``, its aux head and its
optimizer. Rank 0 reads the data; each rank trains its block on what it receives
(:meth:`LocalModel.train_block`) and sends the detached output, with the labels, to rank
``r + 1`` by point-to-point sends on torch.distributed (gloo on CPU, nccl on GPU). With DGL's,
AugLocal's or InfoPro's heads nothing flows backward: a block's update depends on its own input
and labels only, so the ranks compute exactly the updates of sequential local training on the
same batches, overlapped in time. Two kinds of message may flow backward: the weights of a later
stage that a stage's EMA twins follow (MAN, MLAAN: :class:`_FollowedWeights`), and the gradient
a cascade (MLAAN) sends into the block before, which that stage re-runs and backpropagates
before its step (:class:`_CascadeGradients`).

A stage has at most ``pipeline.max_in_flight`` unfinished sends: a fast stage waits for a slow
one rather than queueing batches without bound. The test batches flow through the same pipeline;
the last rank computes the metrics and writes ``metrics.jsonl``, and a checkpoint gathers every
stage's state into one file of the sequential trainer's format (it resumes it, pipelined or not,
and ``fxlocal export`` reads it). A stage whose neighbour dies or stays silent for
``pipeline.timeout_s`` raises :class:`PipelineError` rather than hanging.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..aux.ema import EMATwin
from ..errors import FxLocalError, TrainingDiverged
from ..graph.replace import blends
from ..local_model import LocalModel
from .build import build_agreed_model
from .checkpoint import (
    resume_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .evaluate import evaluation_record, top_correct
from .loaders import make_loaders, reseed_epoch
from .optim import block_stage, load_optimizer_state, make_optimizer, make_schedulers
from .recipe import Recipe
from .report import (
    Reporter,
    TrainResult,
    check_output_dir,
    log_metrics,
    make_output_dir,
    plot_curves,
    tensorboard,
)
from .runtime import (
    Distributed,
    amp_scaler,
    autocast_context,
    device_kind,
    init_distributed,
    leave_distributed,
    peak_memory_mib,
    training_device,
)

__all__ = ["PipelineError", "fit_pipeline", "pipeline_obstacle"]

TRAIN, EVAL, END = 0, 1, 2
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_MAX_DIMS = 8
_MAX_TENSORS = 3  # a cut's tensor, the one it may carry beside it, and the model input (InfoPro's heads read it)
_TENSOR_HEADER = 2 + _MAX_DIMS  # dtype, ndim, shape
_HEADER = 4 + _MAX_TENSORS * _TENSOR_HEADER  # kind, tensor count, has plain values, has the model input, each tensor's


class _Waits:
    """Where a stage's training pass waited, in seconds, by cause: ``input`` (the data for
    stage 0, the stage before's output for the others), ``send`` (the stage after had not taken
    ``max_in_flight`` earlier outputs), ``exchange`` (a later stage's weights or gradients: MAN,
    MLAAN). The rest of the pass is the stage's own work; an efficient pipeline waits little."""

    CAUSES = ("input", "send", "exchange")

    def __init__(self):
        self.seconds = dict.fromkeys(self.CAUSES, 0.0)

    @contextlib.contextmanager
    def on(self, cause: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[cause] += time.perf_counter() - started

    def reset(self) -> dict[str, float]:
        """The seconds so far, by cause; starts counting again from zero."""
        seconds, self.seconds = self.seconds, dict.fromkeys(self.CAUSES, 0.0)
        return seconds


class PipelineError(FxLocalError, RuntimeError):
    """The run cannot be pipelined, or a stage lost its neighbour (it died or stopped answering)."""


def pipeline_obstacle(local: LocalModel) -> str | None:
    """Why ``local``'s blocks cannot be trained one per process, or None when they can.

    A stage holds one block's weights only, so an objective must not read another block's,
    except a later block's that its EMA twins follow (MAN, MLAAN: that stage sends them back,
    :class:`_FollowedWeights`); a cascade reaches the block before only (MLAAN with span 2: the
    gradient goes back one stage, :class:`_CascadeGradients`); a replaced unit next to a cut
    must not read the other block's weights; nor may two blocks hold one parameter (a tied table's).
    """
    if local.input_window > 2:
        return (f"its {local.plan.aux} objective re-runs {local.input_window - 1} earlier blocks in each block's loss, "
                "and a stage sends the gradient back to the stage before only (set its span to 2)")
    if local.task is not None:  # the stages report top-1 and pass class targets on
        return f"it is trained for {local.task.name}, and pipeline stages train classifiers (train it without --pipeline)"
    for b, block in enumerate(local.blocks):
        own = {id(p) for p in block.parameters()}
        reads = [blend for blend in blends(block) if any(id(getattr(s, blend.name)) not in own for s in blend.sources)]
        if reads:
            return (
                f"a replaced unit in block {b} is made from a neighbour's weights that another block trains, which "
                "one process per block cannot keep in step (cut elsewhere with convert.cuts, or train it without --pipeline)"
            )
    tied = local.tied_parameters()
    if tied:
        name, holders = next(iter(tied.items()))
        return (
            f"blocks {', '.join(map(str, holders))} share parameter {name!r} (a table each recomputes "
            "from it), which one process per block cannot keep in step"
        )
    for b in range(local.k):
        for twin in _following_twins(local, b):
            leader = _leader(local, twin)
            if leader is None or leader <= b:
                return f"block {b}'s {local.plan.aux} head has an EMA twin following weights that no single later block holds"
    return None


def _leader(local: LocalModel, twin: EMATwin) -> int | None:
    """The one block holding every weight ``twin`` follows, or None when no single block does."""
    holders = {b for p in twin.live_parameters for b, block in enumerate(local.blocks)
               if any(p is q for q in block.parameters())}
    return holders.pop() if len(holders) == 1 else None


def _following_twins(local: LocalModel, b: int) -> list[EMATwin]:
    """The EMA twins of block ``b``'s objective that follow another block's weights (MAN's
    follow the next block's first unit, MLAAN's the first unit of its chain), in module order."""
    own = {id(p) for p in local.block_parameters(b)}
    objective = local.heads[b] if b < len(local.heads) else local.final_objective
    twins = [m for m in (objective.modules() if objective is not None else ()) if isinstance(m, EMATwin)]
    return [twin for twin in twins if any(id(p) not in own for p in twin.live_parameters)]


class _FollowedWeights:
    """The weights of later stages that stage ``r``'s EMA twins follow (MAN: the next block's
    first unit; MLAAN: the first unit its chain copies, up to a few blocks on), sent back from
    each such leader to ``r``: once as a run starts, then after every ``every``-th step of the
    leader. Stage ``r`` receives them after its backward, before its twins update, at its first
    step and every ``every``-th: with ``every=1`` a twin at step ``t`` follows the weights after
    the leader's step ``t - 1``, as in sequential training, while stage ``r``'s forward and
    backward overlap that step. Nothing is sent after the last step.

    Build it before the other blocks leave this process (it reads which parameters the twins
    follow), then :meth:`place` it on the stage's device.
    """

    def __init__(self, local: LocalModel, rank: int, every: int, timeout_s: float, waits: _Waits, group=None):
        self.rank, self.every, self.group, self.waits = rank, every, group, waits
        self.timeout = timedelta(seconds=timeout_s)
        # as a follower: this stage's twins, by the stage they follow
        self.twins: dict[int, list[EMATwin]] = {}
        for twin in _following_twins(local, rank):
            self.twins.setdefault(_leader(local, twin), []).append(twin)
        # as a leader: this stage's parameters that an earlier stage's twins follow, by follower
        led = {f: [p for twin in _following_twins(local, f) if _leader(local, twin) == rank for p in twin.live_parameters]
               for f in range(rank)}
        self.led = {f: params for f, params in led.items() if params}
        self.copies: dict[int, list[torch.Tensor]] = {}
        self.sending: deque[tuple[object, torch.Tensor]] = deque()

    def place(self, device: torch.device) -> None:
        """Give this stage's twins copies of what they follow, on ``device``."""
        for leader, twins in self.twins.items():
            for twin in twins:
                copies = [torch.zeros(p.shape, dtype=p.dtype, device=device) for p in twin.live_parameters]
                twin.follow(copies)
                self.copies.setdefault(leader, []).extend(copies)

    def start(self) -> None:
        """As a run starts: the leader sends the weights as they are."""
        self._send()

    def after_step(self, step: int, end: int) -> None:
        """The leader, after its global ``step`` of a run that ends before step ``end``."""
        if self.led and (step + 1) % self.every == 0 and step + 1 < end:
            self._send()

    def receiver(self, step: int, start: int):
        """The follower's hook for its global ``step`` (:meth:`LocalModel.train_block`'s
        ``before_heads_follow``), or None where it receives nothing at that step."""
        if not self.twins or not (step == start or step % self.every == 0):
            return None
        return self._receive

    def _send(self) -> None:
        for follower, params in self.led.items():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            with _losing_is_an_error(self.rank, f"stage {follower}"):
                self.sending.append((dist.isend(flat, follower, group=self.group), flat))
        # each follower takes one per step: never far behind
        while len(self.sending) > 2 * len(self.led):
            with _losing_is_an_error(self.rank, "a stage before"), self.waits.on("exchange"):
                self.sending.popleft()[0].wait(self.timeout)

    def _receive(self) -> None:
        for leader, copies in self.copies.items():
            flat = torch.empty(sum(c.numel() for c in copies), dtype=copies[0].dtype, device=copies[0].device)
            with _losing_is_an_error(self.rank, f"stage {leader}"), self.waits.on("exchange"):
                dist.irecv(flat, leader, group=self.group).wait(self.timeout)
            for copy, part in zip(copies, torch.split(flat, [c.numel() for c in copies])):
                copy.copy_(part.view_as(copy))

    def flush(self) -> None:
        with _losing_is_an_error(self.rank, "a stage before"):
            while self.sending:
                self.sending.popleft()[0].wait(self.timeout)


class _CascadeGradients:
    """A cascade's gradient, sent back one stage (MLAAN: block ``r``'s loss also trains block
    ``r - 1``, which sequential training re-runs for it).

    Stage ``r`` sends the gradient reaching its input (:meth:`send`); stage ``r - 1`` keeps the
    input of each step it hands on (:meth:`hold`) and, before its step, receives the gradient
    with the input of the step it is for (:meth:`receive`), on which ``train_block`` re-runs the
    block and backpropagates it. With ``delay``
    0 that is this step's: stage ``r - 1`` waits for stage ``r``'s forward and backward every
    step, and the pipeline computes exactly the updates of sequential training, but the stages
    take turns. With ``delay`` d it is step ``t - d``'s, applied to the weights of step ``t``
    (re-run with them), so stage ``r`` works on step ``t - 1`` while stage ``r - 1`` works on
    step ``t`` (with EMA twins following a later stage every step, stages stay within a step of
    it: a larger delay adds staleness, not overlap). The gradients of an epoch's last d steps
    are not sent: every epoch ends with nothing in flight, so a checkpoint holds all there is
    and a resumed run continues as an uninterrupted one.

    Gradients travel unscaled, in float32: a stage's fp16 gradient scaler follows its own steps,
    and the receiver scales them by its own.
    """

    def __init__(self, local: LocalModel, rank: int, delay: int, scaler, device: torch.device, timeout_s: float,
                 waits: _Waits, group=None):
        self.rank, self.delay, self.scaler, self.device, self.group = rank, delay, scaler, device, group
        self.waits = waits
        self.timeout = timedelta(seconds=timeout_s)
        self.receives = local.input_window > 1 and rank < local.k - 1
        # the steps still to receive a gradient for: (step, block input, (shape, dtype) of each floating output)
        self.held: deque[tuple[int, tuple, list[tuple[torch.Size, torch.dtype]]]] = deque()
        self.sending: deque[tuple[list, list[torch.Tensor]]] = deque()
        self.step, self.steps = 0, 0

    def start_epoch(self, steps: int) -> None:
        self.held.clear()
        self.step, self.steps = 0, steps

    def next_step(self) -> None:
        self.step += 1

    def _exchanged(self, step: int) -> bool:
        """Whether step ``step``'s gradient is sent: its application falls within the epoch."""
        return step + self.delay < self.steps

    def hold(self, inputs: tuple, handed_on: tuple) -> None:
        """Keep this step's block input until the gradient for its output arrives."""
        if self.receives and self._exchanged(self.step):
            outputs = [(t.shape, t.dtype) for t in handed_on if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self.held.append((self.step, inputs, outputs))

    def send(self, grads: list[torch.Tensor | None], cascaded: bool) -> None:
        """As ``train_block``'s ``send_input_gradient``: a header (whether the loss cascaded, which
        gradients are there), then the gradients."""
        if not self._exchanged(self.step):
            return
        present = [g for g in grads if g is not None]
        if self.scaler is not None and present:
            inverse = 1.0 / self.scaler.get_scale()
            present = [g.float() * inverse for g in present]
        header = torch.tensor([cascaded, *(g is not None for g in grads)], dtype=torch.long, device=self.device)
        tensors = [header, *(g.contiguous() for g in present)]
        with _losing_is_an_error(self.rank, f"stage {self.rank - 1}"):
            self.sending.append(([dist.isend(t, self.rank - 1, group=self.group) for t in tensors], tensors))
            while len(self.sending) > self.delay + 1:  # the stage before takes one per step
                self._wait(self.sending.popleft()[0])

    def receive(self) -> tuple[tuple, list[torch.Tensor | None]] | None:
        """As ``train_block``'s ``receive_output_gradient``: the input and output gradient of the
        step ``delay`` steps back, or None where there is none."""
        if not self.held or self.held[0][0] != self.step - self.delay:
            return None
        _, inputs, outputs = self.held.popleft()
        with _losing_is_an_error(self.rank, f"stage {self.rank + 1}"):
            header = torch.empty(1 + len(outputs), dtype=torch.long, device=self.device)
            self._wait([dist.irecv(header, self.rank + 1, group=self.group)])
            cascaded, *present = header.tolist()
            grads = [torch.empty(shape, dtype=torch.float32 if self.scaler is not None else dtype, device=self.device)
                     if p else None for p, (shape, dtype) in zip(present, outputs)]
            self._wait([dist.irecv(g, self.rank + 1, group=self.group) for g in grads if g is not None])
        if not cascaded:
            return None
        if self.scaler is not None:  # scaled as this stage's own losses are, in the outputs' dtype
            grads = [self.scaler.scale(g).to(dtype) if g is not None else None for g, (_, dtype) in zip(grads, outputs)]
        return inputs, grads

    def flush(self) -> None:
        with _losing_is_an_error(self.rank, f"stage {self.rank - 1}"):
            while self.sending:
                self._wait(self.sending.popleft()[0])

    def _wait(self, works: list) -> None:
        with self.waits.on("exchange"):
            for work in works:
                work.wait(self.timeout)


@contextlib.contextmanager
def _losing_is_an_error(rank: int, peer: str):
    """A peer that died or went silent past the timeout, as one line (not gloo's traceback)."""
    try:
        yield
    except FxLocalError:  # fxlocal's own (some are RuntimeErrors): already one line
        raise
    except RuntimeError as exc:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        raise PipelineError(
            f"pipeline stage {rank} lost {peer} ({_first_line(exc)}); that process stopped or hangs, its own output says why"
        ) from None


def _first_line(exc: BaseException) -> str:
    """The backend's reason, without the source location gloo prefixes it with."""
    text = str(exc).strip().splitlines()
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(exc).__name__
    return re.split(r"(?<=\.)\s", reason)[0]  # the first sentence; gloo goes on with advice


class _Link:
    """Messages between neighbouring stages: stage r receives from r-1 and sends to r+1.

    A message is a fixed-size header (kind; count, dtype and shape of the boundary tensors) and,
    unless it marks the end of a pass over the data, the boundary tensors (the cut's, and the one
    it carries where it carries one), the model input where a later stage's objective reads it
    (InfoPro's heads), the labels and, rarely, the plain values that cross the boundary after
    them (pickled). Sends are asynchronous, at most ``max_in_flight`` open.
    """

    def __init__(self, rank: int, world: int, device: torch.device, max_in_flight: int, timeout_s: float,
                 waits: _Waits | None = None):
        self.rank, self.world, self.device = rank, world, device
        self.waits = waits if waits is not None else _Waits()
        self.max_in_flight = max_in_flight
        self.timeout = timedelta(seconds=timeout_s)
        self.in_flight: deque[tuple[list, tuple]] = deque()  # (works, the tensors they read)

    def talking_to(self, peer: str):
        return _losing_is_an_error(self.rank, peer)

    def send(self, kind: int, carried: tuple = (), y: torch.Tensor | None = None, model_input: torch.Tensor | None = None) -> None:
        header = torch.zeros(_HEADER, dtype=torch.long)
        header[0] = kind
        tensors: list[torch.Tensor] = []
        # a block hands on its tensors first, then plain values (see fxlocal.graph.split)
        boundary = [v.contiguous() for v in carried if isinstance(v, torch.Tensor)]
        plain = list(carried[len(boundary):])
        if kind != END:
            if len(boundary) > _MAX_TENSORS - 1:
                raise ValueError(f"a boundary carries at most {_MAX_TENSORS - 1} tensors, got {len(boundary)}")
            sent = [*boundary, *([model_input.contiguous()] if model_input is not None else [])]
            header[1:4] = torch.tensor([len(sent), bool(plain), model_input is not None])
            for i, t in enumerate(sent):
                at = 4 + i * _TENSOR_HEADER
                header[at : at + 2] = torch.tensor([_DTYPES.index(t.dtype), t.dim()])
                header[at + 2 : at + 2 + t.dim()] = torch.tensor(t.shape)
            tensors = [*sent, y.long().contiguous()]
        tensors = [header.to(self.device), *tensors]
        with self.talking_to(f"stage {self.rank + 1}"):
            works = [dist.isend(t, self.rank + 1) for t in tensors]
            if plain:
                dist.send_object_list([plain], self.rank + 1, device=self.device)
            self.in_flight.append((works, tensors))
            with self.waits.on("send"):
                while len(self.in_flight) > self.max_in_flight:
                    self._wait(self.in_flight.popleft()[0])

    def recv(self) -> tuple[int, tuple, torch.Tensor | None, torch.Tensor | None]:
        """``(kind, boundary, labels, model input or None)`` of the next message."""
        source = self.rank - 1
        with self.talking_to(f"stage {source}"):
            header = torch.empty(_HEADER, dtype=torch.long, device=self.device)
            self._wait([dist.irecv(header, source)])
            kind, count, has_plain, has_input, *specs = header.tolist()
            if kind == END:
                return END, (), None, None
            received = []
            for i in range(count):
                code, ndim, *shape = specs[i * _TENSOR_HEADER : (i + 1) * _TENSOR_HEADER]
                received.append(torch.empty(shape[:ndim], dtype=_DTYPES[code], device=self.device))
            y = torch.empty(received[0].shape[0], dtype=torch.long, device=self.device)
            self._wait([dist.irecv(t, source) for t in [*received, y]])
            plain: list = [[]]
            if has_plain:
                dist.recv_object_list(plain, source, device=self.device)
        boundary, model_input = (received[:-1], received[-1]) if has_input else (received, None)
        return kind, (*boundary, *plain[0]), y, model_input

    def receive(self, kind: int) -> Iterator[tuple[tuple, torch.Tensor, torch.Tensor | None]]:
        """``(input, labels, model input or None)`` of each ``kind`` message until the end of the pass."""
        while True:
            got, carried, y, model_input = self.recv()
            if got == END:
                return
            if got != kind:
                raise PipelineError(f"pipeline stage {self.rank} got a {got} message during a {kind} pass (stages out of step)")
            yield carried, y, model_input

    def flush(self) -> None:
        with self.talking_to(f"stage {self.rank + 1}"):
            while self.in_flight:
                self._wait(self.in_flight.popleft()[0])

    def _wait(self, works: list) -> None:
        for work in works:
            work.wait(self.timeout)


@dataclass(frozen=True)
class _RunSteps:
    """A run's steps, counted over epochs: per epoch, the first (where a resumed run starts) and the end."""

    per_epoch: int
    first: int
    end: int


@dataclass
class _Totals:
    """One stage's sums over an epoch."""

    loss: float = 0.0
    accuracy: float = 0.0
    images: int = 0


def _waiting_for_input(batches: Iterator, waits: _Waits) -> Iterator:
    """``batches``, the time taken to get each counted as waiting for input."""
    while True:
        with waits.on("input"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _train_pass(local, rank, link, batches, optimizer, scaler, autocast, epoch, reporter, started, followed, cascade,
                steps, waits) -> _Totals:
    """One epoch of this stage; ``followed`` exchanges the weights EMA twins follow, by global
    step (``steps``: per epoch, the run's first and its end), ``cascade`` a cascade's gradients;
    ``waits`` counts the time spent waiting for each."""
    totals = _Totals()
    last = rank == local.k - 1
    forwards_input = any(b > rank for b in local.needs_model_input)
    cascade.start_epoch(steps.per_epoch)
    for step, (carried, y, model_input) in enumerate(_waiting_for_input(iter(batches), waits)):
        at = epoch * steps.per_epoch + step

        def hand_on(handed_on, carried=carried, y=y, model_input=model_input):
            # sent before this stage's step and before it waits for a later stage's weights or gradient: the next stage starts sooner
            cascade.hold(carried, handed_on)
            link.send(TRAIN, handed_on, y, model_input if forwards_input else None)

        with autocast:
            _, loss, logits = local.train_block(
                rank, carried, y, optimizer, scaler=scaler, before_heads_follow=followed.receiver(at, steps.first),
                model_input=model_input, hand_on=None if last else hand_on,
                send_input_gradient=cascade.send, receive_output_gradient=cascade.receive,
            )
        followed.after_step(at, steps.end)
        cascade.next_step()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss of block {rank} is {value} at epoch {epoch + 1}, step {step + 1}; stopped. "
                "The last good checkpoint is the last one written; lower optimizer.lr or enable warm-up"
            )
        totals.loss += value
        totals.accuracy += (logits.argmax(-1) == y).float().mean().item()
        totals.images += len(y)
        reporter.step(epoch, step, [value], totals.images / max(time.perf_counter() - started, 1e-9))
    if not last:
        link.send(END)
    return totals


@torch.no_grad()
def _eval_pass(local, rank, link, batches, autocast) -> dict:
    """This stage's share of the evaluation: its head's correct count, or (last) the model's."""

    local.eval()
    counts = {"local_correct": 0, "correct1": 0, "correct5": 0, "total": 0}
    last = rank == local.k - 1
    for carried, y, _ in batches:
        with autocast:
            out = local.blocks[rank](*carried)
            if last:
                c1, c5 = top_correct(out, y)
                counts["correct1"] += c1
                counts["correct5"] += c5
            else:
                counts["local_correct"] += int((local.head_logits(rank, out).argmax(-1) == y).sum().item())
                link.send(EVAL, out, y)
        counts["total"] += len(y)
    if not last:
        link.send(END)
    local.train()
    return counts


def _owned_key(key: str, rank: int, k: int) -> bool:
    """Whether stage ``rank`` holds the live value of a LocalModel state_dict entry."""
    for prefix, owner in (("blocks.", None), ("heads.", None), ("final_objective.", k - 1)):
        if key.startswith(prefix):
            return (owner if owner is not None else int(key.split(".")[1])) == rank
    return rank == 0  # never trained (untraced leftovers of the original): any copy will do


def _stage_state(local, rank, optimizer, scheduler, scaler, rng) -> dict:
    def to_cpu(t):
        return t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t

    model = {key: value for key, value in local.state_dict().items() if _owned_key(key, rank, local.k)}
    return tree_map(
        to_cpu,
        {
            "model": model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        },
    )


def fit_pipeline(recipe: Recipe, resume: bool = False, reporter=None):
    """:func:`fxlocal.training.fit` with one block per process (see the module docstring)."""

    if not recipe.optimizer.per_block:
        raise PipelineError("pipeline mode steps each block's optimizer in the block's own process: set optimizer.per_block: true")
    dist_ = init_distributed(device_kind(recipe), recipe.pipeline.timeout_s)
    out_dir = check_output_dir(recipe.output_dir)
    checkpoint = out_dir / "last.pt"
    state = resume_state(out_dir, resume)
    if dist_.main:  # builds the model and sends its plan: its errors are its own
        local = build_agreed_model(recipe, dist_, state)
    else:
        with _losing_is_an_error(dist_.rank, "stage 0"):  # waits for that plan
            local = build_agreed_model(recipe, dist_, state)
    obstacle = pipeline_obstacle(local) if local.k > 1 else "it has one block; set convert.k to 2 or more"
    if obstacle:
        raise PipelineError(f"cannot pipeline this model: {obstacle}; use aux dgl, auglocal, man, mlaan or none")
    if dist_.world != local.k:
        raise PipelineError(
            f"pipeline mode runs one process per block and this model has {local.k} blocks: launch it with "
            f"torchrun --nproc-per-node {local.k} (got {dist_.world} process(es))"
        )
    rank, k = dist_.rank, local.k
    last = rank == k - 1
    reporter = (reporter or Reporter()) if last else Reporter()
    device = training_device(recipe, dist_.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    make_output_dir(out_dir)
    start_epoch, history = 0, []
    if state is not None:
        if len(state["optimizers"]) != k:
            raise PipelineError(f"{checkpoint} holds one optimizer for the whole model; pipeline mode needs one per block")
        local.load_state_dict(state["model"])
        start_epoch, history = state["epoch"], state["history"]
    # One communicator per kind of message flowing backward (weights for EMA twins, a cascade's
    # gradients): each keeps its own order between two stages whatever the other does, which
    # point-to-point tags cannot promise (NCCL ignores them).
    with _losing_is_an_error(rank, "a stage"):
        weights_group, gradients_group = (dist.new_group(timeout=timedelta(seconds=recipe.pipeline.timeout_s))
                                          for _ in range(2))
    waits = _Waits()
    followed = _FollowedWeights(local, rank, recipe.pipeline.weight_sync, recipe.pipeline.timeout_s, waits, weights_group)
    # This process keeps its own block (and head) only.
    for b in range(k):
        if b != rank:
            block_stage(local, b).to("meta")
    stage = block_stage(local, rank).to(device)
    if last and local.final_objective is not None:
        local.final_objective.to(device)
    followed.place(device)
    optimizer = make_optimizer(recipe, stage)
    schedulers = make_schedulers(recipe, [optimizer])
    scheduler = schedulers[0] if schedulers else None
    scaler = amp_scaler(recipe, device)
    cascade = _CascadeGradients(local, rank, recipe.pipeline.cascade_delay, scaler, device, recipe.pipeline.timeout_s,
                                waits, gradients_group)
    if state is not None:
        load_optimizer_state(optimizer, state["optimizers"][rank])
        if scheduler is not None:
            scheduler.load_state_dict(state["schedulers"][rank])
        pipelined = state.get("pipeline") or {}
        if scaler is not None and (pipelined.get("scalers") or [None] * k)[rank] is not None:
            scaler.load_state_dict(pipelined["scalers"][rank])
        rngs = pipelined.get("rng") or [state["rng"], *[None] * (k - 1)]
        if rngs[rank] is not None:
            set_rng_state(rngs[rank])
    else:  # every stage as the sequential trainer's single process: rank 0's data order matches
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)

    link = _Link(rank, k, device, recipe.pipeline.max_in_flight, recipe.pipeline.timeout_s, waits)
    if rank == 0:
        train_loader, sampler, order, eval_loader = make_loaders(recipe, Distributed(), device)
        steps = len(train_loader) if recipe.max_steps_per_epoch is None else min(len(train_loader), recipe.max_steps_per_epoch)
    shared = [steps if rank == 0 else None]
    with link.talking_to("stage 0"):
        dist.broadcast_object_list(shared, src=0)
    steps = shared[0]
    if local.input_window > 1 and recipe.pipeline.cascade_delay >= steps:
        raise PipelineError(
            f"pipeline.cascade_delay is {recipe.pipeline.cascade_delay} but an epoch has {steps} steps: no cascade gradient "
            "would ever be applied; set it below the steps per epoch (0 or 1)"
        )
    reporter.run_start(recipe, local, start_epoch, steps)
    writer = tensorboard(out_dir) if last else None
    autocast = autocast_context(device, recipe.amp)

    def from_loader(loader, limit=None):
        for step, (x, y) in enumerate(loader):
            if limit is not None and step >= limit:
                return
            x = x.to(device, non_blocking=True)
            yield (x,), y.to(device, non_blocking=True), x

    run_steps = _RunSteps(steps, start_epoch * steps, recipe.epochs * steps)
    followed.start()
    for epoch in range(start_epoch, recipe.epochs):
        local.train()
        if rank == 0:
            reseed_epoch(sampler, order, recipe.seed, epoch)
        waits.reset()
        started = time.perf_counter()
        batches = from_loader(train_loader, steps) if rank == 0 else link.receive(TRAIN)
        totals = _train_pass(local, rank, link, batches, optimizer, scaler, autocast, epoch, reporter, started, followed,
                             cascade, run_steps, waits)
        elapsed = time.perf_counter() - started
        waited = waits.reset()
        if scheduler is not None:
            scheduler.step(epoch + 1)
        evaluated = (epoch + 1) % recipe.eval_interval == 0 or epoch + 1 == recipe.epochs
        counts = None
        if evaluated:
            batches = from_loader(eval_loader) if rank == 0 else link.receive(EVAL)
            counts = _eval_pass(local, rank, link, batches, autocast)
        summary = {
            "loss": totals.loss / max(steps, 1),
            "accuracy": totals.accuracy / max(steps, 1),
            "peak_memory_mib": round(peak_memory_mib(device), 1),
            "lr": optimizer.param_groups[0]["lr"],
            "eval": counts,
            "seconds": elapsed,
            "waited": waited,
        }
        summaries = [None] * k if last else None
        with link.talking_to("a stage"):
            link.flush()
            dist.gather_object(summary, summaries, dst=k - 1)
        if last:
            record = {
                "epoch": epoch + 1,
                "train_loss": [round(s["loss"], 5) for s in summaries],
                "train_local_top1": [round(s["accuracy"], 5) for s in summaries],
                "images_per_s": round(totals.images / max(elapsed, 1e-9), 2),
                "lr": summaries[0]["lr"],
                "peak_memory_mib": max(s["peak_memory_mib"] for s in summaries),
                "stage_peak_memory_mib": [s["peak_memory_mib"] for s in summaries],
                # where each stage's training pass went: its seconds, and those it spent waiting (see _Waits)
                "stage_train_s": [round(s["seconds"], 3) for s in summaries],
                "stage_wait_s": [{cause: round(v, 3) for cause, v in s["waited"].items()} for s in summaries],
                "world_size": k,
                "steps": steps,
                "pipeline": True,
            }
            if evaluated:
                final = summaries[-1]["eval"]
                local_correct = [s["eval"]["local_correct"] for s in summaries[:-1]]
                result = evaluation_record(final["correct1"], final["correct5"], local_correct, final["total"])
                record.update({f"test_{key}": v for key, v in result.items()})
            history.append(record)
            log_metrics(out_dir, writer, record)
            reporter.epoch_end(record)
        if (epoch + 1) % recipe.checkpoint_interval == 0 or epoch + 1 == recipe.epochs:
            parts = [None] * k if last else None
            with link.talking_to("a stage"):
                dist.gather_object(_stage_state(local, rank, optimizer, scheduler, scaler, rng_state()), parts, dst=k - 1)
            if last:
                write_checkpoint(
                    checkpoint, recipe, local, epoch + 1, history,
                    model={key: value for part in parts for key, value in part["model"].items()},
                    optimizers=[p["optimizer"] for p in parts],
                    schedulers=[p["scheduler"] for p in parts] if scheduler is not None else [],
                    scaler=parts[-1]["scaler"],
                    rng=parts[0]["rng"],  # rank 0 drew the data augmentation, as a single process does
                    pipeline={"rng": [p["rng"] for p in parts], "scalers": [p["scaler"] for p in parts]},
                )
    if writer is not None:
        writer.close()
    if last:
        plot_curves(history, out_dir / "curves.png")
    followed.flush()
    cascade.flush()
    with link.talking_to("a stage"):
        leave_distributed(dist_)
    return TrainResult(out_dir, recipe.epochs, history, history[-1] if history else {}, last)
