"""The zoo sweep: every timm and torchvision classification model through fxlocal.

For each model and aux method: convert with K=4 (or, when the model has fewer cut points, the
largest K it allows, after checking that K=4 fails with an error naming it), one train step
with per-block optimizers, gradient isolation of every block's loss, and the export round trip
(the trained backbone loads strictly into a fresh original model; on real tensors its eval
output is bit-identical). Models above ``--fake-above`` parameters are built on the meta
device and every stage runs on fake tensors: shapes and graphs are checked, nothing is
computed or allocated, so the whole zoo fits on a 2-core CPU machine.

    python benchmarks/zoo.py                  # the whole zoo (hours; resumable)
    python benchmarks/zoo.py --sample         # one model per timm family and per torchvision family
    python benchmarks/zoo.py --models 'resnet*' 'torchvision:vgg*' --aux dgl

Every model runs in its own process (a crash or a hang costs one row; ``--timeout``). Rows are
appended to ``--results`` (JSON lines, one per model and aux method) and a rerun skips the
models already there (``--fresh`` starts over); ``docs/zoo.md`` is rendered from all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUX = ("dgl", "auglocal", "mlaan", "man")
# What timm's own FX tests leave out (tests/test_models.py, EXCLUDE_FX_FILTERS).
TIMM_FX_EXCLUDED = ("vit_gi*", "hiera*", "gemma4_vit*")
SIZE = (3, 64, 64)  # small enough to run; fixed-size models are built for it
K = 4
CLASSES = 10
STAGES = ("create", "convert", "step", "isolation", "export")


# ---------------------------------------------------------------- which models


def all_models() -> list[str]:
    import timm
    import torchvision

    return [*timm.list_models(), *(f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models))]


def family(name: str) -> str:
    """The module that defines the model: timm's (``resnet``), torchvision's (``torchvision:vgg``)."""
    if name.startswith("torchvision:"):
        import torchvision

        return "torchvision:" + torchvision.models.get_model_builder(name.split(":", 1)[1]).__module__.rsplit(".", 1)[-1]
    return _timm_families()[name]


@functools.lru_cache(maxsize=None)
def _timm_families() -> dict[str, str]:
    import timm

    return {model: module for module in timm.list_modules() for model in timm.list_models(module=module)}


def parameter_count(name: str) -> int:
    """Parameters of ``name`` as built for the sweep, counted on the meta device (free)."""
    import torch

    import fxlocal

    with torch.device("meta"):
        return sum(p.numel() for p in fxlocal.create_model(name, CLASSES, SIZE).parameters())


def stratified_sample(names: list[str]) -> list[str]:
    """The smallest model of every family (ties: the first name)."""
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        try:
            size = parameter_count(name)
        except Exception:  # noqa: BLE001 - unbuildable here: the sweep will say why
            size = 1 << 62
        fam = family(name)
        if fam not in best or (size, name) < best[fam]:
            best[fam] = (size, name)
    return sorted(n for _, n in best.values())


def _sample(names: list[str], cache: Path) -> list[str]:
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("\n".join(stratified_sample(all_models())) + "\n")
    wanted = set(names)
    return [n for n in cache.read_text().split() if n in wanted]


def fx_excluded(name: str) -> bool:
    return not name.startswith("torchvision:") and any(fnmatch.fnmatch(name, p) for p in TIMM_FX_EXCLUDED)


# ---------------------------------------------------------------- one model (in its own process)


def check_model(name: str, aux_methods: list[str], fake_above: int) -> list[dict]:
    """One row per aux method: status ok/fail, the failing stage and reason, details, seconds."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    for aux in aux_methods:
        started = time.perf_counter()
        row = {"model": name, "family": family(name), "aux": aux, "status": "ok", "stage": "", "reason": ""}
        try:
            row.update(_check(name, aux, fake_above))
        except _StageFailure as failure:
            row.update(status="fail", stage=failure.stage, reason=failure.reason)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    return rows


class _StageFailure(Exception):
    def __init__(self, stage: str, exc: BaseException | str):
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        super().__init__(text)
        self.stage, self.reason = stage, text[:300]


@contextlib.contextmanager
def _stage(name: str):
    """Any exception inside becomes a _StageFailure of this stage."""
    try:
        yield
    except _StageFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure, whatever it is
        raise _StageFailure(name, exc) from exc


def _check(name: str, aux: str, fake_above: int) -> dict:
    import copy

    import torch
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    import fxlocal
    from fxlocal.errors import PartitionError
    from fxlocal.memory import max_blocks
    from fxlocal.verify import export_mismatch, isolation_violations

    with _stage("create"):
        fake = parameter_count(name) > fake_above
        device = torch.device("meta") if fake else torch.device("cpu")
        with device:
            original = fxlocal.create_model(name, CLASSES, SIZE)
    details: dict = {"mode": "fake" if fake else "real", "params_m": round(sum(p.numel() for p in original.parameters()) / 1e6, 2)}
    with _stage("convert"):
        try:
            local = fxlocal.convert(original, k=K, aux=aux, input_size=SIZE)
        except PartitionError as exc:
            # too few cut points: the error must name the largest K, and that K must work
            largest = max_blocks(original, aux, SIZE)
            if largest >= K or f"k can be 1 to {largest}" not in str(exc) or largest < 2:
                raise
            details["k_error"] = str(exc)
            local = fxlocal.convert(original, k=largest, aux=aux, input_size=SIZE)
        details.update(k=local.k, candidates=local.plan.num_candidates)
    mode = FakeTensorMode() if fake else None
    if fake:
        with FakeCopyMode(mode):
            trained = copy.deepcopy(local)
    else:
        trained = local
    ctx = mode if fake else torch.device("cpu")
    with ctx:
        x = torch.randn(2, *SIZE, device=device)
        y = torch.randint(0, CLASSES, (2,), device=device)
        with _stage("step"):
            optimizers = [torch.optim.SGD(list(trained.block_parameters(b)), lr=0.01, momentum=0.9) for b in range(trained.k)]
            losses = trained.train_step(x, y, optimizers, as_tensors=True)
            if not fake and not all(torch.isfinite(loss) for loss in losses):
                raise _StageFailure("step", f"non-finite loss {[float(v) for v in losses]}")
        with _stage("isolation"):
            problems = isolation_violations(trained, x, y)
            if problems:
                raise _StageFailure("isolation", "; ".join(problems))
    with _stage("export"):
        with device:
            fresh = fxlocal.create_model(name, CLASSES, SIZE)
        why = export_mismatch(local, fresh, None if fake else torch.randn(2, *SIZE))
        if why:
            raise _StageFailure("export", why)
    return details


