"""Draw a Plan: per-segment cost bars along the graph, the chosen cuts, each block's total."""

from __future__ import annotations

import io
from pathlib import Path

from ..graph.analyze import GraphAnalysis
from ..graph.plan import Plan, atomic_write_bytes

__all__ = ["plot_plan"]

_UNITS = {"flops": ("GFLOPs (fwd+bwd, per image)", 1e-9), "params": ("parameters (MiB)", 2**-20),
          "activations": ("saved activations (MiB per image)", 2**-20), "memory": ("saved activations (MiB per image)", 2**-20),
          "time": ("measured ms (fwd+bwd, per image)", 1e3)}


def plot_plan(plan: Plan, analysis: GraphAnalysis, path: str | Path) -> None:
    """Bars of every segment's cost (in the plan's balance metric), cut lines, block totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "activations" if plan.balance == "memory" else plan.balance
    label, scale = _UNITS[plan.balance]
    values = [c.metric(metric) * scale for c in analysis.segment_costs]
    names = [c.node for c in analysis.candidates] + ["output"]
    cut_at = {c: i for i, c in enumerate(names)}
    fig, (ax, ax_blocks) = plt.subplots(2, 1, figsize=(max(8, len(values) * 0.18), 6), height_ratios=(3, 1))
    colors = []
    block = 0
    for name in names:
        colors.append(f"C{block % 10}")
        if block < len(plan.cuts) and name == plan.cuts[block]:
            block += 1
    ax.bar(range(len(values)), values, color=colors)
    for cut in plan.cuts:
        ax.axvline(cut_at[cut] + 0.5, color="black", linestyle="--", linewidth=1)
    ax.set(ylabel=label, title=f"{plan.model}: K={plan.k}, aux={plan.aux}, balance={plan.balance}, "
                               f"imbalance {plan.imbalance:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    totals = [b.cost for b in plan.blocks]
    ax_blocks.bar(range(plan.k), [t / max(totals) for t in totals], color=[f"C{b % 10}" for b in range(plan.k)])
    ax_blocks.set(xlabel="block", ylabel="cost / max", xticks=range(plan.k))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
