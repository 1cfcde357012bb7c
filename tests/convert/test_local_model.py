import pytest
import timm
import torch
import torchvision
from torch import nn

import fxlocal
from fxlocal.errors import PlanMismatchError, SharedParameterError
from fxlocal.tools.verify import export_mismatch
from fxlocal.training.checkpoint import load_converted, save_converted
from helpers import assert_gradient_isolation, assert_trains, convert_named


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", (3, 32, 32)), ("vit_tiny_patch16_224", (3, 32, 32)), ("torchvision:resnet18", (3, 32, 32))],
)
def test_gradient_isolation(name, size):
    local = convert_named(name, size, 5, k=4)
    assert_gradient_isolation(local, torch.randn(4, *size), torch.randint(0, 5, (4,)))


def test_isolation_check_reports_a_boundary_that_lets_gradients_through(monkeypatch):
    """The check itself can fail: with the boundaries' detach removed, every later block's loss
    reaches the blocks before it."""
    from fxlocal import local_model
    from fxlocal.tools.verify import isolation_violations

    local = fxlocal.convert("resnet18", k=3, input_size=(3, 32, 32), num_classes=5)
    monkeypatch.setattr(local_model, "isolated", lambda carried: carried)
    problems = isolation_violations(local, torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))
    assert [p.split(" parameters:")[0] for p in problems] == ["loss 1 reaches foreign", "loss 2 reaches foreign"]
    assert all("blocks.0.conv1.weight" in p for p in problems)  # block 0's first weight, for both


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet50", (3, 64, 64)),
        ("convnext_atto", (3, 64, 64)),
        ("vit_tiny_patch16_224", (3, 32, 32)),
        ("torchvision:swin_t", (3, 64, 64)),
        ("torchvision:efficientnet_b0", (3, 64, 64)),
    ],
)
def test_eval_equivalence_and_parameter_ownership(name, size):
    torch.manual_seed(0)
    model = fxlocal.create_model(name, 7, size).eval()
    local = fxlocal.convert(model, k=4, input_size=size).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-5, rtol=1e-4)
    # parameters are shared, not copied, and each lives in exactly one block
    owners = {}
    for b, block in enumerate(local.blocks):
        for p in block.parameters():
            assert id(p) not in owners, "a parameter is in two blocks"
            owners[id(p)] = b
    head_params = {id(p) for h in local.heads for p in h.parameters()}
    assert {id(p) for p in model.parameters()} == set(owners)
    assert not head_params & set(owners)
    assert {id(p) for p in local.parameters()} == set(owners) | head_params


def test_train_mode_follows_the_original():
    model = timm.create_model("resnet18", num_classes=3, drop_rate=0.5)
    local = fxlocal.convert(model, k=2, input_size=(3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    local.train()
    a, b = local(x), local(x)
    assert not torch.allclose(a, b)  # functional dropout in the classifier is live in training
    local.eval()
    assert torch.allclose(local(x), local(x))


def test_get_attr_parameters_are_trained():
    local = fxlocal.convert("vit_tiny_patch16_224", k=3, input_size=(3, 32, 32), num_classes=4)
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    before = [local.blocks[0].cls_token.clone(), local.blocks[0].pos_embed.clone()]
    local.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)), opt)
    assert not torch.equal(before[0], local.blocks[0].cls_token)
    assert not torch.equal(before[1], local.blocks[0].pos_embed)


def test_inplace_op_after_a_cut_does_not_overwrite_the_previous_output():
    # torchvision's BasicBlock applies relu(inplace=True) to the residual sum. Cut between the
    # add and that relu: the next block's relu would overwrite the previous block's output
    # (detach shares storage), which its aux head still needs for backward.
    model = torchvision.models.resnet18(num_classes=4)
    gm = fxlocal.trace(model, (3, 32, 32))
    first, second = fxlocal.split_graph(gm, ["add"])
    assert model.layer1[0].relu.inplace  # the original module is left alone
    out = first(torch.randn(2, 3, 32, 32))
    kept = out[0].clone()
    second(*out)
    assert torch.equal(out[0], kept)
    # and a full local step through such a cut works
    local = fxlocal.convert(model, k=2, input_size=(3, 32, 32), plan=_plan_cutting_at(model, "add"))
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    losses = local.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)), opt)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def _plan_cutting_at(model, node):
    plan = fxlocal.convert(model, k=2, input_size=(3, 32, 32)).plan
    plan.blocks[0].cut_node = node
    return plan


