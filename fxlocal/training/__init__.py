"""Training a converted model from a recipe: one process, data-parallel under torchrun
(:func:`fit`), or one block per process (:func:`~fxlocal.training.pipeline.fit_pipeline`, which
``fit`` hands a recipe with ``pipeline.enabled`` to).

Modules, each importing only those listed before it and the layers below (conversion, aux,
graph): ``data`` (datasets), ``recipe`` (the YAML schema), ``runtime`` (device, precision,
torch.distributed), ``report`` (progress, metrics, output folder), ``optim``, ``loaders``,
``evaluate``, ``checkpoint`` (converted models and training state, atomic, loaded without
running code), ``build`` (the model a recipe or checkpoint describes), ``pipeline``, ``loop``.
"""

from .build import build_model, model_from_checkpoint
from .checkpoint import load_converted, load_training_checkpoint, save_converted
from .evaluate import evaluate
from .loaders import evaluation_loader
from .loop import fit
from .recipe import Recipe, load_recipe
from .report import Reporter, TrainResult

__all__ = [
    "Recipe",
    "Reporter",
    "TrainResult",
    "build_model",
    "evaluate",
    "evaluation_loader",
    "fit",
    "load_converted",
    "load_recipe",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "save_converted",
]
