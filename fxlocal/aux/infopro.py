"""InfoPro (Wang et al., "Revisiting Locally Supervised Learning", ICLR 2021).

Each block but the last is trained by ``λ1 · BCE(decoder(h), x01) + λ2 · L_task(classifier(h), y)``:
the decoder reconstructs the model's input from the block's output ``h`` (``x01``: the input
with the data's normalisation undone, in [0, 1]), the classifier predicts the label. For block
``k`` of ``K`` (``K`` counts every block, the last included), with ``r = k / (K - 2)`` (0 when
``K <= 2``), ``λ1 = ixx_1·(1 - r) + ixx_2·r`` and ``λ2 = ixy_1·(1 - r) + ixy_2·r``: early blocks
keep information about the input, later ones about the label.

Heads are derived from the cut tensor and the model's input shape, as the reference builds them
for CIFAR and ImageNet:

* decoder ``"upsample"`` (the reference's CIFAR decoder): bilinear upsample to the input size,
  conv3×3 → 12 + BN + ReLU, conv3×3 → the input's channels; ``"progressive"`` (its ImageNet
  decoder): conv1×1 → 128 + BN + ReLU, then ×2 bilinear upsample + conv3×3 per octave up to the
  input size, widths ending ..., 32, 12, channels, BN + ReLU after each but the last. ``"auto"``
  (default) takes ``upsample`` for inputs up to 64 pixels a side, where its full-resolution
  convolutions are cheap, and ``progressive`` above, where they are not;
* classifier "1c2f": conv3×3 (stride 2 when the map is larger than 8×8, then twice the width,
  capped at ``max_conv_width``) + BN + ReLU, global pool, FC → 128, ReLU, FC → classes.

Token sequences are laid out on their patch grid first, vectors are projected to a 4×4 map.

Two departures from the reference, neither changing the loss: the decoder ends in logits and
the loss is ``binary_cross_entropy_with_logits`` (the reference's sigmoid + BCELoss computed
stably, and allowed under fp16 autocast, where BCELoss is not); a part whose weight is 0 for a
block is not built, so that every parameter a head has is trained.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FxLocalError
from ..graph.cost import Cost, measure_module
from .adapters import make_adapter
from .base import AuxHead, AuxMethod, HeadSpec, register_aux
from .unit_copies import handed_on

__all__ = ["InfoPro", "InfoProHead", "WEIGHT_TABLES", "loss_weights", "table_weights", "supervised_contrastive_loss"]

#: the reference's (ixx_1, ixy_1, ixx_2, ixy_2) on CIFAR-10, by network and K
WEIGHT_TABLES: dict[str, dict[int, tuple[float, float, float, float]]] = {
    "resnet32": {2: (5, 1, 0, 0), 4: (6, 0, 1, 2), 8: (5, 0, 0, 2), 16: (5, 0.05, 0.2, 0.5)},
    "resnet110": {2: (5, 0.5, 0, 0), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1), 16: (5, 0, 0.5, 1)},
}
# ImageNet's only published setting (ResNet-101, K=2) as a table of one entry
WEIGHT_TABLES["imagenet"] = {2: (5, 0.75, 0, 0)}

# the input normalisation assumed when nobody says (timm's and torchvision's ImageNet statistics)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_WEIGHT_NAMES = ("ixx_1", "ixy_1", "ixx_2", "ixy_2")


def table_weights(k: int, table: str = "resnet32") -> tuple[float, float, float, float]:
    """(ixx_1, ixy_1, ixx_2, ixy_2) for ``k`` blocks from one of :data:`WEIGHT_TABLES`.

    A tabulated K gets its entry; between two, each weight is interpolated linearly in log2 K
    (K=6 lies halfway between K=4 and K=8); below the smallest or above the largest, the nearest
    entry is used.

    Args:
        k: the number of blocks.
        table: a key of :data:`WEIGHT_TABLES`.

    Returns:
        The four weights.
    """
    if table not in WEIGHT_TABLES:
        raise FxLocalError(f"infopro weights_table is one of {', '.join(WEIGHT_TABLES)}, got {table!r}")
    rows = WEIGHT_TABLES[table]
    ks = sorted(rows)
    if k <= ks[0] or k >= ks[-1]:
        return rows[ks[0] if k <= ks[0] else ks[-1]]
    if k in rows:
        return rows[k]
    lo = max(x for x in ks if x < k)
    hi = min(x for x in ks if x > k)
    t = (math.log2(k) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return tuple(a + (b - a) * t for a, b in zip(rows[lo], rows[hi]))  # type: ignore[return-value]


def loss_weights(block: int, k: int, weights: tuple[float, float, float, float]) -> tuple[float, float]:
    """(λ1, λ2) of block ``block`` of ``k``: the reconstruction's and the task's weight.

    Args:
        block: 0 … k-2.
        k: the number of blocks (the last included).
        weights: (ixx_1, ixy_1, ixx_2, ixy_2).

    Returns:
        ``(λ1, λ2)``, with ``r = block / (k - 2)`` (0 when ``k <= 2``) interpolating from the
        ``_1`` to the ``_2`` weights.
    """
    ixx_1, ixy_1, ixx_2, ixy_2 = weights
    r = block / (k - 2) if k > 2 else 0.0
    return ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of one view per sample.

    Args:
        features: (batch, dim) projections; normalised here.
        labels: (batch,) classes: samples of a class are each other's positives.
        temperature: τ.

    Returns:
        The mean over the anchors that have a positive (0 when none has).
    """
    z = F.normalize(features.float(), dim=1)
    similarity = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has = counts > 0
    if not has.any():
        return similarity.new_zeros(()) + 0 * z.sum()
    per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)[has] / counts[has])
    return per_anchor.mean()


