"""Replacement Learning (``--replace``) against end-to-end training, on real data (Fashion-MNIST).

Every run is one of ``benchmarks/accuracy.py``'s (its ``train_one``: the recipe, the code path of
``fxlocal train``, the record), on its ``--quick`` protocol by default (the first 4 000 training
and 1 000 test images, batch 64, 3 epochs), for two models:

- ``resnet32``: ``resnet32_cifar`` with accuracy.py's recipe (SGD Nesterov 0.9, lr 0.1, weight
  decay 5e-4, cosine, pad-4 crop + flip); ``--replace interval=2`` replaces 4 of its 15 blocks;
- ``vit``: ``vit_tiny_patch16_224`` at 28×28 with 4×4 patches (49 tokens, 12 blocks), AdamW lr 1e-3,
  weight decay 0.05 (SGD at lr 0.1 does not train a ViT); ``interval=2`` replaces 5 of its 12 blocks.

Every row runs with seeds 0, 1 and 2 (``--seeds``): one seed's test top-1 on 1 000 images moves
by about a point, more than the ±0.3 the claim is about. Rows per model: end to end; ``--replace`` with ``neighbour_grad`` true and false; ``--aux dgl``
and ``--aux mlaan`` at K=4, without and with ``--replace`` (``neighbour_grad`` false, the default
the first rows chose). Columns:
test top-1, the final epoch's training loss of the model's own output (less noisy than top-1 on
1 000 images), trainable parameters (backbone), step time (images/s of training) and the step's
peak (fake tensors: a CPU step, as accuracy.py), each against the model's end-to-end row on the
same device.

    python benchmarks/replace.py                 # train what is missing (resumable), print the table
    python benchmarks/replace.py --jobs 2        # two runs side by side, one thread each
    python benchmarks/replace.py --table         # the table from the results only
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    ("dgl", "dgl", 4, []),
    ("dgl+replace", "dgl", 4, ["convert.replace.interval=2", "convert.replace.neighbour_grad=false"]),
    ("mlaan", "mlaan", 4, []),
    ("mlaan+replace", "mlaan", 4, ["convert.replace.interval=2", "convert.replace.neighbour_grad=false"]),
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


def key_of(args, model: str, row: str, seed: int) -> str:
    aux, k = next((r[1], r[2]) for r in ROWS if r[0] == row)
    return accuracy.run_key(f"{args.protocol}-replace-{model}", aux, k, seed, row, None)


def train_missing(args) -> None:
    done = {r["key"] for r in read_rows(args.results)}
    todo = [(m, r[0], seed) for seed in args.seeds for m in args.models for r in ROWS
            if r[0] in args.rows and key_of(args, m, r[0], seed) not in done]
    if args.jobs <= 1:
        for model, row, seed in todo:
            aux, k = next((r[1], r[2]) for r in ROWS if r[0] == row)
            print(f"training {key_of(args, model, row, seed)}", flush=True)
            append_rows(args.results, [accuracy.train_one(run_args(args, model, row), aux, k, seed)])
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs)  # each its share: OpenMP spin-waits otherwise
    running: list[subprocess.Popen] = []
    passed = [a for a in sys.argv[1:] if a not in ("--table",)]
    for model, row, seed in todo:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(1)
        cmd = [sys.executable, __file__, *passed, "--jobs", "1", "--models", model, "--rows", row,
               "--seeds", str(seed), "--no-table"]
        running.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
    for p in running:
        p.wait()


def mean_of(runs: list[dict], field: str) -> float:
    return statistics.mean(r[field] for r in runs)


def print_table(args) -> None:
    by_key = {r["key"]: r for r in read_rows(args.results)}

    def runs(model: str, row: str) -> list[dict]:
        return [by_key[key] for seed in args.seeds if (key := key_of(args, model, row, seed)) in by_key]

    flags = f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else ""
    flags += f" --models {' '.join(args.models)}" if args.models != list(MODELS) else ""
    flags += f" --rows {' '.join(args.rows)}" if args.rows != [r[0] for r in ROWS] else ""
    print(f"`python benchmarks/replace.py{flags} --table` — {args.protocol} protocol, Fashion-MNIST, test top-1 "
          "(mean ± sd over the seeds); each ratio against the model's end-to-end row on the same device\n")
    print("| model | method | K | test top-1 (%) | Δ vs e2e | final train loss | trainable params (backbone) | × e2e "
          "| step time × e2e | step peak × e2e | seeds | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    claims = []
    for model in args.models:
        e2e = runs(model, "e2e")
        for name, aux, k, _ in ROWS:
            got = runs(model, name) if name in args.rows else []
            if not got:
                continue
            accs = [100 * r["test_top1"] for r in got]
            acc = f"{statistics.mean(accs):.2f}" + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
            same = bool(e2e) and {r["device"] for r in e2e} == {r["device"] for r in got}
            params = got[0]["backbone_trainable_params"]
            delta = f"{statistics.mean(accs) - 100 * mean_of(e2e, 'test_top1'):+.2f}" if e2e else "-"
            params_x = f"{params / e2e[0]['backbone_trainable_params']:.3f}" if e2e else "-"
            time_x = f"{mean_of(e2e, 'images_per_s') / mean_of(got, 'images_per_s'):.2f}" if same else "-"
            peak_x = f"{mean_of(got, 'step_peak_mib') / mean_of(e2e, 'step_peak_mib'):.3f}" if e2e else "-"
            loss = statistics.mean(r["train_loss"][-1] for r in got)  # the model's own (last block's) loss
            print(f"| {model} | {name} | {k} | {acc} | {delta} | {loss:.3f} | {params:,} | {params_x} | {time_x} | {peak_x} | "
                  f"{len(got)} | {got[0]['device']} |")
            if e2e and k == 1 and name != "e2e":
                claims.append(claim_line(model, name, got, e2e))
    if claims:
        print("\nThe papers' claim (`--replace` alone: end-to-end accuracy ±0.3 point with fewer trainable parameters, "
              "less step time and a lower peak):\n")
        print("\n".join(claims))


def claim_line(model: str, name: str, got: list[dict], e2e: list[dict]) -> str:
    gap = 100 * (mean_of(got, "test_top1") - mean_of(e2e, "test_top1"))
    params, e2e_params = got[0]["backbone_trainable_params"], e2e[0]["backbone_trainable_params"]
    speed = mean_of(e2e, "images_per_s") / mean_of(got, "images_per_s")
    peak = mean_of(got, "step_peak_mib") / mean_of(e2e, "step_peak_mib")
    parts = [
        ("accuracy", gap >= -0.3, f"{gap:+.2f} points"),
        ("trainable parameters", params < e2e_params, f"{params / e2e_params:.3f}×"),
        ("step time", speed < 1, f"{speed:.2f}×"),
        ("peak", peak < 1, f"{peak:.3f}×"),
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
