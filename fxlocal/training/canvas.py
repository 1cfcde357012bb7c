"""Detection, segmentation and super-resolution tasks made from real Fashion-MNIST images,
offline and deterministic (nothing to download; the same seed gives the same bytes).

A *canvas* is a 128×128 black image with 1–6 Fashion-MNIST items pasted on it, each scaled by
a random factor (0.75–2, so 21–56 px) at a random place where it overlaps no earlier item by more
than a quarter of the smaller one's box. An item's pixels brighter than
:data:`FOREGROUND` are its foreground: they are pasted over what lies below, so a later item
hides an earlier one where they overlap, and the mask and the image agree on every pixel.

- ``fashion_mnist_detect``: the canvas and its boxes, a (6, 5) tensor of rows ``label, x0, y0,
  x1, y1`` (xyxy in pixels, the tight box of each item's foreground; ``label`` 1 + its class, 0
  being the background as torchvision's detectors count), padded with label -1
  (:func:`fxlocal.aux.tasks.detection_targets` gives torchvision's list of dicts).
- ``fashion_mnist_segment``: the canvas and a per-pixel class mask (0 background, 1 + class).
- ``fashion_mnist_sr``: the canvas downsampled ×2 (bicubic, antialiased) and the canvas itself.

Training canvases are made from the 60 000 training images and test canvases from the 10 000
test images; canvas ``i`` of a split depends only on (``seed``, split, ``i``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CANVAS_SIZE", "FOREGROUND", "Canvas", "CanvasTask", "compose_canvas", "TASKS"]

CANVAS_SIZE = 128
FOREGROUND = 32  # uint8 intensity above which an item's pixel is the item's, not background
MAX_ITEMS = 6
SCALES = (0.75, 2.0)
MAX_SHARED = 0.25  # the most of the smaller box another item's box may cover
TASKS = ("detection", "segmentation", "super_resolution")


@dataclass(frozen=True)
class Canvas:
    """One composed image and what it holds."""

    image: torch.Tensor  # uint8 (size, size)
    boxes: torch.Tensor  # float (n, 4): x0, y0, x1, y1 of each item's foreground (x1, y1 exclusive)
    labels: torch.Tensor  # long (n,): each item's class
    item_masks: torch.Tensor  # bool (n, size, size): each item's foreground where it was pasted
    mask: torch.Tensor  # long (size, size): 0 background, 1 + class of the item seen at each pixel


def _generator(seed: int, train: bool, index: int) -> torch.Generator:
    # one stream per canvas: canvas i never depends on how many canvases were made before it.
    # Hashed to 32 bits: the CPU generator (mt19937) keeps only the low 32 bits of a seed.
    key = hashlib.blake2b(f"{seed}/{'train' if train else 'test'}/{index}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little"))


def _shared(a: torch.Tensor, b: torch.Tensor) -> float:
    """How much of the smaller of boxes ``a`` and ``b`` their intersection covers."""
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    area = lambda t: (t[2] - t[0]) * (t[3] - t[1])  # noqa: E731
    return float(w * h / torch.minimum(area(a), area(b)).clamp(min=1))


def compose_canvas(images: torch.Tensor, labels: torch.Tensor, index: int, train: bool, seed: int = 0,
                   size: int = CANVAS_SIZE) -> Canvas:
    """Canvas ``index`` of a split (see the module docstring).

    Args:
        images: the split's uint8 images, (N, 28, 28).
        labels: their classes, (N,).
        index: which canvas.
        train: the training split (or the test split): it seeds a stream of its own.
        seed: the task's seed.
        size: the canvas side.

    Returns:
        The :class:`Canvas`.
    """
    gen = _generator(seed, train, index)
    count = int(torch.randint(1, MAX_ITEMS + 1, (1,), generator=gen))
    image = torch.zeros(size, size, dtype=torch.uint8)
    boxes: list[torch.Tensor] = []
    classes: list[int] = []
    masks: list[torch.Tensor] = []
    for _ in range(count):
        source = int(torch.randint(0, len(images), (1,), generator=gen))
        scale = SCALES[0] + (SCALES[1] - SCALES[0]) * float(torch.rand(1, generator=gen))
        side = max(2, round(images.shape[-1] * scale))
        item = F.interpolate(images[source][None, None].float(), size=(side, side), mode="bilinear",
                             antialias=True, align_corners=False)[0, 0].round().clamp(0, 255).to(torch.uint8)
        fg = item > FOREGROUND
        if not fg.any():
            continue
        ys, xs = fg.nonzero(as_tuple=True)
        for _try in range(20):  # a place that hides no earlier item too much, or the item is left out
            top = int(torch.randint(0, size - side + 1, (1,), generator=gen))
            left = int(torch.randint(0, size - side + 1, (1,), generator=gen))
            box = torch.tensor([left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1], dtype=torch.float32)
            if all(_shared(box, other) <= MAX_SHARED for other in boxes):
                break
        else:
            continue
        placed = torch.zeros(size, size, dtype=torch.bool)
        placed[top : top + side, left : left + side] = fg
        image[placed] = item[fg]
        boxes.append(box)
        classes.append(int(labels[source]))
        masks.append(placed)
    item_masks = torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
    mask = torch.zeros(size, size, dtype=torch.long)
    for placed, label in zip(masks, classes):  # later items over earlier ones, as pasted
        mask[placed] = label + 1
    return Canvas(
        image=image,
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        labels=torch.tensor(classes, dtype=torch.long),
        item_masks=item_masks,
        mask=mask,
    )


class CanvasTask(torch.utils.data.Dataset):
    """A canvas task over a Fashion-MNIST split: one canvas per source image of the split.

    Items are ``(image, target)`` with ``image`` a float (channels, 128, 128) tensor in [0, 1]:

    - ``detection``: ``target`` the (6, 5) float rows ``1 + class, x0, y0, x1, y1``, padded
      with label -1 (one tensor, so the default collation batches it);
    - ``segmentation``: ``target`` the (128, 128) long mask, 0 background, 1 + class;
    - ``super_resolution``: ``image`` the (channels, 64, 64) input and ``target`` the
      (channels, 128, 128) canvas.

    Args:
        images: the split's uint8 images, (N, 28, 28).
        labels: their classes.
        train: which split they are (it seeds the canvases).
        task: ``detection``, ``segmentation`` or ``super_resolution``.
        channels: the image's channels (the grey canvas repeated).
        seed: the task's seed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, task: str, channels: int = 1,
                 seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"a canvas task is one of {', '.join(TASKS)}, got {task!r}")
        self.images, self.labels = images, labels
        self.train, self.task, self.channels, self.seed = train, task, channels, seed

    def __len__(self) -> int:
        return len(self.images)

    def canvas(self, index: int) -> Canvas:
        return compose_canvas(self.images, self.labels, index, self.train, self.seed)

    def __getitem__(self, index: int):
        canvas = self.canvas(index)
        image = canvas.image.float().div(255)[None].expand(self.channels, -1, -1).contiguous()
        if self.task == "detection":
            rows = torch.full((MAX_ITEMS, 5), -1.0)
            rows[: len(canvas.labels), 0] = canvas.labels.float() + 1
            rows[: len(canvas.labels), 1:] = canvas.boxes
            return image, rows
        if self.task == "segmentation":
            return image, canvas.mask
        low = F.interpolate(image[None], scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)[0]
        return low.clamp(0, 1), image
