"""Local learning beyond classification (GLCAN's claim): end to end vs DGL heads vs GLCAN heads at
K=4, on fxlocal's offline canvas tasks made from real Fashion-MNIST images.

Every run trains a task recipe of ``recipes/`` (``fashion_mnist_{task}_{e2e,k4_dgl,k4_glcan}.yaml``)
through ``fxlocal train``'s code path, on the first ``--train-subset`` training canvases for
``--epochs`` epochs, and evaluates the model's task metric on the first ``--test-subset`` test
canvases (nothing is tuned here: the recipes' settings are fixed up front):

- ``detect``: SSDlite (MobileNetV3-Large, torchvision, built for 128×128), COCO mAP@[.5:.95] and mAP@.5;
- ``segment``: DeepLabV3 (MobileNetV3-Large, torchvision), mIoU over background + 10 classes;
- ``sr``: EDSR ×2 (fxlocal.models.sr) with 8 residual blocks of width 32 (the baseline's 16 × 64
  trains at 3 images/s on one CPU thread), PSNR and SSIM.

The step's peak is measured on a real batch of the run's size (``fxlocal.memory.batch_step_peak_bytes``:
a CPU step tracked by torch's MemTracker, weights, gradients, AdamW state and activations): a
detector's loss matches anchors to the batch's boxes by value, which fake tensors cannot run.

Targets (issue 29): GLCAN within 10% (relative) of end to end on each task's metric, with a peak
≤ 0.5× end to end's, and ahead of DGL's heads.

    python benchmarks/tasks.py                  # train what is missing (resumable), print the table
    python benchmarks/tasks.py --table          # the table from the results only
    python benchmarks/tasks.py --peaks --seeds 0 1   # the step peaks measured again at this commit
    python benchmarks/tasks.py --tasks sr --methods glcan --seeds 0 1
    python benchmarks/tasks.py --tasks detect --methods glcan --validation 500 --tag depth4 \
        --set convert.aux_options.depth=4    # a variant, on canvases held out of training
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from record import ROOT, append_rows, provenance, read_rows

TASKS = {
    "detect": {"metrics": ("map", "map_50"), "overrides": []},
    "segment": {"metrics": ("miou",), "overrides": []},
    "sr": {"metrics": ("psnr", "ssim"), "overrides": ["model.kwargs.num_blocks=8", "model.kwargs.width=32"]},
}
METHODS = {"e2e": "e2e", "dgl": "k4_dgl", "glcan": "k4_glcan"}
# A method's own settings for a task. EDSR's GLCAN head is 24 wide (its blocks are 32): of the
# heads whose split fits 0.5× end to end's peak, the best on held-out canvases (29.13 dB; 32 wide,
# the default, 29.46 dB at 0.54×; one conv deep 28.13; docs/tasks.md's variant table)
METHOD_OVERRIDES = {("sr", "glcan"): ["convert.aux_options.width=24"]}
LABELS = {"map": "mAP", "map_50": "mAP@.5", "miou": "mIoU", "psnr": "PSNR (dB)", "ssim": "SSIM"}


def run_overrides(task: str, method: str) -> list[str]:
    """The benchmark's own recipe overrides for a task and method (a run's ``--set`` comes after)."""
    return [*TASKS[task]["overrides"], *METHOD_OVERRIDES.get((task, method), [])]


def recorded_overrides(row: dict) -> list[str]:
    """A row's overrides (rows from before ``METHOD_OVERRIDES`` record the task's, or none)."""
    return row.get("overrides", TASKS[row["task"]]["overrides"])


def run_dir(args, task: str, method: str, seed: int) -> Path:
    """Where a run writes its checkpoints: its key and a digest of its overrides, so that a run
    whose settings changed starts afresh instead of resuming another's checkpoint."""
    import hashlib

    digest = hashlib.sha1(json.dumps([run_overrides(task, method), args.set]).encode()).hexdigest()[:8]
    return Path(args.runs) / f"{run_key(args, task, method, seed)}-{digest}"


