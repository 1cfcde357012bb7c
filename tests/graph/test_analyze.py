import pytest
import torch
from torch import nn

import fxlocal
from fxlocal.graph.cost import measure_module
from nets import RotaryTokens, TwoBranches


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.zeros(8))  # a get_attr parameter

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.a(x))
        h = self.b(h) + h  # residual: h is live across b
        h = h + self.bias
        return self.c(h)


class Tied(nn.Module):
    """The same Linear is applied twice, far apart: cutting between the uses is refused."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, x):
        x = self.shared(x.flatten(1))
        x = torch.relu(self.mid(x))
        return self.shared(x)


def names(cands):
    return [c.node for c in cands]


def test_cut_candidates_follow_liveness():
    gm = fxlocal.trace(Chain(), (2, 2))
    # not after "a" (h's pre-activation and nothing else... relu is), not inside the residual,
    # and the get_attr parameter "bias" never counts as a live tensor
    assert names(fxlocal.find_cut_candidates(gm)) == ["flatten", "a", "relu", "add", "add_1"]


def test_shared_parameter_blocks_cuts_between_its_uses():
    gm = fxlocal.trace(Tied(), (6,))
    cands = names(fxlocal.find_cut_candidates(gm))
    assert "mid" not in cands and "relu" not in cands
    assert cands == ["flatten"]


def test_segment_costs_are_measured_flops():
    gm = fxlocal.trace(Chain(), (2, 2))
    analysis = fxlocal.analyze(gm, (2, 2))
    assert len(analysis.segment_costs) == len(analysis.candidates) + 1
    total = sum(c.flops for c in analysis.segment_costs)
    # per sample: a needs no input grad (its input is the graph input): 2 matmuls; b, c: 3 each
    fwd = {"a": 2 * 4 * 8, "b": 2 * 8 * 8, "c": 2 * 8 * 3}
    assert total == 2 * fwd["a"] + 3 * fwd["b"] + 3 * fwd["c"]
    params = sum(c.params for c in analysis.segment_costs)
    assert params == sum(p.numel() for p in Chain().parameters())


def test_measure_module_counts_saved_activations():
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cost = measure_module(mlp, (16,), batch=2)
    assert cost.params == 16 * 32 + 32 + 32 * 4 + 4
    assert cost.flops == 2 * 16 * 32 * 2 + 3 * 2 * 32 * 4  # first layer: no input grad
    # saved: the input of linear1 and the relu output (shared with linear2's input), fp32
    assert cost.activation_bytes == (16 + 32) * 4


def test_covered_module_paths_reads_like_the_model():
    local = fxlocal.convert("resnet18", k=2, input_size=(3, 32, 32), num_classes=5)
    paths = [b.module_paths for b in local.plan.blocks]
    assert paths[0][0] == "conv1"
    assert paths[-1][-1] == "fc"
    flat = [p for ps in paths for p in ps]
    assert len(flat) == len(set(flat))


def _saved_bytes_of_a_real_step(model, x):
    """Bytes autograd really saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, alive = {}, []

    def pack(t):
        alive.append(t)  # keep storages alive so that no address is reused
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(saved.values())


@pytest.mark.parametrize("name,tolerance", [("resnet18", 0.0), ("convnext_atto", 0.0), ("vit_tiny_patch16_224", 0.01)])
def test_fake_activation_bytes_match_a_real_run(name, tolerance):
    size = (3, 32, 32)
    model = fxlocal.create_model(name, 10, size)
    gm = fxlocal.trace(model, size)
    first = fxlocal.analyze(gm, size)
    second = fxlocal.analyze(gm, size)
    assert first.segment_costs == second.segment_costs  # deterministic
    predicted = 2 * sum(c.activation_bytes for c in first.segment_costs)  # per sample -> batch 2
    real = _saved_bytes_of_a_real_step(model, torch.randn(2, *size))
    assert abs(predicted - real) <= tolerance * real


def test_a_table_built_from_buffers_and_shapes_is_recomputed_not_live():
    gm = fxlocal.trace(RotaryTokens(), (3, 16, 16))
    table = {n.name for n in fxlocal.recomputable_values(gm)}
    assert {"sin", "cos", "cat"} <= table and "patch" not in table
    # after every block (each residual add), though the table is used by the blocks after it
    assert [c.node for c in fxlocal.find_cut_candidates(gm) if c.node.startswith("add")] == [
        "add", "add_1", "add_2", "add_3"
    ]
    assert len(fxlocal.analyze(gm, (3, 16, 16)).units) == 5  # the patch stem and four blocks


