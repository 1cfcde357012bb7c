"""Print fxlocal's import graph by layer (the layers of docs/architecture.md), from grimp, the
graph import-linter checks: for each layer, the layers it imports. Run from the repository root:
``python scripts/import_graph.py``."""

import grimp

LAYERS = ["cli", "tools", "training", "memory", "convert", "local_model", "backbone", "aux", "graph", "models", "errors"]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def main() -> None:
    graph = grimp.build_graph("fxlocal")
    imports: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    modules: dict[str, int] = {layer: 0 for layer in LAYERS}
    for module in graph.modules:
        src = layer_of(module)
        if src is None:
            continue
        modules[src] += 1
        for imported in graph.find_modules_directly_imported_by(module):
            dst = layer_of(imported)
            if dst is not None and dst != src:
                imports[src].add(dst)
    print("| layer | modules | imports |")
    print("|---|---|---|")
    for layer in LAYERS:
        below = sorted(imports[layer], key=LAYERS.index)
        print(f"| {layer} | {modules[layer]} | {', '.join(below) or '-'} |")
    upward = [(a, b) for a in LAYERS for b in imports[a] if LAYERS.index(b) < LAYERS.index(a)]
    print(f"\nimports upward: {upward or 'none'}")


if __name__ == "__main__":
    main()
