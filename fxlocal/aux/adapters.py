"""The smallest module that turns one activation shape into another, decided from real shapes.

Used where an aux net's input (or the output of one copied unit) does not fit the next copied
unit: first the layout (channels first/last, map vs tokens), then the resolution (average-pool
down, nearest-upsample up; token counts by average-pooling), then the width (a 1×1 conv on
channels-first maps, a Linear on the last dim otherwise). Nothing is added that is not needed.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import FxLocalError

__all__ = ["make_adapter", "make_tensors_adapter"]

# Tokens before the patch grid that a map does not have: class, distillation, register tokens.
MAX_PREFIX_TOKENS = 8


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(0, *self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class MapToTokens(nn.Module):
    """(B, C, H, W) -> (B, H·W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class TokensToMap(nn.Module):
    """(B, N, C) -> (B, C, H, W), dropping leading extra tokens (a class token) if N > H·W."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        h, w = self.size
        x = x[:, x.shape[1] - h * w :]
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class Resize2d(nn.Module):
    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return nn.functional.adaptive_avg_pool2d(x, self.size)
        return nn.functional.interpolate(x, size=self.size, mode="nearest")

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ResizeTokens(nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def forward(self, x):
        return nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), self.count).transpose(1, 2)


def _channels_first(shape, layout):
    """(channels, spatial sizes) of a per-sample shape."""
    if layout == "nchw":
        return shape[0], tuple(shape[1:])
    if layout in ("nhwc", "nlc"):
        return shape[-1], tuple(shape[:-1])
    return shape[0], ()


def make_adapter(
    src_shape: tuple[int, ...], src_layout: str, dst_shape: tuple[int, ...], dst_layout: str
) -> nn.Module:
    """A module mapping per-sample ``src_shape`` (``src_layout``) to ``dst_shape`` (``dst_layout``)."""
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    if (src_shape, src_layout) == (dst_shape, dst_layout) or src_shape == dst_shape and src_layout != "nc":
        return nn.Identity()
    layers: list[nn.Module] = []
    c_src, sp_src = _channels_first(src_shape, src_layout)
    c_dst, sp_dst = _channels_first(dst_shape, dst_layout)
    # 1. resolution and layout: work channels first for maps, (N, C) for tokens
    if dst_layout in ("nchw", "nhwc"):
        if src_layout == "nhwc":
            layers.append(Permute(3, 1, 2))
        elif src_layout == "nlc":
            grid = sp_dst[0] * sp_dst[1]
            if not 0 <= sp_src[0] - grid <= MAX_PREFIX_TOKENS:
                layers.append(ResizeTokens(grid))
            layers.append(TokensToMap(sp_dst))
            sp_src = sp_dst
        elif src_layout == "nc":
            raise FxLocalError(f"cannot adapt a vector of {src_shape} to a feature map {dst_shape}")
        if sp_src != sp_dst:
            layers.append(Resize2d(sp_dst))
        if c_src != c_dst:
            layers.append(nn.Conv2d(c_src, c_dst, 1, bias=False))
        if dst_layout == "nhwc":
            layers.append(Permute(2, 3, 1))
    elif dst_layout == "nlc":
        if src_layout == "nchw":
            layers.append(MapToTokens())
        elif src_layout == "nhwc":
            layers.append(nn.Flatten(1, 2))
        elif src_layout == "nc":
            raise FxLocalError(f"cannot adapt a vector of {src_shape} to tokens {dst_shape}")
        count = sp_src[0] * (sp_src[1] if len(sp_src) > 1 else 1)
        if count != sp_dst[0]:
            layers.append(ResizeTokens(sp_dst[0]))
        if c_src != c_dst:
            layers.append(nn.Linear(c_src, c_dst, bias=False))
    else:  # a vector
        if src_layout == "nhwc":
            layers.append(Permute(3, 1, 2))
        if src_layout in ("nchw", "nhwc"):
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        elif src_layout == "nlc":
            layers.append(_MeanTokens())
        if c_src != c_dst:
            layers.append(nn.Linear(c_src, c_dst, bias=False))
    return nn.Sequential(*layers) if len(layers) != 1 else layers[0]


Tensors = Sequence[tuple[tuple[int, ...], str]]  # (per-sample shape, layout) of each tensor


class TensorsAdapter(nn.Module):
    """Maps the tensors one unit hands on to those the next copy takes, one adapter per route:
    the ``i``-th tensor wanted is made from the ``i``-th one given, or from the first when fewer
    are given (a unit that takes a carried tensor, after a cut that carries none); a given tensor
    with no place is added into the first one wanted, so that what computed it still trains."""

    def __init__(self, adapters: list[nn.Module], routes: list[tuple[int, int]], outputs: int):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.routes = routes  # (given index, wanted index) per adapter
        self.outputs = outputs

    def forward(self, *tensors):
        out: list = [None] * self.outputs
        for adapter, (src, dst) in zip(self.adapters, self.routes):
            y = adapter(tensors[src])
            out[dst] = y if out[dst] is None else out[dst] + y
        return tuple(out)


def make_tensors_adapter(given: Tensors, wanted: Tensors) -> nn.Module:
    """:func:`make_adapter` for each tensor crossing between two units (see :class:`TensorsAdapter`);
    ``nn.Identity`` when they already fit."""
    if len(given) == 1 and len(wanted) == 1:
        return make_adapter(*given[0], *wanted[0])
    routes = [(i if i < len(given) else 0, i) for i in range(len(wanted))]
    routes += [(j, 0) for j in range(len(wanted), len(given))]
    adapters = [make_adapter(*given[src], *wanted[dst]) for src, dst in routes]
    if len(given) == len(wanted) and all(isinstance(a, nn.Identity) for a in adapters):
        return nn.Identity()
    return TensorsAdapter(adapters, routes, len(wanted))


class _MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)