def test_a_table_built_from_a_trained_parameter_is_recomputed_too():
    # timm's rope_mixed ViTs (learned frequencies) and vit_srelpos (a shared position-bias MLP)
    gm = fxlocal.trace(RotaryTokens("parameter"), (3, 16, 16))
    assert {"sin", "cos", "cat"} <= {n.name for n in fxlocal.recomputable_values(gm)}
    assert [c.node for c in fxlocal.find_cut_candidates(gm) if c.node.startswith("add")] == [
        "add", "add_1", "add_2", "add_3"
    ]


def test_a_module_that_updates_state_when_called_is_not_recomputed():
    class NormedTable(nn.Module):  # BatchNorm over a parameter: calling it twice moves its running statistics twice
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 8))
            self.norm = nn.BatchNorm1d(8)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            table = self.norm(self.table).mean(0)
            for block in self.blocks:
                x = block(x) + table
            return x

    gm = fxlocal.trace(NormedTable(), (8,))
    assert not {"norm", "mean"} & {n.name for n in fxlocal.recomputable_values(gm)}
    # the table stays live from the first block to the last: nothing between blocks is a candidate
    assert not [c.node for c in fxlocal.find_cut_candidates(gm) if c.node.startswith("add")]


@pytest.mark.parametrize("table_from, live", [("noise", {"rand", "add"}), ("written", {"cat"})])
def test_a_random_or_written_table_is_live_as_before(table_from, live):
    # a random table would differ when recomputed, and a copy of one written in place would miss
    # the write: both stay live from where they are made to their last use
    gm = fxlocal.trace(RotaryTokens(table_from), (3, 16, 16))
    assert not live & {n.name for n in fxlocal.recomputable_values(gm)}
    # only after the last block, where the table dies
    assert len([c for c in fxlocal.find_cut_candidates(gm) if c.node.startswith("add")]) == 1


def test_side_by_side_branches_are_cut_at_block_ends_carrying_the_other_branch():
    gm = fxlocal.trace(TwoBranches(), (12, 4, 4))
    cands = fxlocal.find_cut_candidates(gm)
    carrying = [c for c in cands if c.carried]
    # after both embeddings and after each block; not after embed.0, a single layer
    assert [c.module_path for c in carrying] == ["embed.1", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    end = carrying[1]  # after blocks.0: its second branch, carrying the first
    assert end.shape == (16, 8) and [(t.shape, t.layout) for t in end.carried] == [((16, 8), "nlc")]
    assert end.nbytes == 2 * 16 * 8 * 4
    # units end where one tensor is live, else at a cut that carries the other branch: a copy of
    # the next unit takes both
    units = fxlocal.analyze(gm, (12, 4, 4)).units
    assert [u.name for u in units] == ["", "embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [len(u.tensors) for u in units] == [1, 2, 2, 2, 2, 2]
    assert [len(u.in_carried) for u in units] == [0, 0, 1, 1, 1, 1]
    assert units[2].carried[0].node == end.carried[0].node


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:googlenet", "xception41p", "densenet121"])
def test_a_skip_that_its_block_still_uses_is_never_carried(name):
    # inside a residual block two tensors are live too (the skip and the branch), inside an
    # inception block the block's input and a finished branch: cutting there cuts a block in two
    size = (3, 64, 64)
    gm = fxlocal.trace(fxlocal.create_model(name, 3, size), size)
    cands = fxlocal.find_cut_candidates(gm)
    assert not [c for c in cands if c.carried] and len(cands) > 8


def test_a_measured_modules_largest_activation_is_not_a_weight():
    """``measure_module``'s ``largest_activation_bytes`` (what backward's transient is priced
    from) is its largest activation per sample, not a weight's transpose (4096×1024 here)."""
    with torch.device("meta"):
        head = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10))
    assert measure_module(head, (1024,)).largest_activation_bytes == 4096 * 4


