"""``aux="none"``: no local heads — only valid with K=1, i.e. plain end-to-end training."""

from __future__ import annotations

from torch import nn

from ..errors import UnknownAuxError
from .base import AuxMethod, HeadSpec, register_aux


@register_aux("none")
class NoAux(AuxMethod):
    def build_head(self, spec: HeadSpec) -> nn.Module:
        raise UnknownAuxError("aux='none' trains end to end and has no local heads: use it with k=1")

    def describe(self, head: nn.Module) -> str:
        return "-"