def run_key(args, task: str, method: str, seed: int) -> str:
    held_out = f"-val{args.validation}" if args.validation else ""
    tag = f"-{args.tag}" if args.tag else ""
    return f"tasks-{task}-{method}{tag}-n{args.train_subset}-e{args.epochs}-b{args.batch_size}{held_out}-s{seed}"


def run_recipe(args, task: str, method: str, seed: int):
    """The recipe of one run."""
    from fxlocal.training.recipe import load_recipe

    path = ROOT / "recipes" / f"fashion_mnist_{task}_{METHODS[method]}.yaml"
    return load_recipe(path, [
        f"data.root={args.data_root}", f"epochs={args.epochs}", f"data.train_subset={args.train_subset}",
        f"data.test_subset={args.test_subset}", f"batch_size={args.batch_size}", "workers=0", "device=cpu",
        f"seed={seed}", f"output_dir={run_dir(args, task, method, seed)}", *run_overrides(task, method),
        *([f"data.validation={args.validation}"] if args.validation else []), *args.set,
    ])


def step_peak(recipe):
    """The model a recipe builds (afresh, seeded: the step a run starts with) and the peak of its
    training step on the first batch of its training set, in MiB. The peak depends on shapes,
    not on the weights' values (a detector matches anchors to boxes, not to predictions), so it
    is the same at any point of the run."""
    import torch

    from fxlocal.memory import batch_step_peak_bytes
    from fxlocal.training.build import build_model
    from fxlocal.training.loaders import train_and_evaluation_sets

    built = build_model(recipe)
    train, _ = train_and_evaluation_sets(recipe.data)
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=recipe.batch_size)))
    optimizer = "adamw" if recipe.optimizer.name.startswith("adam") else "sgd"
    return built, batch_step_peak_bytes(built, x, y, optimizer, recipe.optimizer.per_block) / 2**20


def peak_one(args, task: str, method: str, seed: int) -> dict:
    """The step peak of one run's model measured again, at this commit, without training."""
    recipe = run_recipe(args, task, method, seed)
    built, peak = step_peak(recipe)
    return {
        **provenance("cpu"), "benchmark": "tasks-peak", "key": run_key(args, task, method, seed), "task": task,
        "method": method, "step_peak_mib": peak, "heads": [b.head for b in built.plan.blocks],
        "overrides": run_overrides(task, method), "set": args.set,
        "cuts": built.plan.cuts,
    }


def train_one(args, task: str, method: str, seed: int) -> dict:
    """Train one run (resuming its checkpoint if there is one) and return its record."""
    from fxlocal.training.loop import fit

    key = run_key(args, task, method, seed)
    recipe = run_recipe(args, task, method, seed)
    started = time.perf_counter()
    resume = (Path(recipe.output_dir) / "last.pt").exists()
    history = fit(recipe, resume=resume).history
    built, peak = step_peak(recipe)
    last = history[-1]
    return {
        **provenance("cpu"), "benchmark": "tasks", "key": key, "task": task, "method": method,
        "aux": recipe.convert.aux, "k": built.k, "seed": seed, "model": recipe.model.name, "overrides": run_overrides(task, method),
        "train_subset": args.train_subset, "test_subset": args.test_subset, "epochs": len(history),
        "validation": args.validation, "tag": args.tag, "set": args.set, "evaluated_on": last.get("evaluated_on", "test"),
        "metrics": {m: last[f"test_{m}"] for m in TASKS[task]["metrics"]},
        "metrics_per_epoch": [{m: r[f"test_{m}"] for m in TASKS[task]["metrics"]} for r in history if f"test_{TASKS[task]['metrics'][0]}" in r],
        "train_loss": last["train_loss"], "images_per_s": statistics.median(r["images_per_s"] for r in history),
        "step_peak_mib": peak, "step_peak_kind": f"measured (a CPU step on a real batch of {recipe.batch_size}, MemTracker)",
        "heads": [b.head for b in built.plan.blocks], "wall_s": time.perf_counter() - started, "resumed": resume,
        "recipe": recipe.model_dump(mode="json"),
    }


