"""Predict the peak memory of one training step, end to end vs local, without allocating.

The model (and the converted model) are copied under ``FakeCopyMode(FakeTensorMode())`` and a
full step — forward, backward, optimizer step — runs under
``torch.distributed._tools.mem_tracker.MemTracker``; fake and real CPU runs report the same
peaks, and the fake run allocates nothing. One untracked step runs first so that optimizer state
exists (and so that MemTracker sees a steady state). With ``device="cuda"`` the same step runs
for real and ``torch.cuda.max_memory_allocated`` is read instead.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from .errors import FxLocalError
from .local_model import LocalModel

if TYPE_CHECKING:
    from .convert import AnalyzedModel

__all__ = [
    "batch_step_peak_bytes",
    "BlockMemory",
    "MemoryLimitError",
    "MemoryReport",
    "OPTIMIZERS",
    "parse_bytes",
    "predict_memory",
    "smallest_k_that_fits",
    "step_peak_bytes",
    "step_flops",
    "e2e_step",
    "local_step",
    "block_step_peaks",
]

MIB = 2**20

# optimizer name -> (factory, state tensors per parameter)
OPTIMIZERS: dict[str, tuple[Callable, int]] = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), 1),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-3), 2),
}


@dataclass
class BlockMemory:
    index: int
    activations_mib: float  # saved for backward by the block and its head, at this batch
    params_mib: float
    grads_mib: float
    optimizer_mib: float
    head_params_mib: float


@dataclass
class MemoryReport:
    model: str
    k: int
    aux: str
    batch: int
    input_size: tuple[int, ...]
    optimizer: str
    device: str
    e2e_peak_mib: float
    local_peak_mib: float
    blocks: list[BlockMemory] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.local_peak_mib / self.e2e_peak_mib


def make_step_optimizers(module: nn.Module, optimizer: str, per_block: bool) -> torch.optim.Optimizer | list:
    """One optimizer over ``module``, or one per block of a LocalModel (stepped block by block)."""
    make = OPTIMIZERS[optimizer][0]
    if per_block:
        return [make([p for p in module.block_parameters(b) if p.requires_grad]) for b in range(module.k)]
    return make([p for p in module.parameters() if p.requires_grad])


def step_peak_bytes(module: nn.Module, step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], None],
                    batch: int, input_size: tuple[int, ...], num_classes: int, optimizer: str = "sgd",
                    device: str = "fake", per_block: bool = False) -> int:
    """Peak bytes of ``step(module, optimizer, x, y)`` after a warm-up step; with ``per_block``
    the LocalModel ``module`` gets one optimizer per block (see :meth:`LocalModel.train_step`)."""
    if device == "cuda":
        # what earlier measurements left behind (fx modules hold reference cycles) is not this step's
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        module = copy.deepcopy(module).cuda()
        opt = make_step_optimizers(module, optimizer, per_block)
        x = torch.randn(batch, *input_size, device="cuda")
        y = torch.randint(0, num_classes, (batch,), device="cuda")
        step(module, opt, x, y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(module, opt, x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del module, opt, x, y
        gc.collect()
        return peak
    tracker = _fake_tracked_step(module, step, batch, input_size, num_classes, optimizer, per_block)
    return int(max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))


def batch_step_peak_bytes(local: LocalModel, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                          per_block: bool = True) -> int:
    """Peak bytes of one local training step of ``local`` itself on the real batch ``(x, y)``,
    after a warm-up step (which creates the optimizer state), tracked as :func:`step_peak_bytes`
    tracks a fake one. For objectives that fake tensors cannot run: a detector's loss matches
    anchors to the batch's boxes by value. The warm-up and the tracked step train ``local``.

    Args:
        local: the model (on the device of ``x``).
        x, y: a batch and its targets.
        optimizer: ``sgd`` or ``adamw`` (their state counts).
        per_block: one optimizer per block, as the trainer does by default.

    Returns:
        The step's peak, in bytes: weights, gradients, optimizer state and activations.
    """
    opt = make_step_optimizers(local, optimizer, per_block)
    tracker = _tracked_step(local, local_step, opt, x, y, per_block)
    return int(max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))


def step_flops(module: nn.Module, batch: int, input_size: tuple[int, ...], num_classes: int,
               optimizer: str = "sgd", per_block: bool = False) -> int:
    """Floating-point operations of one training step of ``module`` (a LocalModel: its
    ``train_step``, aux heads, cascades and recomputation included; else forward, backward and
    step end to end), counted by ``torch.utils.flop_counter.FlopCounterMode`` on fake tensors
    after a warm-up step. FlopCounterMode counts matrix products and convolutions (2 per
    multiply-add), not elementwise work such as normalisation or EMA updates.

    Args:
        module: the model to step; it is copied, never run.
        batch, input_size, num_classes: the step's fake batch.
        optimizer: a name of :data:`OPTIMIZERS`.
        per_block: a LocalModel gets one optimizer per block (see :meth:`LocalModel.train_step`).

    Returns:
        The step's FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    step = local_step if isinstance(module, LocalModel) else e2e_step
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake = copy.deepcopy(module)
    with mode:
        opt = make_step_optimizers(fake, optimizer, per_block)
        x = torch.randn(batch, *input_size)
        y = torch.randint(0, num_classes, (batch,))
        step(fake, opt, x, y)
        counter = FlopCounterMode(display=False)
        with counter:
            step(fake, opt, x, y)
    return counter.get_total_flops()


