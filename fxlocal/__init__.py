"""fxlocal: supervised local learning for any timm / torchvision model, from its torch.fx graph.

    >>> import fxlocal
    >>> local = fxlocal.convert("resnet18", k=4, aux="dgl", input_size=(3, 64, 64))
    >>> losses = local.train_step(x, y, optimizer)
"""

from .aux import available_aux, get_aux, register_aux
from .convert import AnalyzedModel, analyze_model, convert, replace
from .errors import FxLocalError
from .graph.analyze import GraphAnalysis, analyze
from .graph.candidates import CutCandidate, find_cut_candidates, recomputable_values
from .graph.cost import Cost
from .graph.partition import min_max_partition, partition
from .graph.plan import BlockPlan, Plan
from .graph.split import split_graph
from .graph.trace import TraceReport, trace
from .local_model import LocalModel
from .models import create_model

__version__ = "0.1.0"

__all__ = [
    "AnalyzedModel",
    "BlockPlan",
    "Cost",
    "CutCandidate",
    "FxLocalError",
    "GraphAnalysis",
    "LocalModel",
    "Plan",
    "TraceReport",
    "analyze",
    "analyze_model",
    "available_aux",
    "convert",
    "create_model",
    "find_cut_candidates",
    "recomputable_values",
    "get_aux",
    "min_max_partition",
    "partition",
    "register_aux",
    "replace",
    "split_graph",
    "trace",
]