def _map_adapter(shape: tuple[int, ...], layout: str) -> tuple[list[nn.Module], tuple[int, int, int]]:
    """Layers laying a cut tensor out as a (C, H, W) map, and that map's shape: a map as it is
    (channels first), tokens on their square patch grid (leading class tokens dropped), a vector
    projected to 128 × 4 × 4."""
    if layout == "nchw":
        return [], tuple(shape)  # type: ignore[return-value]
    if layout == "nhwc":
        c, h, w = shape[-1], shape[0], shape[1]
        return [make_adapter(shape, layout, (c, h, w), "nchw")], (c, h, w)
    if layout == "nlc":
        c, side = shape[-1], max(1, math.isqrt(shape[0]))
        return [make_adapter(shape, layout, (c, side, side), "nchw")], (c, side, side)
    return [nn.Linear(shape[0], 128 * 16), nn.Unflatten(1, (128, 4, 4))], (128, 4, 4)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def build_decoder(shape: tuple[int, ...], layout: str, input_shape: tuple[int, ...], style: str = "auto") -> nn.Sequential:
    """The decoder from a cut tensor to the model's input (logits: the sigmoid is in the loss).

    Args:
        shape: the cut tensor's per-sample shape.
        layout: its layout.
        input_shape: the model input's per-sample (C, H, W).
        style: ``"upsample"``, ``"progressive"`` or ``"auto"`` (see the module's docstring).

    Returns:
        A module mapping (B, *shape) to (B, *input_shape).
    """
    channels, height, width = input_shape
    layers, (c, h, w) = _map_adapter(shape, layout)
    if style == "auto":
        style = "upsample" if max(height, width) <= 64 else "progressive"
    if style == "upsample":
        layers += [nn.Upsample(size=(height, width), mode="bilinear", align_corners=True), *_conv_bn_relu(c, 12, 3)]
        layers.append(nn.Conv2d(12, channels, 3, padding=1))
        return nn.Sequential(*layers)
    steps = max(1, math.ceil(math.log2(max(height / h, width / w))))
    widths = [channels, 12, 32, 64] + [128] * max(0, steps - 4)  # from the last step back
    layers += _conv_bn_relu(c, 128, 1)
    c = 128
    for i in range(steps):
        last = i == steps - 1
        size = (height, width) if last else (h * 2 ** (i + 1), w * 2 ** (i + 1))
        out = widths[steps - 1 - i]
        layers.append(nn.Upsample(size=size, mode="bilinear", align_corners=True))
        layers += [nn.Conv2d(c, out, 3, padding=1)] if last else _conv_bn_relu(c, out, 3)
        c = out
    return nn.Sequential(*layers)


def build_classifier(shape: tuple[int, ...], layout: str, out_features: int, hidden: int = 128, max_conv_width: int = 512) -> nn.Sequential:
    """The reference's "1c2f" head: conv3×3 + BN + ReLU (stride 2 and twice the width on a map
    larger than 8×8, as on CIFAR ResNets' first two stages), global pool, FC → ``hidden``,
    ReLU, FC → ``out_features``. A vector goes straight to the two FCs."""
    if layout == "nc":
        return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, out_features))
    layers, (c, h, w) = _map_adapter(shape, layout)
    stride = 2 if min(h, w) > 8 else 1
    width = min(c * stride, max(max_conv_width, c))
    layers += _conv_bn_relu(c, width, 3, stride)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out_features)]
    return nn.Sequential(*layers)