def test_shared_parameter_across_blocks_is_refused():
    class TiedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.mid(self.shared(x))))

    gm = fxlocal.trace(TiedNet(), (4,))
    with pytest.raises(SharedParameterError, match="shared"):
        fxlocal.split_graph(gm, ["mid"])


def test_plan_round_trip_and_reapply(tmp_path):
    local = fxlocal.convert("resnet18", k=3, input_size=(3, 32, 32), num_classes=5, balance="activations")
    path = tmp_path / "plan.json"
    local.plan.save(path)
    plan = fxlocal.Plan.load(path)
    assert plan.to_dict() == local.plan.to_dict()
    again = fxlocal.convert("resnet18", input_size=(3, 32, 32), num_classes=5, plan=plan)
    assert again.plan.cuts == local.plan.cuts
    assert again.plan.balance == "activations"
    other = fxlocal.Plan.from_dict({**plan.to_dict(), "blocks": [{**b.__dict__, "cut_node": "nope"} for b in plan.blocks]})
    with pytest.raises(PlanMismatchError, match="nope"):
        fxlocal.convert("resnet18", input_size=(3, 32, 32), num_classes=5, plan=other)


def test_saved_converted_model_reloads_identically(tmp_path):
    local = fxlocal.convert("resnet18", k=3, input_size=(3, 32, 32), num_classes=5).eval()
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    local.train()
    local.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), opt)
    local.eval()
    save_converted(local, tmp_path / "m.pt")
    back = load_converted(tmp_path / "m.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), local(x))
    assert back.plan.cuts == local.plan.cuts


def test_aux_none_is_end_to_end():
    local = fxlocal.convert("resnet18", k=1, aux="none", input_size=(3, 32, 32), num_classes=3)
    assert local.k == 1 and len(local.heads) == 0
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    assert len(local.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)), opt)) == 1


def test_train_step_loss_falls_on_fashion_mnist(fashion_mnist):
    x, y = fashion_mnist
    local = fxlocal.convert("resnet18", k=4, input_size=(1, 28, 28), num_classes=10)
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    first = last = None
    for epoch in range(4):
        epoch_losses = [local.train_step(xb, yb, opt) for xb, yb in batches]
        mean = torch.tensor(epoch_losses).mean(0)  # per block
        first = mean if first is None else first
        last = mean
    assert (last < first).all(), f"per-block losses did not fall: {first} -> {last}"
    assert last[-1] < 0.8 * first[-1]


@pytest.mark.parametrize("aux,k", [("dgl", 4), ("mlaan", 4)])
def test_per_block_optimizers_update_like_one_and_release_gradients(aux, k):
    """Stepping each block as soon as its gradient is complete (after the cascade for mlaan)
    gives the parameters one optimizer stepped at the end gives, and leaves no gradient alive."""
    import copy

    size = (3, 32, 32)
    local = fxlocal.convert("resnet32_cifar", k=k, aux=aux, input_size=size)
    reference = copy.deepcopy(local)
    one = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    per = [torch.optim.SGD(list(local.block_parameters(b)), lr=0.1, momentum=0.9, weight_decay=1e-4) for b in range(k)]
    x, y = torch.randn(4, *size), torch.randint(0, 10, (4,))
    for _ in range(2):
        reference.train_step(x, y, one)
        local.train_step(x, y, per)
    assert all(p.grad is None for p in local.parameters())
    # parameters, BN statistics and EMA twins alike
    for (name, p), q in zip(local.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-6), name


def test_a_blocks_input_is_freed_as_soon_as_the_block_is_done_with_it():
    """train_step keeps no reference to a block's input: one that the block's graph does not
    save (block 1 starts with a ReLU, which saves its output) is freed inside the block's
    forward, not when the block returns."""
    import weakref

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = fxlocal.convert(model, k=2, input_size=(8,)).plan
    plan.blocks[0].cut_node = "_1"
    local = fxlocal.convert(model, input_size=(8,), plan=plan)
    handed_on = {}
    local.blocks[0].register_forward_hook(lambda m, i, out: handed_on.update(storage=weakref.ref(out[0].untyped_storage())))
    freed = []
    local.blocks[1].get_submodule("3").register_forward_pre_hook(lambda m, i: freed.append(handed_on["storage"]() is None))
    local.train_step(torch.randn(4, 8), torch.randint(0, 4, (4,)), torch.optim.SGD(local.parameters(), lr=0.1))
    assert freed == [True]


