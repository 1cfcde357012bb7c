"""Replacement Learning (``--replace``) against end-to-end training, on real data (Fashion-MNIST).

Every run is one of ``benchmarks/accuracy.py``'s (its ``train_one``: the recipe, the code path of
``fxlocal train``, the record), on its ``--quick`` protocol by default (the first 4 000 training
and 1 000 test images, batch 64, 3 epochs, seed 0), for two models:

- ``resnet32``: ``resnet32_cifar`` with accuracy.py's recipe (SGD Nesterov 0.9, lr 0.1, weight
  decay 5e-4, cosine, pad-4 crop + flip); ``--replace interval=2`` replaces 4 of its 15 blocks;
- ``vit``: ``vit_tiny_patch16_224`` at 28×28 with 4×4 patches (49 tokens, 12 blocks), AdamW lr 1e-3,
  weight decay 0.05 (SGD at lr 0.1 does not train a ViT); ``interval=2`` replaces 5 of its 12 blocks.

Rows per model: end to end; ``--replace`` with ``neighbour_grad`` true and false; ``--replace``
with ``--aux dgl`` and ``--aux mlaan`` at K=4 (with the default ``neighbour_grad``). Columns:
test top-1, trainable parameters (backbone), step time (images/s of training) and the step's
peak (fake tensors: a CPU step, as accuracy.py), each against the model's end-to-end row on the
same device.

    python benchmarks/replace.py                 # train what is missing (resumable), print the table
    python benchmarks/replace.py --jobs 2        # two runs side by side, one thread each
    python benchmarks/replace.py --table         # the table from the results only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import accuracy
from record import ROOT, append_rows, read_rows

MODELS = {
    "resnet32": [],
    "vit": ["model.name=vit_tiny_patch16_224", "model.kwargs.patch_size=4", "optimizer.name=adamw",
            "optimizer.lr=0.001", "optimizer.weight_decay=0.05"],
}
# (row name, aux, K, replace overrides)
ROWS = [
    ("e2e", "none", 1, []),
    ("replace", "none", 1, ["convert.replace.interval=2", "convert.replace.neighbour_grad=true"]),
    ("replace-no-neighbour-grad", "none", 1, ["convert.replace.interval=2", "convert.replace.neighbour_grad=false"]),
    ("dgl+replace", "dgl", 4, ["convert.replace.interval=2"]),
    ("mlaan+replace", "mlaan", 4, ["convert.replace.interval=2"]),
]


def run_args(args, model: str, row: str) -> argparse.Namespace:
    """accuracy.py's arguments for one run (its train_one reads them)."""
    overrides = MODELS[model] + next(r[3] for r in ROWS if r[0] == row)
    spec = accuracy.PROTOCOLS[args.protocol]
    return argparse.Namespace(
        protocol=args.protocol, label=f"{args.protocol}-replace-{model}", tag=row, set=overrides, device=args.device,
        data_root=args.data_root, workers=args.workers, runs=args.runs, epochs=None, train_subset=spec["train_subset"],
        test_subset=spec["test_subset"], validation=None, pipeline=False, jobs=args.jobs,
    )


def key_of(args, model: str, row: str) -> str:
    aux, k = next((r[1], r[2]) for r in ROWS if r[0] == row)
    return accuracy.run_key(f"{args.protocol}-replace-{model}", aux, k, 0, row, None)


def train_missing(args) -> None:
    done = {r["key"] for r in read_rows(args.results)}
    todo = [(m, r[0]) for m in args.models for r in ROWS if r[0] in args.rows and key_of(args, m, r[0]) not in done]
    if args.jobs <= 1:
        for model, row in todo:
            aux, k = next((r[1], r[2]) for r in ROWS if r[0] == row)
            print(f"training {key_of(args, model, row)}", flush=True)
            append_rows(args.results, [accuracy.train_one(run_args(args, model, row), aux, k, 0)])
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs)  # each its share: OpenMP spin-waits otherwise
    running: list[subprocess.Popen] = []
    passed = [a for a in sys.argv[1:] if a not in ("--table",)]
    for model, row in todo:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(1)
        cmd = [sys.executable, __file__, *passed, "--jobs", "1", "--models", model, "--rows", row, "--no-table"]
        running.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
    for p in running:
        p.wait()


def print_table(args) -> None:
    rows = {r["key"]: r for r in read_rows(args.results)}
    print(f"`python benchmarks/replace.py` — {args.protocol} protocol, Fashion-MNIST, test top-1; "
          "each ratio against the model's end-to-end row\n")
    print("| model | method | K | test top-1 (%) | Δ vs e2e | trainable params (backbone) | × e2e | step time × e2e "
          "| step peak × e2e | device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    claims = []
    for model in args.models:
        e2e = rows.get(key_of(args, model, "e2e"))
        for name, aux, k, _ in ROWS:
            r = rows.get(key_of(args, model, name))
            if r is None:
                continue
            same = e2e is not None and e2e["device"] == r["device"]
            params = r["backbone_trainable_params"]
            delta = f"{100 * (r['test_top1'] - e2e['test_top1']):+.2f}" if e2e else "-"
            params_x = f"{params / e2e['backbone_trainable_params']:.2f}" if e2e else "-"
            time_x = f"{e2e['images_per_s'] / r['images_per_s']:.2f}" if same else "-"
            peak_x = f"{r['step_peak_mib'] / e2e['step_peak_mib']:.2f}" if e2e else "-"
            print(f"| {model} | {name} | {k} | {100 * r['test_top1']:.2f} | {delta} | {params:,} | {params_x} | "
                  f"{time_x} | {peak_x} | {r['device']} |")
            if e2e is not None and k == 1 and name != "e2e":
                claims.append(claim_line(model, name, r, e2e))
    if claims:
        print("\nThe papers' claim (`--replace` alone: end-to-end accuracy ±0.3 point with fewer trainable parameters, "
              "less step time and a lower peak):\n")
        print("\n".join(claims))


def claim_line(model: str, name: str, r: dict, e2e: dict) -> str:
    gap = 100 * (r["test_top1"] - e2e["test_top1"])
    parts = [
        ("accuracy", abs(gap) <= 0.3 or gap > 0, f"{gap:+.2f} points"),
        ("parameters", r["backbone_trainable_params"] < e2e["backbone_trainable_params"],
         f"{r['backbone_trainable_params'] / e2e['backbone_trainable_params']:.2f}×"),
        ("step time", r["images_per_s"] > e2e["images_per_s"], f"{e2e['images_per_s'] / r['images_per_s']:.2f}×"),
        ("peak", r["step_peak_mib"] < e2e["step_peak_mib"], f"{r['step_peak_mib'] / e2e['step_peak_mib']:.2f}×"),
    ]
    said = ", ".join(f"{what} {value} ({'met' if ok else 'missed'})" for what, ok, value in parts)
    return f"- {model} {name}: {said}"


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", dest="protocol", action="store_const", const="full", default="quick",
                   help="accuracy.py's full protocol instead of --quick")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per run")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--data-root", default=os.environ.get("FXLOCAL_FASHION_MNIST", str(accuracy.DATA_ROOT)))
    p.add_argument("--runs", default=str(ROOT / "runs/replace"), help="checkpoints of unfinished runs")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/replace.jsonl"))
    p.add_argument("--table", action="store_true", help="print the table only: train nothing")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.table:
        train_missing(args)
    if not args.no_table:
        print_table(args)


if __name__ == "__main__":
    main()
