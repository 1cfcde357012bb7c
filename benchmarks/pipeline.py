"""Pipeline efficiency: K processes with one thread each vs sequential local learning on one
thread, and against traditional pipeline parallelism (PP) of the end-to-end model.

PPLL and its baseline train the same converted model on the same batches (the same recipe, seed
and data order; the pipeline computes the same updates, see tests/training/test_pipeline.py):
sequentially with ``fxlocal train`` in one single-threaded process, and pipelined with
``torchrun --nproc-per-node K ... --pipeline`` (torchrun gives each process one thread).
Throughput is the ``images_per_s`` of the training loop (``metrics.jsonl``; evaluation
excluded), the median over the epochs after the first (warm-up); efficiency = speed-up / K.
With ``--repeats N`` every run is made N times, round after round, and each figure is the median
over the rounds (a ratio, the median of each round's own): this machine's speed drifts by up to
20% over tens of minutes, and a ratio of runs minutes apart then measures the drift.

PP (``--pp gpipe 1f1b``): the end-to-end model cut at the same K stages from the same plan
(``benchmarks/pp_stage.py``), trained by ``torch.distributed.pipelining``'s GPipe or 1F1B
schedule on ``--microbatches`` micro-batches of ``batch`` images per step: the same unit of work
per message as PPLL's ``batch``. Its efficiency is against end-to-end training in one
single-threaded process at the step's batch (``batch × microbatches``). "PPLL × PP" is PPLL's
throughput over the faster schedule's. The batch sizes are a column: on a CPU, whether a stage's
tensors stay in its core's cache decides whether K stages share the memory bus or not. Stage
peaks are each process's peak resident memory (MiB).

    python benchmarks/pipeline.py                               # resnet32_cifar, K=2, CPU, batch 16, 32, 64
    python benchmarks/pipeline.py --models resnet32_cifar vit_tiny_patch16_224 --balance time --batch 16 --pp gpipe 1f1b
    python benchmarks/pipeline.py --models vit_tiny_ppll --balance time --batch 16 --pp gpipe 1f1b   # the paper's ViT
    python benchmarks/pipeline.py --aux dgl man mlaan --cascade-delay 0 1 --balance time --batch 16   # MLAAN waiting or not
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

import torch
import yaml
from record import append_rows, provenance

import fxlocal

ROOT = Path(__file__).resolve().parents[1]


# A model name, or a layout: the timm model, its kwargs and the input (Fashion-MNIST resized, grey
# to RGB). ViT-Tiny's 16² patches need more than 28×28: 64² gives 16 tokens, which the CPU trains
# in minutes; vit_tiny_ppll is the PPLL paper's ViT (4² patches at 32², 64 tokens, the
# ppll_cifar10_vit recipes' model), 3.5× the work per image.
LAYOUTS = {
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", {}, [3, 64, 64]),
    "vit_tiny_ppll": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, [3, 32, 32]),
}


def layout(model: str) -> tuple[str, dict, list[int]]:
    """``(timm name, kwargs, input size)`` of a ``--models`` entry (28×28 grey by default)."""
    return LAYOUTS.get(model, (model, {}, [1, 28, 28]))


FUSED = {"auto": None, "on": True, "off": False}  # optimizer.fused: where torch has the kernel, always, never


def optimizer_section(fused: str = "auto") -> dict:
    """The recipe's optimizer, for PPLL and for PP (``benchmarks/pp_stage.py``) alike: timm's
    ``sgd`` (Nesterov momentum; no decay on norms and biases)."""
    return {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "fused": FUSED[fused]}


def recipe(model: str, k: int, balance: str, batch: int, epochs: int, device: str, out: Path, aux: str = "dgl",
           cascade_delay: int = 0, fused: str = "auto", plan: Path | None = None) -> dict:
    name, kwargs, size = layout(model)
    return {
        "model": {"name": name, "kwargs": kwargs},
        "convert": {"k": k, "aux": aux, "balance": balance, **({"plan": str(plan)} if plan else {})},
        "pipeline": {"cascade_delay": cascade_delay},
        "data": {"dataset": "fashion_mnist_mini", "input_size": size, "augment": "none"},
        "optimizer": optimizer_section(fused),
        "scheduler": {"name": "none"},
        "epochs": epochs,
        "eval_interval": epochs,
        "batch_size": batch,
        "device": device,
        "seed": 0,
        "workers": 0,
        "output_dir": str(out),
    }


def images_per_s(data: dict, folder: Path, pipeline: bool) -> tuple[float, dict]:
    """The run's throughput (the median over the epochs after the first) and its last epoch's record."""
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
    return statistics.median(e["images_per_s"] for e in epochs[1:]), epochs[-1]


def saved_plan(data: dict, path: Path) -> Path:
    """The plan ``data``'s recipe cuts by, made once here (one thread, as the runs' processes
    time it) and saved to ``path``: sequential, PPLL and PP then train the same blocks, where
    each run planning for itself could cut elsewhere (``balance: time`` measures, and two
    measurements can differ)."""
    from fxlocal.training.build import build_model
    from fxlocal.training.recipe import load_recipe
    from fxlocal.training.runtime import keep_freed_memory

    if not path.exists():
        recipe = load_recipe(data=data)
        if recipe.keep_freed_memory:  # as the runs' fit() does before it plans
            keep_freed_memory()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            build_model(recipe).plan.save(path)
        finally:
            torch.set_num_threads(threads)
    return path


def pp_images_per_s(model: str, k: int, batch: int, microbatches: int, schedule: str, fused: str, plan: Path) -> tuple[float, list]:
    """Traditional pipeline parallelism of the end-to-end model (benchmarks/pp_stage.py)."""
    name, kwargs, size = layout(model)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
           str(ROOT / "benchmarks/pp_stage.py"), "--model", name, "--model-kwargs", json.dumps(kwargs),
           "--input-size", *map(str, size), "--batch", str(batch),
           "--microbatches", str(microbatches), "--schedule", schedule, "--fused", fused, "--plan", str(plan)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return result["images_per_s"], result["stage_peak_mib"]


def runs(methods: list[str], delays: list[int]) -> list[tuple[str, int | None]]:
    """``(aux, cascade delay)`` to run: a method whose loss cascades into the block before (its
    stages exchange gradients) once per delay, the others once (None: the delay changes nothing)."""
    return [(aux, delay) for aux in methods
            for delay in (delays if fxlocal.get_aux(aux).input_window > 1 else [None])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet32_cifar"])
    parser.add_argument("--k", nargs="+", type=int, default=[2])
    parser.add_argument("--aux", nargs="+", default=["dgl"], help="PPLL's aux methods")
    parser.add_argument("--balance", nargs="+", default=["flops", "time"], choices=["flops", "time", "memory", "activations", "params"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pp", nargs="*", default=[], choices=["gpipe", "1f1b"], help="PP schedules to compare with (CPU)")
    parser.add_argument("--microbatches", type=int, default=4, help="PP's micro-batches of BATCH images per step")
    parser.add_argument("--cascade-delay", nargs="+", type=int, default=[0],
                        help="pipeline.cascade_delay values to run a cascaded method (mlaan) with")
    parser.add_argument("--fused", choices=sorted(FUSED), default="auto",
                        help="optimizer.fused for PPLL, its baselines and PP (auto: fxlocal's default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every run, one after another; each figure is the median over the rounds")
    parser.add_argument("--record", default="", help="JSON-lines file the rows are appended to (with the commit and versions)")
    args = parser.parse_args()

    origin = provenance(args.device)
    print(f"`python benchmarks/pipeline.py {' '.join(sys.argv[1:])}`".replace("  ", " "))
    rounds = f", median of {args.repeats} rounds" if args.repeats > 1 else ""
    print(f"(Fashion-MNIST 4000 images, median of epochs 2 to {args.epochs}{rounds}, device {args.device}, commit {origin['commit']})\n")
    pp_columns = "".join(f" PP {s} img/s |" for s in args.pp)
    pp_rule = "---|" * len(args.pp)
    extra = (" end-to-end img/s | PP efficiency | PPLL × PP | stage peaks MiB PPLL / PP |" if args.pp else "")
    print(f"| model | K | aux | balance | batch | sequential img/s | PPLL img/s | speed-up | efficiency |{pp_columns}{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + pp_rule + ("---|---|---|---|" if args.pp else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for k in args.k:
                for balance in args.balance:
                    for batch in args.batch:
                        rounds = [one_round(args, model, k, balance, batch, Path(tmp) / f"{model}-{k}-{balance}-{batch}-{r}",
                                            Path(tmp)) for r in range(args.repeats)]
                        for aux, delay in runs(args.aux, args.cascade_delay):
                            line, row = summary(args, rounds, model, k, balance, batch, aux, delay)
                            row["cuts"] = json.loads(plan_file(Path(tmp), model, k, balance, batch, aux).read_text())["cuts"]
                            print(line, flush=True)
                            if args.record:
                                append_rows(args.record, [{**origin, **row}])


def plan_file(plans: Path, model: str, k: int, balance: str, batch: int, aux: str) -> Path:
    """Where one method's plan for one configuration is saved (:func:`saved_plan`)."""
    return plans / f"{model}-{k}-{balance}-{batch}-{aux}.json"


