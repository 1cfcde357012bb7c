"""Step time against step FLOPs, both relative to end-to-end training: the overhead factor.

For each aux method and K, one local training step (``LocalModel.train_step`` with one
SGD-momentum optimizer per block, as ``fxlocal train`` runs it) is timed against an end-to-end
step of the same model, and its FLOPs (``fxlocal.memory.step_flops``: FlopCounterMode over one
step on fake tensors, aux heads, cascades and recomputation included) are counted against the
end-to-end step's. The *overhead factor* is time × end-to-end / FLOPs × end-to-end: 1.0 when a
local step costs exactly what its extra arithmetic costs. On a torchvision ResNet-101 the
papers' hand-written K=4 split with DGL heads runs beside them. Steps alternate between all
rows, each round starting one further on; the median is reported. Rows are appended to
``--record`` with the commit, versions and device.

    python benchmarks/overhead.py --batch 16 --steps 6 --device cpu                 # ResNet-101, K=4 and 16
    python benchmarks/overhead.py --model resnet32_cifar --input-size 3 32 32 --batch 128 --device cpu
    python benchmarks/overhead.py --batch 64 --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from memory import hand_split
from record import ROOT, append_rows, provenance
from speed import HandSplit
from torch import nn

import fxlocal
from fxlocal.graph.cost import MemoryModel
from fxlocal.memory import step_flops
from fxlocal.training.runtime import compile_blocks


def _end_to_end_stepper(model: nn.Module, x, y, autocast):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _local_stepper(local: fxlocal.LocalModel, x, y, autocast):
    opts = [torch.optim.SGD(list(local.block_parameters(b)), lr=0.01, momentum=0.9) for b in range(local.k)]

    def step():
        with autocast():
            local.train_step(x, y, opts, as_tensors=True)

    return step


def _hand_stepper(hand: HandSplit, x, y, autocast):
    opt = torch.optim.SGD(hand.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast():
            hand.train_step(x, y, opt)

    return step


@contextlib.contextmanager
def timing_turn(gate: str | None):
    """With a gate folder, wait until its file ``open`` exists, then hold its ``lock`` while
    timing: runs started in parallel (their untimed preparation overlapping other work) take
    turns, and none is timed while anything else runs."""
    if not gate:
        yield
        return
    folder = Path(gate)
    while not (folder / "open").exists():
        time.sleep(1)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def time_steps(runs: dict, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step of each run, alternating, each round starting one further on."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in range(warmup + steps):
        for name in names[step % len(names):] + names[: step % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runs[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet101")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, nargs="+", default=[4, 16])
    p.add_argument("--aux", nargs="+", default=["dgl", "auglocal", "mlaan", "man"])
    p.add_argument("--balance", default="flops", help="how the blocks are balanced (the memory DP at K=16 is slow)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast every step (fp32 weights)")
    p.add_argument("--channels-last", action="store_true", help="models and batch in channels_last memory format")
    p.add_argument("--compile", default="", help="torch.compile backend for every block and head (and the end-to-end model), e.g. inductor")
    p.add_argument("--timing-gate", help="a folder: time only once its file 'open' exists, holding its 'lock' (see timing_turn)")
    p.add_argument("--record", default=str(ROOT / "benchmarks/results/overhead.jsonl"), help="JSON-lines file the rows are appended to ('' for none)")
    args = p.parse_args(argv)
    size, device = tuple(args.input_size), torch.device(args.device)
    torch.manual_seed(0)
    original = fxlocal.create_model(args.model, None, size)
    classes = original(torch.zeros(2, *size)).shape[-1]
    analyzed = fxlocal.analyze_model(original, size)
    priced = MemoryModel(batch=args.batch)

    def autocast():
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, *size, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (args.batch,), device=device)

    def placed(module: nn.Module) -> nn.Module:
        module = module.to(device=device, memory_format=fmt)
        if args.compile:  # in place, as fxlocal train's compile option does
            if isinstance(module, fxlocal.LocalModel):
                compile_blocks(module, args.compile)
            elif isinstance(module, HandSplit):  # its step calls the blocks, not the module
                for part in [*module.blocks, *module.heads]:
                    part.compile(backend=args.compile)
            else:
                module.compile(backend=args.compile)
        return module

    # label -> (K, aux, cuts, flops, stepper)
    rows: dict[str, tuple] = {}
    e2e_model = fxlocal.create_model(args.model, None, size)
    e2e_flops = step_flops(e2e_model, args.batch, size, classes)
    rows["end-to-end"] = (1, "-", "-", e2e_flops, _end_to_end_stepper(placed(e2e_model), x, y, autocast))
    if args.model == "torchvision:resnet101" and size == (3, 224, 224) and 4 in args.k:
        model = fxlocal.create_model(args.model, None, size)
        local = hand_split(model, size)
        flops = step_flops(local, args.batch, size, classes, per_block=True)
        hand = placed(HandSplit(model, local.heads))
        rows["hand-written split"] = (4, "dgl", ", ".join(b.module_paths[-1] for b in local.plan.blocks[:-1]), flops,
                                      _hand_stepper(hand, x, y, autocast))
    for k in args.k:
        for aux in args.aux:
            local = fxlocal.convert(analyzed, k=k, aux=aux, balance=args.balance, memory=priced)
            flops = step_flops(local, args.batch, size, classes, per_block=True)
            cuts = ", ".join(b.module_paths[-1] for b in local.plan.blocks[:-1])
            rows[f"{aux}, K={local.k}"] = (local.k, aux, cuts, flops, _local_stepper(placed(local), x, y, autocast))
    with timing_turn(args.timing_gate):
        times = time_steps({name: row[-1] for name, row in rows.items()}, args.steps, args.warmup, device)

    e2e_s = statistics.median(times["end-to-end"])
    cmd = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    origin = provenance(device)
    print(f"`{cmd.strip()}` — {args.model}, batch {args.batch}, {size}, balance {args.balance}, SGD momentum, "
          f"{'bf16 autocast' if args.amp == 'bf16' else 'fp32'}{', channels_last' if args.channels_last else ''}"
          f"{f', compiled ({args.compile})' if args.compile else ''}, "
          f"{origin['device']}, torch {origin['torch']}, commit {origin['commit']}\n")
    print("| configuration | K | median step (s) | time × end-to-end | FLOPs × end-to-end | overhead factor |")
    print("|---|---|---|---|---|---|")
    records = []
    for name, (k, aux, cuts, flops, _) in rows.items():
        took = statistics.median(times[name])
        time_x, flops_x = took / e2e_s, flops / e2e_flops
        print(f"| {name} | {k} | {took:.4f} | {time_x:.3f} | {flops_x:.3f} | {time_x / flops_x:.3f} |")
        records.append({**origin, "benchmark": "overhead", "model": args.model, "input_size": list(size), "batch": args.batch,
                        "balance": args.balance, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "configuration": name,
                        "k": k, "aux": aux, "cuts": cuts, "median_step_s": took, "steps": len(times[name]),
                        "time_x_e2e": time_x, "flops": flops, "flops_x_e2e": flops_x, "overhead_factor": time_x / flops_x})
    if args.record:
        append_rows(args.record, records)


if __name__ == "__main__":
    main()
