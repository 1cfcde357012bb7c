"""A training step's real peak on the CPU beside fxlocal's fake-tensor prediction.

Each configuration runs in its own process: build the model (and convert it), predict its step
peak on fake tensors, reset the kernel's high-water mark (``/proc/self/clear_refs``), take the
resident size, run two training steps (SGD momentum, one optimizer per block as ``fxlocal
train`` does), read the high-water mark again. The measured peak is the high-water mark minus
the resident size before the steps plus the model's parameters (which were resident already):
what the step added on top of everything else the process holds, plus the weights, which is
what the prediction counts.

``OMP_NUM_THREADS=1 python benchmarks/cpu_peak.py`` (torchvision ResNet-101, batch 64, 224²);
``--channels-last`` runs model and batch in that layout; ``--keep-freed-memory`` keeps freed
memory for reuse, as ``fxlocal train`` does by default (``keep_freed_memory``); otherwise glibc
runs as it is, and ``MALLOC_MMAP_THRESHOLD_=BYTES`` in the environment fixes its mmap threshold
(both are recorded with the rows).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import ROOT, append_rows, provenance  # noqa: E402

import fxlocal  # noqa: E402
from fxlocal.graph.cost import MemoryModel  # noqa: E402
from fxlocal.memory import e2e_step, local_step, make_step_optimizers, predict_memory  # noqa: E402
from fxlocal.training.runtime import keep_freed_memory  # noqa: E402

MIB = 2**20
# glibc reads it at start: a fixed threshold stops freed blocks below it staying resident
THRESHOLD = os.environ.get("MALLOC_MMAP_THRESHOLD_")


def _status(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(config: str, model_name: str, size: tuple[int, ...], batch: int, k: int, channels_last: bool = False) -> dict:
    """Predict and measure one configuration (``e2e`` or ``AUX:BALANCE``) in this process."""
    torch.manual_seed(0)
    original = fxlocal.create_model(model_name, 10, size)
    if config == "e2e":
        module, step = original, e2e_step
        local = fxlocal.convert(original, k=1, aux="none", input_size=size, num_classes=10)
        predicted = predict_memory(original, local, batch, "sgd").e2e_peak_mib
    else:
        aux, balance = config.split(":")
        local = fxlocal.convert(model_name, k=k, aux=aux, balance=balance, input_size=size, num_classes=10,
                                memory=MemoryModel(batch=batch, per_block=True))
        module, step = local, local_step
        predicted = predict_memory(fxlocal.create_model(model_name, 10, size), local, batch, "sgd").local_peak_mib
        del original
    if channels_last:  # oneDNN then runs in the tensors' own layout: no reordered copies
        module.to(memory_format=torch.channels_last)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    before = _status("VmRSS")
    optimizer = make_step_optimizers(module, "sgd", per_block=config != "e2e")
    x, y = torch.randn(batch, *size), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for _ in range(2):
        step(module, optimizer, x, y)
    measured = (_status("VmHWM") - before + params) / MIB
    return {"configuration": config, "k": 1 if config == "e2e" else local.k, "predicted_mib": predicted,
            "measured_mib": measured, "params_mib": params / MIB, "rss_before_mib": before / MIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="torchvision:resnet101")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=["e2e", "dgl:memory", "mlaan:memory"])
    p.add_argument("--channels-last", action="store_true", help="model and batch in channels_last memory format")
    p.add_argument("--keep-freed-memory", action="store_true", help="as fxlocal train runs by default")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--record", default=str(ROOT / "benchmarks/results/cpu_peak.jsonl"))
    args = p.parse_args()
    size = tuple(args.input_size)
    if args.one:
        if args.keep_freed_memory:
            keep_freed_memory()
        print(json.dumps(one(args.one, args.model, size, args.batch, args.k, args.channels_last)))
        return
    allocator = ("freed memory kept" if args.keep_freed_memory
                 else f"MALLOC_MMAP_THRESHOLD_={THRESHOLD or 'unset (glibc: dynamic)'}")
    print(f"`{' '.join(['python benchmarks/cpu_peak.py', *sys.argv[1:]])}` — {args.model}, batch {args.batch}, "
          f"{size}, K={args.k}, SGD momentum, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{torch.get_num_threads()} thread(s), "
          f"{allocator}\n")
    print("| configuration | K | predicted MiB | measured MiB | error | measured × e2e |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = []
    for config in args.configs:
        argv = [sys.executable, __file__, "--one", config, "--model", args.model, "--input-size", *map(str, size),
                "--batch", str(args.batch), "--k", str(args.k), *(["--channels-last"] if args.channels_last else []),
                *(["--keep-freed-memory"] if args.keep_freed_memory else [])]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        e2e = rows[0]["measured_mib"]
        error = (row["predicted_mib"] - row["measured_mib"]) / row["measured_mib"]
        print(f"| {config} | {row['k']} | {row['predicted_mib']:.0f} | {row['measured_mib']:.0f} | {100 * error:+.1f}% "
              f"| {row['measured_mib'] / e2e:.3f} |", flush=True)
        if args.record:
            meta = provenance("cpu") | {"benchmark": "cpu_peak", "model": args.model, "batch": args.batch,
                                        "input_size": list(size), "threads": torch.get_num_threads(),
                                        "channels_last": args.channels_last, "malloc_mmap_threshold": THRESHOLD,
                                        "keep_freed_memory": args.keep_freed_memory}
            append_rows(args.record, [meta | row])


if __name__ == "__main__":
    main()
