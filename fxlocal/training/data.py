"""Datasets by name (a registry), with torchvision datasets and timm / torchvision transforms.

Nothing is downloaded unless a recipe says ``download: true``. A dataset that is not where it
is looked for raises :class:`DatasetError` naming the place.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torchvision import transforms as T

from ..errors import FxLocalError

__all__ = ["DatasetError", "DatasetInfo", "register_dataset", "available_datasets", "build_dataset", "build_transform"]

SHIPPED = Path(__file__).parent / "datasets"


class DatasetError(FxLocalError, FileNotFoundError):
    """A dataset that is missing or unknown."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # native image side
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_root: str
    build: Callable[[str, bool, Callable, bool], torch.utils.data.Dataset]  # (root, train, transform, download)
    # what an item's target is (fxlocal.aux.tasks): a class (classification), or a canvas task's
    # (fxlocal.training.canvas): "detection" (padded boxes), "segmentation" (a class per pixel),
    # "super_resolution" (the image at twice the size)
    task: str = "classification"


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    _DATASETS[info.name] = info
    return info


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())}")
    return _DATASETS[name]


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (uint8 data, as Fashion-MNIST ships it), gzipped or not."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()).view(*dims)


class IdxFashionMNIST(torchvision.datasets.FashionMNIST):
    """torchvision's FashionMNIST reading the IDX files straight from ``root`` (``.gz`` or not),
    as Zalando distributes them; torchvision's own layout (``root/FashionMNIST/raw``) works too."""

    def __init__(self, root, train=True, transform=None, download=False):
        self._files = Path(root)
        if not any(self._files.glob("*-idx3-ubyte*")):
            self._files = Path(root) / "FashionMNIST" / "raw"
        super().__init__(str(root), train=train, transform=transform, download=download)

    def _file(self, stem: str) -> Path:
        for candidate in (self._files / stem, self._files / f"{stem}.gz"):
            if candidate.exists():
                return candidate
        raise DatasetError(f"fashion_mnist not found: no {stem}[.gz] in {self._files}")

    def _check_exists(self) -> bool:
        split = "train" if self.train else "t10k"
        stems = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
        return all((self._files / s).exists() or (self._files / f"{s}.gz").exists() for s in stems)

    def _load_data(self):
        split = "train" if self.train else "t10k"
        return _read_idx(self._file(f"{split}-images-idx3-ubyte")), _read_idx(self._file(f"{split}-labels-idx1-ubyte")).long()


def _split_kw(train: bool) -> dict:
    return {"split": "train" if train else "test"}


register_dataset(DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "data/cifar10",
                             lambda r, t, tf, d: torchvision.datasets.CIFAR10(r, train=t, transform=tf, download=d)))
register_dataset(DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "data/cifar100",
                             lambda r, t, tf, d: torchvision.datasets.CIFAR100(r, train=t, transform=tf, download=d)))
register_dataset(DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "data/svhn",
                             lambda r, t, tf, d: torchvision.datasets.SVHN(r, transform=tf, download=d, **_split_kw(t))))
register_dataset(DatasetInfo("stl10", 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), "data/stl10",
                             lambda r, t, tf, d: torchvision.datasets.STL10(r, transform=tf, download=d, **_split_kw(t))))
register_dataset(DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), "data/fashion-mnist",
                             lambda r, t, tf, d: IdxFashionMNIST(r, train=t, transform=tf, download=d)))
register_dataset(DatasetInfo("fashion_mnist_mini", 10, 1, 28, (0.2860,), (0.3530,), str(SHIPPED / "fashion_mnist_mini"),
                             lambda r, t, tf, d: IdxFashionMNIST(r, train=t, transform=tf, download=False)))


