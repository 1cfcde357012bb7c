import pytest
import torch

import fxlocal
from fxlocal.aux.adapters import make_adapter, make_tensors_adapter
from fxlocal.aux.auglocal import pyramid_depths, sampled_units
from helpers import assert_gradient_isolation, assert_trains, convert_named, run_cli

# --- sampling: the reference values ---------------------------------------------------------


def test_sampled_units_reference_values():
    assert sampled_units(0, 16, 3) == [5, 10, 15]  # ResNet-32, first hidden unit
    assert sampled_units(12, 16, 3) == [13, 14, 15]  # d >= L-1-j: all later units
    assert sampled_units(14, 16, 3) == [15]
    assert sampled_units(1, 16, 3) == [6, 10, 15]  # 1 + 14/3·i = 5.67, 10.33, 15
    assert sampled_units(3, 16, 4) == [6, 9, 12, 15]
    # Python's round is half-to-even: 2 + 13/2 = 8.5 -> 8 (round-half-up would give 9)
    assert sampled_units(2, 16, 2) == [8, 15]
    for j in range(15):
        for d in range(1, 6):
            picks = sampled_units(j, 16, d)
            assert picks[-1] == 15 and picks == sorted(set(picks)) and picks[0] > j


def test_pyramid_depths_reference_values():
    # ResNet-32 with K=16 local modules: the reference uses K' = K - d, i.e. K' - 1 aux nets
    assert pyramid_depths(16 - 3 - 1, 3) == [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert pyramid_depths(16 - 5 - 1, 5) == [5, 5, 5, 4, 4, 4, 4, 3, 3, 3]
    assert pyramid_depths(5, 3, tau=0) == [3] * 5
    assert pyramid_depths(1, 4) == [4]
    assert min(pyramid_depths(50, 1, tau=1.0)) == 1


# --- units --------------------------------------------------------------------------------------


def units_of(name, size):
    gm = fxlocal.trace(fxlocal.create_model(name, 10, size), size)
    return fxlocal.analyze(gm, size).units


def test_resnet32_units_match_the_papers():
    units = units_of("resnet32_cifar", (3, 32, 32))
    assert len(units) == 16
    assert units[0].modules == ("conv1", "bn1", "act1")
    assert [u.modules for u in units[1:]] == [(f"layer{s}.{b}",) for s in (1, 2, 3) for b in range(5)]
    assert [u.stage for u in units] == [0] * 6 + [1] * 5 + [2] * 5
    assert units[6].in_shape == (16, 32, 32) and units[6].out_shape == (32, 16, 16)


def test_resnet110_has_55_units():
    assert len(units_of("resnet110_cifar", (3, 32, 32))) == 55


@pytest.mark.parametrize(
    "name,size,count,block",
    [
        ("torchvision:resnet101", (3, 64, 64), 34, "layer3.0"),
        ("vit_tiny_patch16_224", (3, 32, 32), 13, "blocks.0"),
        ("convnext_atto", (3, 64, 64), 16, "stages.1.blocks.0"),
        ("swin_tiny_patch4_window7_224", (3, 64, 64), 16, "layers.1.blocks.0"),
        ("efficientnet_b0", (3, 64, 64), 18, "blocks.1.1"),
        # stages held by nn.Sequential subclasses (timm's SequentialTuple, torchvision's AnyStage)
        ("pit_ti_224", (3, 224, 224), 15, "transformers.1.blocks.0"),
        ("torchvision:regnet_y_400mf", (3, 64, 64), 17, "trunk_output.block2.block2-0"),
    ],
)
def test_units_are_the_models_blocks(name, size, count, block):
    units = units_of(name, size)
    assert len(units) == count
    assert (block,) in [u.modules for u in units]


# --- adapters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,src_layout,dst,dst_layout,params",
    [
        ((16, 32, 32), "nchw", (16, 32, 32), "nchw", 0),
        ((16, 32, 32), "nchw", (32, 16, 16), "nchw", 16 * 32),  # pool + conv1x1
        ((16, 32, 32), "nchw", (16, 16, 16), "nchw", 0),  # pool only
        ((56, 56, 96), "nhwc", (28, 28, 192), "nhwc", 96 * 192),
        ((96, 56, 56), "nchw", (56, 56, 96), "nhwc", 0),  # a permute
        ((197, 192), "nlc", (192, 14, 14), "nchw", 0),  # class token dropped, grid restored
        ((192, 14, 14), "nchw", (197, 192), "nlc", 0),
        ((64, 8, 8), "nchw", (128,), "nc", 64 * 128),
    ],
)
def test_adapter_is_the_smallest_that_fits(src, src_layout, dst, dst_layout, params):
    adapter = make_adapter(src, src_layout, dst, dst_layout)
    assert tuple(adapter(torch.randn(2, *src)).shape[1:]) == dst
    assert sum(p.numel() for p in adapter.parameters()) == params