# ---------------------------------------------------------------- the sweep


def _run_one(name: str, aux: list[str], fake_above: int, timeout: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", name, "--aux", *aux, "--fake-above", str(fake_above)]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [_crash_row(name, a, f"timed out after {timeout:.0f} s", started) for a in aux]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [_crash_row(name, a, f"process died (exit {done.returncode}): {tail}", started) for a in aux]
    return [json.loads(line) for line in lines]


def _crash_row(name: str, aux: str, reason: str, started: float) -> dict:
    return {"model": name, "family": family(name), "aux": aux, "status": "fail", "stage": "process",
            "reason": reason[:300], "seconds": round(time.perf_counter() - started, 2)}


def render(rows: list[dict], command: str) -> str:
    """docs/zoo.md: a summary per source and aux method, the failures, and every row."""
    models = sorted({r["model"] for r in rows})
    lines = [
        "# The zoo: every timm and torchvision classification model through fxlocal",
        "",
        f"Made by `{command}` ({len(models)} models, {len(rows)} model × aux rows; input {SIZE}, K={K}, "
        f"{CLASSES} classes). Each row: convert, one train step with per-block optimizers, gradient "
        "isolation of every block's loss, export round trip (strict load into a fresh original; "
        "bit-identical eval output on real tensors). `fake`: built on the meta device, every stage "
        "on fake tensors. Models timm itself excludes from its FX tests (`vit_gi*`, `hiera*`, "
        "`gemma4_vit*`) are counted apart.",
        "",
        "## Summary",
        "",
        "| models | aux | ok | failed | ok % |",
        "|---|---|---|---|---|",
    ]
    groups = {
        "timm (FX-tested)": lambda r: not r["model"].startswith("torchvision:") and not fx_excluded(r["model"]),
        "timm (FX-excluded)": lambda r: fx_excluded(r["model"]),
        "torchvision": lambda r: r["model"].startswith("torchvision:"),
    }
    for label, keep in groups.items():
        for aux in AUX:
            sel = [r for r in rows if keep(r) and r["aux"] == aux]
            if sel:
                ok = sum(r["status"] == "ok" for r in sel)
                lines.append(f"| {label} | {aux} | {ok} | {len(sel) - ok} | {100 * ok / len(sel):.1f} |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failures", "", "| model | aux | stage | reason |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['aux']} | {r['stage']} | {r['reason'].replace('|', '/')} |" for r in failures]
    lines += ["", "## Every model", "", "| model | family | aux | status | K | cut candidates | params (M) | mode | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], AUX.index(r["aux"]) if r["aux"] in AUX else 9)):
        status = "ok" if r["status"] == "ok" else f"fail ({r['stage']})"
        lines.append(f"| {r['model']} | {r['family']} | {r['aux']} | {status} | {r.get('k', '')} | "
                     f"{r.get('candidates', '')} | {r.get('params_m', '')} | {r.get('mode', '')} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="glob patterns over the model names (torchvision: prefixed)")
    p.add_argument("--sample", action="store_true", help="only the smallest model of every family")
    p.add_argument("--aux", nargs="*", default=list(AUX))
    p.add_argument("--fake-above", type=int, default=30_000_000, help="parameters above which a model runs on fake tensors")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model (all its aux methods)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/zoo.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "docs/zoo.md")
    p.add_argument("--fresh", action="store_true", help="forget the results already recorded")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # worker: print one JSON line per aux method
        for row in check_model(args.one, args.aux, args.fake_above):
            print(json.dumps(row), flush=True)
        return
    names = all_models()
    if args.models:
        names = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    if args.sample:
        # computed once (it builds every model on the meta device), then read back: CI's sample
        names = _sample(names, args.results.parent / "zoo_sample.txt")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and args.results.exists():
        args.results.unlink()
    done = {(r["model"], r["aux"]) for r in _read(args.results)}
    todo = [n for n in names if any((n, a) not in done for a in args.aux)]
    print(f"{len(names)} models, {len(todo)} to run, {args.jobs} at a time", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool, args.results.open("a") as out:
        for i, rows in enumerate(pool.map(lambda n: _run_one(n, args.aux, args.fake_above, args.timeout), todo)):
            for row in rows:
                out.write(json.dumps(row) + "\n")
            out.flush()
            bad = [f"{r['aux']}:{r['stage']}" for r in rows if r["status"] != "ok"]
            print(f"[{i + 1}/{len(todo)}] {rows[0]['model']}: {'ok' if not bad else 'FAIL ' + ' '.join(bad)}", file=sys.stderr)
    rows = list({(r["model"], r["aux"]): r for r in _read(args.results)}.values())
    command = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, command.strip()))
    print(f"wrote {args.out} ({len(rows)} rows)", file=sys.stderr)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    main()
