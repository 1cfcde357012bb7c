"""What recomputing in backward buys and costs: the step's peak and time, kept vs recomputed.

``--what heads`` (default): for each method that copies units (AugLocal, MLAAN, MAN), the
memory-balanced conversion as the reference runs it and with its copies recomputed
(``recompute=True``). ``--what backbone``: for each method, the blocks themselves stored and
recomputed unit by unit (``backbone_recompute`` "cheap" and "all"; the unit-copying heads
recomputed throughout, MLAAN without "cheap", which it cannot run). Each conversion is
memory-balanced with its recompute priced; the step's peak is predicted on fake tensors
(``--device cuda``: measured) and steps alternate between the variants for the median time.

    python benchmarks/recompute.py                                   # resnet101, batch 64 (GPU)
    python benchmarks/recompute.py --time-batch 8 --steps 4 --device cpu  # peaks at 64, steps timed at 8
    python benchmarks/recompute.py --what backbone --aux dgl mlaan --time-batch 8 --steps 4 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import torch
from overhead import time_steps, timing_turn

import fxlocal
from fxlocal.graph.cost import MemoryModel
from fxlocal.memory import local_step, step_peak_bytes


def variants(what: str, aux: str) -> list[tuple[str, dict]]:
    """(label, convert options) to compare for ``aux``, the first the baseline."""
    if what == "heads":
        return [("stored", {}), ("recomputed", {"recompute": True})]
    heads = {} if aux == "dgl" else {"recompute": True}
    policies = ["none", "all"] if fxlocal.get_aux(aux).backpropagates_blocks_twice else ["none", "cheap", "all"]
    return [(policy, {**heads, "backbone_recompute": policy}) for policy in policies]


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet101")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="the batch the cuts are balanced and the peaks taken at")
    p.add_argument("--time-batch", type=int, help="the batch the steps are timed at (default: --batch)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--what", default="heads", choices=("heads", "backbone"))
    p.add_argument("--aux", nargs="*")
    p.add_argument("--timing-gate", help="a folder: time only once its file 'open' exists, holding its 'lock' (overhead.timing_turn)")
    args = p.parse_args(argv)
    size, device = tuple(args.input_size), torch.device(args.device)
    original = fxlocal.create_model(args.model, None, size)
    classes = original(torch.zeros(2, *size)).shape[-1]
    time_batch = args.time_batch or args.batch
    x = torch.randn(time_batch, *size, device=device)
    y = torch.randint(0, classes, (time_batch,), device=device)
    priced, measured = MemoryModel(batch=args.batch), "cuda" if device.type == "cuda" else "fake"
    analyzed = fxlocal.analyze_model(original, size)
    default_aux = ["auglocal", "mlaan", "man"] if args.what == "heads" else ["dgl", "auglocal", "mlaan", "man"]
    prepared = []  # (aux, labels, models, peaks, steps): every conversion and peak first, then the timed steps
    for aux in args.aux or default_aux:
        labels, options = zip(*variants(args.what, aux))
        models = [fxlocal.convert(analyzed, k=args.k, aux=aux, balance="memory", memory=priced, **o) for o in options]
        peaks = [step_peak_bytes(m, local_step, args.batch, size, classes, "sgd", measured, per_block=True) / 2**20 for m in models]
        models = [m.to(device) for m in models]
        opts = [[torch.optim.SGD(list(m.block_parameters(b)), lr=0.01, momentum=0.9) for b in range(m.k)] for m in models]
        steps = {label: (lambda m=m, opt=opt: m.train_step(x, y, opt, as_tensors=True)) for label, m, opt in zip(labels, models, opts)}
        prepared.append((aux, labels, models, peaks, steps))
    rows = []
    with timing_turn(args.timing_gate):
        for aux, labels, models, peaks, steps in prepared:
            # the variants of one method alternate (the first step of each warms up)
            times = time_steps(steps, args.steps, 1, device)
            base = statistics.median(times[labels[0]])
            for label, local, peak in zip(labels, models, peaks):
                took = statistics.median(times[label])
                cuts = ", ".join(b.module_paths[-1] for b in local.plan.blocks[:-1])
                rows.append((aux, label, cuts, peak, peak / peaks[0], took, took / base))
    cmd = "python benchmarks/recompute.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}` — {args.model}, K={args.k}, {size}, SGD momentum, fp32, peaks at batch {args.batch} "
          + ("measured on CUDA" if device.type == "cuda" else "predicted on fake tensors")
          + f", steps timed at batch {time_batch}"
          + ("" if device.type == "cuda" else f" on CPU ({torch.get_num_threads()} threads)")
          + "\n")
    kind = "copies" if args.what == "heads" else "backbone recompute"
    first = variants(args.what, "dgl")[0][0]
    print(f"| aux | {kind} | ends | peak MiB | × {first} | median step (s) | × {first} |")
    print("|---|---|---|---|---|---|---|")
    for aux, label, cuts, peak, peak_x, took, took_x in rows:
        print(f"| {aux} | {label} | {cuts} | {peak:.1f} | {peak_x:.3f} | {took:.3f} | {took_x:.3f} |")


if __name__ == "__main__":
    main()
