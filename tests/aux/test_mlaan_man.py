import pytest
import torch

import fxlocal
from fxlocal.aux.ema import EMATwin
from fxlocal.aux.mlaan import leap_chain
from fxlocal.training.checkpoint import load_converted, save_converted
from helpers import (
    assert_gradient_isolation,
    assert_trains,
    convert_named,
    run_cli,
    saved_activation_bytes,
)

CIFAR = (3, 32, 32)
RESNET32_STAGES = [0] * 6 + [1] * 5 + [2] * 5  # stem + layer1 | layer2 | layer3
RESNET101_STAGES = [0] + [1] * 3 + [2] * 4 + [3] * 23 + [4] * 3  # stem | layer1 | … | layer4 (torchvision)


def twins(local):
    return [m for m in local.modules() if isinstance(m, EMATwin)]


def test_leap_chain_follows_the_references_pattern():
    # The reference's hand-written ImageNet ResNet-101 chains (stages as our graph finds them):
    # layer1 blocks [[2,0],[3,0],[4,0],[4,2]], layer2 blocks [[3,0],[4,0],[4,1]], layer3 blocks
    # [[4,0],[4,1]], layer4.0 [[4,1],[4,2]]: a leap to the first unit of every later stage,
    # then the last unit (where the reference ends at layer4.1, a copy of the same shape).
    size = (3, 64, 64)
    model = fxlocal.create_model("torchvision:resnet101", 10, size)
    assert [u.stage for u in fxlocal.analyze(fxlocal.trace(model, size), size).units] == RESNET101_STAGES
    layer1, layer2, layer3, layer4 = 1, 4, 8, 31
    assert leap_chain(layer1, RESNET101_STAGES) == [layer2, layer3, layer4, 33]
    assert leap_chain(layer1 + 2, RESNET101_STAGES) == [layer2, layer3, layer4, 33]
    assert leap_chain(layer2 + 3, RESNET101_STAGES) == [layer3, layer4, 33]
    assert leap_chain(layer3 + 10, RESNET101_STAGES) == [layer4, 33]
    assert leap_chain(layer4, RESNET101_STAGES) == [32, 33]
    # ResNet-32: one copy per later stage, then the last unit
    assert leap_chain(0, RESNET32_STAGES) == leap_chain(5, RESNET32_STAGES) == [6, 11, 15]
    assert leap_chain(7, RESNET32_STAGES) == [11, 15]
    # fill: the reference's hand-written CIFAR ResNet-32 chains, [[2,0],[3,0],[3,2],[3,4]] for
    # stage-1 blocks; a stage-2 block leaps to stage 3, then samples up to the last unit
    assert leap_chain(0, RESNET32_STAGES, fill=True) == leap_chain(5, RESNET32_STAGES, fill=True) == [6, 11, 13, 15]
    assert leap_chain(7, RESNET32_STAGES, fill=True) == [11, 12, 14, 15]
    # inside the last stage: up to length-1 of the remaining units, as the reference's CIFAR
    # chains ([[3,1],[3,2],[3,4]], [[3,2],[3,3],[3,4]], [[3,3],[3,4]], [[3,4]])
    for fill in (False, True):
        chains = [leap_chain(h, RESNET32_STAGES, fill=fill) for h in (11, 12, 13, 14)]
        assert chains == [[12, 14, 15], [13, 14, 15], [14, 15], [15]]
    # a shorter length keeps the first leaps and the last unit
    assert leap_chain(layer1, RESNET101_STAGES, length=2) == [layer2, 33]
    assert leap_chain(0, RESNET32_STAGES, length=1) == [15]
    for h in range(15):
        assert leap_chain(h, RESNET32_STAGES)[-1] == leap_chain(h, RESNET32_STAGES, fill=True)[-1] == 15
    for h in range(33):
        assert leap_chain(h, RESNET101_STAGES)[-1] == 33


def test_ema_update_is_exactly_the_momentum_rule():
    live = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    twin = EMATwin(live, momentum=0.9)
    assert not list(twin.parameters())  # buffers only
    before = [t.clone() for t in twin.averaged()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p))
    twin.update()
    for old, new, p in zip(before, twin.averaged(), live.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * p)


