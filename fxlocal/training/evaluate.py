"""Evaluation of a LocalModel: top-1 and top-5 of the whole model, and each aux head's top-1
on its block's output; under a task, the task's metric of the whole model (mAP, mIoU, PSNR and
SSIM: :mod:`fxlocal.training.task_metrics`)."""

from __future__ import annotations

import torch

from ..local_model import LocalModel
from .runtime import autocast_context, batch_to
from .task_metrics import task_metric


@torch.no_grad()
def evaluate(local: LocalModel, loader, device: torch.device, amp: bool | str = False, channels_last: bool = False) -> dict:
    """Evaluate ``local`` on every batch of ``loader`` (in eval mode; its mode is restored).

    Args:
        local: the model.
        loader: (images, labels) batches.
        device: where to run.
        amp, channels_last: as the recipe's.

    Returns:
        ``top1``, ``top5`` of the whole model and ``local_top1``, each aux head's top-1 on its
        block's output; under a task, the task's metrics (``map`` and ``map_50``, ``miou``,
        ``psnr`` and ``ssim``). ``images``: how many were evaluated.
    """
    if local.task is not None:
        return evaluate_task(local, loader, device, amp, channels_last)
    was_training = local.training
    local.eval()
    correct1 = correct5 = total = 0
    local_correct = [0] * len(local.heads)
    autocast = autocast_context(device, amp)
    for x, y in loader:
        x, y = batch_to(x, device, channels_last), y.to(device)
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
    """Counts of correct predictions -> the accuracies :func:`evaluate` reports."""
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "local_top1": [c / max(total, 1) for c in local_correct],
        "images": total,
    }


@torch.no_grad()
def evaluate_task(local: LocalModel, loader, device: torch.device, amp: bool | str = False, channels_last: bool = False) -> dict:
    """The task's metrics of ``local``'s predictions (its last block's objective turns the output
    into them: the detector's own post-processing) on every batch of ``loader``."""
    was_training = local.training
    local.eval()
    metric = task_metric(local.task.name)
    autocast = autocast_context(device, amp)
    total = 0
    for x, y in loader:
        x, y = batch_to(x, device, channels_last), y.to(device)
        with autocast:
            out = local(x)
        metric.update(local.final_objective.predict(out), local.final_objective.metric_targets(y))
        total += len(x)
    local.train(was_training)
    return {**metric.compute(), "images": total}