@pytest.mark.parametrize("metrics", [None, {}])
def test_the_models_output_is_freed_before_its_loss_is_backpropagated(metrics):
    """Cross-entropy keeps its log-softmax, not the logits: train_step (and its block
    iterator) hold no reference to the last block's output while the loss backpropagates,
    which for a dense task's full-resolution logits is the block's largest tensor."""
    import weakref

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    local = fxlocal.convert(model, k=2, input_size=(8,))
    output = {}
    local.blocks[-1].register_forward_hook(lambda m, i, out: output.update(storage=weakref.ref(out.untyped_storage())))
    freed = []
    weight = next(local.blocks[-1].parameters())
    weight.register_hook(lambda grad: freed.append(output["storage"]() is None))
    local.train_step(torch.randn(4, 8), torch.randint(0, 4, (4,)), torch.optim.SGD(local.parameters(), lr=0.1),
                     metrics=metrics)
    assert freed == [True]
    if metrics is not None:
        assert len(metrics["accuracy"]) == 2


def test_an_analysed_model_converts_again_like_its_name_without_sharing_weights(tmp_path):
    size = (3, 32, 32)
    torch.manual_seed(0)
    analyzed = fxlocal.analyze_model("resnet32_cifar", size, num_classes=10)
    a = fxlocal.convert(analyzed, k=4, aux="dgl")
    b = fxlocal.convert(analyzed, k=2, aux="auglocal", balance="memory")
    torch.manual_seed(0)
    direct = fxlocal.convert("resnet32_cifar", k=4, aux="dgl", input_size=size, num_classes=10)
    assert a.plan.cuts == direct.plan.cuts and b.k == 2
    for (name, p), q in zip(a.backbone_state_dict().items(), direct.backbone_state_dict().values()):
        assert torch.equal(p, q), name  # the weights it was analysed with
    # each conversion trains its own copy: a step of one leaves the other and the source alone
    before = {n: t.clone() for n, t in b.backbone_state_dict().items()}
    a.train_step(torch.randn(4, *size), torch.randint(0, 10, (4,)), torch.optim.SGD(a.parameters(), lr=0.5))
    assert all(torch.equal(t, before[n]) for n, t in b.backbone_state_dict().items())
    assert all(torch.equal(t, before[n]) for n, t in analyzed.model.state_dict().items() if n in before)
    assert not torch.equal(a.backbone_state_dict()["conv1.weight"], before["conv1.weight"])
    # it is recorded as converted from its name: the checkpoint rebuilds without the model
    save_converted(a, tmp_path / "a.pt")
    assert load_converted(tmp_path / "a.pt").plan.cuts == a.plan.cuts
    with pytest.raises(fxlocal.FxLocalError, match=r"input_size=\(3, 64, 64\) differs from the analysed model's"):
        fxlocal.convert(analyzed, k=2, input_size=(3, 64, 64))


def test_a_feature_encoder_is_refused_as_not_a_classifier():
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))  # (B, 8, H, W) features
    with pytest.raises(fxlocal.FxLocalError, match=r"outputs \(batch, 8, 12, 12\) features, not \(batch, classes\) logits"):
        fxlocal.convert(encoder, k=2, input_size=(3, 16, 16), num_classes=10)
    # a module is named by its class, or as the caller says
    with pytest.raises(fxlocal.FxLocalError, match=r"^my_encoder outputs \(batch, 8, 12, 12\) features"):
        fxlocal.analyze_model(encoder, (3, 16, 16), num_classes=10, name="my_encoder")
    # a head that ignores num_classes: 7 outputs are not 10 classes
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(fxlocal.FxLocalError, match="outputs 7 values per image, not the 10 classes asked for"):
        fxlocal.convert(pooled, k=2, input_size=(3, 16, 16), num_classes=10)
    assert fxlocal.convert(pooled, k=2, input_size=(3, 16, 16)).num_classes == 7


