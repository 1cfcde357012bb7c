"""Where fxlocal differs from the papers' reference code, the reference's behaviour is an option:
each is checked against its definition here (their accuracy effect: benchmarks/accuracy.py)."""


import pytest
import torch
import yaml

import fxlocal
from fxlocal.aux.ema import EMATwin
from fxlocal.aux.mlaan import MLAANHead, PoolLinear, WithoutOwnLoss
from fxlocal.errors import FxLocalError
from fxlocal.training.build import build_model
from fxlocal.training.loaders import train_and_evaluation_sets
from fxlocal.training.optim import make_optimizer
from fxlocal.training.recipe import RecipeError, load_recipe
from helpers import REPO, tiny

CIFAR = (3, 32, 32)
ROOT = REPO
REFERENCE = yaml.safe_load((REPO / "tests" / "data" / "mlaan_reference_chains.yaml").read_text())


def twins(module):
    return [m for m in module.modules() if isinstance(m, EMATwin)]


def step(local, batch=4, size=CIFAR, lr=0.1):
    opts = [torch.optim.SGD(list(local.block_parameters(b)), lr=lr) for b in range(local.k)]
    x, y = torch.randn(batch, *size), torch.randint(0, 10, (batch,))
    return local.train_step(x, y, opts)


def test_mlaan_pool_norm_puts_a_batchnorm_between_pool_and_linear_and_off_is_the_references_pool_fc():
    normed = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR)
    reference = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR, pool_norm=False, narrow_width=0)
    for local, norm in ((normed, True), (reference, False)):
        for head in local.heads:
            for pool_linear in [m for m in head.modules() if isinstance(m, PoolLinear)]:
                kinds = [type(m) for m in pool_linear.layers]
                assert (torch.nn.BatchNorm1d in kinds) == norm
                assert kinds[-1] is torch.nn.Linear
    # the reference's independent head is pool + fc only: no conv on the narrow maps
    assert not any(isinstance(m, torch.nn.Conv2d) for m in reference.heads[0].independent.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in normed.heads[0].independent.modules())


@pytest.mark.parametrize("ema_twins", ["all", "last"])
def test_mlaan_ema_twins_last_updates_only_the_last_blocks_twin(ema_twins):
    local = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR, ema_twins=ema_twins)
    before = [[t.clone() for t in twin.averaged()] for twin in twins(local)]
    for _ in range(2):  # the first step moves the live units, the second the twins that follow them
        step(local)
    moved = [any(not torch.equal(a, b) for a, b in zip(start, twin.averaged())) for start, twin in zip(before, twins(local))]
    assert moved == ([True, True, True] if ema_twins == "all" else [False, False, True])


def test_mlaan_copy_init_backbone_starts_the_chain_as_the_initialised_units_fresh_does_not():
    from fxlocal.aux.ema import ParallelSum

    for copy_init, same in (("backbone", True), ("fresh", False)):
        local = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR, copy_init=copy_init)
        for head in local.heads:
            pair = next(m for m in head.cascade.stages if isinstance(m, ParallelSum))  # first copy + its twin
            live = pair.b.live_parameters  # the live unit's, shared with the backbone
            copied = list(pair.a.parameters())
            assert len(copied) == len(live)
            assert all(torch.equal(c, p) for c, p in zip(copied, live)) == same
            assert not {c.data_ptr() for c in copied} & {p.data_ptr() for p in live}  # a copy, never shared


def test_mlaan_blocks_without_own_loss_are_trained_only_by_the_next_blocks_cascade():
    local = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=CIFAR, blocks_without_own_loss=1)
    assert isinstance(local.heads[0], WithoutOwnLoss) and isinstance(local.heads[1], MLAANHead)
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    losses = local.local_losses(x, y)
    assert float(losses[0]) == 0.0 and not losses[0].requires_grad
    losses[1].backward()  # block 1's cascade re-runs block 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in local.blocks[0].parameters())
    before = [p.detach().clone() for p in local.blocks[0].parameters()]
    step(local)
    assert any(not torch.equal(a, b) for a, b in zip(before, local.blocks[0].parameters()))
    with pytest.raises(FxLocalError, match="span >= 2"):
        fxlocal.get_aux("mlaan", span=1, blocks_without_own_loss=1)