def one_round(args, model: str, k: int, balance: str, batch: int, folder: Path, plans: Path) -> dict:
    """Every run of one configuration, once: end to end and PP (with ``--pp``), then sequential
    and PPLL for each method, each cutting by the plan saved in ``plans`` for its method (made
    by the first round that needs it). ``{"e2e": img/s, "pp": {schedule: (img/s, stage peaks)},
    (aux, delay): (sequential img/s, PPLL img/s, PPLL's last epoch record)}``."""
    measured: dict = {"e2e": None, "pp": {}}
    folder.mkdir(parents=True)

    def plan(aux: str) -> Path:
        planned = recipe(model, k, balance, batch, args.epochs, args.device, folder, aux)
        return saved_plan(planned, plan_file(plans, model, k, balance, batch, aux))

    if args.pp:  # end to end, one process, at PP's step batch
        data = recipe(model, 1, balance, batch * args.microbatches, args.epochs, args.device, folder, "none", fused=args.fused)
        measured["e2e"], _ = images_per_s(data, folder / "e2e", pipeline=False)
    # PP cuts where PPLL with DGL heads cuts
    measured["pp"] = {s: pp_images_per_s(model, k, batch, args.microbatches, s, args.fused, plan("dgl")) for s in args.pp}
    sequential = None
    for aux, delay in runs(args.aux, args.cascade_delay):
        data = recipe(model, k, balance, batch, args.epochs, args.device, folder, aux, delay or 0, args.fused, plan(aux))
        tag = folder / aux
        if delay is None or not (tag / "sequential").exists():  # the same work whatever the delay
            sequential, _ = images_per_s(data, tag / "sequential", pipeline=False)
        measured[aux, delay] = (sequential, *images_per_s(data, tag / f"pipeline-{delay}", pipeline=True))
    return measured


