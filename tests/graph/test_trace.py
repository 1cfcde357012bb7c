import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxlocal
from fxlocal.errors import InputSizeError


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.fc(x.flatten(1)), p=0.5, training=self.training)


class Untraceable(nn.Module):
    """Control flow on a shape: fx cannot trace it, so it must become a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 3, padding=1)
        self.odd = Untraceable()
        self.fc = nn.Linear(2, 3)

    def forward(self, x, scale: float = 1.0, mask=None):
        x = self.odd(self.stem(x)) * scale
        return self.fc(x.mean((2, 3)))


def test_training_flag_is_a_graph_value():
    model = FunctionalDropout()
    gm = fxlocal.trace(model, (2, 2, 2))
    x = torch.randn(4, 2, 2, 2)
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), model(x))  # eval: no dropout, deterministic
    gm.train()
    assert (gm(x) == 0).float().mean() > 0.2  # train: dropout still active


def test_untraceable_module_becomes_leaf_and_concrete_args_are_fixed():
    model = WithUntraceable().eval()
    gm = fxlocal.trace(model, (2, 6, 6))
    report = gm.meta["fxlocal_trace"]
    assert report.leaf_modules == ["odd"]
    assert "trace failed" in report.leaf_reasons["odd"]
    assert report.concrete_args == {"scale": 1.0, "mask": None}
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    x = torch.randn(3, 2, 6, 6)
    assert torch.allclose(gm(x), model(x))
    small = torch.randn(3, 2, 3, 3)
    assert torch.allclose(gm(small), model(small))  # the other branch, too


def test_every_node_knows_module_path_and_shape():
    gm = fxlocal.trace(timm.create_model("resnet18"), (3, 64, 64))
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        assert "module_path" in node.meta and "val" in node.meta, node
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "layer1.0.conv1")
    assert conv.meta["module_path"] == "layer1.0.conv1"
    assert tuple(conv.meta["val"].shape) == (2, 64, 16, 16)
    add = next(n for n in gm.graph.nodes if n.meta.get("qualname") == "layer1.0.add")
    assert add.meta["module_path"] == "layer1.0"


def test_vit_has_one_input_and_mode_dependent_modules_are_leaves():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, drop_rate=0.1, attn_drop_rate=0.1)
    gm = fxlocal.trace(model, (3, 32, 32))
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    report = gm.meta["fxlocal_trace"]
    assert "blocks.0.attn" in report.leaf_modules
    assert report.leaf_reasons["blocks.0.attn"] == "forward branches on self.training"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    gm.eval()
    assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_rejected_input_size_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(InputSizeError, match="rejects input size"):
        fxlocal.trace(model, (3, 9, 9))


class _Memoising(nn.Module):
    """Caches a tensor computed from the input's shape in a buffer, as ConViT's GPSA does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("grid", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.grid.numel() != x.shape[-1]:
            self.grid = torch.arange(x.shape[-1], dtype=x.dtype)
        return self.conv(x) + self.grid


def test_shape_propagation_leaves_no_fake_tensor_on_the_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Memoising(), nn.ReLU(), _Memoising(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    local = fxlocal.convert(model, k=2, input_size=(3, 16, 16))
    from torch._subclasses.fake_tensor import FakeTensor

    assert not any(isinstance(t, FakeTensor) for t in local.buffers())
    losses = local.train_step(torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)), torch.optim.SGD(local.parameters(), lr=0.1))
    assert all(torch.isfinite(torch.tensor(losses)))


class RepeatedOps(nn.Module):
    """The same op several times within one module and across modules: names count repeats per module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())

    def forward(self, x):
        y = self.a(x) + x
        y = y + self.b(y) + 1
        return torch.relu(y) + torch.relu(-y)


class SuffixedNames(nn.Module):
    """Module names that end in ``_<digits>`` once and twice, besides the plain one."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv_1, self.conv_1_1, self.conv_2 = (nn.Conv2d(2, 2, 1) for _ in range(4))

    def forward(self, x):
        return self.conv_2(self.conv_1_1(self.conv_1(self.conv(x)))) + self.conv(x)


def test_node_names_are_torchvisions():
    """Our constant-time naming gives the names torchvision's NodePathTracer gives (which
    feature-extraction users and saved plans refer to)."""
    from torchvision.models.feature_extraction import NodePathTracer

    for model in (RepeatedOps(), SuffixedNames(), timm.create_model("resnet18", num_classes=3)):
        expected = NodePathTracer()
        expected.trace(model)
        ours = fxlocal.trace(model, (3, 32, 32) if isinstance(model, timm.models.ResNet) else (2, 8, 8))
        names = [n.meta["qualname"] for n in ours.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        assert names == [q for n, q in expected.node_to_qualname.items() if n.op not in ("placeholder", "output", "get_attr")]
        assert len(set(names)) == len(names)
