"""The last block's objective under a task other than classification: the task's own loss on the
model's output, and the model's predictions from that output for its metric. A registry by task.

- segmentation: cross-entropy of the (N, classes, H, W) logits (torchvision's models return them
  as ``{"out": logits}``) against the mask;
- super-resolution: L1 of the output image against the high-resolution one (EDSR's loss);
- detection: the detector's own training loss on its head's outputs (its anchor or point
  assignment: :class:`fxlocal.models.dense.DetectorFamily`), and its own post-processing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskError
from ..models.dense import (
    AnchorLayout,
    anchor_layout,
    detector_family,
    level_anchors_per_location,
    level_layout,
)
from .base import AuxHead
from .tasks import TaskSpec, detection_targets

__all__ = ["TaskObjective", "task_objective", "DetectorAssignment", "detector_assignment"]


def model_output(out):
    """The output tensor of a dense model: torchvision's segmentation models return ``{"out": ...}``."""
    return out["out"] if isinstance(out, dict) else out


class TaskObjective(AuxHead):
    """The last block's loss under a task, and what its output predicts (:meth:`predict`)."""

    owns_loss = True
    summary = ""  # one line: what the last block is trained on (``fxlocal convert`` prints it)

    def __init__(self, spec: TaskSpec):
        super().__init__()
        self.spec = spec

    def predict(self, out) -> torch.Tensor | list[dict]:
        """The model's predictions from its output, as the task's metric takes them."""
        return model_output(out)

    def metric_targets(self, target: torch.Tensor) -> torch.Tensor | list[dict]:
        """A batch's targets as the task's metric takes them."""
        return target

    def original_predictions(self, original: nn.Module, x: torch.Tensor) -> torch.Tensor | list[dict]:
        """What the original model (the torchvision detector itself) predicts for ``x``, in the
        form of :meth:`predict`: an exported backbone must give the same."""
        return model_output(original(x))


class SegmentationLoss(TaskObjective):
    summary = "segmentation: cross-entropy of the model's per-pixel logits against the mask"

    def local_loss(self, ctx, b, out):
        logits = model_output(out)
        return F.cross_entropy(logits, ctx.target), logits


class SuperResolutionLoss(TaskObjective):
    summary = "super-resolution: L1 of the model's output against the high-resolution image"

    def local_loss(self, ctx, b, out):
        image = model_output(out)
        return F.l1_loss(image, ctx.target), image


class DetectionLoss(TaskObjective):
    """The detector's own loss (the sum of its terms) on its head's outputs; the anchors are the
    detector's at the input size, computed once."""

    def __init__(self, spec: TaskSpec, detector: nn.Module, layout: AnchorLayout):
        super().__init__(spec)
        self.family = detector_family(detector)
        self.layout = layout
        if self.family.two_stage:  # trained with the last block: they are the detector's, not the trunk's
            self.rpn, self.roi_heads = detector.rpn, detector.roi_heads
            self.summary = (f"detection: {type(detector).__name__}'s region proposals and box heads on the backbone's "
                            "features, trained with this block by its own loss")
        else:
            self.summary = (
                f"detection: {type(detector).__name__}'s own loss on its head's outputs ({len(layout.anchors)} "
                f"anchors on {len(layout.per_level)} levels), its post-processing for boxes"
            )
        object.__setattr__(self, "detector", detector)  # its state is the blocks': not held twice

    def local_loss(self, ctx, b, out):
        terms = self.family.loss(self.detector, detection_targets(ctx.target), out, self.layout)
        return sum(terms.values()), next(iter(out.values()))

    def exported_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict()) if self.family.two_stage else {}

    def predict(self, out) -> list[dict]:
        return self.family.predict(self.detector, out, self.layout)

    def metric_targets(self, target: torch.Tensor) -> list[dict]:
        return detection_targets(target)

    def original_predictions(self, original: nn.Module, x: torch.Tensor) -> list[dict]:
        return original(list(x))  # a detector takes a list of images


