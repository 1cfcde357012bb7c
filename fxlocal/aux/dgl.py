"""DGL's auxiliary head (Belilovsky et al., "Decoupled Greedy Learning of CNNs", 2020).

As the reference builds it: average-pool the boundary to about a quarter of its resolution,
three (conv1×1, BN, ReLU) layers, average-pool to 2×2, three (Linear, BN, ReLU) layers and a
Linear classifier. Sized from the boundary tensor's real shape, so the same head serves feature
maps (channels first or last), token sequences (treated as a 1-D map over tokens) and vectors.
The MLP is capped at ``max_mlp_width`` so that a 2048-channel cut does not get an 8192-wide MLP.
"""

from __future__ import annotations

import math

from torch import nn

from .base import AuxMethod, HeadSpec, register_aux

_SPATIAL = {"nchw": 2, "nhwc": 2, "nlc": 1, "nc": 0}


class ToChannelsFirst(nn.Module):
    """(B, H, W, C) -> (B, C, H, W) and (B, N, C) -> (B, C, N)."""

    def forward(self, x):
        return x.movedim(-1, 1)


class DGLHead(nn.Module):
    def __init__(
        self,
        spec: HeadSpec,
        conv_layers: int = 3,
        mlp_layers: int = 3,
        max_mlp_width: int = 1024,
    ):
        super().__init__()
        spatial_dims = _SPATIAL[spec.layout]
        channels = spec.shape[-1] if spec.layout in ("nhwc", "nlc") else spec.shape[0]
        sizes = spec.shape[:-1] if spec.layout in ("nhwc", "nlc") else spec.shape[1:]
        layers: list[nn.Module] = []
        if spec.layout in ("nhwc", "nlc"):
            layers.append(ToChannelsFirst())
        if spatial_dims:
            conv, bn, pool = {
                2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
                1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
            }[spatial_dims]
            layers.append(pool(tuple(max(1, math.ceil(s / 4)) for s in sizes)))
            for _ in range(conv_layers):
                layers += [conv(channels, channels, 1, bias=False), bn(channels), nn.ReLU()]
            layers += [pool((2,) * spatial_dims), nn.Flatten(1)]
        features = channels * 2**spatial_dims
        width = min(features, max_mlp_width)
        for _ in range(mlp_layers):
            layers += [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, spec.num_classes))
        self.layers = nn.Sequential(*layers)
        self.summary = (
            f"DGL: pool→{conv_layers}×conv1x1({channels})→pool2^{spatial_dims}→"
            f"{mlp_layers}×fc({width})→fc({spec.num_classes})"
        )

    def forward(self, x):
        return self.layers(x)


@register_aux("dgl")
class DGL(AuxMethod):
    can_be_base = True
    def __init__(self, conv_layers: int = 3, mlp_layers: int = 3, max_mlp_width: int = 1024):
        self.options = dict(conv_layers=conv_layers, mlp_layers=mlp_layers, max_mlp_width=max_mlp_width)

    def build_head(self, spec: HeadSpec) -> nn.Module:
        return DGLHead(spec, **self.options)

    def describe(self, head: nn.Module) -> str:
        return head.summary