def block_step_peaks(local: LocalModel, batch: int, input_size: tuple[int, ...], num_classes: int,
                     optimizer: str = "sgd") -> list[int]:
    """Peak bytes of each block's part of one local training step (per-block optimizers), on
    fake tensors: from the block's forward to the next block's (its head, loss, backward and
    step), an earlier block that a cascade recomputes counting toward the block whose loss
    recomputes it. Which block binds the step's peak, and by how much."""
    phase = _Phase()

    def tag_blocks(fake: LocalModel) -> None:  # the fake copy's, which the tracked step runs
        fake.block_started = lambda b: setattr(phase, "block", b)

    def start_step(fake, opt, x, y) -> None:
        phase.block = 0
        local_step(fake, opt, x, y)

    tracker = _fake_tracked_step(local, start_step, batch, input_size, num_classes, optimizer, True, tag_blocks, phase)
    return [int(tracker.phase_peaks.get(b, 0)) for b in range(local.k)]


@dataclass
class _Phase:
    """Which block's part of a tracked step is running: the step sets it, the tracker reads it."""

    block: int = 0


def _fake_tracked_step(module, step, batch, input_size, num_classes, optimizer, per_block, prepare=None, phase=None):
    """The tracker of one ``step`` of a fake copy of ``module``, after a warm-up step (which
    creates the optimizer state); ``prepare(fake)`` before it; with ``phase`` (a :class:`_Phase`
    the step updates), ``tracker.phase_peaks`` holds the peak seen in each block's part."""
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake = copy.deepcopy(module)
    if prepare is not None:
        prepare(fake)
    with mode:
        opt = make_step_optimizers(fake, optimizer, per_block)
        x = torch.randn(batch, *input_size)
        y = torch.randint(0, num_classes, (batch,))
        return _tracked_step(fake, step, opt, x, y, per_block, phase)


def _tracked_step(module, step, opt, x, y, per_block: bool, phase=None):
    """The tracker of one ``step(module, opt, x, y)`` after a warm-up one (which creates the
    optimizer state), real or fake tensors alike."""
    step(module, opt, x, y)
    tracker = step_tracker_class()(phase)
    tracker.track_external(module, *(opt if per_block else [opt]))
    with tracker:
        step(module, opt, x, y)
    return tracker


