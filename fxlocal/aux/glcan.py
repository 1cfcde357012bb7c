"""GLCAN heads (Zhu et al., "Global-Local Collaborative Auxiliary Networks", arXiv 2406.00446):
task-specific aux heads for detection, segmentation and super-resolution, where a classifier
head gives a detector's or an upscaler's early blocks the wrong signal.

The paper's method section was not readable here; this is the design its abstract describes,
built from the cut's tensor and the task (:class:`~fxlocal.aux.tasks.TaskSpec`):

- a *local* branch: a light conv tower at the block's resolution, or ``stride`` times coarser
  (``depth`` × conv3×3, BN, ReLU at ``width`` channels; its maps no larger than the cut's
  tensor) and a 1×1 conv predicting the task's dense target at that stride:
  per-pixel classes (segmentation); for detection, what the detector's own head predicts,
  against its own assignment: its first level's anchors placed on the block's grid, matched and
  scored by its own loss (a one-stage detector; else, or with ``assign=points``, per-location
  classes and box sides against FCOS's point assignment); the high-resolution image through a
  pixel shuffle of the remaining scale (super-resolution);
- a *global* branch: the pooled tensor through a hidden layer, predicting the image-level target
  (the classes present; the target image pooled to 4×4) and *modulating* the local branch: the
  hidden layer gives a per-channel scale and shift of the tower's features (FiLM);
- the loss: the task's loss on the local branch plus ``global_weight`` × the global one.

It can be a base (``--aux glcan+man``: MAN's ``LB + EMA`` path ends in a GLCAN head).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import TaskError
from ..graph.cost import Cost
from .base import AuxHead, AuxMethod, HeadSpec, register_aux
from .unit_copies import handed_on

__all__ = ["GLCAN", "GLCANHead", "ASSIGNMENTS"]

#: what a detection head's local branch predicts against: the detector's own first-level anchors,
#: matching and loss at the block's grid (``model``, the default: a one-stage detector's; a
#: two-stage one falls back to points), or FCOS's points whatever the detector (``points``).
#: On held-out canvases (SSDlite, K=4) ``model`` detected as well as end to end, ``points``
#: 15% worse (docs/tasks.md)
ASSIGNMENTS = ("points", "model")


def _conv_relu(cin: int, cout: int, stride: int, norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=not norm)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)] if norm else [conv, nn.ReLU(inplace=True)]


class GLCANHead(AuxHead):
    owns_loss = True

    def __init__(self, spec: HeadSpec, width: int = 64, depth: int = 2, hidden: int = 128, global_weight: float = 0.1,
                 stride: int = 1, norm: bool = True, assign: str = "model"):
        super().__init__()
        task = spec.task
        if task is None or not task.rules.dense:
            raise TaskError(
                "glcan heads predict a dense task's target (detection, segmentation, super_resolution); "
                "for classification use dgl or another classifier head"
            )
        if spec.layout not in ("nchw", "nhwc"):
            raise TaskError(
                f"glcan heads need a (batch, channels, height, width) map at each cut, but block {spec.block} "
                f"ends in a {spec.layout} tensor of shape {spec.shape}; cut a convolutional model, or use dgl"
            )
        if assign not in ASSIGNMENTS:
            raise TaskError(f"glcan's assign is one of {', '.join(ASSIGNMENTS)}, not {assign!r}")
        if assign == "points" or task.assignment is None:  # the task's own (FCOS's points for detection)
            task = replace(task, assignment=None)
        channels, h, w = spec.shape if spec.layout == "nchw" else (spec.shape[2], *spec.shape[:2])
        if stride < 1 or depth < 1:
            raise TaskError(f"glcan's local tower needs depth 1 or more and stride 1 or more (how much coarser than the cut "
                            f"it runs), not depth {depth}, stride {stride}")
        # its maps no larger than the cut's tensor: a tower costs no more memory than the block it trains
        width = min(width, channels * stride**2)
        h, w = -(-h // stride), -(-w // stride)  # a 3×3 conv of stride s, padded by 1
        self.task, self.channels_last, self.global_weight = task, spec.layout == "nhwc", global_weight
        target_h = task.target_shape[-2]
        self.scale = target_h // h if task.name == "super_resolution" and target_h % h == 0 else 1
        self.tower = nn.Sequential(*[m for i in range(depth)
                                     for m in _conv_relu(channels if i == 0 else width, width, stride if i == 0 else 1, norm)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.context = nn.Sequential(nn.Flatten(1), nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.global_out = nn.Linear(hidden, task.global_size)
        self.modulation = nn.Linear(hidden, 2 * width)
        nn.init.zeros_(self.modulation.weight)  # starts as the identity: scale 1, shift 0
        nn.init.zeros_(self.modulation.bias)
        out = task.rules.local_channels(task, self.scale)
        self.prediction_numel = out * h * w  # per sample (a pixel shuffle keeps it)
        self.local_out = nn.Sequential(nn.Conv2d(width, out, 1), *([nn.PixelShuffle(self.scale)] if self.scale > 1 else []))
        self.summary = (
            f"GLCAN {task.name}: local {depth}×conv3x3({width}{f', stride {stride} first' if stride > 1 else ''}"
            f"{'' if norm else ', no norm'})→conv1x1({out})"
            + (f"→shuffle×{self.scale}" if self.scale > 1 else "")
            + (" against the detector's own anchors" if task.assignment is not None else "")
            + f" at {h}×{w}; global pool→fc({hidden})→fc({task.global_size}), FiLM on the local branch"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local prediction, global prediction)`` from the cut's tensor."""
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        context = self.context(self.pool(x))
        scale, shift = self.modulation(context).chunk(2, dim=1)  # (N, width) each
        features = self.tower(x)
        # FiLM, conv1x1(features * (1 + scale) + shift), folded into a per-sample conv1x1: the
        # same values, without keeping the modulated map (as large as the tower's) for backward
        conv = self.local_out[0]
        weight = conv.weight.flatten(1)  # (out, width)
        per_sample = weight * (1 + scale)[:, None, :]
        bias = shift @ weight.T + conv.bias
        n, _, h, w = features.shape
        # computed location by location, (N, h·w, out), and seen as (N, out, h, w) without a copy:
        # a detector's loss reads it per location and anchor, as its own head lays out its outputs
        local = torch.baddbmm(bias[:, None, :], features.flatten(2).transpose(1, 2), per_sample.transpose(1, 2))
        local = local.view(n, h, w, -1).permute(0, 3, 1, 2)
        return self.local_out[1:](local), self.global_out(context)

    def local_loss(self, ctx, b: int, out):
        local, global_ = self(handed_on(out)[0])
        task = self.task.rules
        loss = task.local_loss(local, ctx.target, self.task) + self.global_weight * task.global_loss(global_, ctx.target, self.task)
        return loss, global_


@register_aux("glcan")
class GLCAN(AuxMethod):
    can_be_base = True

    def __init__(self, width: int = 64, depth: int = 2, hidden: int = 128, global_weight: float = 0.1, stride: int = 1,
                 norm: bool = True, assign: str = "model"):
        self.options = dict(width=width, depth=depth, hidden=hidden, global_weight=global_weight, stride=stride, norm=norm,
                            assign=assign)

    def build_head(self, spec: HeadSpec) -> nn.Module:
        return GLCANHead(spec, **self.options)

    def head_cost(self, spec: HeadSpec) -> Cost:
        """The head's module, and its loss on its dense prediction: the loss keeps the prediction
        and about as much again (a log-softmax, the matched targets), which at a detector's
        anchors on a fine grid outweighs the tower (six anchors of 15 values per location)."""
        cost = super().head_cost(spec)
        with torch.device("meta"):
            predicted = torch.get_default_dtype().itemsize * float(self.build_head(spec).prediction_numel)
        return replace(cost, activation_bytes=cost.activation_bytes + 2 * predicted,
                       largest_activation_bytes=max(cost.largest_activation_bytes, predicted))

    def describe(self, head: nn.Module) -> str:
        return head.summary
