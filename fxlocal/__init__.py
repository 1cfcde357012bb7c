"""fxlocal: supervised local learning for any timm / torchvision model, from its torch.fx graph.

    >>> import fxlocal
    >>> local = fxlocal.convert("resnet18", k=4, aux="dgl", input_size=(3, 64, 64))
    >>> losses = local.train_step(x, y, optimizer)
"""

from .analyze import CutCandidate, GraphAnalysis, analyze, find_cut_candidates, recomputable_values
from .aux import available_aux, get_aux, register_aux
from . import paper_models  # noqa: F401  (registers the CIFAR ResNets with timm)
from .convert import AnalyzedModel, analyze_model, convert
from .cost import Cost
from .errors import FxLocalError
from .local_model import LocalModel
from .models import create_model
from .partition import min_max_partition, partition
from .plan import BlockPlan, Plan
from .split import split_graph
from .trace import TraceReport, trace

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
    "split_graph",
    "trace",
]
