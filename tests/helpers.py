"""Shared test helpers."""

import functools
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]  # the repository
SHARED = REPO.parent / "shared"  # ../shared: the design reference and the full datasets


def run_cli(args, env: dict | None = None, **kwargs):
    """fxlocal's CLI in this process (typer's CliRunner), on a terminal of 80 columns unless
    ``env`` sets COLUMNS; arguments are turned into strings."""
    from typer.testing import CliRunner

    from fxlocal.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80", **(env or {})}, **kwargs)


def assert_gradient_isolation(local, x, y, blocks=None, window=1):
    """Block j's loss reaches exactly the parameters of blocks j-window+1..j and head j.

    ``window`` is 1 for strictly local methods; MLAAN's cascade reaches back ``span`` blocks.
    """
    from fxlocal.tools.verify import isolation_violations

    assert local.input_window == window
    assert isolation_violations(local, x, y, blocks) == []
    losses = local.local_losses(x, y)
    for j in blocks if blocks is not None else range(local.k):
        local.zero_grad(set_to_none=True)
        losses[j].backward(retain_graph=True)
        assert any(p.grad.abs().sum() > 0 for p in local.block_parameters(j))
    local.zero_grad(set_to_none=True)


def assert_trains(local, size, num_classes=10, batch=4):
    """One train step gives finite per-block losses and moves every block's parameters."""
    before = [[p.detach().clone() for p in local.block_parameters(b)] for b in range(local.k)]
    opt = torch.optim.SGD(local.parameters(), lr=0.01)
    losses = local.train_step(torch.randn(batch, *size), torch.randint(0, num_classes, (batch,)), opt)
    assert len(losses) == local.k and all(torch.isfinite(torch.tensor(losses)))
    for b in range(local.k):
        after = list(local.block_parameters(b))
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(before[b], after)), f"block {b} did not train"
    return losses


def assert_exports_bit_identically(local, name, size, num_classes=10):
    """The backbone loads strictly into a fresh original model and gives the same eval output."""
    import fxlocal
    from fxlocal.tools.verify import export_mismatch

    x = torch.randn(2, *size)
    assert export_mismatch(local, fxlocal.create_model(name, num_classes, size), x) is None
    with torch.no_grad():
        assert torch.isfinite(local.eval()(x)).all()


def tiny(tmp_path, **changes):
    """The quickstart recipe, shrunk to a few seconds (K=2). ``section__field=value`` changes a field."""
    from fxlocal.training.recipe import load_recipe

    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data.update(epochs=2, batch_size=32, output_dir=str(tmp_path / "run"))
    data["data"].update(train_subset=128, test_subset=64)
    data["convert"]["k"] = 2
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return load_recipe(data=data)


def saved_activation_bytes(module, *inputs):
    """Bytes ``module``'s forward keeps for backward, besides its inputs, weights and buffers."""
    resident = {t.untyped_storage().data_ptr() for t in [*inputs, *module.parameters(), *module.buffers()]}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in resident and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return total


def assert_trains_alike(a, b, size, classes, rtol=1e-5, atol=1e-7):
    """Two SGD-momentum steps of LocalModels ``a`` and ``b`` (same state, per-block optimizers,
    same batches) end with the same state: parameters, BatchNorm running statistics, EMA twins."""
    for local in (a, b):
        opts = [torch.optim.SGD(list(local.block_parameters(j)), lr=0.1, momentum=0.9) for j in range(local.k)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            local.train_step(torch.randn(8, *size, generator=gen), torch.randint(0, classes, (8,), generator=gen), opts)
    want, got = a.state_dict(), b.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name].float(), got[name].float(), rtol=rtol, atol=atol), name


def assert_one_line_error(result, *fragments):
    """Exit 2, one line on stderr naming what to do, nothing on stdout, no exception but the exit."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "", result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@functools.lru_cache(maxsize=None)
def _analyzed(name: str, size: tuple, num_classes):
    import fxlocal

    return fxlocal.analyze_model(name, size, num_classes=num_classes)


def convert_named(name: str, size, num_classes=None, **options):
    """``fxlocal.convert(name, input_size=size, num_classes=..., **options)``, from one analysis
    per model and size in this test process: tracing and measuring a model costs more than
    converting it, and ``convert`` works on a copy of the analysed model (its LocalModels share
    no weights), so a test sees what converting by name gives."""
    import fxlocal

    return fxlocal.convert(_analyzed(name, tuple(size), num_classes), **options)


def block_price_errors(local, batch, size, classes):
    """(price - measured) / measured for each block of a ``balance="memory"`` conversion: the
    plan's price of the block against its measured part of a (fake) step at ``batch``, both less
    what is held whatever the cuts (every weight and its momentum; a price counts its own head's)."""
    from fxlocal.memory import block_step_peaks

    def weights_and_momentum(module):
        return 2 * sum(p.numel() * p.element_size() for p in module.parameters())

    errors = []
    for b, (plan, peak) in enumerate(zip(local.plan.blocks, block_step_peaks(local, batch, size, classes))):
        own_head = weights_and_momentum(local.heads[b]) if b < len(local.heads) else 0
        price, held = plan.cost - own_head, peak - weights_and_momentum(local)
        errors.append((price - held) / held)
    return errors
