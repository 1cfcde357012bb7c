"""Training recipes: a YAML file validated against a schema, with ``--set key.sub=value`` overrides.

A wrong or missing field raises :class:`RecipeError` with one line naming the field and what it
accepts. The schema is a pydantic model (``extra="forbid"``: a misspelt key is an error, not a
silently ignored default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import FxLocalError

__all__ = ["Recipe", "RecipeError", "load_recipe", "apply_overrides"]


class RecipeError(FxLocalError, ValueError):
    """A recipe that does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    name: str  # timm / torchvision name, "source:name", or "package.module:factory"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: Optional[int] = Field(default=None, ge=1)
    # what it is trained for (fxlocal.aux.tasks); default: the dataset's task
    task: Optional[Literal["classification", "detection", "segmentation", "super_resolution"]] = None
    # every BatchNorm's momentum (timm's --bn-momentum), heads' included: torchvision's
    # MobileNetV3 uses 0.01, whose running statistics lag a short run's weights far enough to
    # break evaluation (a segmenter that predicts background everywhere in eval mode)
    bn_momentum: Optional[float] = Field(default=None, gt=0, le=1)


class ReplaceSection(_Section):
    # Replacement Learning (fxlocal.graph.replace): every interval-th unit of a run of units
    # with identical parameter shapes becomes a·θ_before + b·θ_after of its neighbours
    interval: int = Field(default=2, ge=2)
    neighbour_grad: bool = False  # gradients flow through a replaced unit into its neighbours (docs/replace.md)


class ConvertSection(_Section):
    k: int = Field(default=4, ge=1)
    # "8GiB": instead of k, the smallest K whose predicted step peak (at batch_size) fits
    max_memory: Optional[str] = None
    aux: str = "dgl"
    aux_options: dict[str, Any] = Field(default_factory=dict)
    balance: Literal["flops", "params", "activations", "memory", "time"] = "flops"
    # recompute the blocks' activations in backward, unit by unit (fxlocal.graph.recompute)
    backbone_recompute: Literal["none", "cheap", "all"] = "none"
    # the modules the first k-1 blocks end at (a paper's hand-written split), instead of balancing
    cuts: Optional[list[str]] = None
    # a plan saved by ``fxlocal convert --save-plan`` (JSON): cut where it cuts (its K) instead of
    # balancing; runs that must train the same blocks (balance: time measures, and two
    # measurements can differ) share one
    plan: Optional[str] = None
    # replace units first (``replace: {}`` for the defaults)
    replace: Optional[ReplaceSection] = None


class DataSection(_Section):
    dataset: str = "fashion_mnist_mini"
    root: Optional[str] = None  # None: the dataset's default location
    download: bool = False
    input_size: tuple[int, int, int] = (3, 224, 224)
    augment: Literal["none", "crop_flip", "timm"] = "crop_flip"
    # how crop_flip pads before its random crop (the local-learning references: reflect)
    pad_mode: Literal["constant", "reflect"] = "constant"
    train_subset: Optional[int] = Field(default=None, ge=1)  # first N training images
    test_subset: Optional[int] = Field(default=None, ge=1)
    # Hold out the last N training images and evaluate on them instead of the test split (they
    # are never trained on): the split to choose options and hyper-parameters on.
    validation: Optional[int] = Field(default=None, ge=1)


# timm's names for torch's own SGD, Adam and AdamW: the optimizers torch has a fused kernel for
FUSED_OPTIMIZERS = frozenset({"sgd", "nesterov", "momentum", "adam", "adamw"})