def table(rows: list[dict], args, peaks: list[dict] = ()) -> str:
    """Per task: each method's metrics (mean over seeds), relative to end to end, and its peak;
    of rows with the same key (a run measured again at a later commit), the last; a run's peak
    the last one ``--peaks`` measured again after it, if any (a later run of the key measures its own)."""

    def peak(run: dict) -> float:
        later = [p["step_peak_mib"] for p in peaks if p["key"] == run["key"] and p["time"] >= run["time"]
                 and recorded_overrides(p) == recorded_overrides(run)]
        return later[-1] if later else run["step_peak_mib"]

    rows = [{**r, "step_peak_mib": peak(r)} for r in {r["key"]: r for r in rows}.values()]
    lines = [
        "| task | method | seeds | " + " | ".join(["metric", "vs e2e", "step peak (MiB)", "vs e2e"]) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, spec in TASKS.items():
        by_method = {}
        for method in METHODS:
            tag = "" if method == "e2e" else args.tag  # a variant is measured against plain end to end
            runs = [r for r in rows if r["task"] == task and r["method"] == method and (r.get("tag") or "") == tag
                    and r.get("validation") == args.validation and r["train_subset"] == args.train_subset
                    and r["epochs"] == args.epochs]
            if runs:
                by_method[method] = runs
        if "e2e" not in by_method:
            continue
        main = spec["metrics"][0]
        e2e_metric = statistics.mean(r["metrics"][main] for r in by_method["e2e"])
        e2e_peak = statistics.mean(r["step_peak_mib"] for r in by_method["e2e"])
        for method, runs in by_method.items():
            means = {m: statistics.mean(r["metrics"][m] for r in runs) for m in spec["metrics"]}
            shown = ", ".join(f"{LABELS[m]} {v:.4f}" if m != "psnr" else f"{LABELS[m]} {v:.2f}" for m, v in means.items())
            relative = (means[main] / e2e_metric - 1) * 100 if e2e_metric else float("nan")
            peak = statistics.mean(r["step_peak_mib"] for r in runs)
            lines.append(
                f"| {task} ({runs[0]['model']}) | {method} | {len(runs)} | {shown} | "
                f"{'—' if method == 'e2e' else f'{relative:+.1f}%'} | {peak:.0f} | {peak / e2e_peak:.3f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--test-subset", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-tasks"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "tasks.jsonl"))
    parser.add_argument("--peaks-results", default=str(ROOT / "benchmarks" / "results" / "tasks_peaks.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the table from the results only")
    parser.add_argument("--peaks", action="store_true",
                        help="measure the selected runs' step peaks again at this commit (no training), then print the table")
    parser.add_argument("--validation", type=int, default=None,
                        help="hold out the last N training canvases and evaluate on them (to choose options on)")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for a variant (with --tag)")
    parser.add_argument("--tag", default="", help="names a variant's rows")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.peaks:
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    print(f"measuring the step peak of {run_key(args, task, method, seed)}", flush=True)
                    append_rows(args.peaks_results, [peak_one(args, task, method, seed)])
    elif not args.table:
        # a run is done when a row of its key has its overrides (settings changed: trained again)
        done = {(r["key"], tuple(recorded_overrides(r))) for r in read_rows(args.results)}
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    key = run_key(args, task, method, seed)
                    if (key, tuple(run_overrides(task, method))) not in done:
                        print(f"training {key}", flush=True)
                        append_rows(args.results, [train_one(args, task, method, seed)])
    print(table(read_rows(args.results), args, read_rows(args.peaks_results)))


if __name__ == "__main__":
    main()
