"""The canvas tasks' metrics (:mod:`fxlocal.training.canvas`), from torchmetrics: COCO mAP for
detection (pycocotools' evaluation), mean IoU for segmentation, PSNR and SSIM for
super-resolution. A registry by task: ``task_metric("detection")`` gives a fresh accumulator with
``update(predictions, targets)`` and ``compute() -> dict[str, float]``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

__all__ = ["TaskMetric", "task_metric", "TASK_METRICS"]


class TaskMetric(Protocol):
    def update(self, predictions, targets) -> None: ...

    def compute(self) -> dict[str, float]: ...


class DetectionMAP:
    """COCO mAP@[.5:.95] (``map``) and mAP@.5 (``map_50``) of predicted boxes.

    ``update(predictions, targets)``: lists of dicts, one per image, as torchvision's detection
    models return and take them (``boxes`` xyxy, ``scores`` and ``labels``; targets without scores).
    """

    def __init__(self):
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        self.metric.update([{k: v.detach().cpu() for k, v in p.items()} for p in predictions],
                           [{k: v.detach().cpu() for k, v in t.items()} for t in targets])

    def compute(self) -> dict[str, float]:
        out = self.metric.compute()
        return {"map": float(out["map"]), "map_50": float(out["map_50"])}


class SegmentationMIoU:
    """Mean intersection over union over the classes that occur in the targets or predictions
    (background included), from (N, classes, H, W) logits or (N, H, W) class maps."""

    def __init__(self, num_classes: int = 11):
        from torchmetrics.segmentation import MeanIoU

        self.num_classes = num_classes
        self.metric = MeanIoU(num_classes=num_classes, input_format="index", per_class=True)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        if predictions.dim() == 4:
            predictions = predictions.argmax(1)
        predictions, targets = predictions.detach().cpu().long(), targets.detach().cpu().long()
        self.seen |= torch.bincount(torch.cat([predictions.flatten(), targets.flatten()]), minlength=self.num_classes) > 0
        self.metric.update(predictions, targets)

    def compute(self) -> dict[str, float]:
        per_class = self.metric.compute()
        return {"miou": float(per_class[self.seen].mean())}


class SuperResolutionQuality:
    """PSNR (dB) and SSIM of images in [0, 1]."""

    def __init__(self):
        from torchmetrics.image import (
            PeakSignalNoiseRatio,
            StructuralSimilarityIndexMeasure,
        )

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        predictions, targets = predictions.detach().cpu().float().clamp(0, 1), targets.detach().cpu().float()
        self.psnr.update(predictions, targets)
        self.ssim.update(predictions, targets)

    def compute(self) -> dict[str, float]:
        return {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}


TASK_METRICS: dict[str, Callable[[], TaskMetric]] = {
    "detection": DetectionMAP,
    "segmentation": SegmentationMIoU,
    "super_resolution": SuperResolutionQuality,
}


def task_metric(task: str) -> TaskMetric:
    """A fresh metric accumulator for ``task`` (``detection``, ``segmentation``, ``super_resolution``)."""
    if task not in TASK_METRICS:
        raise ValueError(f"no metric for task {task!r}; tasks: {', '.join(TASK_METRICS)}")
    return TASK_METRICS[task]()
