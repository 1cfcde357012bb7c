"""Train a converted model from a recipe: data, optimizers and schedules from timm, checkpoints
(atomic, resumable), metrics, data-parallel training on torch.distributed.

Library code: nothing is printed. Progress goes to a :class:`Reporter` (the CLI renders it with
rich); metrics go to ``<output_dir>/metrics.jsonl`` (and TensorBoard when it is installed), the
curves to ``<output_dir>/curves.png``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .convert import convert
from .data import build_dataset, dataset_info
from .checkpoint import CheckpointError, invalid_fields, load_weights, read_checkpoint_file
from .errors import FxLocalError
from .local_model import LocalModel
from .plan import Plan, atomic_write_bytes
from .recipe import Recipe

__all__ = [
    "Reporter",
    "TrainingDiverged",
    "build_model",
    "evaluate",
    "fit",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "evaluation_loader",
]

CHECKPOINT_FORMAT = "fxlocal.training/1"


class TrainingDiverged(FxLocalError, RuntimeError):
    """A loss became NaN or infinite."""


class OutputDirError(FxLocalError, OSError):
    """The recipe's output_dir cannot be created or written."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early, creating nothing, when ``path`` cannot become a folder this process writes to.

    Args:
        path: the recipe's output_dir (it need not exist yet).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputDirError: the nearest existing ancestor is a file, or a file cannot be made in it.
    """
    out = Path(path).absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    hint = "set another with --output DIR"
    if not existing.is_dir():
        raise OutputDirError(f"cannot make output_dir {path}: {existing} is a file, not a folder; {hint}")
    try:  # a probe that leaves nothing behind: permissions, read-only mounts, a full disk
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputDirError(f"cannot write in output_dir {path} ({existing}: {exc.strerror}); {hint}") from None
    return Path(path)


def make_output_dir(path: Path) -> None:
    """Create the output folder once the run is known to start (nothing is written before)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot make output_dir {path} ({exc.strerror}); set another with --output DIR") from None


class Reporter:
    """Receives progress; the default ignores it. The CLI subclasses it to draw progress bars."""

    def run_start(self, recipe: Recipe, local: LocalModel, start_epoch: int, steps_per_epoch: int) -> None: ...

    def step(self, epoch: int, step: int, losses: list[float], images_per_s: float) -> None: ...

    def epoch_end(self, record: dict) -> None: ...


@dataclass
class _Distributed:
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


def _init_distributed(device_kind: str, timeout_s: float | None = None) -> _Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Distributed()
    owned = not dist.is_initialized()
    if owned:
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", timeout=timeout)
    return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)


def _device(recipe: Recipe, local_rank: int) -> torch.device:
    if recipe.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise FxLocalError(f"recipe field 'device' is {recipe.device!r} but no CUDA device is available")
    return torch.device(recipe.device)


def build_model(recipe: Recipe, plan: Plan | None = None) -> LocalModel:
    """The converted model a recipe describes (random init, seeded), or cut by ``plan`` (a
    checkpoint's, or another rank's: ``balance="time"`` measures, and two measurements differ).

    With ``convert.max_memory`` set, K is the smallest whose predicted step peak fits it at the
    recipe's batch size and optimizer (``convert.k`` is then ignored).
    """
    from .convert import AnalyzedModel, analyze_model
    from .cost import MemoryModel
    from .memory import max_blocks, parse_bytes, smallest_k_that_fits

    info = dataset_info(recipe.data.dataset)
    size = tuple(recipe.data.input_size)
    states = 2 if recipe.optimizer.name.startswith(("adam", "lamb")) else 1
    per_block = recipe.optimizer.per_block
    priced = MemoryModel(
        batch=recipe.batch_size, optimizer_states=states, per_block=per_block, pipeline=recipe.pipeline.enabled
    )
    classes = recipe.model.num_classes or info.num_classes or None

    def build(k: int, model: AnalyzedModel | None = None) -> LocalModel:
        torch.manual_seed(recipe.seed)
        return convert(
            model if model is not None else recipe.model.name,
            k=k,
            plan=plan,
            aux=recipe.convert.aux,
            input_size=size,
            balance=recipe.convert.balance,
            num_classes=classes,
            model_kwargs=recipe.model.kwargs,
            memory=priced,
            backbone_recompute=recipe.convert.backbone_recompute,
            cuts=recipe.convert.cuts if plan is None else None,
            **recipe.convert.aux_options,
        )

    if plan is not None:
        return build(plan.k)
    if recipe.convert.max_memory is None:
        return build(recipe.convert.k)
    torch.manual_seed(recipe.seed)
    # traced and analysed once for every K the search tries; the chosen K is then built afresh
    # (seeded), as a recipe that names that K would build it
    analyzed = analyze_model(recipe.model.name, size, classes, recipe.model.kwargs, timed=recipe.convert.balance == "time")
    limit = parse_bytes(recipe.convert.max_memory)
    optimizer = "adamw" if states == 2 else "sgd"
    k, _, _ = smallest_k_that_fits(
        lambda k: build(k, analyzed), limit, recipe.batch_size, max_blocks(analyzed, recipe.convert.aux), optimizer,
        per_block=per_block,
    )
    return build(k)


