"""InfoPro's heads and loss, and the plug-ins (MAN, MLAAN) on a DGL or InfoPro base."""

import pytest
import torch
import torch.nn.functional as F

import fxlocal
from fxlocal.aux import combinations, get_aux
from fxlocal.aux.ema import ParallelSum
from fxlocal.aux.infopro import (
    InfoProHead,
    build_decoder,
    loss_weights,
    supervised_contrastive_loss,
    table_weights,
)
from fxlocal.errors import UnknownAuxError
from fxlocal.graph.cost import MemoryModel
from helpers import (
    assert_exports_bit_identically,
    assert_gradient_isolation,
    assert_one_line_error,
    assert_trains,
    block_price_errors,
    convert_named,
    run_cli,
)

CIFAR = (3, 32, 32)


def test_loss_weights_move_from_the_first_weights_to_the_second():
    # r = k / (K - 2): block 0 has the _1 weights, block K-2 the _2 weights, linear between
    assert loss_weights(0, 4, (6, 0, 1, 2)) == (6, 0)
    assert loss_weights(1, 4, (6, 0, 1, 2)) == (3.5, 1)
    assert loss_weights(2, 4, (6, 0, 1, 2)) == (1, 2)
    assert loss_weights(0, 2, (5, 1, 0, 0)) == (5, 1)  # K = 2: r = 0
    assert loss_weights(7, 16, (5, 0.05, 0.2, 0.5)) == pytest.approx((5 * 0.5 + 0.2 * 0.5, 0.05 * 0.5 + 0.5 * 0.5))


def test_table_weights_are_the_references_and_interpolate_in_log_k_between():
    assert table_weights(4) == (6, 0, 1, 2)
    assert table_weights(16, "resnet110") == (5, 0, 0.5, 1)
    assert table_weights(2, "imagenet") == (5, 0.75, 0, 0)
    # K = 6 lies log2(6) - 2 = 0.585 of the way from K = 4 to K = 8
    t = 0.5849625007
    assert table_weights(6) == pytest.approx((6 - t, 0, 1 - t, 2))
    assert table_weights(64) == table_weights(16) and table_weights(1) == table_weights(2)
    # given weights override the table's, one by one
    assert get_aux("infopro", ixy_1=0.5).weights(4) == (6, 0.5, 1, 2)


def test_the_loss_is_the_formula_with_the_denormalised_input_as_target():
    torch.manual_seed(0)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    local = fxlocal.convert("resnet32_cifar", k=4, aux="infopro", input_size=CIFAR, num_classes=10,
                            input_mean=mean, input_std=std).eval()
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    losses = local.local_losses(x, y)
    x01 = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    h = (x,)
    for b in range(3):
        h = local.blocks[b](*h)
        head = local.heads[b]
        assert isinstance(head, InfoProHead)
        assert torch.equal(head.reconstruction_target(x), x01)
        lam_x, lam_y = loss_weights(b, 4, (6, 0, 1, 2))
        expected = torch.zeros(())
        if lam_x:  # the reference's form: sigmoid, then BCE
            expected = expected + lam_x * F.binary_cross_entropy(head.reconstruct(h[0]), x01)
        if lam_y:
            expected = expected + lam_y * F.cross_entropy(head.classifier(h[0]), y)
        assert (head.decoder is None) == (lam_x == 0) and (head.classifier is None) == (lam_y == 0)
        assert torch.allclose(losses[b], expected, atol=1e-6), b


def test_training_undoes_the_datasets_normalisation(tmp_path):
    from fxlocal.training.build import build_model
    from helpers import tiny

    local = build_model(tiny(tmp_path, convert__aux="infopro", convert__k=3))
    head = local.heads[0]
    assert head.mean.flatten().tolist() == pytest.approx([0.2860]) and head.std.flatten().tolist() == pytest.approx([0.3530])
    assert local.config["aux_options"]["input_mean"] == pytest.approx([0.2860])  # what rebuilds it


# (model, input size): maps channels first and last, tokens with and without class tokens,
# strides 4 to 32, 1 and 3 input channels, small inputs (one upsample) and large (octaves)
FAMILIES = [
    ("resnet32_cifar", (3, 32, 32)),
    ("resnet18", (1, 64, 64)),
    ("torchvision:resnet18", (3, 64, 64)),
    ("convnext_atto", (3, 64, 64)),
    ("efficientnet_b0", (3, 64, 64)),
    ("mobilenetv3_small_050", (3, 96, 96)),
    ("regnetx_002", (3, 64, 64)),
    ("vit_tiny_patch16_224", (3, 32, 32)),
    ("deit_tiny_distilled_patch16_224", (3, 32, 32)),
    ("mixer_s16_224", (3, 64, 64)),
    ("swin_tiny_patch4_window7_224", (3, 224, 224)),
    ("levit_128s", (3, 224, 224)),
]