@pytest.mark.parametrize(
    "given,wanted,identity",
    [
        ([((8, 4, 4), "nchw"), ((3, 4, 4), "nchw")], [((8, 4, 4), "nchw"), ((3, 4, 4), "nchw")], True),
        ([((8, 4, 4), "nchw"), ((3, 4, 4), "nchw")], [((16, 2, 2), "nchw"), ((8, 4, 4), "nchw")], False),
        ([((8, 4, 4), "nchw")], [((16, 2, 2), "nchw"), ((8, 4, 4), "nchw")], False),  # second made from the first
        ([((8, 4, 4), "nchw"), ((3, 4, 4), "nchw")], [((8, 4, 4), "nchw")], False),  # carried one added in
    ],
)
def test_tensors_adapter_fits_each_tensor_a_unit_takes(given, wanted, identity):
    adapter = make_tensors_adapter(given, wanted)
    assert isinstance(adapter, torch.nn.Identity) == identity
    if not identity:
        inputs = [torch.randn(2, *shape, requires_grad=True) for shape, _ in given]
        out = adapter(*inputs)
        assert [tuple(t.shape[1:]) for t in out] == [shape for shape, _ in wanted]
        sum(t.sum() for t in out).backward()  # every tensor given reaches what is handed on
        assert all(t.grad is not None for t in inputs)


# --- the heads ----------------------------------------------------------------------------------


def test_resnet32_heads_copy_the_sampled_units():
    local = fxlocal.convert("resnet32_cifar", k=16, aux="auglocal", input_size=(3, 32, 32))
    assert [b.module_paths for b in local.plan.blocks[:2]] == [["conv1", "bn1", "act1"], ["layer1.0"]]
    assert "copies units [5, 10, 15] (layer1.4, layer2.4, layer3.4)" in local.plan.blocks[0].head
    depths = [h.summary.split(":")[0] for h in local.heads]
    assert depths[:3] == ["AugLocal d=3"] * 3 and depths[-1] == "AugLocal d=1"
    backbone = {id(p) for b in local.blocks for p in b.parameters()}
    for head in local.heads:
        assert not backbone & {id(p) for p in head.parameters()}  # fresh copies, never shared
    # a copy of layer3.4 is re-initialised, not a clone of the backbone's unit
    copy_conv = local.heads[0].stages[-2].get_submodule("layer3.4.conv1").weight
    assert not torch.equal(copy_conv, local.blocks[-1].get_submodule("layer3.4.conv1").weight)
    out = local.heads[0](torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 10)


def test_aux_depth_and_pyramid_reach_the_heads():
    local = fxlocal.convert("resnet32_cifar", k=8, aux="auglocal", input_size=(3, 32, 32), aux_depth=2, pyramid=0)
    assert all(h.summary.startswith("AugLocal d=2") or "d=1" in h.summary for h in local.heads)
    assert local.config["aux_options"] == {"aux_depth": 2, "pyramid": 0}


@pytest.mark.parametrize(
    "name,k,size",
    [
        ("resnet32_cifar", 16, (3, 32, 32)),
        ("resnet110_cifar", 4, (3, 32, 32)),
        ("torchvision:resnet101", 4, (3, 64, 64)),
        ("convnext_atto", 4, (3, 64, 64)),
        ("vit_tiny_patch16_224", 4, (3, 32, 32)),
        ("deit_tiny_patch16_224", 4, (3, 32, 32)),
        ("swin_tiny_patch4_window7_224", 4, (3, 64, 64)),
        ("efficientnet_b0", 4, (3, 64, 64)),
    ],
)
def test_auglocal_converts_trains_and_isolates(name, k, size):
    local = convert_named(name, size, 10, k=k, aux="auglocal")
    assert local.k == k
    assert_trains(local, size)
    assert_gradient_isolation(local, torch.randn(2, *size), torch.randint(0, 10, (2,)))


def test_resnet110_k55_trains():
    local = fxlocal.convert("resnet110_cifar", k=55, aux="auglocal", input_size=(3, 32, 32))
    assert local.k == 55 and all(len(b.module_paths) == 1 for b in local.plan.blocks[1:-1])
    assert_trains(local, (3, 32, 32))


def test_cli_prints_which_units_each_head_copies():
    result = run_cli(["convert", "resnet32_cifar", "--k", "16", "--aux", "auglocal", "--input-size", "3", "32", "32", "--aux-depth", "3"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "head 0: AugLocal d=3: copies units [5, 10, 15] (layer1.4, layer2.4, layer3.4)" in result.output
