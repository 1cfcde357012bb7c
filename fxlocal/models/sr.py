"""A reference super-resolution network (neither timm nor torchvision has one), registered with
timm's model registry: EDSR (Lim et al., CVPR 2017 workshops), the baseline's residual body and
pixel-shuffle tail, ×2.

``edsr_x2``: conv3×3 head, ``num_blocks`` residual blocks (conv3×3, ReLU, conv3×3, scaled by
``res_scale``) and a conv3×3 inside a global skip, then conv3×3 to ``width·scale²`` channels,
pixel shuffle ×``scale`` and conv3×3 to the input's channels. EDSR's RGB mean shift is left out:
the inputs are normalised by the data pipeline.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["EDSR"]


class ResidualBlock(nn.Module):
    def __init__(self, width: int, res_scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.res_scale * self.conv2(self.act(self.conv1(x)))


class EDSR(nn.Module):
    """EDSR: (N, C, H, W) -> (N, C, scale·H, scale·W)."""

    def __init__(self, num_blocks: int = 16, width: int = 64, scale: int = 2, in_chans: int = 3, res_scale: float = 1.0,
                 num_classes: int | None = None):
        super().__init__()
        if num_classes not in (None, 0):
            raise ValueError("EDSR is a super-resolution network: it has no classes")
        self.scale = scale
        self.head = nn.Conv2d(in_chans, width, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(width, res_scale) for _ in range(num_blocks)])
        self.body_end = nn.Conv2d(width, width, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(width, width * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.tail = nn.Conv2d(width, in_chans, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = h + self.body_end(self.body(h))
        return self.tail(self.upsample(h))


default_cfgs = generate_default_cfgs({"edsr_x2": {"num_classes": 0, "input_size": (3, 64, 64), "mean": (0.0, 0.0, 0.0),
                                                  "std": (1.0, 1.0, 1.0), "first_conv": "head", "classifier": ""}})


@register_model
def edsr_x2(pretrained: bool = False, **kwargs) -> EDSR:
    """EDSR baseline at ×2: 16 residual blocks of width 64."""
    return build_model_with_cfg(EDSR, "edsr_x2", pretrained, scale=2, **kwargs)
