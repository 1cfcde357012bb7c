"""The zoo sweep: every timm and torchvision classification model through fxlocal.

For each model and aux method, ``fxlocal.tools.zoo.check_model``: convert with K=4 (or, when the
model has fewer cut points, the largest K it allows, after checking that K=4 fails with an error
naming it) at 64×64 (or, for a model that rejects it, the sizes its source gives for it), one
train step with per-block optimizers, gradient isolation of every block's loss, and the export
round trip (the trained backbone loads strictly into a fresh original model; on real tensors
its eval output is bit-identical). Models above ``--fake-above`` parameters are built on the
meta device and every stage runs there: shapes and graphs are checked, nothing is computed or
allocated, so the whole zoo fits on a 2-core CPU machine.

    python benchmarks/zoo.py                  # the whole zoo (hours; resumable)
    python benchmarks/zoo.py --sample         # one model per timm family and per torchvision family
    python benchmarks/zoo.py --models 'resnet*' 'torchvision:vgg*' --aux dgl

The sample is the smallest model of each family, computed once into
``benchmarks/results/zoo_sample.txt`` (delete it to recompute); ``tests/tools/test_zoo_sample.py``
runs the same families in CI, one aux method each.

Every model runs in its own process (a crash or a hang costs one row; ``--timeout``). Rows are
appended to ``--results`` (JSON lines, one per model and aux method) and a rerun skips the
models already there (``--rerun`` checks the selected ones again, ``--stale`` those whose last
rows are from another commit than the checkout's: a sweep of one fixed checkout, resumable, and
``--fresh`` starts over); ``docs/zoo.md`` is rendered from all of them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import provenance

from fxlocal.tools.zoo import (
    AUX,
    CLASSES,
    SIZE,
    STAGES,
    K,
    all_models,
    check_model,
    family,
    fx_excluded,
    stratified_sample,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "benchmarks/results/zoo_sample.txt"


def _sample(names: list[str], cache: Path) -> list[str]:
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("\n".join(stratified_sample(all_models())) + "\n")
    wanted = set(names)
    return [n for n in cache.read_text().split() if n in wanted]


# ---------------------------------------------------------------- the sweep


def _run_one(name: str, aux: list[str], fake_above: int, timeout: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", name, "--aux", *aux, "--fake-above", str(fake_above)]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
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
    """docs/zoo.md: what was run, a summary per source and aux method, failures by stage, the
    failures, and every row."""
    models = sorted({r["model"] for r in rows})
    lines = [
        "# The zoo: every timm and torchvision classification model through fxlocal",
        "",
        f"Made by `python benchmarks/zoo.py` runs, resumed where the results stopped; rendered from every "
        f"row of `benchmarks/results/zoo.jsonl` ({len(models)} models, {len(rows)} model × aux rows), "
        f"last by `{command}`. What the sweep found and what it took to pass: [zoo_notes.md](zoo_notes.md).",
        "",
        f"**What was run:** {_scope(models)}",
        "",
        (f"Each row: convert with K={K} ({CLASSES} classes, input {SIZE}; a model that rejects it is "
        "built for the sizes its source gives for it, smallest first: column *input*), one train step "
        "with per-block optimizers, gradient isolation of every block's loss, export round trip "
        "(strict load into a fresh original; bit-identical eval output on real tensors, NaN where NaN). A model "
        f"with too few cut points for K={K} must fail with an error naming its largest K, and is "
        "then checked at that K. *fake*: built on the meta device, every stage run there, nothing computed "
        "(rows before 5 December 2026 ran the step on fake copies). "
        "Models timm itself excludes from its FX tests (`vit_gi*`, `hiera*`, `gemma4_vit*`) are "
        "outside the target and counted apart; so are feature encoders without a classification head "
        "(timm's `*_enc`), which convert refuses as not classifiers (*no head*; ok % leaves them out)."),
        "",
        "## Summary",
        "",
        (f"*ok*: real tensors; finite losses, every trainable parameter changed by the step (or listed with "
         "the reason it cannot: no gradient end to end either), isolation, identical export outputs. "
         "*ok (fake)*: the same stages on the meta device, nothing computed. *degraded*: passed at a lower K "
         f"than {K}, the model has too few cut points (the reason names its largest K). Rows without a commit "
         "predate the parameter check and these statuses: their ok means finite losses, and their status here is "
         "read from their mode and K."),
        "",
        _provenance_line(rows),
        "",
        f"| models | aux | ok at K={K} | ok (fake) at K={K} | degraded (lower K) | cannot be cut (K=1 only) | failed | no head | passed % |",
        "|---|---|---|---|---|---|---|---|---|",
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
                n = {status: sum(verdict(r) == status for r in sel) for status in VERDICTS}
                passed = n["ok"] + n["ok-fake"] + n["degraded"]
                lines.append(f"| {label} | {aux} | {n['ok']} | {n['ok-fake']} | {n['degraded']} | {n['unsplittable']} | "
                             f"{n['fail']} | {n['no head']} | {100 * passed / max(len(sel) - n['no head'], 1):.1f} |")
    failures = [r for r in rows if verdict(r) not in ("ok", "ok-fake")]
    if failures:
        failed = [r for r in failures if r["status"] == "fail"]
        stages = [s for s in (*STAGES, "process") if any(r["stage"] == s for r in failed)]
        lines += ["", "## Failures by stage", "", "| aux | " + " | ".join(stages) + " |",
                  "|---|" + "---|" * len(stages)]
        for aux in AUX:
            counts = [sum(r["aux"] == aux and r["stage"] == s for r in failed) for s in stages]
            lines.append(f"| {aux} | " + " | ".join(map(str, counts)) + " |")
        lines += ["", "## Failures and models that cannot be cut", "",
                  "| model | aux | in target | status | stage | reason |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['aux']} | {_in_target(r)} | "
                  f"{verdict(r)} | {r['stage'] or 'convert'} | {(r['reason'] or r.get('k_error', '')).replace('|', '/')} |" for r in failures]
    lines += ["", "## Every model", "",
              "| model | family | aux | status | input | K | cut candidates | params (M) | mode | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], AUX.index(r["aux"]) if r["aux"] in AUX else 9)):
        status = verdict(r) if r["status"] != "fail" else f"fail ({r['stage']})"
        size = "×".join(map(str, r["input"][1:])) if r.get("input") else ""
        lines.append(f"| {r['model']} | {r['family']} | {r['aux']} | {status} | {size} | {r.get('k', '')} | "
                     f"{r.get('candidates', '')} | {r.get('params_m', '')} | {r.get('mode', '')} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


VERDICTS = ("ok", "ok-fake", "degraded", "unsplittable", "fail", "no head")


def verdict(row: dict) -> str:
    """A row's status; rows recorded before the statuses ok-fake and degraded existed (no
    ``commit``) get the one they would have had, from their mode and K."""
    if row["status"] == "ok" and "commit" not in row:
        if row.get("k") != K:
            return "degraded"
        return "ok-fake" if row.get("mode") == "fake" else "ok"
    return row["status"]


def _provenance_line(rows: list[dict]) -> str:
    by_commit: dict[str, int] = {}
    for r in rows:
        key = f"`{r['commit']}` (torch {r['torch']}, torchvision {r['torchvision']}, timm {r['timm']})" if "commit" in r else "no commit recorded (before rows carried one)"
        by_commit[key] = by_commit.get(key, 0) + 1
    return "**Rows by fxlocal commit:** " + "; ".join(f"{n} from {key}" for key, n in sorted(by_commit.items(), key=lambda kv: -kv[1])) + "."


def _in_target(row: dict) -> str:
    if fx_excluded(row["model"]):
        return "no (FX-excluded)"
    return "no (not a classifier)" if row["status"] == "no head" else "yes"


def _scope(recorded: list[str]) -> str:
    everything = all_models()
    missing = len(set(everything) - set(recorded))
    families = len({family(n) for n in everything})
    sample = set(_sample(everything, SAMPLE))
    parts = [f"{len(everything) - missing} of the {len(everything)} models"]
    if sample <= set(recorded):
        parts.append(f"including the stratified sample (the smallest model of each of the {families} timm and "
                     "torchvision families, `--sample`, listed in `benchmarks/results/zoo_sample.txt`)")
    text = ", ".join(parts) + "; "
    if missing:
        return text + (f"the other {missing} have not been run yet: `python benchmarks/zoo.py` (hours on 2 cores) "
                       "goes on from where the results stop.")
    return text + "the full sweep."


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="glob patterns over the model names (torchvision: prefixed)")
    p.add_argument("--sample", action="store_true", help="only the smallest model of every family")
    p.add_argument("--aux", nargs="*", default=list(AUX))
    p.add_argument("--fake-above", type=int, default=30_000_000, help="parameters above which a model is checked on the meta device, computing nothing")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model (all its aux methods)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/zoo.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "docs/zoo.md")
    p.add_argument("--fresh", action="store_true", help="forget the results already recorded")
    p.add_argument("--rerun", action="store_true", help="check the selected models again; their new rows replace the old")
    p.add_argument("--stale", action="store_true",
                   help="check again the selected models whose latest rows are not from this checkout's commit "
                        "(resumable: a sweep of a fixed checkout, in pieces)")
    p.add_argument("--render", action="store_true", help="run nothing: only render --out from the recorded rows")
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
        # computed once (it builds every model on the meta device), then read back; delete the
        # file to recompute it after a timm upgrade
        names = _sample(names, SAMPLE)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and args.results.exists():
        args.results.unlink()
    recorded = {k: v for k, v in provenance("cpu").items() if k in ("commit", "torch", "torchvision", "timm", "python")}
    latest = {(r["model"], r["aux"]): r.get("commit") for r in _read(args.results)}
    current = recorded["commit"] if args.stale else None
    if current is not None and (current == "unknown" or current.endswith("+dirty")):
        print(f"error: --stale sweeps one fixed commit, and this checkout is {current}: commit, or run it in a "
              "clean worktree (git worktree add DIR COMMIT)", file=sys.stderr)
        sys.exit(2)
    todo = [] if args.render else _families_in_turn([n for n in names if args.rerun or needs_a_row(latest, n, args.aux, current)])
    print(f"{len(names)} models, {len(todo)} to run, {args.jobs} at a time", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool, args.results.open("a") as out:
        for i, rows in enumerate(pool.map(lambda n: _run_one(n, args.aux, args.fake_above, args.timeout), todo)):
            for row in rows:
                out.write(json.dumps({**row, **recorded}) + "\n")
            out.flush()
            bad = [f"{r['aux']}:{r['stage']}" if r["status"] == "fail" else f"{r['aux']}:{r['status']}"
                   for r in rows if r["status"] not in ("ok", "ok-fake")]
            print(f"[{i + 1}/{len(todo)}] {rows[0]['model']}: {'ok' if not bad else 'not ok ' + ' '.join(bad)}", file=sys.stderr)
    rows = list({(r["model"], r["aux"]): r for r in _read(args.results)}.values())
    command = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, command.strip()))
    print(f"wrote {args.out} ({len(rows)} rows)", file=sys.stderr)


def needs_a_row(latest: dict[tuple[str, str], str | None], name: str, aux: list[str], commit: str | None = None) -> bool:
    """Whether model ``name`` is missing a row for one of ``aux`` (``latest``: the commit of each
    (model, aux)'s last row), or, given ``commit``, has a last row from another commit."""
    return any((name, a) not in latest or (commit is not None and latest[(name, a)] != commit) for a in aux)


def _families_in_turn(names: list[str]) -> list[str]:
    """Each family's first model, then each family's second, ...: a sweep stopped part-way has
    still seen every family it had models left in."""
    seen: dict[str, int] = {}
    order = {}
    for position, name in enumerate(names):
        fam = family(name)
        seen[fam] = seen.get(fam, -1) + 1
        order[name] = (seen[fam], position)
    return sorted(names, key=order.__getitem__)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    main()