def _make_optimizer(recipe: Recipe, module: nn.Module, only: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """timm's optimizer for ``module`` (no weight decay on biases and norms), over ``only`` of its
    parameters when given."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    o = recipe.optimizer

    def groups(m: nn.Module) -> list[dict]:
        if o.decay_norm_and_bias:
            return [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
        return param_groups_weight_decay(m, o.weight_decay)

    def only_those(m: nn.Module) -> list[dict]:
        keep = set(map(id, only)) if only is not None else {id(p) for p in m.parameters()}
        chosen = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups(m)]
        return [g for g in chosen if g["params"]]

    timm_groups = only is None and not o.decay_norm_and_bias  # timm's own grouping (it honours no_weight_decay())
    return create_optimizer_v2(
        module, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
        param_group_fn=None if timm_groups else only_those,
    )


def _stage(local: LocalModel, b: int) -> nn.ModuleList:
    """Block ``b`` and its head: what its local loss trains."""
    return nn.ModuleList([local.blocks[b], *([local.heads[b]] if b < len(local.heads) else [])])


def _optimizers(recipe: Recipe, local: LocalModel) -> list[torch.optim.Optimizer]:
    if not recipe.optimizer.per_block:
        return [_make_optimizer(recipe, local)]
    # a tied parameter is stepped by one block's optimizer only (LocalModel.block_parameters)
    return [_make_optimizer(recipe, _stage(local, b), list(local.block_parameters(b))) for b in range(local.k)]


def _schedulers(recipe: Recipe, optimizers: list[torch.optim.Optimizer]) -> list[Any]:
    from timm.scheduler import create_scheduler_v2

    s = recipe.scheduler
    if s.name == "none":
        return []
    return [
        create_scheduler_v2(
            opt,
            sched=s.name,
            num_epochs=recipe.epochs,
            decay_epochs=s.decay_epochs,
            decay_milestones=s.decay_milestones,
            decay_rate=s.decay_rate,
            min_lr=s.min_lr,
            warmup_lr=s.warmup_lr,
            warmup_epochs=s.warmup_epochs,
        )[0]
        for opt in optimizers
    ]


def _splits(d) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """The training images and the images evaluation sees: the test split, or with
    ``data.validation`` the last N training images (held out of training, not augmented)."""
    size = tuple(d.input_size)
    if d.validation is None:
        train = build_dataset(d.dataset, d.root, True, size, d.augment, d.download, d.train_subset, d.pad_mode)
        return train, build_dataset(d.dataset, d.root, False, size, "none", d.download, d.test_subset)
    train = build_dataset(d.dataset, d.root, True, size, d.augment, d.download, pad_mode=d.pad_mode)
    kept = len(train) - d.validation
    if kept < 1:
        raise FxLocalError(
            f"data.validation={d.validation} holds out every one of the {len(train)} training images; hold out fewer"
        )
    held_out = build_dataset(d.dataset, d.root, True, size, "none", d.download)
    end = kept + min(d.validation, d.test_subset or d.validation)
    trained = torch.utils.data.Subset(train, range(min(kept, d.train_subset or kept)))
    return trained, torch.utils.data.Subset(held_out, range(kept, end))


def _loaders(recipe: Recipe, dist_: _Distributed, device: torch.device):
    train, test = _splits(recipe.data)
    common = dict(batch_size=recipe.batch_size, num_workers=recipe.workers, pin_memory=device.type == "cuda")
    # Epoch e's order depends on (seed, e) only, so a resumed run sees the same batches.
    order = torch.Generator()
    if dist_.enabled:
        sampler = torch.utils.data.DistributedSampler(train, dist_.world, dist_.rank, shuffle=True, seed=recipe.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=order)
    train_loader = torch.utils.data.DataLoader(train, sampler=sampler, generator=order, drop_last=True, **common)
    eval_loader = torch.utils.data.DataLoader(test, shuffle=False, **common)
    return train_loader, sampler, order, eval_loader


def _reseed_epoch(sampler, order: torch.Generator, seed: int, epoch: int) -> None:
    order.manual_seed(seed * 1000 + epoch)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)


def _rng_state() -> dict:
    # numpy's key as a tensor: a checkpoint holds tensors and plain data only (weights_only loads)
    name, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or an array in checkpoints before it was one
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, recipe: Recipe, local: LocalModel, optimizers, schedulers, scaler, epoch: int, history) -> None:
    _write_checkpoint(
        path, recipe, local, epoch, history,
        model=local.state_dict(),
        optimizers=[o.state_dict() for o in optimizers],
        schedulers=[s.state_dict() for s in schedulers],
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=_rng_state(),
    )


def _write_checkpoint(path: Path, recipe: Recipe, local: LocalModel, epoch: int, history, **states) -> None:
    """Write a training checkpoint atomically. ``states``: ``model`` (the whole LocalModel's
    state_dict), ``optimizers`` and ``schedulers`` (one per block with per-block optimizers),
    ``scaler``, ``rng``, and anything a trainer adds for itself (the pipeline's per-stage RNG)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "recipe": recipe.model_dump(mode="json"),
        "plan": local.plan.to_dict(),
        "config": local.config,
        "epoch": epoch,  # epochs completed
        "history": history,
        **states,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`fit` (tensors and plain data only: it cannot run code).

    Raises:
        CheckpointError: a missing, truncated or incomplete file, one that is not a training
            checkpoint, or one that holds pickled objects.
    """
    # format 1 kept numpy's RNG key as an array
    return training_checkpoint_from(read_checkpoint_file(path, allow_numpy_arrays=True), path)


def training_checkpoint_from(payload: object, path: str | os.PathLike) -> dict:
    """:func:`load_training_checkpoint` of a file already read with ``read_checkpoint_file``."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an fxlocal training checkpoint")
    wrong = invalid_fields(payload, {"recipe": dict, "plan": dict, "config": dict, "model": dict, "epoch": int, "history": list})
    if wrong:
        raise CheckpointError(f"{path} is an incomplete training checkpoint (no valid {', '.join(wrong)}): use an earlier one or train again")
    return payload


def _check_resumable(state: dict, path: Path, optimizers: int) -> None:
    """A checkpoint that evaluates may still lack what resuming needs (one written by hand)."""
    wrong = invalid_fields(state, {"optimizers": list, "schedulers": list, "rng": dict})
    if wrong:
        raise CheckpointError(f"{path} cannot be resumed (no valid {', '.join(wrong)}): train again without --resume")
    if len(state["optimizers"]) != optimizers:
        raise CheckpointError(
            f"{path} holds {len(state['optimizers'])} optimizer(s) and the recipe makes {optimizers}: "
            "resume with the recipe's optimizer.per_block as it was"
        )


def model_from_checkpoint(state: dict) -> LocalModel:
    """The trained LocalModel of a loaded training checkpoint (rebuilt from its recipe and plan)."""
    from .recipe import load_recipe

    local = build_model(load_recipe(data=state["recipe"]), Plan.from_dict(state["plan"]))
    load_weights(local, state["model"], "the checkpoint")
    return local


def build_agreed_model(recipe: Recipe, dist_: _Distributed, checkpoint: dict | None = None) -> LocalModel:
    """:func:`build_model` on every rank, cut where rank 0 cuts (or where the checkpoint did)."""
    if checkpoint is not None:
        return build_model(recipe, Plan.from_dict(checkpoint["plan"]))
    if not dist_.enabled:
        return build_model(recipe)
    local = build_model(recipe) if dist_.main else None
    shared = [local.plan.to_dict() if local is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return local if local is not None else build_model(recipe, Plan.from_dict(shared[0]))


def evaluation_loader(recipe: Recipe):
    """The recipe's test split, as evaluation sees it."""
    return _loaders(recipe, _Distributed(), torch.device("cpu"))[3]


@torch.no_grad()
def evaluate(local: LocalModel, loader, device: torch.device, amp: bool | str = False, channels_last: bool = False) -> dict:
    """Top-1/top-5 of the whole model and top-1 of every aux head on its block's output."""
    was_training = local.training
    local.eval()
    correct1 = correct5 = total = 0
    local_correct = [0] * len(local.heads)
    autocast = _autocast(device, amp)
    for x, y in loader:
        x, y = _batch_to(x, device, channels_last), y.to(device)
        with autocast:
            carried: tuple = (x,)
            for b, block in enumerate(local.blocks):
                carried = block(*carried)
                if b < len(local.heads):
                    local_correct[b] += (local.head_logits(b, carried).argmax(-1) == y).sum().item()
            logits = carried
        c1, c5 = top_correct(logits, y)
        correct1, correct5, total = correct1 + c1, correct5 + c5, total + y.numel()
    local.train(was_training)
    return evaluation_record(correct1, correct5, local_correct, total)


def top_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """How many of a batch's predictions are right at top-1 and at top-5."""
    top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
    return int((top[:, 0] == y).sum().item()), int((top == y[:, None]).any(-1).sum().item())


def evaluation_record(correct1: int, correct5: int, local_correct: list[int], total: int) -> dict:
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "local_top1": [c / max(total, 1) for c in local_correct],
        "images": total,
    }


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


def amp_scaler(recipe: Recipe, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler where the step needs one: fp16 autocast on CUDA (bf16 does not)."""
    return torch.amp.GradScaler("cuda") if device.type == "cuda" and amp_dtype(recipe.amp, device) == torch.float16 else None


def _autocast(device: torch.device, amp: bool | str):
    dtype = amp_dtype(amp, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _batch_to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch on ``device``, channels-last where the model is (images only: 4-d)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compile_blocks(local: LocalModel, backend: bool | str) -> None:
    """``torch.compile`` every block and head in place (``nn.Module.compile``: their parameters
    and state_dict keys stay as they are); the step's loop, which hands tensors between them,
    stays eager. ``backend``: ``True`` for inductor, or a backend's name."""
    for module in [*local.blocks, *local.heads]:
        module.compile(backend="inductor" if backend is True else backend)


def _grad_allreduce(world: int):
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


def _replicas_in_sync(local: LocalModel) -> bool:
    checksum = torch.stack([p.detach().double().sum() for p in local.parameters()]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs().item() <= 1e-6 * max(1.0, checksum.abs().item()))


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


@dataclass
class TrainResult:
    output_dir: Path
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    reporting: bool = True  # this process reported progress and wrote the metrics (one per run)


def _device_kind(recipe: Recipe) -> str:
    auto_cuda = recipe.device == "auto" and torch.cuda.is_available()
    return "cuda" if recipe.device.startswith("cuda") or auto_cuda else "cpu"


def fit(recipe: Recipe, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train ``recipe``; with ``resume`` continue from ``<output_dir>/last.pt``.

    Under torchrun, ranks train data-parallel, or with ``pipeline.enabled`` one block each
    (:func:`fxlocal.pipeline.fit_pipeline`). Only the reporting rank calls ``reporter``.
    """
    if recipe.pipeline.enabled:
        from .pipeline import fit_pipeline

        return fit_pipeline(recipe, resume, reporter)
    dist_ = _init_distributed(_device_kind(recipe))
    reporter = (reporter or Reporter()) if dist_.main else Reporter()
    device = _device(recipe, dist_.local_rank)
    out_dir = check_output_dir(recipe.output_dir)
    last = out_dir / "last.pt"

    state = None
    if resume:
        if not last.exists():
            raise FxLocalError(f"nothing to resume: no checkpoint at {last}")
        state = load_training_checkpoint(last)
    local = build_agreed_model(recipe, dist_, state).to(device)
    if recipe.channels_last:
        local.to(memory_format=torch.channels_last)
    if dist_.enabled:  # same start everywhere, whatever each rank's RNG did
        for t in [*local.parameters(), *local.buffers()]:
            dist.broadcast(t.data, src=0)
    optimizers = _optimizers(recipe, local)
    schedulers = _schedulers(recipe, optimizers)
    scaler = amp_scaler(recipe, device)
    start_epoch, history = 0, []
    if state is not None:
        _check_resumable(state, last, len(optimizers))
        load_weights(local, state["model"], last)
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
    else:
        torch.manual_seed(recipe.seed + dist_.rank)
        random.seed(recipe.seed + dist_.rank)
        np.random.seed(recipe.seed + dist_.rank)

    if recipe.compile:  # after the checkpoint's weights are in (compiling keeps the modules' own)
        compile_blocks(local, recipe.compile)
    train_loader, sampler, order, eval_loader = _loaders(recipe, dist_, device)
    if dist_.main:
        make_output_dir(out_dir)
    steps = len(train_loader) if recipe.max_steps_per_epoch is None else min(len(train_loader), recipe.max_steps_per_epoch)
    reporter.run_start(recipe, local, start_epoch, steps)
    grad_hook = _grad_allreduce(dist_.world) if dist_.enabled else None
    writer = _tensorboard(out_dir) if dist_.main else None
    optimizer_arg = optimizers if recipe.optimizer.per_block else optimizers[0]
    autocast = _autocast(device, recipe.amp)

    for epoch in range(start_epoch, recipe.epochs):
        local.train()
        _reseed_epoch(sampler, order, recipe.seed, epoch)
        sums = np.zeros(local.k)
        accs = np.zeros(local.k)
        seen, started = 0, time.perf_counter()
        for step, (x, y) in enumerate(train_loader):
            if step >= steps:
                break
            x, y = _batch_to(x, device, recipe.channels_last), y.to(device, non_blocking=True)
            metrics: dict = {}
            with autocast:
                losses = local.train_step(x, y, optimizer_arg, scaler=scaler, grad_hook=grad_hook, metrics=metrics)
            if not all(math.isfinite(v) for v in losses):
                bad = next(b for b, v in enumerate(losses) if not math.isfinite(v))
                raise TrainingDiverged(
                    f"loss of block {bad} is {losses[bad]} at epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is {last if last.exists() else 'none (no epoch finished)'}; "
                    "lower optimizer.lr or enable warm-up"
                )
            sums += losses
            accs += metrics["accuracy"]
            seen += len(y)
            reporter.step(epoch, step, losses, seen / max(time.perf_counter() - started, 1e-9))
        for sch in schedulers:
            sch.step(epoch + 1)
        elapsed = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "train_loss": (sums / max(steps, 1)).round(5).tolist(),
            "train_local_top1": (accs / max(steps, 1)).round(5).tolist(),
            "images_per_s": round(seen * dist_.world / max(elapsed, 1e-9), 2),
            "lr": optimizers[0].param_groups[0]["lr"],
            "peak_memory_mib": round(_peak_memory_mib(device), 1),
            "world_size": dist_.world,
            "steps": steps,
        }
        if dist_.enabled:
            record["replicas_in_sync"] = _replicas_in_sync(local)
        if dist_.main and ((epoch + 1) % recipe.eval_interval == 0 or epoch + 1 == recipe.epochs):
            record.update({f"test_{k}": v for k, v in evaluate(local, eval_loader, device, recipe.amp, recipe.channels_last).items()})
            record["evaluated_on"] = "validation" if recipe.data.validation else "test"
        history.append(record)
        if dist_.main:
            _log_metrics(out_dir, writer, record)
            if (epoch + 1) % recipe.checkpoint_interval == 0 or epoch + 1 == recipe.epochs:
                _save_checkpoint(last, recipe, local, optimizers, schedulers, scaler, epoch + 1, history)
        reporter.epoch_end(record)
    if writer is not None:
        writer.close()
    if dist_.main:
        _plot_curves(history, out_dir / "curves.png")
    _leave_distributed(dist_)
    return TrainResult(out_dir, recipe.epochs, history, history[-1] if history else {}, dist_.main)


def _leave_distributed(dist_: _Distributed) -> None:
    if dist_.enabled:
        # No rank may exit while another still evaluates or writes the checkpoint: a process
        # leaving a live gloo group behind can abort, and torchrun then kills the others.
        dist.barrier()
        if dist_.owned:
            dist.destroy_process_group()


def _log_metrics(out_dir: Path, writer, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        _log_tensorboard(writer, record)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _log_tensorboard(writer, record: dict) -> None:
    for key, value in record.items():
        if isinstance(value, list):
            for i, v in enumerate(value):
                writer.add_scalar(f"{key}/block{i}", v, record["epoch"])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["epoch"])


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for b in range(len(history[0]["train_loss"])):
        ax1.plot(epochs, [r["train_loss"][b] for r in history], label=f"block {b}")
    ax1.set(xlabel="epoch", ylabel="train loss", title="local losses")
    ax1.legend()
    tested = [r for r in history if "test_top1" in r]
    ax2.plot([r["epoch"] for r in tested], [r["test_top1"] for r in tested], marker="o", label="model top-1")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    ax2.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
