"""Typed errors. Every message is one line that says what went wrong and what to do.

The CLI turns any :class:`FxLocalError` into that line and exit code 2, without a traceback.
"""

from __future__ import annotations


class FxLocalError(Exception):
    """Base class of every error fxlocal raises on purpose."""


class UnknownModelError(FxLocalError, ValueError):
    """A model name that neither timm nor torchvision knows."""


class TraceError(FxLocalError, RuntimeError):
    """The model could not be turned into a torch.fx graph."""


class InputSizeError(FxLocalError, ValueError):
    """The model rejects the requested input size."""


class PartitionError(FxLocalError, ValueError):
    """K, the balance criterion or a saved plan does not fit the graph."""


class SharedParameterError(FxLocalError, RuntimeError):
    """A parameter would be used by two gradient-isolated blocks."""


class UnknownAuxError(FxLocalError, ValueError):
    """An aux method name that is not registered."""


class PlanMismatchError(FxLocalError, ValueError):
    """A saved plan names cut nodes that the traced graph does not have."""


class IncompatibleOptionsError(FxLocalError, ValueError):
    """Options that cannot be used together."""


class NotAClassifierError(FxLocalError, ValueError):
    """The model's output is not one row of class logits per image (a feature encoder)."""


class KOutOfRangeError(PartitionError):
    """More blocks than the graph has places to cut; ``max_k`` is the largest K it allows."""

    def __init__(self, message: str, max_k: int):
        super().__init__(message)
        self.max_k = max_k


class TrainingDiverged(FxLocalError, RuntimeError):
    """A loss became NaN or infinite."""


class TaskError(FxLocalError, ValueError):
    """A task the model, data or aux method does not serve (``--task detection`` on a classifier)."""