@pytest.mark.parametrize("model", ["resnet32_cifar", "resnet110_cifar"])
def test_mlaan_paper_recipes_build_the_references_modules_and_chains_exactly(model):
    reference = REFERENCE[model]
    name = {"resnet32_cifar": "cifar10_resnet32_k16_mlaan.yaml", "resnet110_cifar": "cifar10_resnet110_k55_mlaan.yaml"}[model]
    recipe = load_recipe(ROOT / "recipes" / name)
    local = build_model(recipe)
    assert local.k == reference["k"]
    ends = reference["module_ends"]
    assert [bp.module_paths[-1] for bp in local.plan.blocks[:-1]] == ends[:-1]
    assert local.plan.blocks[0].module_paths[:3] == ["conv1", "bn1", "act1"]  # the stem is in module 0
    assert isinstance(local.heads[0], WithoutOwnLoss)
    chains = {ends[b]: list(head.chain_units) for b, head in enumerate(local.heads) if b}
    assert chains == reference["chains"]


def test_mlaan_chains_table_is_checked_against_the_graph():
    ends = REFERENCE["resnet32_cifar"]["module_ends"]
    chains = dict(REFERENCE["resnet32_cifar"]["chains"])
    analyzed = fxlocal.analyze_model("resnet32_cifar", CIFAR)
    kw = dict(k=15, aux="mlaan", cuts=ends[:-1], blocks_without_own_loss=1)
    with pytest.raises(FxLocalError, match="no entry for block 13"):
        fxlocal.convert(analyzed, chains={k: v for k, v in chains.items() if k != "layer3.3"}, **kw)
    with pytest.raises(FxLocalError, match="not a unit"):
        fxlocal.convert(analyzed, chains={**chains, "layer3.3": ["layer4.0"]}, **kw)
    with pytest.raises(FxLocalError, match="after 'layer3.2'"):
        fxlocal.convert(analyzed, chains={**chains, "layer3.2": ["layer3.1", "layer3.4"]}, **kw)


def test_cuts_build_the_blocks_a_paper_names_and_are_refused_when_they_do_not_fit():
    cuts = ["act1", "layer1.4", "layer2.4"]
    local = fxlocal.convert("resnet32_cifar", k=4, aux="dgl", input_size=CIFAR, cuts=cuts)
    # a stage's last unit ends where the stage does: the blocks are the stem and the three stages
    assert [bp.module_paths for bp in local.plan.blocks] == [["conv1", "bn1", "act1"], ["layer1"], ["layer2"], ["layer3", "global_pool", "fc"]]
    same = fxlocal.convert("resnet32_cifar", k=4, aux="dgl", input_size=CIFAR, cuts=["act1", "layer1", "layer2"])
    assert same.plan.cuts == local.plan.cuts
    with pytest.raises(FxLocalError, match="set k to 4"):
        fxlocal.convert("resnet32_cifar", k=3, aux="dgl", input_size=CIFAR, cuts=cuts)
    with pytest.raises(FxLocalError, match="'layer9.0'"):
        fxlocal.convert("resnet32_cifar", k=2, aux="dgl", input_size=CIFAR, cuts=["layer9.0"])
    with pytest.raises(RecipeError, match="keep one"):
        load_recipe(data={"model": {"name": "resnet32_cifar"}, "convert": {"cuts": ["act1"], "max_memory": "1GiB"}})


def test_man_copy_init_random_starts_lb_and_twin_apart_from_the_live_unit_and_the_twin_still_follows_it():
    live_init = fxlocal.convert("resnet32_cifar", k=3, aux="man", input_size=CIFAR)
    random_init = fxlocal.convert("resnet32_cifar", k=3, aux="man", input_size=CIFAR, copy_init="random")
    for local, same in ((live_init, True), (random_init, False)):
        pair = local.heads[0].pair
        live = pair.b.live_parameters
        assert all(torch.equal(a, b) for a, b in zip(pair.b.averaged(), live)) == same
        assert all(torch.equal(a, b) for a, b in zip(pair.a.parameters(), live)) == same
    twin = random_init.heads[0].pair.b
    start = [t.clone() for t in twin.averaged()]
    twin.update()
    for old, new, live in zip(start, twin.averaged(), twin.live_parameters):
        assert torch.allclose(new, twin.momentum * old + (1 - twin.momentum) * live)