@pytest.mark.parametrize("aux", ["mlaan", "man"])
def test_ema_twins_get_no_gradient_and_no_optimizer_slot_and_all_update(aux):
    local = fxlocal.convert("resnet32_cifar", k=4, aux=aux, input_size=CIFAR)
    found = twins(local)
    assert len(found) == 3  # one per aux head
    twin_tensors = {id(t) for twin in found for t in twin.averaged()}
    opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    in_groups = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not twin_tensors & in_groups
    initial = [[t.clone() for t in twin.averaged()] for twin in found]
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    for _ in range(2):  # the first step moves the live units, the second moves every twin
        local.train_step(x, y, opt)
    for twin, start in zip(found, initial):
        assert all(not t.requires_grad and t.grad is None for t in twin.averaged())
        assert any(not torch.equal(a, b) for a, b in zip(start, twin.averaged())), "a twin was not updated"


def test_mlaan_cascade_reaches_exactly_span_blocks():
    local = fxlocal.convert("resnet32_cifar", k=6, aux="mlaan", input_size=CIFAR)
    x, y = torch.randn(2, *CIFAR), torch.randint(0, 10, (2,))
    assert_gradient_isolation(local, x, y, window=2)
    local.local_losses(x, y)[3].backward()
    assert all(p.grad is not None for p in local.blocks[2].parameters())  # the cascade
    assert all(p.grad is None for p in local.blocks[1].parameters())  # but no further


def test_mlaan_options_reach_the_heads():
    local = fxlocal.convert(
        "resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR, span=3, chain_length=2, momentum=0.9, wx=0.5, wy=0.5
    )
    head = local.heads[0]
    assert head.input_window == 3 and local.input_window == 3
    assert (head.wx, head.wy) == (0.5, 0.5)
    assert all(t.momentum == 0.9 for t in twins(local))
    assert "units [6, 15]" in local.plan.blocks[0].head


def test_mlaan_loss_is_the_weighted_sum_of_both_paths():
    local = fxlocal.convert("resnet32_cifar", k=3, aux="mlaan", input_size=CIFAR, wx=0.25, wy=0.75).eval()
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    loss = local.local_losses(x, y)[1]
    out0 = local.blocks[0](x)
    out1 = local.blocks[1](*out0)
    ce = torch.nn.functional.cross_entropy
    head = local.heads[1]
    expected = 0.25 * ce(head.independent(out1[0]), y) + 0.75 * ce(head(out1[0]), y)
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("aux", ["mlaan", "man"])
@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet50", (3, 64, 64)),
        ("torchvision:resnet101", (3, 64, 64)),
        ("convnext_atto", (3, 64, 64)),
        ("vit_tiny_patch16_224", (3, 32, 32)),
        ("efficientnet_b0", (3, 64, 64)),
    ],
)
def test_converts_trains_and_isolates(aux, name, size):
    local = convert_named(name, size, 10, k=4, aux=aux)
    assert len(twins(local)) == 3
    assert_trains(local, size)
    x, y = torch.randn(2, *size), torch.randint(0, 10, (2,))
    assert_gradient_isolation(local, x, y, window=2 if aux == "mlaan" else 1)


def test_man_head_is_sized_from_the_copied_units_output():
    local = fxlocal.convert("resnet32_cifar", k=4, aux="man", input_size=CIFAR)
    for head, block in zip(local.heads, local.plan.blocks):
        assert "LB(unit" in block.head and "EMA twin" in block.head
        out = head(torch.randn(2, *block.cut_shape))
        assert out.shape == (2, 10)


def test_checkpoint_keeps_ema_twins(tmp_path):
    local = fxlocal.convert("resnet32_cifar", k=3, aux="mlaan", input_size=CIFAR)
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    for _ in range(2):
        local.train_step(torch.randn(4, *CIFAR), torch.randint(0, 10, (4,)), opt)
    save_converted(local, tmp_path / "m.pt")
    back = load_converted(tmp_path / "m.pt")
    for a, b in zip(twins(local), twins(back)):
        assert all(torch.equal(x, y) for x, y in zip(a.averaged(), b.averaged()))