@pytest.mark.parametrize("name,size", FAMILIES)
def test_the_decoder_reconstructs_the_input_shape(name, size):
    local = convert_named(name, size, 10, k=3, aux="infopro", weights_table="resnet32", ixy_1=1.0)
    x = torch.randn(2, *size)
    h = (x,)
    for b in range(2):
        h = local.blocks[b](*h)
        head = local.heads[b]
        cut = [t for t in h if isinstance(t, torch.Tensor)][0]
        assert head.reconstruct(cut).shape == x.shape, (name, b, tuple(cut.shape))
        assert head(cut).shape == (2, 10)


def test_the_decoder_is_the_references_for_small_and_large_inputs():
    small = build_decoder((16, 32, 32), "nchw", (3, 32, 32))
    assert [type(m).__name__ for m in small] == ["Upsample", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert small[1].out_channels == 12 and small[-1].out_channels == 3
    # ImageNet, from 28x28: conv1x1 -> 128, then x2 upsample + conv3x3 -> 32, -> 12, -> 3
    large = build_decoder((512, 28, 28), "nchw", (3, 224, 224))
    convs = [m for m in large if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.out_channels) for c in convs] == [(1, 128), (3, 32), (3, 12), (3, 3)]
    assert build_decoder((512, 28, 28), "nchw", (3, 224, 224), "upsample")[0].size == (224, 224)


def test_supervised_contrastive_loss_is_the_mean_over_anchors_with_a_positive():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    s = z @ z.T / 0.5
    # anchors 0 and 1 each have one positive (the other); anchor 2 has none and is left out
    expected = -(torch.log(torch.exp(s[0, 1]) / (torch.exp(s[0, 1]) + torch.exp(s[0, 2])))
                 + torch.log(torch.exp(s[1, 0]) / (torch.exp(s[1, 0]) + torch.exp(s[1, 2])))) / 2
    assert torch.allclose(supervised_contrastive_loss(z, labels, 0.5), expected)


@pytest.mark.parametrize("aux", ["infopro", "dgl+man", "infopro+man", "dgl+mlaan", "infopro+mlaan"])
def test_every_combination_trains_isolates_and_exports(aux):
    torch.manual_seed(0)
    local = convert_named("resnet32_cifar", CIFAR, 10, k=4, aux=aux)
    assert_trains(local, CIFAR)
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    assert_gradient_isolation(local, x, y, window=2 if "mlaan" in aux else 1)
    assert_exports_bit_identically(local, "resnet32_cifar", CIFAR)


def test_plugins_end_in_the_base_head():
    man = convert_named("resnet32_cifar", CIFAR, 10, k=4, aux="infopro+man")
    assert all(isinstance(h.head, InfoProHead) and h.owns_loss for h in man.heads)
    # `man` and `dgl+man` are one method: the same heads from the same seed
    torch.manual_seed(0)
    plain = convert_named("resnet32_cifar", CIFAR, 10, k=4, aux="man")
    torch.manual_seed(0)
    dgl = convert_named("resnet32_cifar", CIFAR, 10, k=4, aux="dgl+man")
    assert plain.plan.blocks == dgl.plan.blocks
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dgl.state_dict().values()))
    mlaan = convert_named("resnet32_cifar", CIFAR, 10, k=4, aux="infopro+mlaan")
    assert all(isinstance(h.independent, InfoProHead) and isinstance(h.cascade_head, InfoProHead) for h in mlaan.heads)
    assert get_aux("mlaan", base="infopro").base.name == "infopro"
    assert set(combinations()) >= {"dgl+man", "infopro+man", "dgl+mlaan", "infopro+mlaan"}


def test_man_plus_plus_scales_the_two_branches():
    torch.manual_seed(0)
    local = convert_named("resnet32_cifar", CIFAR, 10, k=3, aux="man", learnable_scale=True)
    pair = local.heads[0].pair
    assert isinstance(pair, ParallelSum) and pair.scale.item() == 1.0
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        pair.scale.fill_(0.25)
        lb, ema = pair.a(x), pair.b(x)
        expected = 0.25 * lb[0] + 1.75 * ema[0]
        assert torch.allclose(pair(x)[0], expected)
    assert any(p is pair.scale for p in local.block_parameters(0))  # trained with the block
    assert_trains(local, CIFAR)


@pytest.mark.parametrize("aux", ["infopro", "infopro+man"])
def test_memory_balance_prices_the_decoder(aux):
    """As for the other methods (test_backbone_recompute): each block's price is its measured part
    of the step to within -5%..+15%, the decoder's full-resolution maps and its target included;
    +25% where the decoder's upsampled map is the block's largest tensor (block 2 of plain
    InfoPro: 64×32×32 from 64×8×8): backward's buffers are priced at two of the largest
    activation, and beside the upsample's output gradient the other is its small input's.
    Priced without the decoder, blocks 0-2 came out 7-13% under."""
    torch.manual_seed(0)
    local = fxlocal.convert("resnet32_cifar", k=4, aux=aux, input_size=CIFAR, balance="memory", memory=MemoryModel(batch=64))
    for b, error in enumerate(block_price_errors(local, 64, CIFAR, 10)):
        upsampled_is_largest = aux == "infopro" and b == 2
        assert -0.05 <= error <= (0.25 if upsampled_is_largest else 0.15), (aux, b, error)


