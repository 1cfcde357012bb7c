"""Building models by name (timm, then torchvision, random init; torchvision's detectors and
segmenters; ``segment:NAME``, a timm backbone with a simple decoder), and the papers' CIFAR ResNets
and a reference super-resolution network (registered with timm on import). Imports nothing else from fxlocal but its errors."""

from . import (
    cifar_resnet,  # noqa: F401  (registers resnet32_cifar, resnet110_cifar with timm)
    dense,  # noqa: F401  (registers torchvision's detection and segmentation models as a source)
    segmenter,  # noqa: F401  (registers the segment: source, any timm backbone with a simple decoder)
    sr,  # noqa: F401  (registers edsr_x2, the reference super-resolution network, with timm)
)
from .factory import (
    ModelSource,
    create_model,
    list_model_names,
    native_input_sizes,
    register_model_source,
)

__all__ = ["ModelSource", "create_model", "list_model_names", "native_input_sizes", "register_model_source"]