@pytest.mark.parametrize("aux,marker", [("mlaan", "EMA twin on unit"), ("man", "MAN: LB(unit")])
def test_cli_prints_each_heads_structure(aux, marker):
    result = run_cli(["convert", "resnet32_cifar", "--k", "4", "--aux", aux, "--input-size", "3", "32", "32"], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(marker) == 3


def test_cli_aux_options_reach_mlaan():
    result = run_cli(["convert", "resnet32_cifar", "--k", "4", "--aux", "mlaan", "--input-size", "3", "32", "32",
         "--aux-option", "span=3", "--aux-option", "momentum=0.9", "--aux-option", "fill=true"],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    assert "re-running blocks 0..2" in result.output and "m=0.9" in result.output
    assert "units [6, 11, 13, 15]" in result.output  # the reference's CIFAR chain


@pytest.mark.parametrize("span", [1, 2, 3])
def test_mlaan_train_step_gradients_equal_the_connected_cascade(span):
    """train_step recomputes the cascade's earlier blocks one at a time instead of keeping
    their graphs; the gradients must be those of the connected losses."""
    import copy

    # float64: the two paths sum in different orders, and float32 rounding (relative 1e-4 on
    # near-cancelling gradient entries) would hide a real difference or flag none
    local = fxlocal.convert("resnet32_cifar", k=5, aux="mlaan", input_size=CIFAR, span=span, wx=0.3, wy=0.7).double()
    connected = copy.deepcopy(local)
    generator = torch.Generator().manual_seed(span)
    x = torch.randn(4, *CIFAR, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=generator)
    got = {}

    def record(params):
        got.update({name: p.grad.clone() for name, p in local.named_parameters() if p.grad is not None})

    local.train_step(x, y, torch.optim.SGD(local.parameters(), lr=0.0), grad_hook=record)
    sum(connected.local_losses(x, y)).backward()
    want = {name: p.grad for name, p in connected.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(want) == len(list(local.parameters()))
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-12), name


def test_mlaan_cascade_shares_the_blocks_forward():
    """Training, the cascade's loss is built on the block's own output (the reference's second
    stream computes the same values again): a block runs once for its own loss and once more,
    recomputed, for each later loss that reaches it."""
    local = fxlocal.convert("resnet32_cifar", k=3, aux="mlaan", input_size=CIFAR)
    runs = [0] * local.k
    for b, block in enumerate(local.blocks):
        first = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_pre_hook(lambda m, i, b=b: runs.__setitem__(b, runs[b] + 1))
    local.train_step(torch.randn(4, *CIFAR), torch.randint(0, 10, (4,)), torch.optim.SGD(local.parameters(), lr=0.1))
    assert runs == [2, 2, 1]


@pytest.mark.parametrize("unit", [0, 5, 12])  # 32², the first downsampling unit, 8²
def test_ema_twins_are_priced_as_what_they_save(unit):
    # the twin runs on the block's output, which needs a gradient: backward goes through it, so
    # it saves what the unit saves; its averaged weights are resident buffers (balance="memory")
    from fxlocal.aux import HeadSpec, UnitLibrary, get_aux
    from fxlocal.aux.ema import twin_cost
    from fxlocal.graph.analyze import analyze
    from fxlocal.graph.trace import trace

    size = (3, 32, 32)
    gm = trace(fxlocal.create_model("resnet32_cifar", 10, size), size)
    analysis = analyze(gm, size)
    library = UnitLibrary.from_analysis(gm, analysis)
    cut = analysis.candidates[analysis.units[unit].cut_position]
    head = get_aux("man").build_head(HeadSpec(cut.shape, cut.layout, 10, 0, 4, unit, library)).train()
    twin = head.pair.b
    x = torch.randn(8, *cut.shape, requires_grad=True)
    priced = twin_cost(library.unit_costs[unit + 1])
    assert priced.activation_bytes == pytest.approx(saved_activation_bytes(twin, x) / 8, rel=0.02)
    weights = sum(b.numel() * b.element_size() for name, b in twin.named_buffers() if not name.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert priced.buffer_bytes == weights and priced.param_bytes == 0


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("unit", [2, 12])  # 32², 8²
def test_man_head_is_priced_as_what_it_keeps(unit, recompute):
    """Stored: LB's and the twin's activations, their sum (kept by DGL's head) and DGL's own;
    recomputed: the sum and DGL's, plus one unit's activations while it is recomputed."""
    from fxlocal.aux import HeadSpec, UnitLibrary, get_aux
    from fxlocal.graph.analyze import analyze
    from fxlocal.graph.trace import trace

    size = (3, 32, 32)
    gm = trace(fxlocal.create_model("resnet32_cifar", 10, size), size)
    analysis = analyze(gm, size)
    library = UnitLibrary.from_analysis(gm, analysis)
    cut = analysis.candidates[analysis.units[unit].cut_position]
    method = get_aux("man", recompute=recompute)
    spec = HeadSpec(cut.shape, cut.layout, 10, 0, 4, unit, library)
    x = torch.randn(2, *cut.shape, requires_grad=True)  # the batch heads are measured at
    kept = saved_activation_bytes(method.build_head(spec).train(), x) / 2
    recomputed = library.unit_costs[unit + 1].activation_bytes if recompute else 0.0
    # (DGL's head is measured alone, on an input needing no gradient: within a few percent of what
    # it keeps in place on 8×8 maps; pricing without their sum fails it)
    assert method.head_cost(spec).activation_bytes == pytest.approx(kept + recomputed, rel=0.05)


class UnfoldFirst(torch.nn.Module):
    """Its first unit has no parameters (TNT's starts with an unfold into pixel tokens)."""

    def __init__(self, depth=3, dim=12):
        super().__init__()
        self.unfold = torch.nn.Unfold(2, stride=2)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, x):
        x = self.unfold(x).transpose(1, 2)  # (B, 16, 12) from (B, 3, 8, 8)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x.mean(1))


def test_a_cascade_into_a_block_without_parameters_trains_the_rest():
    size = (3, 8, 8)
    plan = fxlocal.convert(UnfoldFirst(), k=3, aux="mlaan", input_size=size).plan
    analysis = fxlocal.analyze(fxlocal.trace(UnfoldFirst(), size), size)
    plan.blocks[0].cut_node = analysis.units[0].cut  # block 0: the unfold alone
    local = fxlocal.convert(UnfoldFirst(), k=3, aux="mlaan", input_size=size, plan=plan)
    assert not list(local.blocks[0].parameters())
    assert_gradient_isolation(local, torch.randn(4, *size), torch.randint(0, 5, (4,)), blocks=[1, 2], window=2)
    losses = local.train_step(torch.randn(4, *size), torch.randint(0, 5, (4,)), torch.optim.SGD(local.parameters(), lr=0.1))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("k", [4, 8])
def test_mlaan_heads_are_priced_with_every_part_they_train(k):
    """The plan's head parameters are the built head's trainable ones: the chain's copies and
    both pool→fc heads, which on a narrow map start with two conv1×1 to 64 channels."""
    local = fxlocal.convert("resnet32_cifar", k=k, aux="mlaan", input_size=(3, 32, 32))
    for head, block in zip(local.heads, local.plan.blocks):
        assert block.head_params == sum(p.numel() for p in head.parameters() if p.requires_grad)
        assert isinstance(head.independent.layers[0], torch.nn.Conv2d)  # narrow: the conv1×1 stem is there


def test_mlaan_heads_hold_their_independent_part_and_their_chain_one_at_a_time():
    """On ResNet-32's 16-channel maps the independent head (two conv1×1 to 64 channels at 32²)
    saves more than the chain: the head is priced at the larger of the two, as measured."""
    from fxlocal.aux import HeadSpec, UnitLibrary, get_aux
    from fxlocal.graph.analyze import analyze
    from fxlocal.graph.trace import trace

    size = (3, 32, 32)
    gm = trace(fxlocal.create_model("resnet32_cifar", 10, size), size)
    analysis = analyze(gm, size)
    library = UnitLibrary.from_analysis(gm, analysis)
    cut = analysis.candidates[analysis.units[2].cut_position]
    spec = HeadSpec(cut.shape, cut.layout, 10, 0, 4, 2, library)
    method = get_aux("mlaan")
    head = method.build_head(spec).train()
    x = torch.randn(8, *cut.shape, requires_grad=True)
    independent, chain = (saved_activation_bytes(part, x) / 8 for part in (head.independent, head.cascade))
    assert independent > chain
    # priced with its input, which the block's graph holds anyway
    assert method.head_cost(spec).activation_bytes == pytest.approx(independent + x[0].numel() * 4, rel=0.01)
