"""Where and how a training step runs: the device, mixed precision (autocast, the fp16 loss
scaler), ``torch.compile`` of the blocks, and torch.distributed (the process group under
torchrun, the gradient all-reduce of data-parallel training, the replicas' agreement)."""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FxLocalError
from ..local_model import LocalModel
from .recipe import Recipe


@dataclass
class Distributed:
    """This process's place in a torchrun job (one process, rank 0 of 1, without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # fit() created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(kind: str, timeout_s: float | None = None) -> Distributed:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1.

    Args:
        kind: ``"cuda"`` or ``"cpu"`` (:func:`device_kind`).
        timeout_s: the group's collective timeout (None: torch's default).

    Returns:
        This process's :class:`Distributed`; ``owned`` when this call created the group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    owned = not dist.is_initialized()
    if owned:
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", timeout=timeout)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)


def leave_distributed(dist_: Distributed) -> None:
    """Wait for every rank, then destroy the process group if this process created it."""
    if dist_.enabled:
        # No rank may exit while another still evaluates or writes the checkpoint: a process
        # leaving a live gloo group behind can abort, and torchrun then kills the others.
        dist.barrier()
        if dist_.owned:
            dist.destroy_process_group()


# glibc's mallopt parameters, and the largest mmap threshold it accepts (HEAP_MAX_SIZE / 2 on 64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Make this process keep the host memory it frees for reuse, as torch's CUDA caching
    allocator keeps device memory, instead of handing it back to the operating system.

    glibc serves an allocation above its mmap threshold (128 KiB, raised as such blocks are freed)
    with fresh pages from the kernel, and returns a heap's freed top once it exceeds the trim
    threshold. A CPU training step that allocates and frees tens of MiB of activations then
    faults those pages in again every step, the kernel zeroing each (measured by
    ``benchmarks/host_memory.py``, ``docs/memory.md``). Here allocations up to 32 MiB (glibc's
    limit) come from the heap, and the heap is never trimmed, so the resident size stays at its
    peak. Process-wide, like ``torch.set_num_threads``; GPU memory is not affected (torch caches it).

    Returns:
        Whether it applied: False where the C library is not glibc (nothing changed).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def training_device(recipe: Recipe, local_rank: int) -> torch.device:
    """The device a recipe trains on: ``auto`` is this rank's GPU when there is one, else the CPU."""
    if recipe.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise FxLocalError(f"recipe field 'device' is {recipe.device!r} but no CUDA device is available")
    return torch.device(recipe.device)


def device_kind(recipe: Recipe) -> str:
    """``"cuda"`` or ``"cpu"``: what the recipe's device is, before a device is picked."""
    auto_cuda = recipe.device == "auto" and torch.cuda.is_available()
    return "cuda" if recipe.device.startswith("cuda") or auto_cuda else "cpu"


def amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``amp`` on ``device``; None when it is off.

    Args:
        amp: ``False``, ``True`` (fp16 on CUDA, bf16 elsewhere), ``"bf16"`` or ``"fp16"``.
        device: where the step runs.
    """
    if amp is False:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def loss_scaled(recipe: Recipe, device: torch.device) -> bool:
    """Whether the step on ``device`` needs a loss scaler: fp16 autocast on CUDA (bf16 does not)."""
    return device.type == "cuda" and amp_dtype(recipe.amp, device) == torch.float16


def amp_scaler(recipe: Recipe, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler where the step needs one (:func:`loss_scaled`)."""
    return torch.amp.GradScaler("cuda") if loss_scaled(recipe, device) else None


def autocast_context(device: torch.device, amp: bool | str):
    """``torch.autocast`` at the recipe's ``amp`` dtype on ``device``, or a context that does nothing."""
    dtype = amp_dtype(amp, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def batch_to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch on ``device``, channels-last where the model is (images only: 4-d)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compile_blocks(local: LocalModel, backend: bool | str) -> None:
    """``torch.compile`` every block and head in place (``nn.Module.compile``: their parameters
    and state_dict keys stay as they are); the step's loop, which hands tensors between them,
    stays eager. ``backend``: ``True`` for inductor, or a backend's name."""
    for module in [*local.blocks, *local.heads]:
        module.compile(backend="inductor" if backend is True else backend)


def grad_allreduce(world: int):
    """A LocalModel ``grad_hook`` that averages each block's gradients over ``world`` data-parallel ranks."""
    def hook(params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    return hook


def replicas_in_sync(local: LocalModel) -> bool:
    """Whether every rank holds the same parameters (a checksum compared across ranks)."""
    checksum = torch.stack([p.detach().double().sum() for p in local.parameters()]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs().item() <= 1e-6 * max(1.0, checksum.abs().item()))


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA's allocator peak, or the CPU's maximum resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
