"""Aux-head methods, by name: each builds the head that trains block ``b`` from what is known at
its cut (:class:`HeadSpec`). The last block keeps the model's own head, so methods build K-1 heads.

The contract is :mod:`fxlocal.aux.base`; each method is one module that registers itself.
"""

from . import auglocal, dgl, glcan, infopro, man, mlaan, none  # noqa: F401  (methods register on import)
from .base import (
    AuxHead,
    AuxMethod,
    HeadSpec,
    available_aux,
    combinations,
    get_aux,
    head_loss,
    register_aux,
)
from .tasks import TaskSpec, available_tasks, get_task
from .unit_copies import UnitLibrary

__all__ = ["AuxHead", "AuxMethod", "HeadSpec", "TaskSpec", "available_tasks", "get_task", "UnitLibrary", "register_aux", "get_aux", "available_aux", "combinations", "head_loss"]