def test_decay_norm_and_bias_decays_every_parameter_the_default_exempts_norms_and_biases(tmp_path):
    for decay_all in (False, True):
        recipe = tiny(tmp_path, optimizer__decay_norm_and_bias=decay_all, optimizer__weight_decay=0.01)
        local = build_model(recipe)
        for b in range(local.k):
            stage = torch.nn.ModuleList([local.blocks[b], *([local.heads[b]] if b < len(local.heads) else [])])
            opt = make_optimizer(recipe, stage, list(local.block_parameters(b)))
            decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
            one_dim = [p for p in local.block_parameters(b) if p.ndim <= 1]
            assert one_dim
            assert all((id(p) in decayed) == decay_all for p in one_dim)
        whole = make_optimizer(recipe, local)
        decayed = {id(p) for g in whole.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert all((id(p) in decayed) == decay_all for p in local.parameters() if p.ndim <= 1)


def test_pad_mode_reflect_pads_crops_by_reflection(tmp_path):
    from torchvision import transforms as T

    for mode in ("constant", "reflect"):
        train, _ = train_and_evaluation_sets(tiny(tmp_path, data__pad_mode=mode).data)
        crops = [t for t in train.dataset.transform.transforms if isinstance(t, T.RandomCrop)]
        assert [c.padding_mode for c in crops] == [mode]


def test_validation_holds_out_the_last_training_images_and_evaluation_sees_only_them(tmp_path):
    recipe = tiny(tmp_path, data__validation=1000, data__train_subset=None, data__test_subset=None)
    train, held_out = train_and_evaluation_sets(recipe.data)
    assert len(train) + len(held_out) == 4000 and len(held_out) == 1000
    assert list(train.indices) == list(range(3000)) and list(held_out.indices) == list(range(3000, 4000))
    assert held_out.dataset.train  # from the training split, not the test split
    small = tiny(tmp_path, data__validation=1000)  # train_subset=128, test_subset=64 as tiny sets them
    train, held_out = train_and_evaluation_sets(small.data)
    assert (len(train), len(held_out)) == (128, 64) and held_out.indices[0] == 3000
    with pytest.raises(FxLocalError, match="hold out fewer"):
        train_and_evaluation_sets(tiny(tmp_path, data__validation=4000).data)


def test_auglocal_paper_recipe_builds_the_references_modules_k16_d3_is_13_blocks_with_12_heads():
    recipe = load_recipe(ROOT / "recipes" / "cifar10_resnet32_k16_auglocal.yaml")
    local = build_model(recipe)
    assert (local.k, len(local.heads)) == (13, 12)  # the reference's local_module_num = K - d = 16 - 3
    assert [bp.module_paths[-1] for bp in local.plan.blocks[:-1]] == ["act1"] + [f"layer{s}.{b}" for s in (1, 2) for b in range(5)] + ["layer3.0"]
    assert local.plan.blocks[-1].module_paths == ["layer3.1", "layer3.2", "layer3.3", "layer3.4", "global_pool", "fc"]
    # the pyramid over its 12 aux nets (DESIGN.md §4): depths 3 ×6, then 2 ×6
    depths = [int(bp.head.split("d=")[1].split(":")[0]) for bp in local.plan.blocks[:-1]]
    assert depths == [3] * 6 + [2] * 6


def test_auglocal_init_he_draws_the_copies_convolutions_from_the_references_normal():
    he = fxlocal.convert("resnet32_cifar", k=2, aux="auglocal", input_size=CIFAR, init="he")
    default = fxlocal.convert("resnet32_cifar", k=2, aux="auglocal", input_size=CIFAR)
    for local, expect_he in ((he, True), (default, False)):
        convs = [m for m in local.heads[0].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs
        for conv in convs:
            std = conv.weight.std().item()
            target = (2.0 / (9 * conv.out_channels)) ** 0.5
            # PyTorch's default (kaiming_uniform, a=sqrt(5)) has std 1/sqrt(3·fan_in), well below He's
            assert (abs(std - target) < 0.15 * target) == expect_he
