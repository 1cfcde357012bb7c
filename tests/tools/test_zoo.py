"""Models of many families, from timm and torchvision, convert with K=4, train a step, and give
their trained backbone back to a fresh instance of the original model."""

import pytest
import torch

from helpers import assert_exports_bit_identically, assert_trains, convert_named

SMALL = (3, 64, 64)
# Beside tests/tools/test_zoo_sample.py, which checks the smallest model of every family (real tensors
# up to 15M parameters, fake above), the larger models of the main families, for real: deeper
# stacks, wider stages, the 96×96 Inception stems. Not repeated here: the models the sample checks
# for real (timm's deit_tiny, regnetx_002, densenet121; torchvision's efficientnet_b0,
# mobilenet_v3_small, regnet_y_400mf, densenet121, googlenet, shufflenet_v2_x0_5; its resnet18
# stays, for every aux method below), and VGG-11 and torchvision's ViT-B/16, plain stacks of
# layouts the rest cover, whose 86-129M parameters made theirs the slowest real steps (the sample
# checks them on fake tensors).
ZOO = [
    ("resnet50", SMALL),
    ("convnext_atto", SMALL),
    ("vit_tiny_patch16_224", SMALL),
    ("swin_tiny_patch4_window7_224", SMALL),
    ("efficientnet_b0", SMALL),
    ("mobilenetv3_small_050", SMALL),
    ("inception_v3", (3, 96, 96)),
    ("mixer_s16_224", SMALL),
    ("maxvit_tiny_tf_224", SMALL),
    ("torchvision:resnet18", SMALL),
    ("torchvision:convnext_tiny", SMALL),
    ("torchvision:swin_t", SMALL),
    ("torchvision:inception_v3", (3, 96, 96)),
    ("torchvision:squeezenet1_0", SMALL),
]


@pytest.mark.parametrize("name,size", ZOO, ids=[n for n, _ in ZOO])
def test_converts_and_trains(name, size):
    local = convert_named(name, size, 10, k=4)
    assert local.k == 4 and len(local.heads) == 3
    assert_trains(local, size)
    assert_exports_bit_identically(local, name, size)


# Every aux method on one model of each main layout (maps, channels-last maps, tokens;
# residual, inverted-residual and ConvNeXt blocks): tests/tools/test_zoo_sample.py runs one model of
# every family, each with one aux method in rotation.
EVERY_AUX = [z for z in ZOO if z[0] in (
    "resnet50", "convnext_atto", "vit_tiny_patch16_224", "efficientnet_b0", "torchvision:resnet18", "torchvision:swin_t",
)]


@pytest.mark.parametrize("aux", ["auglocal", "mlaan", "man", "infopro", "infopro+mlaan", "none"])
@pytest.mark.parametrize("name,size", EVERY_AUX, ids=[n for n, _ in EVERY_AUX])
def test_every_aux_method_round_trips(name, size, aux):
    """Convert with every other aux method (dgl is above), train a step, export: bit-identical."""
    local = convert_named(name, size, 10, k=1 if aux == "none" else 4, aux=aux)
    opt = torch.optim.SGD(local.parameters(), lr=0.01)
    local.train_step(torch.randn(4, *size), torch.randint(0, 10, (4,)), opt)
    assert_exports_bit_identically(local, name, size)


# --- the zoo check's verdict --------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzed_resnet18():
    from fxlocal.tools import zoo

    return zoo.prepare("torchvision:resnet18", fake=False)


def test_zoo_check_lists_what_a_step_cannot_move(analyzed_resnet18):
    """torchvision's ResNet-18 zero-inits nothing: every parameter moves, nothing is listed. The
    verdict's reasons are what the check measured, not a fixed list."""
    from fxlocal.tools import zoo

    details = zoo.check(analyzed_resnet18, "dgl")
    assert details["mode"] == "real" and details["k"] == zoo.K
    assert details["unchanged"] == {}


def test_zoo_check_fails_a_parameter_the_step_leaves_with_a_gradient(analyzed_resnet18, monkeypatch):
    from fxlocal.local_model import LocalModel
    from fxlocal.tools import zoo

    original = LocalModel.block_parameters
    monkeypatch.setattr(LocalModel, "block_parameters", lambda self, b: list(original(self, b))[1:] if b == 1 else original(self, b))
    with pytest.raises(zoo.ZooFailure, match="1 parameters have a gradient but the step left them"):
        zoo.check(analyzed_resnet18, "dgl")


