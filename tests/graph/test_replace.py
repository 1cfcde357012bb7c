"""Replacement Learning (fxlocal.graph.replace): the replaced unit computes what the paper says,
trains only its two coefficients (and, with neighbour_grad, its neighbours), composes with local
learning and exports to the plain architecture."""

import copy

import pytest
import torch
from torch.func import functional_call

import fxlocal
from fxlocal.aux.ema import EMATwin
from fxlocal.graph.replace import (
    NeighbourBlend,
    ReplaceError,
    blends,
    checked_options,
    effective_parameters,
    materialise,
)
from fxlocal.training.checkpoint import load_converted, save_converted
from fxlocal.training.pipeline import pipeline_obstacle
from helpers import (
    assert_exports_bit_identically,
    assert_gradient_isolation,
    assert_one_line_error,
    assert_trains,
    run_cli,
    tiny,
)

RESNET = ("resnet32_cifar", (3, 32, 32))
VIT = ("vit_tiny_patch16_224", (3, 32, 32))


def replaced_pair(name, size, **options):
    """(original model, its replaced copy, the replacement plan), the coefficients set off 0.5."""
    original = fxlocal.create_model(name, 10, size)
    analyzed = fxlocal.analyze_model(copy.deepcopy(original), size, replace=options)
    with torch.no_grad():
        for i, blend in enumerate(blends(analyzed.model)):
            blend.coefficients.a.fill_(0.3 + 0.01 * i)
            blend.coefficients.b.fill_(0.6 - 0.01 * i)
    return original, analyzed.model, analyzed.replacement


@pytest.mark.parametrize("name,size", [RESNET, VIT], ids=["resnet32", "vit"])
def test_replaced_unit_is_the_unit_with_blended_parameters(name, size):
    original, model, plan = replaced_pair(name, size)
    assert plan.replaced
    for r in plan.replaced:
        unit, plain = model.get_submodule(r.unit), original.get_submodule(r.unit)
        a, b = blends(unit)[0].coefficients.a, blends(unit)[0].coefficients.b
        before, after = dict(original.get_submodule(r.before).named_parameters()), dict(original.get_submodule(r.after).named_parameters())
        theta = {n: a * before[n] + b * after[n] for n, _ in plain.named_parameters()}
        x = _unit_input(original, r.unit, size)
        plain.eval(), unit.eval()
        want = functional_call(plain, {**theta, **dict(plain.named_buffers())}, (x,))
        torch.testing.assert_close(unit(x), want, rtol=0, atol=0)


def _unit_input(model, path, size):
    """A batch of what unit ``path`` takes, captured by a forward hook."""
    got = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, args: got.setdefault("x", args[0]))
    with torch.no_grad():
        model.eval()(torch.randn(2, *size))
    handle.remove()
    return got["x"].clone()


