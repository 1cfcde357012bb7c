"""The ``fxlocal`` command line: convert and inspect models. Rendering lives here, not in the library."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import FxLocalError

# Click's error base class, as the installed typer raises it (typer 0.29 vendors click privately)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Click's usage errors (an unknown option, a missing argument, a value out of range) as one
    line on stderr with the help hint and exit code 2, like fxlocal's own errors: typer's default
    is a multi-line panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "fxlocal"
            message = " ".join(exc.format_message().split()).rstrip(".")  # one line
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(message)} (see '{escape(command)} --help')", highlight=False, soft_wrap=True
            )
            sys.exit(2)
        except typer.Abort:
            sys.exit(1)
        # a command returns None; an Exit it raised comes back as its code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Supervised local learning for any timm / torchvision model, from its torch.fx graph.",
)
# Made per command by _one_line_errors, which every command goes through: rich fixes a console's
# width when it is made if COLUMNS is set then, so one made at import would keep the importing
# process's width (pytest-xdist workers export COLUMNS=80), not this invocation's.
console: Console
err_console: Console

InputSize = Tuple[int, int, int]
INPUT_SIZE_HELP = "input size C H W the model is traced and measured at"


def _one_line_errors(command):
    """Turn fxlocal's own errors into one red line and exit code 2, no traceback; make the
    consoles the command prints to."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        global console, err_console
        console, err_console = Console(), Console(stderr=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision/timm init chatter is not ours to show
                return command(*args, **kwargs)
        except FxLocalError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return run


def _check_writable(path: Optional[Path], what: str) -> None:
    """Refuse an output path in a missing folder before any work (nothing printed, nothing written)."""
    if path is not None and not path.parent.is_dir():
        raise FxLocalError(f"cannot write the {what} to {path}: folder {path.parent} does not exist; create it first")


def _plan_table(plan) -> Table:
    table = Table(
        title=f"{plan.model}: K={plan.k}, aux={plan.aux}, balance={plan.balance}, "
        f"input={tuple(plan.input_size)}, imbalance={plan.imbalance:.3f}",
        caption="per image: GFLOPs forward+backward, activations saved for backward; +aux head",
    )
    for col in ("block", "modules", "params (M)", "GFLOPs", "act (MiB)", "cut after"):
        table.add_column(col, justify="right" if col in ("params (M)", "GFLOPs", "act (MiB)") else "left")
    for b in plan.blocks:
        paths = b.module_paths
        modules = ", ".join(paths) if len(paths) <= 3 else f"{paths[0]} … {paths[-1]}"
        table.add_row(
            str(b.index),
            modules,
            f"{b.params / 1e6:.2f}" + (f" +{b.head_params / 1e6:.2f}" if b.head_params else ""),
            f"{b.gflops:.2f}" + (f" +{b.head_gflops:.2f}" if b.head_gflops else ""),
            f"{b.activation_mib:.1f}",
            f"{b.cut_node} {'×'.join(map(str, b.cut_shape))}" if b.cut_node else "-",
        )
    return table


def _print_heads(plan) -> None:
    for b in plan.blocks:
        console.print(f"  head {b.index}: {b.head or 'the model' + chr(39) + 's own head'}", highlight=False)


def _print_tied(local) -> None:
    for name, holders in local.tied_parameters().items():
        console.print(
            f"  tied: {name} is used by blocks {', '.join(map(str, holders))} (a table each recomputes); "
            f"each one's loss trains it, block {holders[-1]} steps it",
            highlight=False,
        )


AUX_HELP = (
    "aux head method: dgl, auglocal, infopro, mlaan, man, glcan (detection, segmentation, super-resolution), none; "
    "or a plug-in on a base, BASE+PLUGIN: dgl+man, infopro+man, glcan+man, dgl+mlaan, infopro+mlaan"
)
TASK_HELP = "classification, detection, segmentation or super_resolution (default: the model's own)"


def _parse_aux_options(pairs: list[str], flag: str = "--aux-option") -> dict:
    """``["span=3", "momentum=0.99"]`` -> ``{"span": 3, "momentum": 0.99}`` (YAML scalars)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FxLocalError(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


REPLACE_HELP = (
    "Replacement Learning first: every Nth unit of a run of same-shaped units becomes a·before + b·after "
    "of its neighbours' weights; KEY=VALUE, repeatable: interval=N (>= 2, default 2), neighbour_grad=true|false (default false)"
)


def _replace_options(pairs: list[str]) -> dict | None:
    """``--replace`` pairs as ``convert(replace=...)``: None when not given."""
    return _parse_aux_options(pairs, "--replace") if pairs else None


def _print_task(local) -> None:
    if local.task is not None:
        traced = " (traced: the detector's trunk, backbone and head)" if local.task.name == "detection" else ""
        console.print(f"task: {local.task.name}, {local.task.num_classes} classes{traced}", highlight=False)


def _print_trace_report(report) -> None:
    if report.leaf_modules:
        shown = ", ".join(f"{p} ({report.leaf_reasons[p]})" for p in report.leaf_modules[:4])
        more = f" and {len(report.leaf_modules) - 4} more" if len(report.leaf_modules) > 4 else ""
        console.print(f"traced as leaf modules: {shown}{more}", highlight=False)
    if report.root_branches_on_mode:
        console.print("the model's forward branches on self.training: its inference path was traced")


@app.command()
@_one_line_errors
def convert(
    model: str = typer.Argument(..., help="timm or torchvision model name, e.g. resnet101"),
    k: int = typer.Option(4, "--k", help="number of gradient-isolated blocks"),
    aux: str = typer.Option("dgl", "--aux", help=AUX_HELP),
    aux_depth: Optional[int] = typer.Option(None, "--aux-depth", help="auglocal: units per aux net (d)"),
    pyramid: Optional[float] = typer.Option(None, "--pyramid", help="auglocal: pyramidal depth decay (tau)"),
    aux_option: list[str] = typer.Option([], "--aux-option", help="any aux option as KEY=VALUE (repeatable)"),
    replace: list[str] = typer.Option([], "--replace", help=REPLACE_HELP),
    task: Optional[str] = typer.Option(None, "--task", help=TASK_HELP),
    balance: str = typer.Option("flops", "--balance", help="flops, params, activations, memory or time (measured here)"),
    input_size: InputSize = typer.Option((3, 224, 224), "--input-size", help=INPUT_SIZE_HELP),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1, help="classifier size (a task's classes)"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="re-apply a saved plan (JSON)"),
    save_plan: Optional[Path] = typer.Option(None, "--save-plan", help="write the plan as JSON"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="save the converted model"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="pick the smallest K whose step peak fits, e.g. 8GiB"),
    batch: int = typer.Option(64, "--batch", min=1, help="batch size that --max-memory and balance=memory price"),
    backbone_recompute: str = typer.Option(
        "none", "--backbone-recompute", help="recompute the blocks' activations in backward, unit by unit: none, cheap (all but conv/matmul outputs) or all"
    ),
):
    """Cut MODEL into K balanced gradient-isolated blocks with aux heads and print the plan."""
    import fxlocal

    from .graph.cost import MemoryModel
    from .training.checkpoint import save_converted
    from .training.runtime import keep_freed_memory

    _check_writable(save_plan, "plan")
    _check_writable(output, "converted model")
    options = _parse_aux_options(aux_option)
    options.update({key: v for key, v in (("aux_depth", aux_depth), ("pyramid", pyramid)) if v is not None})
    options["backbone_recompute"] = backbone_recompute
    replace_options = _replace_options(replace)
    priced = MemoryModel(batch=batch)
    if balance == "time":  # measured under the allocator fxlocal train runs with (its recipe's default)
        keep_freed_memory()
    if max_memory is not None:
        original = fxlocal.create_model(model, num_classes, input_size)
        k, local = _fit_k(original, max_memory, aux, input_size, balance, priced, "sgd", "fake",
                          replace=replace_options, task=task, **options)
    else:
        local = fxlocal.convert(
            model,
            k=k,
            aux=aux,
            input_size=input_size,
            balance=balance,
            num_classes=num_classes,
            plan=fxlocal.Plan.load(plan) if plan else None,
            memory=priced,
            replace=replace_options,
            task=task,
            **options,
        )
    console.print(_plan_table(local.plan))
    _print_task(local)
    _print_replacement(local.replacement)
    _print_heads(local.plan)
    _print_tied(local)
    _print_trace_report(local.trace_report)
    if save_plan:
        local.plan.save(save_plan)
        console.print(f"plan written to {save_plan}")
    if output:
        save_converted(local, output)
        console.print(f"converted model written to {output}")


@app.command()
@_one_line_errors
def inspect(
    model: str = typer.Argument(..., help="timm or torchvision model name"),
    input_size: InputSize = typer.Option((3, 224, 224), "--input-size", help=INPUT_SIZE_HELP),
    k: int = typer.Option(4, "--k", help="blocks of the plan --plot draws"),
    balance: str = typer.Option("flops", "--balance", help="balance of the plan --plot draws"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw the per-segment costs and the K-way cuts to a PNG"),
    replace_interval: int = typer.Option(2, "--replace-interval", help="the units column says which units --replace interval=N replaces"),
):
    """List MODEL's cut candidates, the module each one closes, and the cost of the segment before it,
    then its units (and which of them Replacement Learning would replace)."""
    import fxlocal

    from .graph.replace import checked_options, plan_replacement
    from .models.dense import DetectionTrunk, model_task

    _check_writable(plot, "plot")
    net = fxlocal.create_model(model, None, input_size)
    if model_task(net) == "detection":  # its end-to-end forward is not traceable: its trunk is
        net = DetectionTrunk(net)
        console.print(
            f"{model} is a detector: its trunk (backbone and head, images -> per-anchor class logits and boxes) is "
            "traced and cut; its own loss on the head's outputs is the last block's objective", highlight=False,
        )
    gm = fxlocal.trace(net, input_size)
    analysis = fxlocal.analyze(gm, input_size, timed=plot is not None and balance == "time")
    report = gm.meta["fxlocal_trace"]
    table = Table(
        title=f"{model}: {len(analysis.candidates)} cut candidates, K can be 1 to {analysis.max_k}",
        caption="cost of the segment that ends at each cut (forward+backward, per image); "
        "shape a + b: the cut carries a second tensor beside its own",
    )
    for col in ("#", "cut after", "module path", "closes unit", "shape", "GFLOPs", "act (MiB)", "params (M)"):
        table.add_column(col, justify="right" if col in ("#", "GFLOPs", "act (MiB)", "params (M)") else "left")
    rows = list(enumerate(analysis.candidates)) + [(len(analysis.candidates), None)]
    for i, cand in rows:
        cost = analysis.segment_costs[i]
        table.add_row(
            str(i),
            cand.node if cand else "(output)",
            cand.module_path if cand else "",
            (cand.closes or "") if cand else "",
            _shapes([cand.shape, *(t.shape for t in cand.carried)]) if cand else "",
            f"{cost.flops / 1e9:.3f}",
            f"{cost.activation_bytes / 2**20:.2f}",
            f"{cost.params / 1e6:.3f}",
        )
    console.print(table)
    replacement = plan_replacement(net, analysis.units, checked_options({"interval": replace_interval}))
    _print_units(analysis.units, model, replacement)
    _print_trace_report(report)
    if plot is not None:
        from .tools.plot import plot_plan

        plan = fxlocal.partition(gm, k, balance, analysis=analysis, model_name=model)
        plot_plan(plan, analysis, plot)
        console.print(f"plan drawn to {plot}")


def _print_units(units, model: str, replacement) -> None:
    if not units:
        console.print(f"{model}: no units found (no module-aligned cuts)")
        return
    table = Table(title=f"{model}: {len(units)} units in {units[-1].stage + 1} stages")
    for col in ("unit", "stage", "modules", "in", "out", "cut after", f"--replace interval={replacement.options.interval}"):
        table.add_column(col, justify="right" if col in ("unit", "stage") else "left")
    for u in units:
        table.add_row(
            str(u.index), str(u.stage), u.name,
            _shapes([u.in_shape, *(t.shape for t in u.in_carried)]),
            _shapes([u.out_shape, *(t.shape for t in u.carried)]),
            u.cut,
            replacement.why(u),
        )
    console.print(table)
    console.print(
        f"--replace interval={replacement.options.interval} replaces {len(replacement.replaced)} of {len(units)} units",
        highlight=False,
    )


def _print_replacement(replacement) -> None:
    if replacement is None:
        return
    done = ", ".join(f"{r.unit} = a·{r.before} + b·{r.after}" for r in replacement.replaced)
    console.print(
        f"replaced {len(replacement.replaced)} units (interval {replacement.options.interval}, neighbour_grad "
        f"{str(replacement.options.neighbour_grad).lower()}): {done}",
        highlight=False,
    )


def _shapes(shapes) -> str:
    """Per-sample shapes of what crosses a cut: ``256×14×14``, or ``197×192 + 401×384`` where
    it carries a second tensor."""
    return " + ".join("×".join(map(str, shape)) for shape in shapes)


class _RichReporter:
    """Progress bars per epoch (loss, images/s) and a line per epoch with local accuracies."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def run_start(self, recipe, local, start_epoch, steps):
        self.steps, self.epochs = steps, recipe.epochs
        console.print(_plan_table(local.plan))
        if start_epoch:
            console.print(f"resuming after epoch {start_epoch}")
        self.progress.start()

    def step(self, epoch, step, losses, ips):
        if self.task is None:
            self.task = self.progress.add_task("train", total=self.steps, epoch=f"{epoch + 1}/{self.epochs}", loss="-", ips="-")
        self.progress.update(
            self.task, completed=step + 1, epoch=f"{epoch + 1}/{self.epochs}",
            loss="/".join(f"{v:.3f}" for v in losses), ips=f"{ips:.0f}",
        )

    def epoch_end(self, record):
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        local = " ".join(f"{a:.3f}" for a in record.get("train_local_top1", []))
        split = record.get("evaluated_on", "test")
        test = f" | {split} {_test_metrics(record)}" if "evaluated_on" in record else ""
        console.print(
            f"epoch {record['epoch']}: loss {' '.join(f'{v:.3f}' for v in record['train_loss'])} | "
            + (f"local acc {local} | " if local else "")
            + f"{record['images_per_s']:.0f} img/s | peak {record['peak_memory_mib']:.0f} MiB{test}",
            highlight=False,
            soft_wrap=True,
        )

    def close(self):
        if self.progress.live.is_started:  # stopping a bar never started prints an empty line
            self.progress.stop()


@app.command()
@_one_line_errors
def train(
    recipe: Path = typer.Argument(..., help="YAML training recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe field: key.sub=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from <output_dir>/last.pt"),
    pipeline: bool = typer.Option(
        False, "--pipeline", help="one block per process: torchrun --nproc-per-node K ... train RECIPE --pipeline"
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output_dir: checkpoints and metrics (--set output_dir=DIR)"),
    task: Optional[str] = typer.Option(None, "--task", help="model.task: " + TASK_HELP.replace("the model's own", "the dataset's")),
    quick: bool = typer.Option(False, "--quick", help="a smoke run: 1 epoch of 5 steps, evaluated on 32 images, no workers"),
):
    """Train a converted model from RECIPE (checkpoints, metrics.jsonl, curves in output_dir).

    Under torchrun the processes train data-parallel, or with --pipeline one block each."""
    from .training.loop import fit
    from .training.recipe import load_recipe

    overrides = [*set_, *(["pipeline.enabled=true"] if pipeline else []), *([f"output_dir={json.dumps(str(output))}"] if output else [])]  # quoted: a YAML string whatever the name
    if task is not None:
        overrides.append(f"model.task={json.dumps(task)}")
    if quick:
        overrides += QUICK
    parsed = load_recipe(recipe, overrides)
    reporter = _RichReporter()
    try:
        result = fit(parsed, resume=resume, reporter=reporter)
    finally:
        reporter.close()
    if result.reporting:
        _print_summary(result)


# what --quick sets: enough to see that a recipe builds, trains, evaluates and checkpoints
QUICK = ["epochs=1", "max_steps_per_epoch=5", "data.test_subset=32", "workers=0", "eval_interval=1"]


def _test_metrics(record: dict, prefix: str = "test_") -> str:
    """The model's test metrics of a record: top-1 and top-5, or a task's (mAP, mIoU, PSNR, SSIM)."""
    names = {"top1": "top-1", "top5": "top-5", "map": "mAP", "map_50": "mAP@.5", "miou": "mIoU", "psnr": "PSNR", "ssim": "SSIM"}
    return " ".join(f"{label} {record[prefix + key]:.4f}" for key, label in names.items() if prefix + key in record)


def _print_summary(result) -> None:
    table = Table(title=f"summary ({result.output_dir})")
    for col in ("epoch", "train loss (last block)", "test", "local test top-1", "img/s"):
        table.add_column(col, justify="right")
    for r in result.history:
        table.add_row(
            str(r["epoch"]),
            f"{r['train_loss'][-1]:.4f}",
            _test_metrics(r) or "-",
            " ".join(f"{a:.3f}" for a in r.get("test_local_top1", [])) or "-",
            f"{r['images_per_s']:.0f}",
        )
    console.print(table)
    console.print(f"checkpoint: {result.output_dir / 'last.pt'}  metrics: {result.output_dir / 'metrics.jsonl'}")


@app.command()
@_one_line_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="a checkpoint written by fxlocal train"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default: the recipe's"),
):
    """Report top-1 / top-5 of CHECKPOINT on its dataset's test split (a task's metrics for a task model)."""
    from .training.build import model_from_checkpoint
    from .training.checkpoint import load_training_checkpoint
    from .training.evaluate import evaluate as run_eval
    from .training.loaders import evaluation_loader
    from .training.recipe import load_recipe

    state = load_training_checkpoint(checkpoint)
    local = model_from_checkpoint(state)
    recipe = load_recipe(data=state["recipe"], overrides=[f"batch_size={batch_size}"] if batch_size else [])
    result = run_eval(local, evaluation_loader(recipe), next(local.parameters()).device, recipe.amp, recipe.channels_last)
    heads = f"; aux heads top-1 {' '.join(f'{a:.3f}' for a in result['local_top1']) or '-'}" if "local_top1" in result else ""
    console.print(
        f"{checkpoint}: epoch {state['epoch']}, {result['images']} test images: {_test_metrics(result, '')}{heads}",
        highlight=False,
    )


@app.command()
@_one_line_errors
def export(
    checkpoint: Path = typer.Argument(..., help="a training checkpoint or a converted-model file"),
    format: str = typer.Option("state_dict", "--format", help="state_dict, safetensors or pt2"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write the backbone"),
    with_aux: bool = typer.Option(False, "--with-aux", help="also write the aux heads beside it"),
):
    """Write the trained backbone under the original model's parameter names (heads and twins gone)."""
    from .tools.export import EXPORT_FORMATS, ExportError, load_local_model
    from .tools.export import export as run_export

    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    _check_writable(output, "export")
    local = load_local_model(checkpoint)
    for path in run_export(local, format, output, with_aux):
        console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", highlight=False)


def _fit_k(original, max_memory, aux, input_size, balance, priced, optimizer, device, replace=None, task=None, **options):
    """The smallest K whose predicted step peak fits ``max_memory``, and its converted model."""
    import fxlocal

    from .memory import fit_to_memory, parse_bytes

    parse_bytes(max_memory)  # a malformed size is refused before the model is traced
    from .models.dense import model_task

    if task not in (None, "classification") or model_task(original) != "classification":
        raise FxLocalError(
            "--max-memory predicts a classifier's step on fake tensors; for a detection, segmentation or "
            "super-resolution model give --k (benchmarks/tasks.py measures their steps' peaks)"
        )
    # once for every K tried
    analyzed = fxlocal.analyze_model(original, input_size, timed=balance == "time", replace=replace)
    k, local, peak = fit_to_memory(
        analyzed, aux, max_memory,
        lambda k: fxlocal.convert(analyzed, k=k, aux=aux, balance=balance, memory=priced, **options),
        priced.batch, optimizer, device,
    )
    console.print(f"K={k} is the smallest that fits {max_memory}: predicted peak {peak:.0f} MiB", highlight=False)
    return k, local


@app.command()
@_one_line_errors
def memory(
    model: str = typer.Argument(..., help="timm or torchvision model name"),
    k: int = typer.Option(4, "--k", help="number of gradient-isolated blocks"),
    aux: str = typer.Option("dgl", "--aux", help=AUX_HELP),
    batch: int = typer.Option(64, "--batch", min=1, help="batch size of the step"),
    input_size: InputSize = typer.Option((3, 224, 224), "--input-size", help=INPUT_SIZE_HELP),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum) or adamw"),
    balance: str = typer.Option("memory", "--balance", help="flops, params, activations, memory or time (measured here)"),
    device: str = typer.Option("fake", "--device", help="fake (predict on CPU, no allocation) or cuda (measure)"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="pick the smallest K whose peak fits, e.g. 8GiB"),
    backbone_recompute: str = typer.Option(
        "none", "--backbone-recompute", help="recompute the blocks' activations in backward, unit by unit: none, cheap (all but conv/matmul outputs) or all"
    ),
):
    """Peak memory of one training step: end to end vs local, with a per-block table."""
    import fxlocal

    from .memory import OPTIMIZERS, predict_memory

    if optimizer not in OPTIMIZERS:
        raise FxLocalError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if device not in ("fake", "cuda"):
        raise FxLocalError(f"unknown device {device!r}; choose fake or cuda")
    from .graph.cost import MemoryModel
    from .models.dense import model_task

    original = fxlocal.create_model(model, num_classes, input_size)
    if model_task(original) != "classification":
        raise FxLocalError(
            f"fxlocal memory predicts a classifier's step on fake tensors, and {model} is a {model_task(original)} model "
            "(its loss reads the targets' values); benchmarks/tasks.py measures its step's peak on a real batch"
        )

    priced = MemoryModel(batch=batch, optimizer_states=OPTIMIZERS[optimizer][1])
    if max_memory is not None:
        k, local = _fit_k(original, max_memory, aux, input_size, balance, priced, optimizer, device, backbone_recompute=backbone_recompute)
    else:
        local = fxlocal.convert(
            original, k=k, aux=aux, input_size=input_size, balance=balance, memory=priced, backbone_recompute=backbone_recompute
        )
    report = predict_memory(original, local, batch, optimizer, device, name=model)
    table = Table(
        title=f"{model}: one {optimizer} step, batch {batch}, input {tuple(input_size)}, K={k}, aux={aux}, "
        f"balance={balance}{'' if backbone_recompute == 'none' else f', backbone recompute {backbone_recompute}'} "
        f"({'predicted on fake tensors' if device == 'fake' else 'measured on CUDA'})",
        caption="MiB = 2^20 bytes; activations are saved for backward by the block and its head"
        + ("" if backbone_recompute == "none" else " when nothing is recomputed (the peaks above recompute them)"),
    )
    for col in ("block", "activations", "params", "grads", "optimizer state", "aux head params"):
        table.add_column(col, justify="right")
    for b in report.blocks:
        table.add_row(str(b.index), *(f"{v:.1f}" for v in (b.activations_mib, b.params_mib, b.grads_mib, b.optimizer_mib, b.head_params_mib)))
    console.print(table)
    console.print(
        f"peak: end-to-end {report.e2e_peak_mib:.1f} MiB, local {report.local_peak_mib:.1f} MiB "
        f"= {report.ratio:.3f}× end-to-end",
        highlight=False,
    )


def main() -> None:  # console-script entry point
    sys.exit(app())


if __name__ == "__main__":
    main()
