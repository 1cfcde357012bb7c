"""Train-step time: fxlocal's DGL conversion vs the same split written by hand, same weights.

Both run torchvision ResNet-101 cut after layer2.2, layer3.8 and layer3.16 (the papers' split)
with the same DGL heads and the same optimizer; the hand-written version is plain
``nn.Sequential`` blocks and an eager loop, fxlocal's is the traced, split GraphModules and
``LocalModel.train_step``. Beside them, fxlocal's memory-balanced DGL conversion (the memory
benchmark's, at batch 64), stored and with its blocks recomputed (``--backbone-recompute``): what
the memory targets cost in time. Steps alternate between all, each round starting one further on;
the median is reported.

    python benchmarks/speed.py --batch 64 --steps 10          # the issue's setting (GPU)
    python benchmarks/speed.py --batch 8 --steps 5 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision
from memory import HAND_SPLIT, hand_split
from torch import nn

import fxlocal


class HandSplit(nn.Module):
    """The papers' hand-written K=4 ResNet-101 split, sharing modules with ``local``."""

    def __init__(self, model: torchvision.models.ResNet, heads: nn.ModuleList):
        super().__init__()
        m = model
        self.blocks = nn.ModuleList([
            nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2[:3]),
            nn.Sequential(m.layer2[3:], m.layer3[:9]),
            nn.Sequential(m.layer3[9:17]),
            nn.Sequential(m.layer3[17:], m.layer4, m.avgpool, nn.Flatten(1), m.fc),
        ])
        self.heads = heads

    def train_step(self, x, y, optimizer):
        optimizer.zero_grad(set_to_none=True)
        h = x
        for b, block in enumerate(self.blocks):
            h = block(h.detach() if b else h)
            out = self.heads[b](h) if b < len(self.heads) else h
            nn.functional.cross_entropy(out, y).backward()
        optimizer.step()


def _stepper(local: fxlocal.LocalModel, x: torch.Tensor, y: torch.Tensor):
    """One train step of ``local`` with its own SGD-momentum optimizer."""
    opt = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9)
    return lambda: local.train_step(x, y, opt, as_tensors=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone-recompute", nargs="*", default=["cheap", "all"], choices=("cheap", "all"))
    args = p.parse_args()
    size = (3, args.size, args.size)
    device = torch.device(args.device)
    model = torchvision.models.resnet101()
    local = hand_split(model, size).to(device)
    hand = HandSplit(model, local.heads).to(device)
    params = list(local.parameters())
    assert {id(p) for p in hand.parameters()} == {id(p) for p in params}  # same weights, same heads
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, *size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    runs = {"hand-written": lambda: hand.train_step(x, y, opt), "fxlocal": lambda: local.train_step(x, y, opt, as_tensors=True)}
    analyzed = fxlocal.analyze_model(torchvision.models.resnet101(), size)  # its conversions get their own weights
    for policy in ["none", *args.backbone_recompute]:
        balanced = fxlocal.convert(analyzed, k=4, balance="memory", backbone_recompute=policy).to(device)
        ends = ", ".join(b.module_paths[-1] for b in balanced.plan.blocks[:-1])
        name = f"fxlocal, balance=memory (ends: {ends})" + (f", backbone recompute {policy}" if policy != "none" else "")
        runs[name] = _stepper(balanced, x, y)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in range(args.steps + 1):
        # each round starts one further on, so that none always runs after the same one
        for name in names[step % len(names):] + names[: step % len(names)]:
            run = runs[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - start)
    hand_s = statistics.median(times["hand-written"])
    cmd = f"python benchmarks/speed.py --batch {args.batch} --steps {args.steps} --size {args.size} --device {args.device}"
    if args.backbone_recompute != ["cheap", "all"]:
        cmd += " --backbone-recompute " + " ".join(args.backbone_recompute)
    print(f"`{cmd}` — torchvision resnet101, the hand-written split's cuts after {', '.join(HAND_SPLIT)}, DGL heads, SGD momentum, fp32, "
          f"{torch.get_num_threads()} threads\n")
    print("| implementation | median step (s) | × hand-written |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / hand_s:.3f} |")


if __name__ == "__main__":
    main()