@pytest.mark.parametrize("neighbour_grad", [False, True])
def test_gradients_reach_the_coefficients_and_only_with_neighbour_grad_the_neighbours(neighbour_grad):
    original, model, plan = replaced_pair(*RESNET, neighbour_grad=neighbour_grad)
    r = plan.replaced[0]
    unit = model.get_submodule(r.unit)
    x = _unit_input(original, r.unit, RESNET[1])
    model.zero_grad(set_to_none=True)
    unit(x).square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    own = {f"{r.unit}.{n}" for n, p in unit.named_parameters() if p.requires_grad}
    assert own and all(n.endswith((".a", ".b")) for n in own)  # its only trainable parameters
    neighbours = {n for n in with_grad if n.startswith((f"{r.before}.", f"{r.after}."))}
    assert own <= with_grad
    assert with_grad == own | neighbours
    plain = materialise(copy.deepcopy(unit))  # the plain unit holding θ_i
    names = [n for n, _ in plain.named_parameters()]
    if not neighbour_grad:
        assert neighbours == set()
        return
    assert neighbours == {f"{m}.{n}" for m in (r.before, r.after) for n in names}
    # θ_i = a·θ_before + b·θ_after: the neighbour before gets a·dL/dθ_i
    a = blends(unit)[0].coefficients.a.detach()
    plain(x).square().sum().backward()
    before = dict(model.get_submodule(r.before).named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(before[n].grad, a * p.grad, rtol=1e-4, atol=1e-6)


def test_trainable_parameters_drop_by_the_replaced_units():
    original, model, plan = replaced_pair(*RESNET)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    removed = sum(p.numel() for r in plan.replaced for p in original.get_submodule(r.unit).parameters())
    assert len(plan.replaced) == 4  # layer1.1, layer1.3, layer2.2, layer3.2
    assert trainable(model) == trainable(original) - removed + 2 * len(plan.replaced)


def test_runs_and_reasons_on_resnet32():
    _, _, plan = replaced_pair(*RESNET)
    assert [r.unit for r in plan.replaced] == ["layer1.1", "layer1.3", "layer2.2", "layer3.2"]
    assert [(r.before, r.after) for r in plan.replaced][0] == ("layer1.0", "layer1.2")
    assert plan.kept["layer2.0"] == "neighbours differ in shape"  # the downsampling block
    assert plan.kept["layer2.1"] == "first of its run" and plan.kept["layer2.4"] == "last of its run"
    assert plan.kept["layer1.2"] == "off the interval"
    _, _, sparse = replaced_pair(*RESNET, interval=3)
    assert [r.unit for r in sparse.replaced] == ["layer1.2", "layer2.3", "layer3.3"]


@pytest.mark.parametrize("aux,k", [("none", 1), ("dgl", 4), ("mlaan", 4), ("man", 4)])
def test_composes_with_local_learning_trains_isolates_and_exports(aux, k):
    name, size = RESNET
    local = fxlocal.convert(name, k=k, aux=aux, input_size=size, num_classes=10, replace={})
    x, y = torch.randn(4, *size), torch.randint(0, 10, (4,))
    if k > 1:
        assert_gradient_isolation(local, x, y, window=local.input_window)
    assert_trains(local, size)
    assert_exports_bit_identically(local, name, size)
    assert local.config["replace"] == {"interval": 2, "neighbour_grad": False}


def test_a_neighbour_in_another_block_is_read_without_its_gradient():
    name, size = RESNET
    # cut right after the replaced layer1.1: its neighbour layer1.2 trains in the next block
    local = fxlocal.convert(name, k=3, aux="dgl", input_size=size, num_classes=10, replace={"neighbour_grad": True},
                            cuts=["layer1.1", "layer2.2"])
    first = blends(local.blocks[0])
    assert first and all(b.attached == [True, False] for b in first)
    assert_gradient_isolation(local, torch.randn(4, *size), torch.randint(0, 10, (4,)))
    assert "another block trains" in pipeline_obstacle(local)
    inside = fxlocal.convert(name, k=2, aux="dgl", input_size=size, num_classes=10, replace={}, cuts=["layer1.4"])
    assert pipeline_obstacle(inside) is None  # every replaced unit's neighbours train in its own block


def test_no_cut_falls_inside_a_replaced_unit():
    name, size = RESNET
    analyzed = fxlocal.analyze_model(name, size, num_classes=10, replace={})
    units = {u.name: u for u in analyzed.analysis.units}
    positions = {c.node: i for i, c in enumerate(analyzed.analysis.candidates)}
    for k in (6, 12, 20):
        local = fxlocal.convert(analyzed, k=k, aux="dgl")
        for r in analyzed.replacement.replaced:
            end = units[r.unit].cut_position
            start = units[r.before].cut_position
            assert not any(start < positions[c] < end for c in local.plan.cuts), (k, r.unit)


def test_ema_twin_of_a_replaced_unit_follows_its_blended_weights():
    _, model, plan = replaced_pair(*RESNET)
    unit = model.get_submodule(plan.replaced[0].unit)
    twin = EMATwin(unit, momentum=0.5)
    assert not blends(twin.module)  # a plain unit, reading no neighbour
    start = [t.clone() for t in twin.averaged()]
    with torch.no_grad():
        blends(unit)[0].coefficients.a.add_(0.25)
    twin.update()
    now = [t.detach() for _, t in effective_parameters(unit)]
    for s, ema, live in zip(start, twin.averaged(), now):
        torch.testing.assert_close(ema, 0.5 * s + 0.5 * live)


def test_converted_file_and_recipe_rebuild_the_replacement(tmp_path):
    name, size = RESNET
    local = fxlocal.convert(name, k=2, aux="dgl", input_size=size, num_classes=10, replace={"neighbour_grad": True})
    assert_trains(local, size)
    save_converted(local, tmp_path / "m.pt")
    back = load_converted(tmp_path / "m.pt")
    assert back.replacement.options == checked_options({"neighbour_grad": True})
    for (n, p), (_, q) in zip(local.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n
    recipe = tiny(tmp_path, convert__replace={"interval": 2})
    from fxlocal.training.build import build_model

    built = build_model(recipe)
    assert built.replacement is not None and built.replacement.replaced


# ten families: each either replaces units or says why none qualify
FAMILIES = [
    ("resnet32_cifar", (3, 32, 32), True),
    ("resnet50", (3, 64, 64), True),  # layer1: three bottlenecks after the first
    ("vit_tiny_patch16_224", (3, 32, 32), True),
    ("convnext_atto", (3, 64, 64), True),
    ("torchvision:vgg11", (3, 32, 32), False),  # units are conv+relu(+pool), several modules each
    ("mobilenetv3_small_100", (3, 64, 64), False),
    ("resnet18", (3, 32, 32), False),  # two blocks per stage: no unit has two same-shaped neighbours
    ("efficientnet_b0", (3, 64, 64), True),
    ("regnetx_002", (3, 64, 64), False),  # its units are whole stages, each of other shapes
    ("deit_tiny_patch16_224", (3, 32, 32), True),
]


@pytest.mark.parametrize("name,size,replaces", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_zoo_families_replace_units_or_say_why_not(name, size, replaces):
    analyzed = fxlocal.analyze_model(name, size, num_classes=10)
    from fxlocal.graph.replace import plan_replacement

    plan = plan_replacement(analyzed.model, analyzed.analysis.units, checked_options({}))
    assert bool(plan.replaced) == replaces, [(u.name, plan.why(u)) for u in analyzed.analysis.units]
    assert all(plan.why(u) for u in analyzed.analysis.units)  # every unit: replaced, or the reason
    if not replaces:
        with pytest.raises(ReplaceError, match="no unit can be replaced"):
            fxlocal.convert(name, k=2, input_size=size, num_classes=10, replace={})
        return
    local = fxlocal.convert(name, k=2, aux="dgl", input_size=size, num_classes=10, replace={})
    assert len(blends(local)) > 0 and all(isinstance(b, NeighbourBlend) for b in blends(local))
    assert_gradient_isolation(local, torch.randn(2, *size), torch.randint(0, 10, (2,)))
    assert_trains(local, size, batch=2)
    assert_exports_bit_identically(local, name, size)


def test_cli_convert_replace_and_inspect_say_which_units(tmp_path):
    result = run_cli(["convert", "resnet32_cifar", "--input-size", 3, 32, 32, "--k", 2, "--replace", "interval=2"],
                     env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "replaced 4 units" in result.stdout and "layer1.1 = a·layer1.0 + b·layer1.2" in result.stdout
    result = run_cli(["inspect", "resnet32_cifar", "--input-size", 3, 32, 32], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "a·layer3.1 + b·layer3.3" in result.stdout and "neighbours differ in shape" in result.stdout
    assert "--replace interval=2 replaces 4 of 16 units" in result.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["resnet32_cifar", "--input-size", 3, 32, 32, "--replace", "interval=1"], "at least 2"),
        (["resnet32_cifar", "--input-size", 3, 32, 32, "--replace", "every=2"], "unknown replace option 'every'"),
        (["resnet32_cifar", "--input-size", 3, 32, 32, "--replace", "interval"], "--replace takes KEY=VALUE"),
        (["resnet18", "--input-size", 3, 32, 32, "--replace", "interval=2"], "fxlocal inspect"),
    ],
    ids=["interval-1", "unknown-option", "not-a-pair", "nothing-to-replace"],
)
def test_cli_bad_replace_is_one_line(args, fragment, tmp_path):
    saved = tmp_path / "m.pt"
    result = run_cli(["convert", *args, "--output", saved])
    assert_one_line_error(result, fragment)
    assert not saved.exists()


def test_recipe_refuses_an_interval_below_two(tmp_path):
    from fxlocal.training.recipe import RecipeError

    with pytest.raises(RecipeError, match="convert.replace.interval"):
        tiny(tmp_path, convert__replace={"interval": 1})


def test_replace_api_rewrites_the_model_in_place():
    model = fxlocal.create_model(*RESNET[:1], 10, RESNET[1])
    assert fxlocal.replace(model, input_size=RESNET[1]) is model
    assert {b.name for b in blends(model)} == {"weight", "bias"} and len({id(b.coefficients) for b in blends(model)}) == 4
    with pytest.raises(ReplaceError, match="at least 2"):
        fxlocal.replace("resnet32_cifar", interval=1, input_size=RESNET[1])