@pytest.mark.parametrize(
    "name,size",
    [("resnet32_cifar", (3, 32, 32)), ("vit_tiny_patch16_224", (3, 32, 32)), ("convnext_atto", (3, 32, 32))],
)
def test_real_and_fake_measurements_count_the_same_and_leave_the_model_as_it_was(name, size, monkeypatch):
    """``measure_nodes`` runs a small graph for real (faster) and a large one on fake tensors:
    every node's FLOPs, saved, kept and largest bytes are the same either way, and the real run
    leaves the model as it found it (BatchNorm statistics, gradients, training flag, RNG)."""
    from fxlocal.graph import cost

    gm = fxlocal.analyze_model(name, size, num_classes=10).gm.eval()
    assert 2 * cost.traced_activation_bytes(gm) <= cost.REAL_RUN_MAX_BYTES  # the real path runs
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    rng = torch.get_rng_state()
    real = cost.measure_nodes(gm, size)
    assert not gm.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in gm.parameters())
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    monkeypatch.setattr(cost, "REAL_RUN_MAX_BYTES", -1.0)
    fake = cost.measure_nodes(gm, size)
    assert sum(c.flops for c in real.values()) > 0 and sum(c.activation_bytes for c in real.values()) > 0
    assert real == fake


@pytest.mark.parametrize("shape,layout", [((256, 16, 16), "nchw"), ((8, 8, 96), "nhwc"), ((197, 192), "nlc"), ((16, 32, 32), "nchw")])
def test_a_head_on_the_meta_device_costs_what_its_fake_copy_does(shape, layout):
    """``measure_module`` runs a meta-device module as it is (meta tensors) and any other as a fake
    copy: a head counts the same either way, and the meta one is left without gradients."""
    from fxlocal.aux import HeadSpec
    from fxlocal.aux.dgl import DGLHead
    from fxlocal.aux.mlaan import PoolLinear

    spec = HeadSpec(shape, layout, 10, 0, 4)
    for build in (lambda: DGLHead(spec), lambda: PoolLinear(shape, layout, 10, 64, True)):
        with torch.device("meta"):
            on_meta = build().eval()
        assert measure_module(on_meta, shape) == measure_module(build(), shape)
        assert not on_meta.training and all(p.grad is None for p in on_meta.parameters())


class GridFromPatchShape(nn.Module):
    """DINOv3's RoPE in small: a table built on the default device from the size of a patch
    embedding's output (a shape read from parameters' output), then moved to the tokens'."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        grid = torch.arange(h * w).float()[:, None]
        tokens = x.flatten(2).transpose(1, 2) * grid.to(x.device).cos()
        return self.head(torch.relu(self.mix(tokens)).mean(1))


def test_a_table_sized_by_a_parameters_output_is_costed_without_a_gradient_on_the_meta_device():
    """A shape carries no gradient: what is built from it (on the CPU, moved to the meta
    device) is costed as a constant, as on real weights, not as a trainable leaf (whose
    gradient backward would copy from the meta device)."""
    with torch.device("meta"):
        on_meta = GridFromPatchShape()
    analysis = fxlocal.analyze_model(on_meta, (3, 16, 16), num_classes=10)
    real = fxlocal.analyze_model(GridFromPatchShape(), (3, 16, 16), num_classes=10)
    assert analysis.analysis.segment_costs == real.analysis.segment_costs


class ComplexRotation(nn.Module):
    """Complex RoPE in small: tokens rotated as complex numbers, then attention on the real view."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("rotation", torch.polar(torch.ones(4, 4), torch.rand(4, 4)))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        q = self.proj(x.flatten(2).transpose(1, 2))  # (N, 4 tokens, 8)
        rotated = torch.view_as_real(torch.view_as_complex(q.reshape(-1, 4, 4, 2)) * self.rotation).flatten(2)
        attention = (rotated @ rotated.transpose(1, 2)).softmax(-1)
        return self.head((attention @ rotated).mean(1))


def test_a_complex_activation_carries_its_gradient_in_the_costs():
    """What follows a complex op on an activation is trained through (its gradient flows back to
    the projection): the attention after it is costed with what it saves for backward, not as
    a constant."""
    from fxlocal.graph.cost import measure_nodes

    size = (8, 2, 2)
    gm = fxlocal.trace(ComplexRotation(), size)
    costs = measure_nodes(gm, size)
    # the scores' product keeps both rotated operands, the softmax its output (the second
    # product keeps only those again: counted once)
    assert costs["matmul"].activation_bytes > 0 and costs["softmax"].activation_bytes > 0