def _canvas_task(task: str) -> Callable[[str, bool, Callable, bool], torch.utils.data.Dataset]:
    """A canvas task (detection, segmentation, super-resolution) over the Fashion-MNIST at ``root``."""
    from .canvas import CanvasTask

    def build(root: str, train: bool, _transform, _download: bool) -> torch.utils.data.Dataset:
        source = IdxFashionMNIST(root, train=train)
        return CanvasTask(source.data, source.targets, train, task)

    return build


for _name, _task, _size in (("detect", "detection", 128), ("segment", "segmentation", 128), ("sr", "super_resolution", 64)):
    # made from the full Fashion-MNIST (60 000 training / 10 000 test images), offline; the
    # classes count the background (0) for detection and segmentation, as their models do
    register_dataset(DatasetInfo(f"fashion_mnist_{_name}", 11 if _task != "super_resolution" else 0, 1, _size, (0.0,),
                                 (1.0,), "data/fashion-mnist", _canvas_task(_task), task=_task))

register_dataset(DatasetInfo("imagefolder", 0, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "data/imagenet",
                             lambda r, t, tf, d: torchvision.datasets.ImageFolder(os.path.join(r, "train" if t else "val"), transform=tf)))


def normalisation(info: DatasetInfo, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the transforms normalise ``channels``-channel inputs with: the
    dataset's, cycled where the model takes more channels than the images have."""
    if channels == info.channels:
        return info.mean, info.std
    return tuple(float(v) for v in np.resize(np.array(info.mean), channels)), tuple(float(v) for v in np.resize(np.array(info.std), channels))


def build_transform(info: DatasetInfo, input_size: tuple[int, int, int], train: bool, augment: str,
                    pad_mode: str = "constant") -> Callable:
    """Image -> normalised tensor of ``input_size``; training adds the recipe's augmentation
    (``crop_flip`` pads with zeros, or by reflection with ``pad_mode="reflect"``)."""
    channels, h, w = input_size
    mean, std = normalisation(info, channels)
    if augment == "timm":
        from timm.data import create_transform

        pre = [T.Grayscale(channels)] if channels != info.channels else []
        return T.Compose(pre + [create_transform((channels, h, w), is_training=train, mean=mean, std=std)])
    steps: list = []
    if channels != info.channels:
        steps.append(T.Grayscale(channels))
    if (h, w) != (info.size, info.size):
        steps.append(T.Resize((h, w)))
    if train and augment == "crop_flip":
        # the CIFAR recipe of the papers: pad-4 random crop + horizontal flip
        steps += [T.RandomCrop((h, w), padding=4, padding_mode=pad_mode), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def build_dataset(
    name: str,
    root: str | None,
    train: bool,
    input_size: tuple[int, int, int],
    augment: str = "none",
    download: bool = False,
    subset: int | None = None,
    pad_mode: str = "constant",
) -> torch.utils.data.Dataset:
    info = dataset_info(name)
    root = root or info.default_root
    if info.task != "classification":
        _check_canvas_input(info, input_size, augment)
    transform = build_transform(info, input_size, train, augment, pad_mode) if info.task == "classification" else None
    try:
        dataset = info.build(root, train, transform, download)
    except DatasetError:
        raise
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DatasetError(
            f"dataset {name!r} not found at {os.path.abspath(root)} ({str(exc).splitlines()[0]}); "
            "set data.root, or data.download=true where the dataset can be downloaded"
        ) from None
    if info.task != "classification":
        dataset.channels = input_size[0]  # the grey canvas, repeated for the model
    if subset is not None and subset < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(subset))
    return dataset


def _check_canvas_input(info: DatasetInfo, input_size: tuple[int, int, int], augment: str) -> None:
    """A canvas task's images have one size, and augmenting them would move what the targets say."""
    if tuple(input_size[1:]) != (info.size, info.size):
        raise DatasetError(
            f"{info.name} makes {info.size}×{info.size} inputs: set data.input_size to [{input_size[0]}, {info.size}, {info.size}]"
        )
    if augment != "none":
        raise DatasetError(f"{info.name}'s targets are fixed to its images: set data.augment to none (got {augment!r})")
