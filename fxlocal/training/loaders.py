"""The data a run trains and evaluates on: the recipe's dataset split into training and
evaluation sets (the test split, or a validation split held out of the training images), and
their loaders (seeded per epoch; sharded across data-parallel ranks)."""

from __future__ import annotations

import torch

from ..errors import FxLocalError
from .data import build_dataset
from .recipe import Recipe
from .runtime import Distributed


def train_and_evaluation_sets(d) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """The training images and the images evaluation sees: the test split, or with
    ``data.validation`` the last N training images (held out of training, not augmented)."""
    size = tuple(d.input_size)
    if d.validation is None:
        train = build_dataset(d.dataset, d.root, True, size, d.augment, d.download, d.train_subset, d.pad_mode)
        return train, build_dataset(d.dataset, d.root, False, size, "none", d.download, d.test_subset)
    train = build_dataset(d.dataset, d.root, True, size, d.augment, d.download, pad_mode=d.pad_mode)
    kept = len(train) - d.validation
    if kept < 1:
        raise FxLocalError(
            f"data.validation={d.validation} holds out every one of the {len(train)} training images; hold out fewer"
        )
    held_out = build_dataset(d.dataset, d.root, True, size, "none", d.download)
    end = kept + min(d.validation, d.test_subset or d.validation)
    trained = torch.utils.data.Subset(train, range(min(kept, d.train_subset or kept)))
    return trained, torch.utils.data.Subset(held_out, range(kept, end))


def make_loaders(recipe: Recipe, dist_: Distributed, device: torch.device):
    """The training and evaluation loaders of a recipe.

    Args:
        recipe: the recipe (data, batch size, workers, seed).
        dist_: this process's place in the job (data-parallel ranks each get a shard).
        device: where batches go (pinned memory on CUDA).

    Returns:
        (training loader, its sampler, the generator that orders its epochs, evaluation loader).
    """
    train, test = train_and_evaluation_sets(recipe.data)
    common = dict(batch_size=recipe.batch_size, num_workers=recipe.workers, pin_memory=device.type == "cuda")
    # Epoch e's order depends on (seed, e) only, so a resumed run sees the same batches.
    order = torch.Generator()
    if dist_.enabled:
        sampler = torch.utils.data.DistributedSampler(train, dist_.world, dist_.rank, shuffle=True, seed=recipe.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=order)
    train_loader = torch.utils.data.DataLoader(train, sampler=sampler, generator=order, drop_last=True, **common)
    eval_loader = torch.utils.data.DataLoader(test, shuffle=False, **common)
    return train_loader, sampler, order, eval_loader


def reseed_epoch(sampler, order: torch.Generator, seed: int, epoch: int) -> None:
    """Order epoch ``epoch`` by (seed, epoch) alone, so a resumed run sees the same batches."""
    order.manual_seed(seed * 1000 + epoch)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)


def evaluation_loader(recipe: Recipe):
    """The loader of what a recipe evaluates on (its test split, or its validation split).

    Args:
        recipe: the recipe.

    Returns:
        A DataLoader over the evaluation images, in order.
    """
    return make_loaders(recipe, Distributed(), torch.device("cpu"))[3]