def test_zoo_check_predicts_a_move_with_the_steps_own_arithmetic(analyzed_resnet18, monkeypatch):
    """An update of half a float32 step at the parameter's value that SGD's step
    (``param.add_(grad, alpha=-lr)``) leaves, and that a product and a difference rounded apart
    would move (on a CPU whose kernel fuses the multiply-add, as this one's): the verdict says
    the update is below float32's resolution, not that the step stalled (LowFormer's and
    MaxViT's rows in the sweep)."""
    from fxlocal.tools import zoo

    # updates within a hair of half a float32 step: one the step's add leaves, and, where this
    # CPU's kernel rounds once (a fused multiply-add), that a product and a difference would move
    values = torch.linspace(0.05, 0.1, 4096)
    half_step = (torch.nextafter(values, torch.ones_like(values)) - values) / zoo.LR / 2
    grads = half_step * (1 + torch.linspace(-1e-3, 1e-3, 4097)[:, None])  # exactly half a step among them
    left = values.add(grads, alpha=-zoo.LR) == values
    both = left & (values - zoo.LR * grads != values)
    at, index = (both if both.any() else left).nonzero()[0].tolist()
    value, grad = values[index].expand(64).clone(), grads[at, index].expand(64).clone()
    assert torch.equal(value.add(grad, alpha=-zoo.LR), value)
    original = zoo.convert

    def convert_then_pin(*args, **kwargs):
        local = original(*args, **kwargs)
        bias = dict(local.named_parameters())["blocks.3.fc.bias"]
        with torch.no_grad():
            bias.copy_(value[: len(bias)])
        bias.register_hook(lambda g: grad[: len(bias)].clone())
        return local

    monkeypatch.setattr(zoo, "convert", convert_then_pin)
    details = zoo.check(analyzed_resnet18, "dgl")
    assert list(details["unchanged"]) == ["fc.bias"]
    assert details["unchanged"]["fc.bias"].startswith("an update below float32 resolution")


def test_zoo_check_fails_a_backbone_that_gets_no_gradient(analyzed_resnet18, monkeypatch):
    from fxlocal.tools import zoo

    monkeypatch.setattr(zoo, "train_one_step", lambda *args, **kwargs: None)  # a step that trains nothing
    with pytest.raises(zoo.ZooFailure, match="parameters that end-to-end training moves get no gradient: conv1.weight"):
        zoo.check(analyzed_resnet18, "dgl")


def test_zoo_rows_say_fake_apart():
    """(A degraded row, TNT's, is checked by the CI sample, tests/tools/test_zoo_sample.py.)"""
    from fxlocal.tools import zoo

    (fake,) = zoo.check_model("torchvision:resnet18", ["dgl"], fake_above=0)
    assert fake["status"] == "ok-fake" and fake["mode"] == "fake"


def test_a_fake_row_still_catches_a_gradient_leak(monkeypatch):
    """A model checked without computing (built on the meta device) still fails isolation when
    the boundaries stop detaching: meta tensors carry the autograd graph a leak goes through."""
    from fxlocal import local_model
    from fxlocal.tools import zoo

    monkeypatch.setattr(local_model, "isolated", lambda carried: carried)
    monkeypatch.setattr(zoo, "train_one_step", lambda *args, **kwargs: None)  # (a step then fails first)
    (row,) = zoo.check_model("torchvision:resnet18", ["dgl"], fake_above=0)
    assert row["status"] == "fail" and row["stage"] == "isolation", row
    assert "reaches foreign parameters" in row["reason"]


def test_the_sweep_goes_on_with_models_missing_a_row_or_with_rows_of_another_commit():
    """``benchmarks/zoo.py`` resumes: a model is checked when an aux method has no row for it, and
    with ``--stale`` when its last row for one is from another commit than the checkout's."""
    import importlib.util
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling ``record``
    try:
        spec = importlib.util.spec_from_file_location("zoo_benchmark", REPO / "benchmarks" / "zoo.py")
        sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    latest = {("a", "dgl"): "old", ("a", "man"): "new", ("b", "dgl"): "new", ("b", "man"): "new"}
    assert not sweep.needs_a_row(latest, "a", ["dgl", "man"])
    assert sweep.needs_a_row(latest, "c", ["dgl"])
    assert sweep.needs_a_row(latest, "a", ["dgl", "man", "infopro"])
    assert sweep.needs_a_row(latest, "a", ["dgl", "man"], commit="new")
    assert not sweep.needs_a_row(latest, "b", ["dgl", "man"], commit="new")
