"""The modules a model's units are made of (its *atoms*), read from the module tree before
tracing: :func:`fxlocal.trace` records them on the graph, which keeps only the modules it calls.
See :mod:`fxlocal.graph.units` for how units are found from them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["atom_of", "has_parameterised_children", "unit_atoms"]

_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

def has_parameterised_children(m: nn.Module) -> bool:
    """A module of parameterised modules (a block, a cell), not a single layer."""
    return any(any(True for _ in c.parameters()) for c in m.children())


def _is_plain_container(m: nn.Module) -> bool:
    # subclasses too (timm's SequentialTuple runs PiT's stages on (tokens, cls) pairs; DenseNet's
    # blocks are ModuleDicts): whatever their forward adds between children is glue that joins
    # a unit, and units still end only at cut candidates
    return isinstance(m, _PLAIN_CONTAINERS)


def _holds_block_stack(m: nn.Module) -> bool:
    """A module with a plain container of >= 2 same-class composite blocks (a model stage)."""
    for child in m.children():
        if not _is_plain_container(child) or len(child) < 2:
            continue
        kinds = {type(g) for g in child.children()}
        first = next(iter(child.children()))
        if len(kinds) == 1 and not isinstance(first, nn.Sequential) and has_parameterised_children(first):
            return True
    return False


def unit_atoms(model: nn.Module) -> dict[str, bool]:
    """The modules units are made of (step 1 of the module docstring): path -> starts a unit.

    :func:`fxlocal.trace` records this on ``gm.meta["fxlocal_unit_atoms"]``, because the
    GraphModule keeps only the modules it calls, not the containers around them.
    """
    atoms: dict[str, bool] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _holds_block_stack(child) or (
                # a container of one weight layer and its norms (a downsample) stays whole
                _is_plain_container(child) and sum(_starts_unit(g) for g in child.children()) >= 2
            ):
                walk(child, path)
            else:
                atoms[path] = _starts_unit(child)

    walk(model, "")
    return atoms


def _starts_unit(m: nn.Module) -> bool:
    if has_parameterised_children(m):
        return True
    return any(p.dim() >= 2 for p in m.parameters(recurse=False))


def atom_of(path: str, atoms: dict[str, bool]) -> str | None:
    """The atom (from :func:`unit_atoms`) a module path lies in, if any."""
    parts = path.split(".") if path else []
    for j in range(len(parts), 0, -1):
        prefix = ".".join(parts[:j])
        if prefix in atoms:
            return prefix
    return None
