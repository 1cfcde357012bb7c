"""Peak memory of one training step: end to end, the papers' hand-written split, and fxlocal.

Prints a markdown table. On CPU the peaks are predicted on fake tensors (FakeCopyMode +
MemTracker, identical to a real CPU step), with each block's part of the step (which binds);
with ``--device cuda`` each is also measured with ``torch.cuda.max_memory_allocated`` (less what
was allocated before the model was placed), beside the prediction and its error. MiB = 2^20
bytes.

    python benchmarks/memory.py                         # resnet101, K=4, batch 64, 224², SGD momentum
    python benchmarks/memory.py --model resnet32_cifar --k 16 --batch 128 --input-size 3 32 32 --no-hand-split
    python benchmarks/memory.py --aux infopro infopro+man --backbone-recompute all   # InfoPro, InfoPro*, InfoPro*+MAN
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from record import append_rows, provenance

import fxlocal
from fxlocal.graph.cost import MemoryModel
from fxlocal.memory import (
    OPTIMIZERS,
    block_step_peaks,
    e2e_step,
    local_step,
    step_peak_bytes,
)

# The split the local-learning papers hand-write for torchvision ResNet-101 at K=4.
HAND_SPLIT = ("layer2.2", "layer3.8", "layer3.16")


def hand_split(model, input_size) -> fxlocal.LocalModel:
    """``model`` cut where the papers cut it (:data:`HAND_SPLIT`), with DGL heads."""
    return fxlocal.convert(model, k=len(HAND_SPLIT) + 1, input_size=input_size, cuts=list(HAND_SPLIT))


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet101")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224))
    p.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS))
    p.add_argument("--device", default="fake", choices=("fake", "cuda"))
    p.add_argument("--no-hand-split", action="store_true", help="the model is not a torchvision ResNet-101")
    p.add_argument("--aux", nargs="*", default=["dgl", "auglocal", "mlaan", "man"])
    p.add_argument("--backbone-recompute", nargs="*", default=["cheap", "all"], choices=("cheap", "all"))
    p.add_argument("--record", default="", help="JSON-lines file the rows are appended to (with the commit and versions)")
    args = p.parse_args(argv)
    size = tuple(args.input_size)
    priced = MemoryModel(batch=args.batch, optimizer_states=OPTIMIZERS[args.optimizer][1])
    original = fxlocal.create_model(args.model, None, size)
    classes = original(__import__("torch").zeros(2, *size)).shape[-1]

    def local_peaks(local) -> tuple[float, str]:
        """The step's peak (MiB) on fake tensors and each block's part of it (which binds)."""
        blocks = [b / 2**20 for b in block_step_peaks(local, args.batch, size, classes, args.optimizer)]
        return max(blocks), " / ".join(f"{b:.0f}" for b in blocks)

    def measured(module, per_block: bool) -> float:
        """The step's peak (MiB) measured on CUDA."""
        step = local_step if per_block else e2e_step
        return step_peak_bytes(module, step, args.batch, size, classes, args.optimizer, "cuda", per_block) / 2**20

    cuda = args.device == "cuda"
    cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    origin = provenance(args.device if cuda else "cpu")
    print(f"`{cmd.strip()}` — {args.model}, batch {args.batch}, {size}, {args.optimizer}, fp32, "
          f"{'predicted on fake tensors (CPU)' if not cuda else 'predicted on fake tensors and measured on ' + origin['device']}, "
          f"torch {origin['torch']}, commit {origin['commit']}\n")
    if cuda:
        print("| configuration | K | aux | balance | predicted MiB | measured MiB | error | measured × end-to-end | blocks' predicted peaks MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| configuration | K | aux | balance | peak MiB | × end-to-end | blocks' peaks MiB |")
        print("|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    first: list[float] = []  # end to end: predicted, measured

    def row(name: str, k: int, aux: str, balance: str, module, per_block: bool) -> None:
        """Print a row as soon as it is measured (a run cut short keeps what it printed) and record it."""
        if per_block:
            mib, blocks = local_peaks(module)
        else:
            mib, blocks = step_peak_bytes(module, e2e_step, args.batch, size, classes, args.optimizer) / 2**20, "-"
        real = measured(module, per_block) if cuda else None
        if not first:
            first.extend([mib, real])
        if cuda:
            print(f"| {name} | {k} | {aux} | {balance} | {mib:.1f} | {real:.1f} | {100 * (mib - real) / real:+.1f}% "
                  f"| {real / first[1]:.3f} | {blocks} |", flush=True)
        else:
            print(f"| {name} | {k} | {aux} | {balance} | {mib:.1f} | {mib / first[0]:.3f} | {blocks} |", flush=True)
        if args.record:
            append_rows(args.record, [{
                **origin, "benchmark": "memory", "model": args.model, "input_size": list(size), "batch": args.batch,
                "optimizer": args.optimizer, "configuration": name, "k": k, "aux": aux, "balance": balance,
                "predicted_mib": mib, "blocks_predicted_mib": blocks, "measured_mib": real,
            }])

    row("end-to-end", 1, "-", "-", original, False)
    if not args.no_hand_split:
        local = hand_split(original, size)
        row("hand-written split " + "/".join(HAND_SPLIT), local.k, "dgl", "-", local, True)
    configs = [("dgl", "flops", {}), ("dgl", "activations", {}), ("dgl", "memory", {})]
    # heads that copy no units (InfoPro's): on the paper's compute-balanced cuts and memory-balanced ("InfoPro*")
    copying = [aux for aux in args.aux if fxlocal.get_aux(aux).cuts_at_units]
    configs += [(aux, balance, {}) for aux in args.aux if aux != "dgl" and aux not in copying for balance in ("flops", "memory")]
    # the methods that copy units, as the reference runs them and with the copies recomputed
    configs += [(aux, "memory", options) for options in ({}, {"recompute": True}) for aux in copying]
    # the blocks recomputed unit by unit too (MLAAN backpropagates blocks twice: "all" only)
    for policy in args.backbone_recompute:
        configs += [
            (aux, "memory", {**({"recompute": True} if aux in copying else {}), "backbone_recompute": policy})
            for aux in args.aux
            if not (policy == "cheap" and fxlocal.get_aux(aux).backpropagates_blocks_twice)
        ]
    analyzed = fxlocal.analyze_model(original, size)
    for aux, balance, options in configs:
        local = fxlocal.convert(analyzed, k=args.k, aux=aux, balance=balance, memory=priced, **options)
        cuts = ", ".join(b.module_paths[-1] for b in local.plan.blocks[:-1])
        label = aux + "".join(f", {key}" if value is True else f", {key.replace('_', ' ')} {value}" for key, value in options.items())
        row(f"fxlocal (ends: {cuts})", local.k, label, balance, local, True)
    print(f"\n{time.perf_counter() - started:.0f} s")

if __name__ == "__main__":
    main()
