"""Any timm backbone as a segmenter: its last feature map (timm's ``forward_intermediates``, which
gives a ViT's tokens as a map too) through a simple decoder (FCN's head: a conv3×3, BN, ReLU and a
conv1×1 to the classes), upsampled bilinearly to the input's size.
Made by name through the ``segment`` model source: ``segment:resnet18``, ``segment:convnext_atto``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimpleSegmenter"]


class SimpleSegmenter(nn.Module):
    """``images -> {"out": (N, classes, H, W) logits}``, as torchvision's segmentation models return them.

    Args:
        backbone: a timm model name (random init) that has ``forward_intermediates``.
        num_classes: the classes, background included.
        in_chans: the images' channels.
        decoder_width: channels of the decoder's conv3×3.
        **kwargs: passed to timm's ``create_model``.
    """

    def __init__(self, backbone: str, num_classes: int = 21, in_chans: int = 3, decoder_width: int = 128, **kwargs):
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        channels = self.backbone.feature_info[-1]["num_chs"]
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, decoder_width, 3, padding=1, bias=False), nn.BatchNorm2d(decoder_width), nn.ReLU(inplace=True),
            nn.Conv2d(decoder_width, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        logits = self.decoder(features)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def _register() -> None:
    from .factory import ModelSource, register_model_source

    def names() -> list[str]:
        import timm

        return timm.list_models()

    def create(name: str, num_classes: int | None, input_size: tuple[int, ...], **kwargs) -> nn.Module:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return SimpleSegmenter(name, in_chans=input_size[0], **kwargs)

    register_model_source(ModelSource("segment", names, create))


_register()