def step_tracker_class() -> type:
    """A MemTracker that tracks the step's peak without module hooks (see ``NoModules``), and per
    block when given a phase; made on first use (the import is slow)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY as _TOTAL
    from torch.distributed._tools.mem_tracker import MemTracker

    class NoModules:
        """Stands in for MemTracker's module tracker, whose gradient hooks on every module input
        that requires grad keep that input and its gradient alive after the step is done with
        them (a cascade's block input, two blocks on). Without it the step's peak is tracked all
        the same; only the per-module statistics (which refuse a module run twice in one step
        anyway) and the split of activations from temporaries go."""

        parents = frozenset({"Global"})
        is_bw = False

        def register_user_hooks(self, *hooks) -> None:
            pass

        def clear_user_hooks(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *args) -> None:
            pass

    class StepTracker(MemTracker):
        def __init__(self, phase: _Phase | None = None):
            super().__init__()
            self._mod_tracker = NoModules()
            self.phase = phase
            self.phase_peaks: dict = {}

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            if self.phase is not None:
                total = max(snap[_TOTAL] for snap in self._curr_mem_snap.values())
                self.phase_peaks[self.phase.block] = max(self.phase_peaks.get(self.phase.block, 0), total)

    return StepTracker


def e2e_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One end-to-end training step (cross-entropy), as :func:`step_peak_bytes` measures it."""
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def local_step(local: LocalModel, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    """One local training step (``opt``: one optimizer, or one per block), as
    :func:`step_peak_bytes` measures it."""
    local.train_step(x, y, opt, as_tensors=True)


def predict_memory(original: nn.Module, local: LocalModel, batch: int, optimizer: str = "sgd",
                   device: str = "fake", name: str = "", per_block: bool = True) -> MemoryReport:
    """End-to-end vs local peak of one step, with a per-block breakdown; ``per_block``: one
    optimizer per block, as the trainer does by default (see :meth:`LocalModel.train_step`)."""
    size = tuple(local.config["input_size"])
    classes = local.num_classes
    e2e = step_peak_bytes(original, e2e_step, batch, size, classes, optimizer, device)
    loc = step_peak_bytes(local, local_step, batch, size, classes, optimizer, device, per_block)
    states = OPTIMIZERS[optimizer][1]
    blocks = []
    for b, bp in enumerate(local.plan.blocks):
        params = sum(p.numel() * p.element_size() for p in local.blocks[b].parameters())
        head = sum(p.numel() * p.element_size() for p in local.heads[b].parameters()) if b < len(local.heads) else 0
        blocks.append(
            BlockMemory(
                index=b,
                activations_mib=(bp.activation_mib + bp.head_activation_mib) * batch,
                params_mib=params / MIB,
                grads_mib=params / MIB,
                optimizer_mib=states * params / MIB,
                head_params_mib=head / MIB,
            )
        )
    return MemoryReport(name or local.plan.model, local.k, local.plan.aux, batch, size, optimizer, device,
                        e2e / MIB, loc / MIB, blocks)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"500MiB"``, ``"8G"`` (binary), ``"8GB"`` (decimal) -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise MemoryLimitError(f"cannot read memory size {text!r}; write it like 8GiB, 512MiB or 8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class MemoryLimitError(FxLocalError, ValueError):
    """A memory limit that cannot be read or met."""


def smallest_k_that_fits(
    convert_k: Callable[[int], LocalModel],
    limit_bytes: int,
    batch: int,
    max_k: int,
    optimizer: str = "sgd",
    device: str = "fake",
    per_block: bool = True,
) -> tuple[int, LocalModel, float]:
    """The smallest K whose predicted step peak fits ``limit_bytes``: (K, model, peak MiB).

    Peaks do not fall monotonically with K (more cuts, more heads), so K is scanned upward on
    a sparse grid (1-6, 8, 10, 12, 16, 24, 32, …, max_k) and, at the first fit, the gap below it
    is filled in. If nothing fits, the error names the smallest peak seen and its K.
    ``per_block`` as in :func:`predict_memory`.
    """
    cache: dict[int, tuple[LocalModel, int]] = {}

    def peak(k: int) -> int:
        if k not in cache:
            local = convert_k(k)
            size = tuple(local.config["input_size"])
            classes = local.num_classes
            cache[k] = (local, step_peak_bytes(local, local_step, batch, size, classes, optimizer, device, per_block))
        return cache[k][1]

    grid = sorted({k for k in (1, 2, 3, 4, 5, 6, 8, 10, 12) if k <= max_k} | {2**i for i in range(4, 12) if 2**i <= max_k}
                  | {3 * 2**i for i in range(3, 11) if 3 * 2**i <= max_k} | {max_k})
    previous = 0
    for k in grid:
        if peak(k) <= limit_bytes:
            for smaller in range(previous + 1, k):
                if peak(smaller) <= limit_bytes:
                    k = smaller
                    break
            return k, cache[k][0], cache[k][1] / MIB
        previous = k
    best_k = min(cache, key=lambda k: cache[k][1])
    raise MemoryLimitError(
        f"no K fits {limit_bytes / MIB:.0f} MiB: the smallest predicted peak is {cache[best_k][1] / MIB:.0f} MiB "
        f"(K={best_k}, of K in {grid}); lower the batch size or raise the limit"
    )


def max_blocks(analyzed: AnalyzedModel, aux: str) -> int:
    """The largest K ``convert`` accepts for this analysed model and aux method."""
    from .aux import get_aux

    analysis = analyzed.analysis
    return len(analysis.units) if get_aux(aux).cuts_at_units else analysis.max_k


def fit_to_memory(
    analyzed: AnalyzedModel,
    aux: str,
    max_memory: str,
    convert_k: Callable[[int], LocalModel],
    batch: int,
    optimizer: str = "sgd",
    device: str = "fake",
    per_block: bool = True,
) -> tuple[int, LocalModel, float]:
    """The K search behind ``--max-memory`` and a recipe's ``convert.max_memory``.

    Args:
        analyzed: the model, traced and analysed once for every K tried.
        aux: the aux method (it bounds K: methods that copy units cut only between them).
        max_memory: the limit as written (``"8GiB"``).
        convert_k: converts ``analyzed`` at a given K.
        batch, optimizer, device, per_block: the step that is predicted (:func:`predict_memory`).

    Returns:
        (K, its LocalModel, its predicted step peak in MiB), the smallest K that fits.
    """
    return smallest_k_that_fits(convert_k, parse_bytes(max_memory), batch, max_blocks(analyzed, aux), optimizer,
                                device, per_block)
