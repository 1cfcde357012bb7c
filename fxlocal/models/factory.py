"""Model names -> randomly initialised ``nn.Module``s, through a registry of model sources.

Sources are tried in order (timm, then torchvision's classification models); a name nobody
knows raises :class:`UnknownModelError` with the closest names. Nothing is downloaded: weights
are always random.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from torch import nn

from ..errors import InputSizeError, UnknownModelError

__all__ = ["ModelSource", "create_model", "list_model_names", "native_input_sizes", "register_model_source"]


@dataclass(frozen=True)
class ModelSource:
    name: str
    list_models: Callable[[], list[str]]
    create: Callable[..., nn.Module]  # create(name, num_classes, input_size, **kwargs)
    # input_sizes(name): the sizes the source itself gives for a model, smallest first
    input_sizes: Callable[[str], list[tuple[int, ...]]] = lambda name: []


_SOURCES: list[ModelSource] = []


def register_model_source(source: ModelSource) -> ModelSource:
    _SOURCES.append(source)
    return source


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_create(name: str, num_classes: int | None, input_size: tuple[int, ...], **extra) -> nn.Module:
    import timm

    kwargs: dict = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    # timm models take the input's channel count; fixed-size models (ViT, Swin, Mixer, MaxViT)
    # must be built for the resolution they will see.
    kwargs["in_chans"] = input_size[0]
    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    fixed = bool(cfg and getattr(cfg, "fixed_input_size", False))
    if fixed and tuple(input_size[1:]) != tuple(getattr(cfg, "input_size", (0, 0, 0))[1:]):
        kwargs["img_size"] = tuple(input_size[1:])
    return timm.create_model(name, **{**kwargs, **extra})


def _timm_input_sizes(name: str) -> list[tuple[int, ...]]:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    sizes = [getattr(cfg, "min_input_size", None), getattr(cfg, "input_size", None)] if cfg else []
    return [tuple(s) for s in sizes if s]


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_create(name: str, num_classes: int | None, input_size: tuple[int, ...], **extra) -> nn.Module:
    import torchvision

    kwargs: dict = {"weights": None, **extra}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    h, w = input_size[1:]
    # ViT is built for one resolution (image_size), MaxViT too (input_size); other builders
    # reject both keywords with a TypeError before building anything.
    for size_kwargs in ({"image_size": h} if h == w else {}, {"input_size": (h, w)}, {}):
        try:
            return torchvision.models.get_model(name, **kwargs, **size_kwargs)
        except TypeError as exc:
            if "unexpected keyword" not in str(exc) or not size_kwargs:
                raise
    raise AssertionError("unreachable")


def _torchvision_input_sizes(name: str) -> list[tuple[int, ...]]:
    """The default weights' smallest accepted size and their evaluation crop."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return []
    sizes = [(3, *weights.meta.get("min_size", (1, 1)))]
    crop = getattr(weights.transforms(), "crop_size", None)
    if crop:
        sizes.append((3, crop[0], crop[-1]))
    return [s for s in sizes if min(s[1:]) > 1]


register_model_source(ModelSource("timm", _timm_names, _timm_create, _timm_input_sizes))
register_model_source(ModelSource("torchvision", _torchvision_names, _torchvision_create, _torchvision_input_sizes))


@lru_cache(maxsize=None)
def _names(source: str) -> frozenset[str]:
    return frozenset(next(s for s in _SOURCES if s.name == source).list_models())


def list_model_names() -> list[str]:
    return sorted({n for s in _SOURCES for n in _names(s.name)})


def _from_factory(path: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    """``package.module:factory`` -> ``factory(num_classes=..., **kwargs)``."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownModelError(f"cannot import model factory {path!r}: {exc}") from None
    if num_classes is not None:
        kwargs = {"num_classes": num_classes, **kwargs}
    return factory(**kwargs)


def native_input_sizes(name: str) -> list[tuple[int, ...]]:
    """The input sizes ``name``'s source gives for it (timm's pretrained config: minimum, then
    default; torchvision's default weights: minimum, then crop), smallest first, without
    duplicates; empty when it gives none. For fixed-resolution models that do not say so, these
    are the sizes known to work."""
    source_name, _, model_name = name.rpartition(":")
    for source in _SOURCES:
        if (not source_name or source.name == source_name) and model_name in _names(source.name):
            sizes = sorted(set(source.input_sizes(model_name)), key=lambda s: (s[1] * s[2], s))
            return [tuple(int(v) for v in s) for s in sizes]
    return []


def create_model(
    name: str, num_classes: int | None = None, input_size: tuple[int, ...] = (3, 224, 224), **kwargs
) -> nn.Module:
    """Create a model by name, with random weights.

    Args:
        name: a timm name, then a torchvision one; ``source:name`` (``torchvision:resnet50``) picks a
            source, ``package.module:factory`` calls that function.
        num_classes: the classifier's width (default: the model's).
        input_size: per-sample input shape: timm's ``in_chans`` and, for fixed-size models, the
            image size they are built for.
        **kwargs: passed to the model's constructor.

    Returns:
        The model, in training mode.
    """
    source_name, _, model_name = name.rpartition(":")
    if source_name and source_name not in {s.name for s in _SOURCES}:
        return _from_factory(name, num_classes, kwargs)
    for source in _SOURCES:
        if source_name and source.name != source_name:
            continue
        if model_name in _names(source.name):
            try:
                return source.create(model_name, num_classes, tuple(input_size), **kwargs)
            except (ValueError, AssertionError, RuntimeError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputSizeError(
                    f"{source.name} cannot build {model_name!r} for input size {tuple(input_size)}: "
                    f"{reason}; pass an --input-size it supports"
                ) from exc
    close = difflib.get_close_matches(model_name, list_model_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() or torchvision.models.list_models()"
    raise UnknownModelError(f"unknown model {name!r}{hint}")
