"""Where each entry of the original model's ``state_dict`` lives inside a converted model.

Blocks hold the original parameters and buffers (the same tensor objects), under the same
qualified names; a few entries belong to modules the traced graph never calls (an inference
path without GoogLeNet's aux classifier, say) and are kept aside as buffers. The map is plain
data computed once at conversion, so ``LocalModel.backbone_state_dict()`` can give the original
keys back even after ``.to(device)`` replaced buffer tensors.

A replaced unit's parameter (Replacement Learning, :mod:`fxlocal.graph.replace`) is stored as a
parametrization; its original key maps to the module that computes it, so the backbone state is
the plain architecture's, holding the parameter's current value.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["BackboneMap", "UntracedState", "map_backbone"]

# key -> ("block", block index, key in that block), ("untraced", buffer name) or ("computed",
# block index, module path, tensor name): a replaced unit's parameter, computed by that module
BackboneMap = dict[str, tuple]


class UntracedState(nn.Module):
    """State of the original model that no block uses; saved so that export stays strict.

    ``metadata`` is the original ``state_dict``'s ``_metadata`` (each module's ``_version``), as
    plain data: a module that upgrades old checkpoints when loading (torchvision's MNASNet)
    refuses a state dict without it.
    """

    def __init__(self, tensors: list[torch.Tensor], metadata: dict[str, dict] | None = None):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t.detach().clone())
        self.metadata = {prefix: dict(entry) for prefix, entry in (metadata or {}).items()}


def map_backbone(model: nn.Module, blocks: list[nn.Module]) -> tuple[BackboneMap, UntracedState]:
    by_tensor: dict[int, tuple] = {}
    for b, block in enumerate(blocks):
        for key, t in block.state_dict(keep_vars=True).items():
            by_tensor.setdefault(id(t), ("block", b, key))
    mapping: BackboneMap = {}
    untraced: list[torch.Tensor] = []
    state = model.state_dict(keep_vars=True)
    parametrized = {f"{path}.parametrizations.{t}.": (path, t) for path, m in model.named_modules()
                    if parametrize.is_parametrized(m) for t in m.parametrizations.keys()}
    for key, t in state.items():
        stored = next((prefix for prefix in parametrized if key.startswith(prefix)), None)
        if stored is not None:  # the stand-in original or the coefficients: the parameter is computed
            if key == stored + "original":
                path, tensor = parametrized[stored]
                mapping[f"{path}.{tensor}"] = ("computed", by_tensor[id(t)][1], path, tensor)
        elif id(t) in by_tensor:
            mapping[key] = by_tensor[id(t)]
        else:
            mapping[key] = ("untraced", f"t{len(untraced)}")
            untraced.append(t)
    return mapping, UntracedState(untraced, getattr(state, "_metadata", None))
