"""What ``recompute=True`` buys and costs: the unit-copying aux heads kept or recomputed.

For each method that copies units (AugLocal, MLAAN, MAN), the memory-balanced conversion as the
reference runs it and the one with the copies recomputed in backward (balanced with its heads
priced so): the step's peak predicted on fake tensors (``--device cuda``: measured) and the
median train-step time, steps alternating between the two.

    python benchmarks/recompute.py                                   # resnet101, batch 64 (GPU)
    python benchmarks/recompute.py --time-batch 8 --steps 4 --device cpu  # peaks at 64, steps timed at 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import fxlocal
from fxlocal.cost import MemoryModel
from fxlocal.memory import _local_step, step_peak_bytes


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
    p.add_argument("--aux", nargs="*", default=["auglocal", "mlaan", "man"])
    args = p.parse_args(argv)
    size, device = tuple(args.input_size), torch.device(args.device)
    original = fxlocal.create_model(args.model, None, size)
    classes = original(torch.zeros(2, *size)).shape[-1]
    time_batch = args.time_batch or args.batch
    x = torch.randn(time_batch, *size, device=device)
    y = torch.randint(0, classes, (time_batch,), device=device)
    priced, measured = MemoryModel(batch=args.batch), "cuda" if device.type == "cuda" else "fake"
    rows = []
    for aux in args.aux:
        models = [
            fxlocal.convert(original, k=args.k, aux=aux, input_size=size, balance="memory", memory=priced, recompute=r)
            for r in (False, True)
        ]
        peaks = [step_peak_bytes(m, _local_step, args.batch, size, classes, "sgd", measured, per_block=True) / 2**20 for m in models]
        models = [m.to(device) for m in models]
        opts = [[torch.optim.SGD(list(m.block_parameters(b)), lr=0.01, momentum=0.9) for b in range(m.k)] for m in models]
        times = [[], []]
        for step in range(args.steps + 1):
            for i, (m, opt) in enumerate(zip(models, opts)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                m.train_step(x, y, opt, as_tensors=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:  # the first step warms up
                    times[i].append(time.perf_counter() - start)
        for heads, local, peak, took in zip(("stored", "recomputed"), models, peaks, times):
            cuts = ", ".join(b.module_paths[-1] for b in local.plan.blocks[:-1])
            rows.append((aux, heads, cuts, peak, peak / peaks[0], statistics.median(took), statistics.median(took) / statistics.median(times[0])))
    cmd = "python benchmarks/recompute.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}` — {args.model}, K={args.k}, {size}, SGD momentum, fp32, peaks at batch {args.batch} "
          + ("measured on CUDA" if device.type == "cuda" else "predicted on fake tensors")
          + f", steps timed at batch {time_batch}"
          + ("" if device.type == "cuda" else f" on CPU ({torch.get_num_threads()} threads)")
          + "\n")
    print("| aux | copies | ends | peak MiB | × stored | median step (s) | × stored |")
    print("|---|---|---|---|---|---|---|")
    for aux, heads, cuts, peak, peak_x, took, took_x in rows:
        print(f"| {aux} | {heads} | {cuts} | {peak:.1f} | {peak_x:.3f} | {took:.3f} | {took_x:.3f} |")


if __name__ == "__main__":
    main()
