"""Pipeline efficiency: K processes with one thread each vs sequential local learning on one thread.

Both train the same converted model on the same batches (the same recipe, seed and data
order; the pipeline computes the same updates, see tests/training/test_pipeline.py): sequentially with
``fxlocal train`` in one single-threaded process, and pipelined with ``torchrun
--nproc-per-node K ... --pipeline`` (torchrun gives each process one thread). Throughput is the
``images_per_s`` of the training loop (``metrics.jsonl``; evaluation excluded), the median over
the epochs after the first (warm-up); efficiency = speed-up / K. The batch sizes are a column:
on a CPU, whether a stage's tensors stay in its core's cache decides whether K stages share the
memory bus or not.

    python benchmarks/pipeline.py                               # resnet32_cifar, K=2, CPU, batch 16, 32, 64
    python benchmarks/pipeline.py --k 2 4 --balance flops memory --device cuda   # K processes sharing one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(model: str, k: int, balance: str, batch: int, epochs: int, device: str, out: Path) -> dict:
    return {
        "model": {"name": model},
        "convert": {"k": k, "aux": "dgl", "balance": balance},
        "data": {"dataset": "fashion_mnist_mini", "input_size": [1, 28, 28], "augment": "none"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "scheduler": {"name": "none"},
        "epochs": epochs,
        "eval_interval": epochs,
        "batch_size": batch,
        "device": device,
        "seed": 0,
        "workers": 0,
        "output_dir": str(out),
    }


def images_per_s(data: dict, folder: Path, pipeline: bool) -> float:
    folder.mkdir(parents=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(folder / "run")}))
    train = ["-m", "fxlocal.cli", "train", str(path)]
    if pipeline:
        k = data["convert"]["k"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k), *train, "--pipeline"]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    epochs = [json.loads(line) for line in (folder / "run/metrics.jsonl").read_text().splitlines()]
    # the first epoch warms up (allocator, gloo connections); the median of the rest
    return statistics.median(e["images_per_s"] for e in epochs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet32_cifar"])
    parser.add_argument("--k", nargs="+", type=int, default=[2])
    parser.add_argument("--balance", nargs="+", default=["flops", "time"], choices=["flops", "time", "memory", "activations", "params"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    print(f"`python benchmarks/pipeline.py {' '.join(sys.argv[1:])}`".replace("  ", " "))
    print(f"(Fashion-MNIST 4000 images 28×28, DGL heads, median of epochs 2 to {args.epochs}, device {args.device})\n")
    print("| model | K | balance | batch | sequential img/s | pipeline img/s | speed-up | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for k in args.k:
                for balance in args.balance:
                    for batch in args.batch:
                        data = recipe(model, k, balance, batch, args.epochs, args.device, Path(tmp))
                        tag = Path(tmp) / f"{model}-{k}-{balance}-{batch}"
                        sequential = images_per_s(data, tag / "sequential", pipeline=False)
                        pipelined = images_per_s(data, tag / "pipeline", pipeline=True)
                        speedup = pipelined / sequential
                        print(f"| {model} | {k} | {balance} | {batch} | {sequential:.0f} | {pipelined:.0f} | "
                              f"{speedup:.2f}× | {speedup / k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