@pytest.mark.parametrize("aux", ["dgl", "auglocal", "mlaan"])
def test_blocks_recompute_a_table_built_from_buffers_and_shapes(aux):
    from nets import RotaryTokens

    torch.manual_seed(0)
    model = RotaryTokens().eval()
    local = fxlocal.convert(model, k=3, aux=aux, input_size=(3, 16, 16), num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-6)
    # every block that uses the table makes its own; none is handed one
    for block in local.blocks[1:]:
        assert any(n.target == "sin" for n in block.graph.nodes)
        inputs = [n for n in block.graph.nodes if n.op == "placeholder"]
        assert all(not isinstance(n.meta.get("val"), torch.Tensor) for n in inputs[1:])
    local.train()
    window = local.input_window
    assert_gradient_isolation(local, torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)), window=window)
    assert_trains(local, (3, 16, 16), num_classes=5)
    # the buffer the blocks share goes back once, under its own name
    assert export_mismatch(local, RotaryTokens(), x) is None


@pytest.mark.parametrize("aux", ["dgl", "auglocal", "mlaan", "man"])
def test_a_table_made_from_a_parameter_ties_it_between_the_blocks_that_recompute_it(aux):
    from fxlocal.training.pipeline import pipeline_obstacle
    from nets import RotaryTokens

    torch.manual_seed(0)
    model = RotaryTokens("parameter").eval()
    local = fxlocal.convert(model, k=3, aux=aux, input_size=(3, 16, 16), num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-6)
    assert local.tied_parameters() == {"frequencies": [1, 2]}  # the patch stem (block 0) uses no table
    tied = local.blocks[1].get_parameter("frequencies")
    # stepped once, by the last block that holds it
    assert [any(p is tied for p in local.block_parameters(b)) for b in range(3)] == [False, False, True]

    local.train()
    xs, ys = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    assert_gradient_isolation(local, xs, ys, window=local.input_window)
    # its update is the sum of both holders' local-loss gradients (plain SGD, lr 1)
    local.zero_grad(set_to_none=True)
    for loss in local.local_losses(xs, ys):
        loss.backward()
    want = tied.detach() - tied.grad
    local.zero_grad(set_to_none=True)
    optimizers = [torch.optim.SGD(list(local.block_parameters(b)), lr=1.0) for b in range(3)]
    local.train_step(xs, ys, optimizers)
    assert torch.allclose(tied.detach(), want, atol=1e-6)
    obstacle = pipeline_obstacle(local)
    assert "share parameter 'frequencies'" in obstacle
    assert export_mismatch(local, RotaryTokens("parameter"), x) is None


@pytest.mark.parametrize("aux", ["dgl", "auglocal", "mlaan", "man"])
def test_a_cut_carrying_a_second_branch_detaches_both_and_trains_through_both(aux):
    """DGL puts a head on each tensor; the methods that copy units hand both to copies of the
    units after the cut, which take both (TwoBranches' units are its blocks)."""
    import copy

    from nets import TwoBranches

    torch.manual_seed(0)
    model = TwoBranches().eval()
    plan = fxlocal.convert(model, k=3, input_size=(12, 4, 4), num_classes=5).plan
    plan.blocks[0].cut_node, plan.blocks[1].cut_node = "add_3", "add_7"  # after blocks.0 and blocks.1
    local = fxlocal.convert(model, k=3, aux=aux, input_size=(12, 4, 4), num_classes=5, plan=plan).eval()
    x = torch.randn(2, 12, 4, 4)
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-6)
        out = local.blocks[0](x)
    assert [type(v) for v in out[:2]] == [torch.Tensor, torch.Tensor]
    if aux == "dgl":
        assert all(", logits averaged" in b.head for b in local.plan.blocks[:-1])
    else:  # head 0 copies blocks.1 (AugLocal, MLAAN: then later ones), which takes both branches
        assert "blocks.1" in local.plan.blocks[0].head
    local.train()
    # each loss reaches every parameter of its block, both branches', and nothing before it
    # (MLAAN's cascade: and of the block before)
    xs, y = torch.randn(4, 12, 4, 4), torch.randint(0, 5, (4,))
    assert_gradient_isolation(local, xs, y, window=local.input_window)
    if aux == "mlaan":  # the cascade carries both branches' gradients back into block 0
        connected, got = copy.deepcopy(local), {}

        def record(params):
            got.update({name: p.grad.clone() for name, p in local.named_parameters() if p.grad is not None})

        local.train_step(xs, y, torch.optim.SGD(local.parameters(), lr=0.0), grad_hook=record)
        sum(connected.local_losses(xs, y)).backward()
        for name, p in connected.named_parameters():
            assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert_trains(local, (12, 4, 4), num_classes=5)
    assert export_mismatch(local, TwoBranches(), x) is None
