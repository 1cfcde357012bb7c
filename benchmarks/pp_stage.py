"""One stage of traditional pipeline parallelism (PP) of the end-to-end model, for
``benchmarks/pipeline.py``: run under ``torchrun --nproc-per-node K`` (one thread per process).

The model is cut where PPLL cuts it (``--plan``, the plan PPLL's runs share; its K stages),
and stage ``r`` is block ``r`` without its aux head and without the detach: the end-to-end model, trained by ``torch.distributed.pipelining``'s GPipe or
1F1B schedule on ``--microbatches`` micro-batches of ``--batch`` images per step, cross-entropy
on the last stage, one optimizer step per stage and step (as the end-to-end model's), with PPLL's
optimizer (fxlocal's, from the same recipe section: timm's Nesterov SGD, ``--fused`` as
``optimizer.fused``), and fxlocal train's host memory (freed memory kept for reuse). Stage 0 reads
the data (``--dataset``, in its own process, as PPLL's recipe reads it) and sends the labels to
the last stage. The last rank
prints one JSON line: images/s over the timed steps (after ``--warmup``) and each stage's peak
resident memory.

    fxlocal convert resnet32_cifar --k 2 --balance time --input-size 1 28 28 --save-plan plan.json
    torchrun --standalone --nproc-per-node 2 benchmarks/pp_stage.py --model resnet32_cifar --plan plan.json --batch 16
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist
from pipeline import FUSED, optimizer_section
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import fxlocal
from fxlocal.graph.plan import Plan
from fxlocal.training.optim import make_optimizer
from fxlocal.training.recipe import load_recipe
from fxlocal.training.runtime import keep_freed_memory

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageModule(nn.Module):
    """A block as a pipeline stage: its tensors in, its tensors out (a single one bare)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *inputs):
        out = self.block(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(v, torch.Tensor) for v in out):
            raise SystemExit("pp_stage.py: this cut carries plain values, which a pipelining stage cannot send")
        return out[0] if len(out) == 1 else out


def _batches(dataset: str, size: tuple, batch: int):
    """Shuffled batches of ``dataset`` at ``size``, read in this process as PPLL's stage 0 reads
    them (``workers: 0``), over and over."""
    from fxlocal.training.data import build_dataset

    data = build_dataset(dataset, None, True, size)
    while True:
        yield from torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32_cifar")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="the model constructor's kwargs, as JSON")
    p.add_argument("--input-size", type=int, nargs=3, default=(1, 28, 28))
    p.add_argument("--batch", type=int, default=16, help="images per micro-batch")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="gpipe")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fused", choices=sorted(FUSED), default="auto", help="optimizer.fused, as PPLL's recipe sets it")
    p.add_argument("--dataset", default="fashion_mnist_mini", help="read by stage 0, as PPLL's recipe reads it")
    p.add_argument("--plan", required=True, help="the saved plan (JSON) PPLL cuts by (fxlocal convert --save-plan)")
    args = p.parse_args()

    torch.set_num_threads(1)
    keep_freed_memory()  # as fxlocal train does by default (recipe field keep_freed_memory)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = tuple(args.input_size)
    torch.manual_seed(0)
    plan = Plan.load(args.plan)
    if plan.k != world:
        raise SystemExit(f"pp_stage.py: {args.plan} has {plan.k} blocks; run it with torchrun --nproc-per-node {plan.k}")
    local = fxlocal.convert(args.model, aux="dgl", input_size=size, num_classes=10, model_kwargs=args.model_kwargs, plan=plan)
    stage_module = StageModule(local.blocks[rank])
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=nn.functional.cross_entropy)
    # benchmarks/pipeline.py's recipe section, so that PP and PPLL step the same optimizer
    same_as_ppll = load_recipe(data={"model": {"name": args.model}, "optimizer": optimizer_section(args.fused)})
    optimizer = make_optimizer(same_as_ppll, stage_module)

    batch = args.batch * args.microbatches
    batches = _batches(args.dataset, size, batch) if rank == 0 else None
    started = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        y = torch.empty(batch, dtype=torch.long)
        if rank == 0:  # reads the data, as PPLL's first stage does; the labels go to the last
            x, y = next(batches)
            dist.send(y, world - 1)
            schedule.step(x)
        elif rank == world - 1:
            dist.recv(y, 0)
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()
    dist.barrier()
    elapsed = time.perf_counter() - started
    peaks = [None] * world
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == world - 1:
        print(json.dumps({"images_per_s": args.steps * batch / elapsed, "stage_peak_mib": peaks}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