def summary(args, rounds: list[dict], model: str, k: int, balance: str, batch: int, aux: str, delay) -> tuple[str, dict]:
    """The table line and the recorded row of one method over the rounds: each throughput's
    median, and each ratio's median over the rounds' own ratios (a round's runs follow one
    another, so a machine that slows down for a while moves both sides of its ratios)."""
    median = statistics.median
    sequential = median(r[aux, delay][0] for r in rounds)
    pipelined = median(r[aux, delay][1] for r in rounds)
    speedup = median(r[aux, delay][1] / r[aux, delay][0] for r in rounds)
    last = rounds[-1][aux, delay][2]
    peaks = last["stage_peak_memory_mib"]
    name = aux if delay is None else f"{aux} (delay {delay})"
    line = f"| {model} | {k} | {name} | {balance} | {batch} | {sequential:.0f} | {pipelined:.0f} | {speedup:.2f}× | {speedup / k:.2f} |"
    row = {"benchmark": "pipeline", "model": model, "k": k, "aux": aux, "balance": balance, "batch": batch, "fused": args.fused,
           "repeats": len(rounds), "sequential_images_per_s": sequential, "ppll_images_per_s": pipelined, "speedup": speedup,
           "ppll_stage_peak_mib": peaks,
           # the last round's last epoch: each stage's seconds, and those it waited (input, send, exchange)
           "ppll_stage_train_s": last["stage_train_s"], "ppll_stage_wait_s": last["stage_wait_s"],
           "rounds": [{"sequential_images_per_s": r[aux, delay][0], "ppll_images_per_s": r[aux, delay][1]} for r in rounds]}
    if delay is not None:
        row["cascade_delay"] = delay
    if args.pp:
        pp = {s: median(r["pp"][s][0] for r in rounds) for s in args.pp}
        e2e = median(r["e2e"] for r in rounds)
        best = [max(v for v, _ in r["pp"].values()) for r in rounds]
        pp_efficiency = median(b / r["e2e"] / k for b, r in zip(best, rounds))
        versus_pp = median(r[aux, delay][1] / b for b, r in zip(best, rounds))
        fastest = max(rounds[-1]["pp"], key=lambda s: rounds[-1]["pp"][s][0])
        line += "".join(f" {pp[s]:.0f} |" for s in args.pp)
        line += (f" {e2e:.0f} | {pp_efficiency:.2f} | {versus_pp:.2f}× | "
                 f"{' / '.join(f'{m:.0f}' for m in peaks)} ; {' / '.join(f'{m:.0f}' for m in rounds[-1]['pp'][fastest][1])} |")
        row.update(microbatches=args.microbatches, e2e_images_per_s=e2e, pp_efficiency=pp_efficiency, ppll_over_pp=versus_pp,
                   pp={s: {"images_per_s": pp[s], "stage_peak_mib": rounds[-1]["pp"][s][1]} for s in args.pp})
        for r, round_row in zip(rounds, row["rounds"]):
            round_row.update(e2e_images_per_s=r["e2e"], pp={s: r["pp"][s][0] for s in args.pp})
    return line, row

if __name__ == "__main__":
    main()
