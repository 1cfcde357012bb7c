"""Where a training step's time goes: the share spent in the ops FlopCounterMode counts
(convolutions and matrix products, forward and backward) against everything else (norms,
activations, pools, elementwise), per configuration, from torch.profiler over one step after
two warm-up steps. It explains an overhead factor (``benchmarks/overhead.py``) above 1: a step
whose uncounted ops take a larger share than end to end's costs more time per counted FLOP.

``OMP_NUM_THREADS=1 python benchmarks/op_share.py`` (resnet32_cifar, batch 128, 32²).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import ROOT, append_rows, provenance  # noqa: E402

import fxlocal  # noqa: E402

COUNTED = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::convolution_overrideable",
           "aten::cudnn_convolution", "aten::addmm", "aten::mm", "aten::bmm")


def step_profile(step) -> tuple[float, float]:
    """(seconds of one step as the profiler saw it, share of it in counted ops)."""
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    counted = sum(e.self_cpu_time_total for e in events if e.key in COUNTED)
    return total / 1e6, counted / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32_cifar")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 32, 32))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rows", nargs="+", default=["dgl:4", "mlaan:4", "man:4", "dgl:16", "mlaan:16", "man:16"])
    p.add_argument("--record", default=str(ROOT / "benchmarks/results/op_share.jsonl"))
    args = p.parse_args()
    size = tuple(args.input_size)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, *size), torch.randint(0, 10, (args.batch,))
    model = fxlocal.create_model(args.model, 10, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def e2e():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    seconds, share = step_profile(e2e)
    rows = [{"configuration": "end-to-end", "k": 1, "step_s": seconds, "counted_share": share}]
    for spec in args.rows:
        aux, k = spec.split(":")
        local = fxlocal.convert(args.model, k=int(k), aux=aux, input_size=size, num_classes=10)
        opts = [torch.optim.SGD(list(local.block_parameters(b)), lr=0.01, momentum=0.9) for b in range(local.k)]
        seconds, share = step_profile(lambda: local.train_step(x, y, opts))
        rows.append({"configuration": aux, "k": int(k), "step_s": seconds, "counted_share": share})
    base = rows[0]["counted_share"]
    print(f"`{' '.join(['python benchmarks/op_share.py', *sys.argv[1:]])}` — {args.model}, batch {args.batch}, "
          f"{size}, {torch.get_num_threads()} thread(s)\n")
    print("| configuration | K | step (s, profiled) | counted ops' share | end to end's share / this share |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['configuration']} | {r['k']} | {r['step_s']:.3f} | {r['counted_share']:.3f} | {base / r['counted_share']:.3f} |")
    if args.record:
        meta = provenance("cpu") | {"benchmark": "op_share", "model": args.model, "batch": args.batch, "threads": torch.get_num_threads()}
        append_rows(args.record, [meta | r for r in rows])


if __name__ == "__main__":
    main()
