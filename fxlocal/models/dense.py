"""torchvision's detection and segmentation models by name (random init), and what of a detector
fxlocal traces and trains.

A detector's end-to-end forward is not symbolically traceable (its transform resizes image by
image, its post-processing keeps a data-dependent number of boxes). What is traceable is its
*trunk*: the backbone (body + FPN) and, for a one-stage detector (RetinaNet, FCOS, SSD), the
head, which maps the images to the per-anchor class logits and box regressions. fxlocal traces
and cuts the trunk; the detector's own loss (its anchor or point assignment) on the head's
outputs is the last block's objective, and its own post-processing turns them into boxes
(:class:`DetectorFamily`). A two-stage detector's (Faster R-CNN's) region proposal network and
box heads pick proposals per image: they run, and are trained, in the last block's objective.

Detectors are built for the input size they will see: their transform neither resizes (a fixed
size equal to the input's) nor normalises (the data pipeline does), so the trunk on a batch
computes what the detector computes on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InputSizeError, TaskError

__all__ = [
    "DetectionTrunk", "DetectorFamily", "AnchorLayout", "anchor_layout", "detector_family",
    "level_anchors_per_location", "level_layout", "model_task",
]


def _detector_classes() -> dict[str, type]:
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD

    return {"retinanet": RetinaNet, "fcos": FCOS, "ssd": SSD, "two_stage": GeneralizedRCNN}


def _dense_names() -> list[str]:
    import torchvision

    return [*torchvision.models.list_models(module=torchvision.models.detection),
            *torchvision.models.list_models(module=torchvision.models.segmentation)]


def _identity_transform(input_size: tuple[int, ...]) -> nn.Module:
    """A detector transform that keeps the batch as it is: the input's fixed size (no resize),
    mean 0 and std 1 (the data is normalised already)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    c, h, w = input_size
    return GeneralizedRCNNTransform(min(h, w), max(h, w), [0.0] * c, [1.0] * c, size_divisible=1, fixed_size=(w, h))


def _dense_create(name: str, num_classes: int | None, input_size: tuple[int, ...], **extra) -> nn.Module:
    import torchvision

    if input_size[0] != 3:
        raise InputSizeError(f"torchvision's {name} takes 3-channel images, not {input_size[0]}: pass --input-size 3 H W")
    kwargs: dict = {"weights": None, "weights_backbone": None, **extra}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    if name in torchvision.models.list_models(module=torchvision.models.detection):
        model.transform = _identity_transform(tuple(input_size))
    return model


@dataclass(frozen=True)
class AnchorLayout:
    """The anchors (or points) of a detector at one input size: they depend on the feature maps'
    sizes alone, so they are computed once."""

    anchors: torch.Tensor  # (total, 4) xyxy, for one image (none for a two-stage detector: its RPN places its own)
    per_level: tuple[int, ...]  # how many of them each feature level has, in order
    image_size: tuple[int, int]  # (H, W)
    channels: int = 3


@dataclass(frozen=True)
class DetectorFamily:
    """How fxlocal trains and runs one class of torchvision detector from its trunk's output (the
    head's outputs; a two-stage detector's backbone features).

    ``loss(detector, targets, trunk_output, layout)`` is the detector's training loss (a dict of
    terms, as its forward returns), ``predict(detector, trunk_output, layout)`` its detections
    (one dict of ``boxes``, ``scores``, ``labels`` per image).
    """

    name: str
    loss: Callable[..., dict[str, torch.Tensor]]
    predict: Callable[..., list[dict[str, torch.Tensor]]]
    num_classes: Callable[[nn.Module], int]  # the classes its boxes are scored over, the background included
    #: the trunk is the backbone alone: the region proposal network and the box heads choose
    #: proposals per image, so they run in the objective (which trains them with the last block)
    two_stage: bool = False


def _anchors(layout: AnchorLayout, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    return [layout.anchors.to(like.device, like.dtype)] * n


def _split(head_outputs: dict, layout: AnchorLayout) -> tuple[dict, list]:
    """Head outputs and anchors per feature level, as the detector's post-processing takes them."""
    split = {k: list(v.split(list(layout.per_level), dim=1)) for k, v in head_outputs.items()}
    anchors = [list(layout.anchors.to(next(iter(head_outputs.values())).device).split(list(layout.per_level)))]
    return split, anchors


def _predict_by_level(detector, head_outputs: dict, layout: AnchorLayout) -> list[dict]:
    n = next(iter(head_outputs.values())).shape[0]
    split, anchors = _split(head_outputs, layout)
    sizes = [layout.image_size] * n
    return detector.postprocess_detections(split, anchors * n, sizes)


def _retinanet_loss(detector, targets, head_outputs, layout):
    return detector.compute_loss(targets, head_outputs, _anchors(layout, len(targets), head_outputs["cls_logits"]))


def _fcos_loss(detector, targets, head_outputs, layout):
    anchors = _anchors(layout, len(targets), head_outputs["cls_logits"])
    return detector.compute_loss(targets, head_outputs, anchors, list(layout.per_level))


def _ssd_loss(detector, targets, head_outputs, layout):
    from torchvision.ops import boxes as box_ops

    anchors = _anchors(layout, len(targets), head_outputs["cls_logits"])
    matched = []  # what SSD's forward matches before its compute_loss
    for anchors_per_image, target in zip(anchors, targets):
        if target["boxes"].numel() == 0:
            matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device))
        else:
            matched.append(detector.proposal_matcher(box_ops.box_iou(target["boxes"], anchors_per_image)))
    return detector.compute_loss(targets, head_outputs, anchors, matched)


