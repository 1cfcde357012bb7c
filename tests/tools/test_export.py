import pytest
import torch
from safetensors.torch import load_file

import fxlocal
from fxlocal.tools.export import ExportError, export, plain_model
from fxlocal.training.checkpoint import save_converted
from helpers import assert_one_line_error, run_cli

AUX = ["dgl", "auglocal", "mlaan", "man", "infopro", "none"]
MODELS = [
    ("resnet32_cifar", (3, 32, 32)),
    ("vit_tiny_patch16_224", (3, 32, 32)),
    ("convnext_atto", (3, 64, 64)),
    ("torchvision:efficientnet_b0", (3, 64, 64)),
]


def trained(name, size, aux):
    local = fxlocal.convert(name, k=1 if aux == "none" else 4, aux=aux, input_size=size, num_classes=10)
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        local.train_step(torch.randn(4, *size), torch.randint(0, 10, (4,)), opt)
    return local.eval()


@pytest.mark.parametrize("aux", AUX)
@pytest.mark.parametrize("name,size", MODELS, ids=[n for n, _ in MODELS])
def test_backbone_round_trip_is_bit_identical(name, size, aux):
    local = trained(name, size, aux)
    fresh = fxlocal.create_model(name, 10, size)
    fresh.load_state_dict(local.backbone_state_dict(), strict=True)  # the original's own keys
    fresh.eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(fresh(x), local(x))


class PartlyNaN(torch.nn.Module):
    """Eval output NaN in some places (log of a negative), as an untrained deep net's can be
    where its activations overflow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).log()


class PartlyNaNShifted(PartlyNaN):
    def forward(self, x):
        return super().forward(x) + 1


def test_export_check_is_bit_identical_with_nan_where_nan():
    from fxlocal.tools.verify import export_mismatch

    torch.manual_seed(0)
    local = fxlocal.convert(PartlyNaN(), k=2, input_size=(4,))
    x = torch.randn(8, 4)
    with torch.no_grad():
        out = local.eval()(x)
    assert out.isnan().any() and not out.isnan().all()
    assert export_mismatch(local, PartlyNaN(), x) is None  # the same NaNs, the same numbers
    assert export_mismatch(local, PartlyNaNShifted(), x) == "eval outputs differ by up to 1"


def test_modules_off_the_traced_path_are_kept():
    # GoogLeNet's aux classifiers are off the inference path the trace follows; strict loading
    # still needs them, so they are carried unchanged
    local = trained("torchvision:googlenet", (3, 64, 64), "dgl")
    assert any(where[0] == "untraced" for where in local.backbone_map.values())
    fresh = fxlocal.create_model("torchvision:googlenet", 10, (3, 64, 64))
    fresh.load_state_dict(local.backbone_state_dict(), strict=True)


def test_module_versions_are_kept():
    # MNASNet's _load_from_state_dict reads its version from the state dict's _metadata (as
    # nn.Module.state_dict() records it) and refuses a dict without one
    local = trained("torchvision:mnasnet0_5", (3, 64, 64), "dgl")
    state = local.backbone_state_dict()
    fresh = fxlocal.create_model("torchvision:mnasnet0_5", 10, (3, 64, 64))
    assert state._metadata[""] == fresh.state_dict()._metadata[""]
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), local(x))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "m.pt"
    local = trained("resnet32_cifar", (3, 32, 32), "mlaan")
    save_converted(local, path)
    return path, local


def test_cli_state_dict_and_safetensors(converted, tmp_path):
    path, local = converted
    x = torch.randn(2, 3, 32, 32)
    expected = local(x)
    for fmt, load in (("state_dict", lambda p: torch.load(p, weights_only=True)), ("safetensors", load_file)):
        out = tmp_path / f"backbone.{fmt}"
        result = run_cli(["export", str(path), "--format", fmt, "--output", str(out), "--with-aux"])
        assert result.exit_code == 0, result.output
        model = fxlocal.create_model("resnet32_cifar", 10, (3, 32, 32))
        model.load_state_dict(load(out), strict=True)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected)
        aux = load(tmp_path / f"backbone.aux.{fmt}")
        assert aux.keys() == {f"heads.{k}" for k in local.heads.state_dict()}


def test_cli_pt2_is_the_plain_model(converted, tmp_path):
    path, local = converted
    out = tmp_path / "backbone.pt2"
    result = run_cli(["export", str(path), "--format", "pt2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    program = torch.export.load(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), local(x), atol=1e-5)


def test_training_checkpoint_exports(tmp_path):
    from fxlocal.training.loop import fit
    from helpers import tiny

    fit(tiny(tmp_path, epochs=1))
    out = tmp_path / "b.safetensors"
    result = run_cli(["export", str(tmp_path / "run/last.pt"), "--format", "safetensors", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = fxlocal.create_model("resnet32_cifar", 10, (1, 28, 28))
    model.load_state_dict(load_file(out), strict=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "onnx"], "unknown export format 'onnx'; choose one of state_dict, safetensors, pt2"),
        (["--output", "/proc/none/x.pt"], "folder /proc/none does not exist"),
    ],
)
def test_bad_export_requests_are_one_line(converted, tmp_path, args, message):
    path, _ = converted
    base = ["export", str(path), "--output", str(tmp_path / "x.pt")]
    assert_one_line_error(run_cli(base + args), message)
    assert not list(tmp_path.iterdir())


def test_not_our_checkpoint(tmp_path):
    (tmp_path / "other.pt").write_bytes(b"\x80\x04junk")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    for name in ("other.pt", "dict.pt"):
        assert_one_line_error(run_cli(["export", str(tmp_path / name), "-o", str(tmp_path / "x.pt")]), "not an fxlocal")
    assert not (tmp_path / "x.pt").exists()


def test_a_failed_write_leaves_nothing(converted, tmp_path, monkeypatch):
    _, local = converted
    import os

    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the aux file fails after the backbone file was renamed
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ExportError, match="No space left"):
        export(local, "state_dict", tmp_path / "b.pt", with_aux=True)
    assert not list(tmp_path.iterdir())  # no temp file, and the backbone file was taken back


def test_plain_model_needs_a_name():
    local = fxlocal.convert(fxlocal.create_model("resnet32_cifar", 10, (3, 32, 32)), k=2, input_size=(3, 32, 32))
    with pytest.raises(ExportError, match="converted from a module object"):
        plain_model(local)
