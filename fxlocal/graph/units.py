"""Find the natural layers ("units") of a traced model: a residual block, a transformer block,
an MBConv block, a stem. AugLocal and MLAAN sample units, not single ops.

How units are found, from the module tree and the graph together:

1. *Atoms*: walk the module tree from the root, expanding plain containers (``nn.Sequential``,
   ``nn.ModuleList``, ``nn.ModuleDict`` and their subclasses) that hold two or more unit-starting modules, and
   modules that hold a stack of repeated blocks (a plain container of >= 2 modules of one class,
   as in a Swin or ConvNeXt stage). Everything else is an atom.
2. A unit starts at every composite atom (one with parameterised children) and at every plain
   weight layer (a conv or linear module); norms, activations, pools and functional glue join the
   unit before them. So a ResNet stem (conv, bn, act, pool) is one unit and so is each block.
3. The *tail* (the model's own head: pooling and classifier) begins after the last cut
   candidate whose tensor still has a spatial or token extent; units come before it.
4. A unit ends at the last cut candidate before the next unit starts that leaves one tensor
   live, or, where there is none, at the last that carries a second tensor beside it (the
   cells of NASNet, CrossViT's two token streams): the unit then hands both on, and a copy of
   the next unit takes both (``Unit.tensors``). A unit that cannot be cut from the next at all
   (as DenseNet's dense layers) merges into it.
5. *Stages*: consecutive units with the same output shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .atoms import atom_of
from .candidates import CarriedTensor, CutCandidate, covered_module_paths
from .trace import traced_input_size

__all__ = ["Unit", "find_units"]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Unit:
    index: int
    modules: tuple[str, ...]  # module paths it covers, e.g. ("layer1.0",)
    cut: str  # node name of the cut candidate it ends at
    cut_position: int  # index of that candidate in the candidate list
    in_shape: tuple[int, ...]  # per-sample shape of its input
    out_shape: tuple[int, ...]
    layout: str  # layout of its output
    stage: int
    # a second tensor it hands on beside its output, and one it takes beside its input (the
    # unit after a cut that carries one)
    carried: tuple[CarriedTensor, ...] = ()
    in_carried: tuple[CarriedTensor, ...] = ()

    @property
    def tensors(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """(shape, layout) of every tensor it hands on: its output, then the carried one."""
        return ((self.out_shape, self.layout), *((t.shape, t.layout) for t in self.carried))

    @property
    def name(self) -> str:
        return ", ".join(self.modules) if len(self.modules) <= 2 else f"{self.modules[0]} … {self.modules[-1]}"


def _has_extent(c: CutCandidate) -> bool:
    spatial = {"nchw": c.shape[1:], "nhwc": c.shape[:-1], "nlc": c.shape[:1]}.get(c.layout, ())
    n = 1
    for s in spatial:
        n *= s
    return n > 1


def find_units(gm: fx.GraphModule, candidates: list[CutCandidate]) -> list[Unit]:
    """The units of a traced model (see the module docstring), in graph order."""
    atoms = gm.meta.get("fxlocal_unit_atoms")
    if not atoms or not candidates:
        return []
    order = list(gm.graph.nodes)
    # where units start: the first node of each unit-starting atom
    starts: list[int] = []
    seen: set[str] = set()
    for i, node in enumerate(order):
        if node.op not in _COMPUTE_OPS:
            continue
        atom = atom_of(node.meta.get("module_path", ""), atoms)
        if atom is not None and atom not in seen:
            seen.add(atom)
            if atoms[atom]:
                starts.append(i)
    trunk = [c for c in candidates if _has_extent(c)]
    if not trunk:
        return []
    tail_from = trunk[-1].index  # the model's own head starts after this candidate
    starts = [s for s in starts if s <= tail_from]
    if not starts or starts[0] > 0:
        starts.insert(0, 0)
    by_index = {c.index: pos for pos, c in enumerate(candidates)}
    cuts: list[int] = []  # candidate positions, one per unit
    boundaries = starts[1:] + [tail_from + 1]
    for start, next_start in zip(starts, boundaries):
        inside = [c for c in candidates if start <= c.index < next_start]
        # a single live tensor where there is one: a copy of the next unit then takes it alone
        inside = [c for c in inside if not c.carried] or inside
        if inside and (not cuts or candidates[cuts[-1]].index < inside[-1].index):
            cuts.append(by_index[inside[-1].index])
    units: list[Unit] = []
    prev_index, prev_shape, prev_carried, stage = -1, traced_input_size(gm), (), 0
    for u, pos in enumerate(cuts):
        c = candidates[pos]
        carried = c.carried
        names = {n.name for n in order[prev_index + 1 : c.index + 1] if n.op in _COMPUTE_OPS}
        if units and units[-1].tensors != ((c.shape, c.layout), *((t.shape, t.layout) for t in carried)):
            stage += 1
        units.append(
            Unit(
                index=u,
                modules=tuple(covered_module_paths(gm, names)),
                cut=c.node,
                cut_position=pos,
                in_shape=prev_shape,
                out_shape=c.shape,
                layout=c.layout,
                stage=stage,
                carried=carried,
                in_carried=prev_carried,
            )
        )
        prev_index, prev_shape, prev_carried = c.index, c.shape, carried
    return units