def _ssd_predict(detector, head_outputs, layout):
    n = head_outputs["cls_logits"].shape[0]
    return detector.postprocess_detections(head_outputs, _anchors(layout, n, head_outputs["cls_logits"]),
                                           [layout.image_size] * n)


def _image_list(features: dict, layout: AnchorLayout):
    """The batch's ImageList as a two-stage detector's RPN reads it: its shape, device and sizes
    (an expanded scalar: no image is needed, only what its anchors are placed on)."""
    from torchvision.models.detection.image_list import ImageList

    like = next(iter(features.values()))
    images = like.new_zeros(()).expand(like.shape[0], layout.channels, *layout.image_size)
    return ImageList(images, [layout.image_size] * like.shape[0])


def _two_stage_loss(detector, targets, features, layout):
    images = _image_list(features, layout)
    proposals, rpn_losses = detector.rpn(images, features, targets)
    _, box_losses = detector.roi_heads(features, proposals, images.image_sizes, targets)
    return {**rpn_losses, **box_losses}


def _two_stage_predict(detector, features, layout):
    images = _image_list(features, layout)
    proposals, _ = detector.rpn(images, features)
    detections, _ = detector.roi_heads(features, proposals, images.image_sizes)
    return detector.transform.postprocess(detections, images.image_sizes, images.image_sizes)


def _families() -> dict[type, DetectorFamily]:
    classes = _detector_classes()
    return {
        classes["retinanet"]: DetectorFamily("retinanet", _retinanet_loss, _predict_by_level,
                                             lambda d: d.head.classification_head.num_classes),
        classes["fcos"]: DetectorFamily("fcos", _fcos_loss, _predict_by_level, lambda d: d.head.classification_head.num_classes),
        classes["ssd"]: DetectorFamily("ssd", _ssd_loss, _ssd_predict, lambda d: d.head.classification_head.num_columns),
        # Faster R-CNN (and its GeneralizedRCNN kin without mask or keypoint heads)
        classes["two_stage"]: DetectorFamily("two-stage", _two_stage_loss, _two_stage_predict,
                                             lambda d: d.roi_heads.box_predictor.cls_score.out_features, two_stage=True),
    }


def detector_family(detector: nn.Module) -> DetectorFamily:
    """The :class:`DetectorFamily` of a torchvision detector.

    Raises:
        TaskError: a detector whose head is not traceable (two-stage: Faster/Mask/Keypoint R-CNN).
    """
    if getattr(detector, "roi_heads", None) is not None and (detector.roi_heads.has_mask() or detector.roi_heads.has_keypoint()):
        raise TaskError(
            f"{type(detector).__name__} predicts masks or keypoints beside boxes, which the detection task's targets do "
            "not have: use a box detector (fasterrcnn_*, retinanet_*, fcos_*, ssd*)"
        )
    for cls, family in _families().items():
        if isinstance(detector, cls):
            return family
    raise TaskError(f"{type(detector).__name__} is no torchvision detector fxlocal knows: use fasterrcnn_*, retinanet_*, fcos_* or ssd*")