def test_heads_that_reconstruct_the_input_say_so():
    """The blocks whose objective reads the model input (a pipeline sends it on to their stages:
    tests/training/test_pipeline.py); DGL's read nothing."""
    from fxlocal.training.pipeline import pipeline_obstacle

    local = convert_named("resnet32_cifar", CIFAR, 10, k=3, aux="infopro+man")
    assert local.needs_model_input == [0, 1] and pipeline_obstacle(local) is None
    assert convert_named("resnet32_cifar", CIFAR, 10, k=3, aux="dgl").needs_model_input == []


@pytest.mark.parametrize(
    "aux,options,fragment",
    [
        ("foo+mlaan", [], "unknown base 'foo' for mlaan"),
        ("auglocal+man", [], "'auglocal' cannot be a base for man"),
        ("infopro+dgl", [], "'dgl' is not a plug-in"),
        ("man", ["base=mlaan"], "'mlaan' cannot be a base for man"),
        ("infopro", ["ixx_1=lots"], "infopro ixx_1 is a weight"),
        ("infopro", ["ixy_2=true"], "infopro ixy_2 is a weight"),
        ("infopro", ["input_mean=0.5"], "infopro input_mean is a list of numbers"),
        ("infopro+man", ["decoder=big"], "infopro decoder is 'auto', 'upsample' or 'progressive'"),
        ("infopro+man", ["spam=1"], "man with base infopro does not take ['spam']"),
        ("mlaan", ["ixx_1=1"], "give a base"),
    ],
)
def test_bad_aux_is_one_line(aux, options, fragment):
    args = ["convert", "resnet32_cifar", "--k", "3", "--aux", aux, "--input-size", "3", "32", "32"]
    for option in options:
        args += ["--aux-option", option]
    assert_one_line_error(run_cli(args), fragment)


def test_get_aux_refuses_a_base_given_twice():
    with pytest.raises(UnknownAuxError, match="give the base once"):
        get_aux("dgl+man", base="infopro")


def test_the_man_imagenet_recipe_is_infopro_star_plus_man_and_takes_the_references_cuts():
    from fxlocal.training.build import build_model
    from fxlocal.training.recipe import load_recipe
    from helpers import REPO

    path = REPO / "recipes/imagenet_resnet101_k4_man.yaml"
    changes = ["convert.cuts=[layer3.0, layer3.9, layer3.17]", "convert.balance=flops", "data.input_size=[3, 64, 64]"]
    local = build_model(load_recipe(path, changes))
    assert [b.module_paths[-1] for b in local.plan.blocks[:-1]] == ["layer3.0", "layer3.9", "layer3.17"]
    for head in local.heads:  # 5·BCE + 0.75·CE in every head, after LB + EMA
        assert (head.head.reconstruction_weight, head.head.task_weight) == (5, 0.75)
    assert load_recipe(path).convert.balance == "memory"  # InfoPro*: memory-balanced cuts


@pytest.mark.parametrize("aux", ["infopro", "infopro+man"])
def test_trains_from_a_recipe(tmp_path, aux):
    """Through fxlocal.training.fit, as `fxlocal train` runs it: the heads reconstruct the real
    images (Fashion-MNIST's normalisation undone) and every block's loss falls."""
    from fxlocal.training.loop import fit
    from helpers import tiny

    result = fit(tiny(tmp_path, convert__aux=aux, convert__k=3, epochs=4))
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert all(torch.isfinite(torch.tensor(last))) and all(b < a for a, b in zip(first, last)), (first, last)


def test_the_contrastive_task_loss_trains():
    torch.manual_seed(0)
    local = convert_named("resnet32_cifar", CIFAR, 10, k=3, aux="infopro", task_loss="contrast", ixy_1=1.0)
    head = local.heads[0]
    assert head.classifier[-1].out_features == 128 and "SupCon(τ=0.07)" in head.summary
    assert_trains(local, CIFAR, batch=8)


def test_base_as_an_option_is_the_combination():
    args = ["convert", "resnet32_cifar", "--k", "3", "--input-size", "3", "32", "32"]
    named = run_cli([*args, "--aux", "infopro+man"], env={"COLUMNS": "300"})
    option = run_cli([*args, "--aux", "man", "--aux-option", "base=infopro"], env={"COLUMNS": "300"})
    assert named.exit_code == option.exit_code == 0, named.output + option.output
    heads = [line for line in named.stdout.splitlines() if "head 0:" in line]
    # K=3 lies between the table's K=2 and K=4: weights interpolated in log2 K
    assert heads and "→ InfoPro: 5.58·BCE(decoder → 3×32×32) + 0.415·CE(1c2f)" in heads[0] and heads == [line for line in option.stdout.splitlines() if "head 0:" in line]
