"""Host memory returned to the kernel or kept for reuse: what a CPU training step pays for each.

glibc hands a large freed block back to the kernel (an allocation above its mmap threshold is
unmapped when freed; a heap's freed top is trimmed), so a step that allocates and frees tens of
MiB of activations faults those pages in again, zeroed, every step. ``fxlocal train`` keeps
freed memory for reuse (recipe field ``keep_freed_memory``, default on;
``fxlocal.training.runtime.keep_freed_memory``). For each aux method this times every pipeline
stage's step (``LocalModel.train_block``: the block, its head, a cascade's re-run on a gradient
made up here, the block's optimizer) and the sequential step (``train_step``), each in a fresh
single-threaded process, with glibc's behaviour as it is (``returned``) and with freed memory
kept (``kept``): milliseconds, minor page faults and system time per step. Modes alternate in
every round; each figure is the median over the rounds of each run's median step. Rows are
appended to ``--record``.

    python benchmarks/host_memory.py                                      # resnet32_cifar, K=2, batch 16, dgl man mlaan
    python benchmarks/host_memory.py --aux mlaan --cuts layer1.1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import ROOT, append_rows, provenance

MODES = ("returned", "kept")


def _child(spec: dict) -> dict:
    """In a fresh process: each stage's and the sequential step's ms, faults and system ms per step."""
    import torch
    from pipeline import layout, optimizer_section

    import fxlocal
    from fxlocal.training.optim import block_stage, make_optimizer
    from fxlocal.training.recipe import load_recipe
    from fxlocal.training.runtime import keep_freed_memory

    torch.set_num_threads(1)
    if spec["mode"] == "kept":
        keep_freed_memory()
    name, kwargs, size = layout(spec["model"])
    torch.manual_seed(0)
    local = fxlocal.convert(name, k=spec["k"], aux=spec["aux"], cuts=spec["cuts"], balance="flops",
                            input_size=tuple(size), num_classes=10, model_kwargs=kwargs)
    recipe = load_recipe(data={"model": {"name": name}, "optimizer": optimizer_section()})
    optimizers = [make_optimizer(recipe, block_stage(local, b)) for b in range(local.k)]
    x, y = torch.randn(spec["batch"], *size), torch.randint(0, 10, (spec["batch"],))
    inputs, carried = [], (x,)
    with torch.no_grad():  # what each stage takes: the blocks before it, run once
        for block in local.blocks:
            inputs.append(carried)
            out = block(*carried)
            carried = out if isinstance(out, tuple) else (out,)
    cascade = local.input_window > 1

    def stage(b: int):
        handed = inputs[b + 1] if b + 1 < local.k else ()
        gradient = [torch.randn_like(t) * 1e-3 for t in handed if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return lambda: local.train_block(
            b, inputs[b], y, optimizers[b], hand_on=lambda handed_on: None,
            send_input_gradient=(lambda grads, cascaded: None) if cascade and b > 0 else None,
            receive_output_gradient=(lambda: (inputs[b], gradient)) if cascade and b < local.k - 1 else None)

    steps = {f"stage {b}": stage(b) for b in range(local.k)}
    steps["sequential"] = lambda: local.train_step(x, y, optimizers)
    measured = {}
    for what, step in steps.items():
        for _ in range(3):
            step()
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        measured[what] = {"ms": statistics.median(times) * 1e3,
                          "faults": (after.ru_minflt - before.ru_minflt) / spec["steps"],
                          "system_ms": (after.ru_stime - before.ru_stime) / spec["steps"] * 1e3}
    return {"cuts": list(local.plan.cuts), "steps": measured}


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"host_memory.py child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet32_cifar"])
    p.add_argument("--aux", nargs="+", default=["dgl", "man", "mlaan"])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--cuts", nargs="+", default=None, help="where to cut (unit or node names); default: balance flops")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage and run")
    p.add_argument("--repeats", type=int, default=2, help="rounds, each running both modes")
    p.add_argument("--record", type=Path, default=ROOT / "benchmarks/results/host_memory.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    median = statistics.median
    print(f"`python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` (one thread per process, "
          f"batch {args.batch}, median of {args.repeats} round(s) of {args.steps} steps)\n")
    print("| model | aux | cuts | step | ms returned → kept | faults per step returned → kept | system ms returned → kept |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for model in args.models:
        for aux in args.aux:
            spec = {"model": model, "aux": aux, "k": args.k, "cuts": args.cuts, "batch": args.batch, "steps": args.steps}
            rounds = []
            for r in range(args.repeats):  # the modes alternate, each round starting with the other
                order = MODES if r % 2 == 0 else MODES[::-1]
                rounds.append({mode: run_child({**spec, "mode": mode}) for mode in order})
            cuts = rounds[0]["kept"]["cuts"]
            row = {**provenance("cpu"), "model": model, "aux": aux, "k": args.k, "cuts": cuts, "batch": args.batch,
                   "steps": args.steps, "repeats": args.repeats, "threads": 1, "per_step": {}}
            for what in rounds[0]["kept"]["steps"]:
                figures = {mode: {key: median(r[mode]["steps"][what][key] for r in rounds) for key in ("ms", "faults", "system_ms")}
                           for mode in MODES}
                row["per_step"][what] = figures
                ret, kept = figures["returned"], figures["kept"]
                print(f"| {model} | {aux} | {', '.join(cuts)} | {what} | {ret['ms']:.1f} → {kept['ms']:.1f} | "
                      f"{ret['faults']:.0f} → {kept['faults']:.0f} | {ret['system_ms']:.1f} → {kept['system_ms']:.1f} |")
            rows.append(row)
    append_rows(args.record, rows)
    print(f"\nrecorded {len(rows)} row(s) in {args.record}")


if __name__ == "__main__":
    main()