class InfoProHead(AuxHead):
    """``λ1 · BCE(decoder(h), x01) + λ2 · L_task(classifier(h), y)`` for one block.

    ``decoder`` is None where λ1 is 0 and ``classifier`` where λ2 is 0 (their logits are then
    zeros). ``task_loss`` is ``"cross_entropy"`` (the criterion of the step) or ``"contrast"``
    (the supervised contrastive loss on the classifier's projection; its logits are zeros).
    """

    owns_loss = True
    needs_model_input = True

    def __init__(
        self,
        decoder: nn.Module | None,
        classifier: nn.Module | None,
        weights: tuple[float, float],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        task_loss: str = "cross_entropy",
        temperature: float = 0.07,
        summary: str = "",
    ):
        super().__init__()
        self.decoder, self.classifier = decoder, classifier
        self.reconstruction_weight, self.task_weight = weights
        # the data's normalisation, undone to make the BCE target (not state: the config rebuilds it)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.num_classes = num_classes
        self.task_loss, self.temperature = task_loss, temperature
        self.summary = summary

    def forward(self, *tensors):
        """Logits of the block's output (zeros without a cross-entropy classifier)."""
        h = tensors[0]
        if self.classifier is None or self.task_loss != "cross_entropy":
            return h.new_zeros(h.shape[0], self.num_classes)
        return self.classifier(h)

    def reconstruct(self, *tensors) -> torch.Tensor:
        """The decoder's image of the model input, in [0, 1]."""
        if self.decoder is None:
            raise FxLocalError("this InfoPro head has no decoder: its block's reconstruction weight is 0")
        return torch.sigmoid(self.decoder(tensors[0]))

    def reconstruction_target(self, x: torch.Tensor) -> torch.Tensor:
        """The model input ``x`` with the normalisation undone, clamped to [0, 1]."""
        return (x.float() * self.std + self.mean).clamp(0, 1)

    def local_loss(self, ctx, b: int, out):
        h = handed_on(out)[0]
        loss = h.new_zeros((), dtype=torch.float32)
        logits = h.new_zeros(h.shape[0], self.num_classes)
        if self.classifier is not None:
            task = self.classifier(h)
            if self.task_loss == "contrast":
                loss = loss + self.task_weight * supervised_contrastive_loss(task, ctx.target, self.temperature)
            else:
                logits = task
                loss = loss + self.task_weight * ctx.criterion(task, ctx.target)
        if self.decoder is not None:
            if ctx.input is None:
                raise FxLocalError("an InfoPro head reconstructs the model's input, and this step was given none")
            target = self.reconstruction_target(ctx.input)
            loss = loss + self.reconstruction_weight * F.binary_cross_entropy_with_logits(self.decoder(h).float(), target)
        return loss, logits


def _channel_stats(given, channels: int, name: str) -> tuple[float, ...]:
    """Per-channel statistics for ``channels`` channels: given per channel, or one for all, or
    cycled as the data pipeline does for a grey input of an RGB model."""
    values = given
    values = tuple(values) if isinstance(values, (list, tuple)) else ()
    if not values or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise FxLocalError(f"infopro {name} is a list of numbers, one per input channel; got {given!r}")
    return tuple(float(values[i % len(values)]) for i in range(channels))