class OptimizerSection(_Section):
    name: Literal["sgd", "nesterov", "momentum", "adamw", "adam", "lamb", "lars"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    # Decay norm weights and biases too (the local-learning references do); by default they are
    # exempt, as timm groups them
    decay_norm_and_bias: bool = False
    # One optimizer per block, each stepped as soon as its block's gradient is complete and its
    # gradients released (DGL's way): the same updates as one optimizer (except LAMB's global
    # gradient-norm clipping, then per block), with one block's gradients alive instead of all.
    per_block: bool = True
    # torch's fused kernel for the update (one kernel over all of an optimizer's tensors instead
    # of a loop of small ops: the same update, a few ms less per step on a ViT's block). None:
    # fused where torch has the kernel (SGD, Adam, AdamW on CPU or CUDA) and no fp16 loss scaler
    # steps it (optim.fused_update says why); true insists on it.
    fused: Optional[bool] = None


class PipelineSection(_Section):
    # ``fxlocal train --pipeline`` under ``torchrun --nproc-per-node K``: one block per process
    # (fxlocal.training.pipeline). Also settable here, so a recipe can say how it is meant to run.
    enabled: bool = False
    max_in_flight: int = Field(default=2, ge=1)  # unfinished sends per stage before it waits
    timeout_s: float = Field(default=300.0, gt=0)  # a silent neighbour for this long is an error
    # steps between the weights a stage sends back to the one before, whose EMA twins follow
    # them (MAN): 1 computes exactly the updates of sequential training
    weight_sync: int = Field(default=1, ge=1)
    # steps by which a stage applies the gradient the next stage's cascade sends back (MLAAN):
    # 0 waits for it every step and computes exactly the updates of sequential training; d > 0
    # applies it d steps late, to the weights then, so that the stages overlap
    cascade_delay: int = Field(default=0, ge=0)


class SchedulerSection(_Section):
    name: Literal["cosine", "step", "multistep", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)
    warmup_lr: float = Field(default=1e-5, ge=0)
    min_lr: float = Field(default=0.0, ge=0)
    decay_epochs: float = 30
    decay_milestones: list[int] = Field(default_factory=lambda: [30, 60])
    decay_rate: float = 0.1


class Recipe(_Section):
    source: str = ""  # where the settings come from (paper, table)
    model: ModelSection
    convert: ConvertSection = Field(default_factory=ConvertSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=128, ge=1)
    # mixed precision: false, true (fp16 with loss scaling on CUDA, bf16 on CPU), "bf16" or "fp16"
    amp: Union[bool, Literal["bf16", "fp16"]] = False
    channels_last: bool = False  # the model and its batches in channels-last memory format
    # torch.compile each block and head in place (the step's loop stays eager): false, true
    # (inductor) or the name of a torch.compile backend
    compile: Union[bool, str] = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # keep freed host memory for reuse instead of returning it to the OS (glibc; runtime.keep_freed_memory):
    # a CPU step then does not fault its activations' pages in again every step
    keep_freed_memory: bool = True
    seed: int = 0
    workers: int = Field(default=2, ge=0)
    output_dir: str = "runs/fxlocal"
    checkpoint_interval: int = Field(default=1, ge=1)  # epochs
    eval_interval: int = Field(default=1, ge=1)  # epochs
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1)  # for smoke runs


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set takes key.sub=value, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<recipe>"
    if err["type"] == "missing":
        return f"recipe field {field!r} is required"
    if err["type"] == "extra_forbidden":
        return f"recipe field {field!r} is not a recipe field (misspelt?)"
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"recipe field {field!r}: {err['msg']}{got}"


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: a YAML file.
        overrides: ``key.sub=value`` strings (``--set``), applied in order.
        data: an already-parsed recipe instead of ``path``.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: a missing or malformed file, an unknown key, or an invalid value.
    """
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RecipeError(f"no recipe at {path}") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe sections")
    data = apply_overrides(dict(data), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_one_line(exc)) from None
    if isinstance(recipe.compile, str):
        from torch._dynamo import list_backends

        if recipe.compile not in list_backends(exclude_tags=()):
            raise RecipeError(
                f"recipe field 'compile': unknown torch.compile backend {recipe.compile!r}; use true (inductor) or one of "
                f"{', '.join(list_backends())}"
            )
    if recipe.device != "auto":
        import torch

        try:
            torch.device(recipe.device)
        except RuntimeError:
            raise RecipeError(f"recipe field 'device': unknown device {recipe.device!r}; use auto, cpu, cuda or cuda:N") from None
    if recipe.pipeline.enabled and (recipe.channels_last or recipe.compile):
        raise RecipeError("recipe fields 'channels_last' and 'compile' are not supported with pipeline.enabled yet: turn them off")
    if recipe.optimizer.fused and recipe.optimizer.name not in FUSED_OPTIMIZERS:
        raise RecipeError(
            f"recipe field 'optimizer.fused': torch has no fused {recipe.optimizer.name} (only "
            f"{', '.join(sorted(FUSED_OPTIMIZERS))}): set it to null or false"
        )
    choosers = [f"'convert.{name}'" for name in ("cuts", "max_memory", "plan") if getattr(recipe.convert, name) is not None]
    if len(choosers) > 1:
        raise RecipeError(f"recipe fields {' and '.join(choosers)} {'both' if len(choosers) == 2 else 'all'} choose the blocks: "
                          "keep one")
    from ..aux import available_aux, combinations

    if recipe.convert.aux not in [*available_aux(), *combinations()]:
        raise RecipeError(
            f"recipe field 'convert.aux': unknown method {recipe.convert.aux!r}; choose one of {', '.join(available_aux())} "
            f"or a combination {', '.join(combinations())}"
        )
    from .data import available_datasets

    if recipe.data.dataset not in available_datasets():
        raise RecipeError(
            f"recipe field 'data.dataset': unknown dataset {recipe.data.dataset!r}; "
            f"choose one of {', '.join(available_datasets())}"
        )
    return recipe
