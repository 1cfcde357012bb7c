"""What a model is trained to do, beyond classification: the task's targets, its image-level
(*global*) target and loss, and its dense (*local*) loss at a block's resolution. A registry by
name (``classification``, ``segmentation``, ``detection``, ``super_resolution``).

Targets as a batch carries them (one tensor each, so loaders collate and move them as usual):

- ``classification``: (N,) class indices;
- ``segmentation``: (N, H, W) class indices, 0 the background;
- ``detection``: (N, M, 5) rows ``label, x0, y0, x1, y1`` (pixels), padded with label -1;
  labels count from 1 (0 is the background, as torchvision's detectors take them);
- ``super_resolution``: (N, C, H, W) the high-resolution image.

A plain head (DGL's, MLAAN's) predicts a vector per image; under a task it is trained on the
task's global target: which classes are present (segmentation, detection) or the target image
pooled to a 4×4 grid (super-resolution). Heads built for the task (:mod:`fxlocal.aux.glcan`)
also predict the dense target at their block's resolution.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..errors import TaskError

__all__ = [
    "TaskSpec", "Task", "get_task", "available_tasks", "detection_targets", "point_targets",
    "POOLED_GRID", "DenseAssignment",
]

POOLED_GRID = 4  # super-resolution's global target: the target image average-pooled to 4×4


class DenseAssignment(Protocol):
    """A model's own way to score a dense prediction at any block's resolution (a one-stage
    detector's anchors, matching and loss), for task heads' local branches."""

    def channels(self, num_classes: int) -> int:
        """Values predicted per location."""
        ...

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of an (N, channels, h, w) prediction against the batch's task target."""
        ...


@dataclass(frozen=True)
class TaskSpec:
    """What a head needs to know about the task its block serves.

    Attributes:
        name: the task's registered name.
        num_classes: the classes the dense target and the global presence vector score
            (background included for segmentation and detection); 0 for super-resolution.
        target_shape: per-sample shape of the dense target: (H, W) for a mask or the boxes'
            image, (C, H, W) for the high-resolution image; () for classification.
        assignment: the model's own assignment at any resolution, where it has one (one-stage
            detectors); task heads may predict against it instead of the task's default.
    """

    name: str
    num_classes: int
    target_shape: tuple[int, ...] = ()
    assignment: DenseAssignment | None = field(default=None, compare=False, repr=False)

    @property
    def rules(self) -> "Task":
        """The task's targets and losses (the registered :class:`Task`)."""
        return get_task(self.name)

    @property
    def global_size(self) -> int:
        """How many values the global target has per image (a plain head's output width)."""
        return self.rules.global_size(self)


def detection_targets(target: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A padded detection target, (N, M, 5), as torchvision's detectors take it: one dict of
    ``boxes`` (n, 4) and ``labels`` (n,) per image, the padding rows (label -1) dropped."""
    real = [rows[rows[:, 0] >= 0] for rows in target]
    return [{"boxes": rows[:, 1:].float(), "labels": rows[:, 0].long()} for rows in real]


def _centres(size: tuple[int, int], stride: tuple[float, float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) pixel centres of an (h, w) grid of the given stride, each (h, w)."""
    ys = (torch.arange(size[0], device=device, dtype=torch.float32) + 0.5) * stride[0]
    xs = (torch.arange(size[1], device=device, dtype=torch.float32) + 0.5) * stride[1]
    return torch.meshgrid(ys, xs, indexing="ij")


def point_targets(target: torch.Tensor, size: tuple[int, int], stride: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS-style point assignment on an (h, w) grid of the given stride: each location whose
    centre lies inside a box takes the smallest such box.

    Args:
        target: (N, M, 5) padded detection target.
        size: the grid's (h, w).
        stride: pixels per location, (y, x).

    Returns:
        ``(labels, boxes)``: (N, h, w) labels (0 where no box), (N, h, w, 4) the assigned boxes.
    """
    cy, cx = _centres(size, stride, target.device)
    labels, boxes = target[..., 0].long(), target[..., 1:].float()  # (N, M), (N, M, 4)
    x0, y0, x1, y1 = (boxes[..., i][:, :, None, None] for i in range(4))  # (N, M, 1, 1)
    inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1) & (labels >= 0)[:, :, None, None]
    area = ((x1 - x0) * (y1 - y0)).expand_as(inside).masked_fill(~inside, float("inf"))
    best = area.argmin(1)  # (N, h, w): the smallest box holding each location
    found = inside.any(1)
    assigned = labels.gather(1, best.flatten(1)).view_as(best).clamp_min(0) * found
    assigned_boxes = boxes.gather(1, best.flatten(1)[..., None].expand(-1, -1, 4)).view(*best.shape, 4)
    return assigned, assigned_boxes


class Task:
    """A task: its global target and loss (what a plain head is trained on), its dense loss at a
    block's resolution (what a task head's local branch is trained on)."""

    name: str = ""
    dense: bool = True  # the target is a map (or boxes) over the image, not one class

    def global_size(self, spec: TaskSpec) -> int:
        """Values per image of the global target."""
        return spec.num_classes

    def global_target(self, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
        """The image-level target a global prediction is trained on."""
        raise NotImplementedError

    def global_loss(self, prediction: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
        """Loss of (N, global_size) predictions against the batch's task target; by default
        binary cross-entropy against the classes present (:meth:`global_target`)."""
        return F.binary_cross_entropy_with_logits(prediction, self.global_target(target, spec))

    def local_loss(self, prediction: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
        """Loss of a dense prediction at a block's resolution (a task head's local branch)."""
        raise NotImplementedError

    def local_channels(self, spec: TaskSpec, scale: int) -> int:
        """Channels a local branch predicts per location (before a pixel shuffle of ``scale``)."""
        raise NotImplementedError


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls()
    return cls


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """A task by name.

    Raises:
        TaskError: an unknown name (with the closest one).
    """
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TaskError(f"unknown task {name!r}{hint}; choose one of {', '.join(available_tasks())}")
    return _TASKS[name]


def presence(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, ...) class indices -> (N, num_classes) 0/1: which classes occur in each image. Index
    0 (the background) and negative ones (padding) are never a class present."""
    flat = labels.flatten(1).long()
    hot = torch.zeros(flat.shape[0], num_classes, device=flat.device)
    return hot.scatter_reduce(1, flat.clamp(0, num_classes - 1), (flat > 0).float(), reduce="amax")


@register_task
class Classification(Task):
    name = "classification"
    dense = False

    def global_target(self, target, spec):
        return target

    def global_loss(self, prediction, target, spec):
        return F.cross_entropy(prediction, target)


@register_task
class Segmentation(Task):
    name = "segmentation"

    def global_target(self, target, spec):
        return presence(target, spec.num_classes)

    def local_channels(self, spec, scale):
        return spec.num_classes

    def local_loss(self, prediction, target, spec):
        # the mask at the prediction's resolution (nearest: a class, not a blend of classes)
        mask = F.interpolate(target[:, None].float(), size=prediction.shape[-2:], mode="nearest")[:, 0].long()
        return F.cross_entropy(prediction, mask)


@register_task
class Detection(Task):
    """Where the spec has no model's own assignment (a two-stage detector, or GLCAN's
    ``assign=points``), the local branch predicts, at each location, the classes (sigmoid, focal
    loss) and the distances to the four sides of the box it lies in (GIoU loss), against FCOS's
    point assignment; else the detector's own anchors, matching and loss at its grid."""

    name = "detection"

    def global_target(self, target, spec):
        return presence(target[..., 0], spec.num_classes)

    def local_channels(self, spec, scale):
        return spec.assignment.channels(spec.num_classes) if spec.assignment is not None else spec.num_classes + 4

    def local_loss(self, prediction, target, spec):
        if spec.assignment is not None:  # the detector's own anchors, matching and loss at this grid
            return spec.assignment.loss(prediction, target)
        n, _, h, w = prediction.shape
        image_h, image_w = spec.target_shape[-2:]
        stride = (image_h / h, image_w / w)
        labels, boxes = point_targets(target, (h, w), stride)
        logits, distances = prediction[:, : spec.num_classes], prediction[:, spec.num_classes:]
        positive = labels > 0
        num_positive = max(int(positive.sum()), 1)
        classes = F.one_hot(labels, spec.num_classes).float()
        classes[..., 0] = 0.0  # the background is no class to score
        loss = sigmoid_focal_loss(logits.permute(0, 2, 3, 1), classes, reduction="sum") / num_positive
        if positive.any():
            cy, cx = (g.expand(n, h, w) for g in _centres((h, w), stride, prediction.device))
            ltrb = F.relu(distances.permute(0, 2, 3, 1)) * stride[1]  # in strides -> pixels
            predicted = torch.stack([cx - ltrb[..., 0], cy - ltrb[..., 1], cx + ltrb[..., 2], cy + ltrb[..., 3]], -1)
            loss = loss + generalized_box_iou_loss(predicted[positive], boxes[positive], reduction="mean")
        return loss


@register_task
class SuperResolution(Task):
    name = "super_resolution"

    def global_size(self, spec):
        return spec.target_shape[0] * POOLED_GRID**2

    def global_target(self, target, spec):
        return F.adaptive_avg_pool2d(target, POOLED_GRID).flatten(1)

    def global_loss(self, prediction, target, spec):
        return F.l1_loss(prediction, self.global_target(target, spec))

    def local_channels(self, spec, scale):
        return spec.target_shape[0] * scale**2

    def local_loss(self, prediction, target, spec):
        if prediction.shape[-2:] != target.shape[-2:]:  # a block whose stride the shuffle does not undo
            prediction = F.interpolate(prediction, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.l1_loss(prediction, target)


def task_criterion(spec: TaskSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``criterion(logits, target)`` for plain heads: the task's global loss."""
    task = spec.rules
    if not task.dense:
        return F.cross_entropy
    return lambda prediction, target: task.global_loss(prediction, target, spec)