def _detection(spec: TaskSpec, model: nn.Module, input_size: tuple[int, ...]) -> TaskObjective:
    detector = model.detector  # a DetectionTrunk: convert traces the trunk of a detector
    return DetectionLoss(spec, detector, anchor_layout(detector, input_size))


class DetectorAssignment:
    """A one-stage detector's own assignment at any block's resolution (a
    :class:`~fxlocal.aux.tasks.DenseAssignment`): its first level's anchors (FCOS: points) on the
    block's grid, matched and scored by the detector's own loss, on a prediction laid out as its
    head lays out its own (per anchor: the class logits, the box regression, FCOS's
    centre-ness). It refers to the detector's loss machinery and holds no state of its own, so
    copies of a head share it."""

    def __init__(self, detector: nn.Module, image_size: tuple[int, int]):
        self.family = detector_family(detector)
        self.per_location = level_anchors_per_location(detector)
        self.centreness = self.family.name == "fcos"
        self.image_size = tuple(image_size)
        self.detector = detector
        # per grid, device and dtype: placed and moved once, not at every step
        self._layouts: dict[tuple, AnchorLayout] = {}

    def __deepcopy__(self, memo) -> "DetectorAssignment":
        return self

    def channels(self, num_classes: int) -> int:
        return self.per_location * (num_classes + 4 + int(self.centreness))

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, _, h, w = prediction.shape
        layout = self._layout((h, w), prediction.device, prediction.dtype)
        # (N, anchors·values, h, w) -> (N, h·w·anchors, values): location, then anchor, as the
        # detector's head and anchors are laid out (a view where the prediction is channels-last)
        per_anchor = prediction.permute(0, 2, 3, 1).reshape(n, h * w * self.per_location, -1)
        classes = per_anchor.shape[-1] - 4 - int(self.centreness)
        outputs = {"cls_logits": per_anchor[..., :classes], "bbox_regression": per_anchor[..., classes:classes + 4]}
        if self.centreness:
            outputs["bbox_ctrness"] = per_anchor[..., classes + 4:]
        return sum(self.family.loss(self.detector, detection_targets(target), outputs, layout).values())

    def _layout(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> AnchorLayout:
        """The first level's anchors placed on ``grid``, on ``device`` in ``dtype``."""
        key = (grid, device, dtype)
        if key not in self._layouts:
            placed = level_layout(self.detector, grid, self.image_size)
            self._layouts[key] = AnchorLayout(placed.anchors.to(device, dtype), placed.per_level, placed.image_size)
        return self._layouts[key]


def detector_assignment(model: nn.Module, input_size: tuple[int, ...]) -> DetectorAssignment | None:
    """The own assignment of the detector whose trunk ``model`` is, where it has one to place on
    any grid (a one-stage detector's; a two-stage one's RPN anchors are not its box loss's)."""
    detector = model.detector
    return None if detector_family(detector).two_stage else DetectorAssignment(detector, tuple(input_size[1:]))


_OBJECTIVES: dict[str, Callable[[TaskSpec, nn.Module, tuple[int, ...]], TaskObjective]] = {
    "segmentation": lambda spec, model, size: SegmentationLoss(spec),
    "super_resolution": lambda spec, model, size: SuperResolutionLoss(spec),
    "detection": _detection,
}


def task_objective(spec: TaskSpec, model: nn.Module, input_size: tuple[int, ...]) -> TaskObjective:
    """The last block's objective for ``spec``'s task.

    Args:
        spec: the task.
        model: what was traced (a :class:`~fxlocal.models.dense.DetectionTrunk` for detection).
        input_size: per-sample input shape.

    Returns:
        The :class:`TaskObjective`.
    """
    if spec.name not in _OBJECTIVES:
        raise TaskError(f"task {spec.name!r} has no objective of its own: the last block's loss is cross-entropy")
    return _OBJECTIVES[spec.name](spec, model, tuple(input_size))