class DetectionTrunk(nn.Module):
    """What fxlocal traces of a detector: for a one-stage one ``images -> head(backbone(images))``,
    the per-anchor ``cls_logits`` and ``bbox_regression`` (and FCOS's ``bbox_ctrness``); for a
    two-stage one the backbone's features (its region proposal network and box heads choose
    proposals per image: they run in the last block's objective). Its ``state_dict`` is the
    detector's own under the same keys (a two-stage one's RPN and box heads' are the
    objective's); ``detector`` is the whole detector, for its loss and post-processing (not a
    submodule, so its state is not held twice)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.two_stage = detector_family(detector).two_stage
        self.backbone = detector.backbone
        if not self.two_stage:
            self.head = detector.head
        object.__setattr__(self, "detector", detector)

    @property
    def num_classes(self) -> int:
        """The classes its boxes are scored over, the background included."""
        return int(detector_family(self.detector).num_classes(self.detector))

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        if self.two_stage:
            return features
        return self.head(list(features.values()))


@torch.no_grad()
def anchor_layout(detector: nn.Module, input_size: tuple[int, ...]) -> AnchorLayout:
    """The anchors of ``detector`` for one image of ``input_size``, and their count per level:
    its anchor generator on its backbone's feature maps (computed in eval mode, so that no
    batch-norm statistic moves)."""
    from torchvision.models.detection.image_list import ImageList

    c, h, w = input_size
    if detector_family(detector).two_stage:
        return AnchorLayout(torch.zeros(0, 4), (), (h, w), c)
    param = next(detector.parameters())
    images = torch.zeros(1, c, h, w, device=param.device, dtype=param.dtype)
    was_training = detector.backbone.training
    detector.backbone.eval()
    try:
        features = detector.backbone(images)
    finally:
        detector.backbone.train(was_training)
    features = list(features.values()) if isinstance(features, dict) else [features]
    anchors = detector.anchor_generator(ImageList(images, [(h, w)]), features)[0]
    per_location = detector.anchor_generator.num_anchors_per_location()  # per level (SSD300's vary)
    per_level = tuple(int(f.shape[-2] * f.shape[-1] * a) for f, a in zip(features, per_location))
    return AnchorLayout(anchors.detach().cpu(), per_level, (h, w), c)


def _first_level_generator(detector: nn.Module, stride: int | None = None) -> nn.Module:
    """A one-stage detector's anchor generator reduced to its first (finest) level's anchor
    shapes, free of where that level's anchors sit: placed on any grid, it puts them at the
    grid's stride. FCOS's points are sized as their level's stride (its centre sampling and box
    scale read that size), so on a grid of ``stride`` they are that large."""
    from torchvision.models.detection.anchor_utils import (
        AnchorGenerator,
        DefaultBoxGenerator,
    )

    generator = detector.anchor_generator
    if isinstance(generator, DefaultBoxGenerator):  # SSD: the first map's default boxes, no fixed steps
        return DefaultBoxGenerator([generator.aspect_ratios[0]], scales=generator.scales[:2], steps=None, clip=generator.clip)
    if detector_family(detector).name == "fcos" and stride is not None:
        return AnchorGenerator(sizes=((stride,),), aspect_ratios=(generator.aspect_ratios[0],))
    return AnchorGenerator(sizes=(generator.sizes[0],), aspect_ratios=(generator.aspect_ratios[0],))


def level_anchors_per_location(detector: nn.Module) -> int:
    """How many anchors a one-stage detector's first level has per location (1 for FCOS's points)."""
    return int(_first_level_generator(detector).num_anchors_per_location()[0])


@torch.no_grad()
def level_layout(detector: nn.Module, grid: tuple[int, int], image_size: tuple[int, int]) -> AnchorLayout:
    """The anchors (FCOS: points) a one-stage detector's first level would have on a feature map
    of ``grid`` size over an image of ``image_size``: what a block's aux head at that resolution
    predicts against, with the detector's own matching and loss (:class:`DetectorFamily`).

    Args:
        detector: a RetinaNet, FCOS or SSD.
        grid: the feature map's (h, w).
        image_size: the image's (H, W).

    Returns:
        One level's :class:`AnchorLayout`, anchors ordered as the detector's heads flatten their
        outputs (by location, then anchor).
    """
    from torchvision.models.detection.image_list import ImageList

    generator = _first_level_generator(detector, image_size[0] // grid[0])
    images = torch.zeros(1, 1, *image_size)
    anchors = generator(ImageList(images, [tuple(image_size)]), [torch.zeros(1, 1, *grid)])[0]
    return AnchorLayout(anchors, (int(anchors.shape[0]),), tuple(image_size))


def _register() -> None:
    from .factory import ModelSource, register_model_source

    register_model_source(ModelSource("torchvision_dense", _dense_names, _dense_create))


_register()


def model_task(model: nn.Module) -> str:
    """The task a model is made for: ``detection`` for torchvision's detectors (and a
    :class:`DetectionTrunk`), ``segmentation`` for its segmenters (and a
    :class:`~fxlocal.models.segmenter.SimpleSegmenter`), ``super_resolution`` for fxlocal's EDSR,
    else ``classification``."""
    from torchvision.models import segmentation

    from .segmenter import SimpleSegmenter
    from .sr import EDSR

    if isinstance(model, (DetectionTrunk, *_detector_classes().values())):
        return "detection"
    if isinstance(model, (segmentation.FCN, segmentation.DeepLabV3, segmentation.LRASPP, SimpleSegmenter)):
        return "segmentation"
    return "super_resolution" if isinstance(model, EDSR) else "classification"