@register_aux("infopro")
class InfoPro(AuxMethod):
    can_be_base = True
    reconstructs_input = True
    heads_vary_by_block = True  # λ1 and λ2 move from the first block to the last

    def __init__(
        self,
        ixx_1: float | None = None,
        ixy_1: float | None = None,
        ixx_2: float | None = None,
        ixy_2: float | None = None,
        weights_table: str = "resnet32",
        decoder: str = "auto",
        task_loss: str = "cross_entropy",
        temperature: float = 0.07,
        hidden: int = 128,
        max_conv_width: int = 512,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
    ):
        given = dict(zip(_WEIGHT_NAMES, (ixx_1, ixy_1, ixx_2, ixy_2)))
        for name, value in given.items():
            if value is not None and (not isinstance(value, Real) or isinstance(value, bool) or value < 0):
                raise FxLocalError(f"infopro {name} is a weight, a number >= 0; got {value!r}")
        if weights_table not in WEIGHT_TABLES:
            raise FxLocalError(f"infopro weights_table is one of {', '.join(WEIGHT_TABLES)}, got {weights_table!r}")
        if decoder not in ("auto", "upsample", "progressive"):
            raise FxLocalError(f"infopro decoder is 'auto', 'upsample' or 'progressive', got {decoder!r}")
        if task_loss not in ("cross_entropy", "contrast"):
            raise FxLocalError(f"infopro task_loss is 'cross_entropy' or 'contrast', got {task_loss!r}")
        if not isinstance(temperature, Real) or isinstance(temperature, bool) or temperature <= 0:
            raise FxLocalError(f"infopro temperature is a number > 0, got {temperature!r}")
        self.given = given
        self.weights_table = weights_table
        self.decoder, self.task_loss, self.temperature = decoder, task_loss, float(temperature)
        self.hidden, self.max_conv_width = hidden, max_conv_width
        self.input_mean = IMAGENET_MEAN if input_mean is None else input_mean
        self.input_std = IMAGENET_STD if input_std is None else input_std
        _channel_stats(self.input_mean, 1, "input_mean")
        _channel_stats(self.input_std, 1, "input_std")

    def weights(self, k: int) -> tuple[float, float, float, float]:
        """(ixx_1, ixy_1, ixx_2, ixy_2) at ``k`` blocks: those given, the table's for the rest."""
        table = table_weights(k, self.weights_table)
        return tuple(t if g is None else float(g) for g, t in zip(self.given.values(), table))  # type: ignore[return-value]

    def block_weights(self, spec: HeadSpec) -> tuple[float, float]:
        """(λ1, λ2) of the block ``spec`` trains."""
        k = max(spec.num_blocks, 2)
        lam = loss_weights(spec.block, k, self.weights(k))
        if lam == (0, 0):
            raise FxLocalError(f"infopro: block {spec.block} of {k} would have no loss (λ1 = λ2 = 0): give it a weight")
        return lam

    def _parts(self, spec: HeadSpec) -> tuple[nn.Module | None, nn.Module | None]:
        if len(spec.input_shape) != 3:
            raise FxLocalError(f"infopro reconstructs image inputs (C, H, W); this model takes {spec.input_shape}")
        lam_x, lam_y = self.block_weights(spec)
        decoder = build_decoder(spec.shape, spec.layout, spec.input_shape, self.decoder) if lam_x else None
        out = self.hidden if self.task_loss == "contrast" else spec.num_classes
        classifier = build_classifier(spec.shape, spec.layout, out, self.hidden, self.max_conv_width) if lam_y else None
        return decoder, classifier

    def build_head(self, spec: HeadSpec) -> nn.Module:
        lam_x, lam_y = self.block_weights(spec)
        decoder, classifier = self._parts(spec)
        channels = spec.input_shape[0]
        parts = []
        if decoder is not None:
            parts.append(f"{lam_x:.3g}·BCE(decoder → {'×'.join(map(str, spec.input_shape))})")
        if classifier is not None:
            task = f"SupCon(τ={self.temperature:g})" if self.task_loss == "contrast" else "CE"
            parts.append(f"{lam_y:.3g}·{task}(1c2f)")
        return InfoProHead(
            decoder,
            classifier,
            (lam_x, lam_y),
            _channel_stats(self.input_mean, channels, "input_mean"),
            _channel_stats(self.input_std, channels, "input_std"),
            spec.num_classes,
            self.task_loss,
            self.temperature,
            "InfoPro: " + " + ".join(parts),
        )

    def head_cost(self, spec: HeadSpec) -> Cost:
        """The decoder and the classifier, both alive until the block's one backward; the
        decoder's full-resolution output and its BCE target besides (two input-sized tensors,
        often the largest of the step)."""
        lam_x, lam_y = self.block_weights(spec)
        key = (spec.shape, spec.layout, spec.input_shape, spec.num_classes, bool(lam_x), bool(lam_y),
               self.decoder, self.task_loss, self.hidden, self.max_conv_width, torch.get_default_dtype())
        if key not in _COSTS:
            with torch.device("meta"):
                decoder, classifier = self._parts(spec)
            cost = Cost()
            for part in (decoder, classifier):
                if part is not None:
                    cost = cost + measure_module(part, spec.shape)
            if decoder is not None:
                image = 4.0 * math.prod(spec.input_shape)
                cost = cost + Cost(activation_bytes=2 * image, largest_activation_bytes=image)
            _COSTS[key] = cost
        return _COSTS[key]

    def describe(self, head: nn.Module) -> str:
        return head.summary


_COSTS: dict[tuple, Cost] = {}

