"""``fit``: train a recipe in one process or data-parallel under torchrun; a recipe with
``pipeline.enabled`` goes to :func:`~fxlocal.training.pipeline.fit_pipeline` (one block per
process). Both are built from the same public helpers of this package."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..errors import TrainingDiverged
from .build import build_agreed_model
from .checkpoint import (
    check_resumable,
    load_weights,
    resume_state,
    save_checkpoint,
    set_rng_state,
)
from .evaluate import evaluate
from .loaders import make_loaders, reseed_epoch
from .optim import load_optimizer_state, make_optimizers, make_schedulers
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
    amp_scaler,
    autocast_context,
    batch_to,
    compile_blocks,
    device_kind,
    grad_allreduce,
    init_distributed,
    keep_freed_memory,
    leave_distributed,
    peak_memory_mib,
    replicas_in_sync,
    training_device,
)


def fit(recipe: Recipe, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train ``recipe``: in this process, data-parallel under torchrun, or with
    ``pipeline.enabled`` one block per process (:func:`fxlocal.training.pipeline.fit_pipeline`).

    Args:
        recipe: the recipe (:func:`~fxlocal.training.recipe.load_recipe`).
        resume: continue from ``<output_dir>/last.pt``.
        reporter: receives progress (only the reporting rank calls it).

    Returns:
        The :class:`TrainResult`; checkpoints, ``metrics.jsonl`` and ``curves.png`` are in
        ``output_dir``.

    Raises:
        TrainingDiverged: a loss became NaN or infinite (the last good checkpoint is kept).
    """
    if recipe.keep_freed_memory:  # before build_model: balance: time measures under it too
        keep_freed_memory()
    if recipe.pipeline.enabled:
        from .pipeline import fit_pipeline

        return fit_pipeline(recipe, resume, reporter)
    dist_ = init_distributed(device_kind(recipe))
    reporter = (reporter or Reporter()) if dist_.main else Reporter()
    device = training_device(recipe, dist_.local_rank)
    out_dir = check_output_dir(recipe.output_dir)
    last = out_dir / "last.pt"

    state = resume_state(out_dir, resume)
    local = build_agreed_model(recipe, dist_, state).to(device)
    if recipe.channels_last:
        local.to(memory_format=torch.channels_last)
    if dist_.enabled:  # same start everywhere, whatever each rank's RNG did
        for t in [*local.parameters(), *local.buffers()]:
            dist.broadcast(t.data, src=0)
    optimizers = make_optimizers(recipe, local)
    schedulers = make_schedulers(recipe, optimizers)
    scaler = amp_scaler(recipe, device)
    start_epoch, history = 0, []
    if state is not None:
        check_resumable(state, last, len(optimizers))
        load_weights(local, state["model"], last)
        for opt, s in zip(optimizers, state["optimizers"]):
            load_optimizer_state(opt, s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
    else:
        torch.manual_seed(recipe.seed + dist_.rank)
        random.seed(recipe.seed + dist_.rank)
        np.random.seed(recipe.seed + dist_.rank)

    if recipe.compile:  # after the checkpoint's weights are in (compiling keeps the modules' own)
        compile_blocks(local, recipe.compile)
    train_loader, sampler, order, eval_loader = make_loaders(recipe, dist_, device)
    if dist_.main:
        make_output_dir(out_dir)
    steps = len(train_loader) if recipe.max_steps_per_epoch is None else min(len(train_loader), recipe.max_steps_per_epoch)
    reporter.run_start(recipe, local, start_epoch, steps)
    grad_hook = grad_allreduce(dist_.world) if dist_.enabled else None
    writer = tensorboard(out_dir) if dist_.main else None
    optimizer_arg = optimizers if recipe.optimizer.per_block else optimizers[0]
    autocast = autocast_context(device, recipe.amp)

    for epoch in range(start_epoch, recipe.epochs):
        local.train()
        reseed_epoch(sampler, order, recipe.seed, epoch)
        sums = np.zeros(local.k)
        accs = np.zeros(local.k)
        seen, started = 0, time.perf_counter()
        for step, (x, y) in enumerate(train_loader):
            if step >= steps:
                break
            x, y = batch_to(x, device, recipe.channels_last), y.to(device, non_blocking=True)
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
            accs += metrics.get("accuracy", 0.0)  # classification only: a task's metric is its test set's
            seen += len(y)
            reporter.step(epoch, step, losses, seen / max(time.perf_counter() - started, 1e-9))
        for sch in schedulers:
            sch.step(epoch + 1)
        elapsed = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "train_loss": (sums / max(steps, 1)).round(5).tolist(),
            **({"train_local_top1": (accs / max(steps, 1)).round(5).tolist()} if local.task is None else {}),
            "images_per_s": round(seen * dist_.world / max(elapsed, 1e-9), 2),
            "lr": optimizers[0].param_groups[0]["lr"],
            "peak_memory_mib": round(peak_memory_mib(device), 1),
            "world_size": dist_.world,
            "steps": steps,
        }
        if dist_.enabled:
            record["replicas_in_sync"] = replicas_in_sync(local)
        if dist_.main and ((epoch + 1) % recipe.eval_interval == 0 or epoch + 1 == recipe.epochs):
            record.update({f"test_{k}": v for k, v in evaluate(local, eval_loader, device, recipe.amp, recipe.channels_last).items()})
            record["evaluated_on"] = "validation" if recipe.data.validation else "test"
        history.append(record)
        if dist_.main:
            log_metrics(out_dir, writer, record)
            if (epoch + 1) % recipe.checkpoint_interval == 0 or epoch + 1 == recipe.epochs:
                save_checkpoint(last, recipe, local, optimizers, schedulers, scaler, epoch + 1, history)
        reporter.epoch_end(record)
    if writer is not None:
        writer.close()
    if dist_.main:
        plot_curves(history, out_dir / "curves.png")
    leave_distributed(dist_)
    return TrainResult(out_dir, recipe.epochs, history, history[-1] if history else {}, dist_.main)
