"""The training options a GPU user expects (amp, channels_last, compile) train as the plain run
does; on the CPU each is checked against that run."""

import copy
import subprocess
import sys

import pytest
import torch
import yaml

import fxlocal
from fxlocal.errors import PlanMismatchError
from fxlocal.training.checkpoint import load_training_checkpoint
from fxlocal.training.loop import fit
from fxlocal.training.recipe import RecipeError, load_recipe
from fxlocal.training.report import Reporter
from fxlocal.training.runtime import amp_dtype, amp_scaler
from helpers import tiny


def final_weights(tmp_path, name, **changes):
    fit(tiny(tmp_path / name, epochs=1, **changes))
    return load_training_checkpoint(tmp_path / name / "run/last.pt")["model"]


def assert_close(a, b, atol):
    assert a.keys() == b.keys()  # the same state_dict keys: checkpoints stay interchangeable
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())
        else:
            assert torch.equal(a[key], b[key]), key


def test_amp_values_map_to_the_autocast_dtype_and_only_fp16_on_cuda_scales_the_loss(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(False, cpu) is None
    assert amp_dtype(True, cpu) == torch.bfloat16 and amp_dtype(True, cuda) == torch.float16
    assert amp_dtype("bf16", cuda) == torch.bfloat16 and amp_dtype("fp16", cpu) == torch.float16
    assert amp_scaler(tiny(tmp_path, amp="bf16"), cpu) is None
    assert amp_scaler(tiny(tmp_path, amp=True), cpu) is None
    with pytest.raises(RecipeError, match="amp"):
        tiny(tmp_path, amp="fp8")


class Watch(Reporter):
    """Sees the model fit trains, and the memory format of the batches its first block gets."""

    def run_start(self, recipe, local, start_epoch, steps_per_epoch):
        self.local, self.batches = local, []
        local.blocks[0].register_forward_pre_hook(
            lambda m, args: self.batches.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )


def test_channels_last_puts_the_model_and_every_batch_in_channels_last(tmp_path):
    watch = Watch()
    fit(tiny(tmp_path, epochs=1, channels_last=True), reporter=watch)
    convs = [m.weight for m in watch.local.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert watch.batches and all(watch.batches)  # training and evaluation batches


@pytest.mark.parametrize("aux", ["dgl", "mlaan"])
def test_a_channels_last_step_computes_what_the_default_layout_does(aux):
    # in float64, where the two layouts' different summation orders do not show (in float32 this
    # net's gradients differ by ~0.3% between them, and SGD at lr 0.1 amplifies that within steps)
    torch.manual_seed(0)
    plain = fxlocal.convert("resnet32_cifar", k=3, aux=aux, input_size=(1, 28, 28)).double()
    last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    for local, batch in ((plain, x), (last, x.contiguous(memory_format=torch.channels_last))):
        opts = [torch.optim.SGD(list(local.block_parameters(b)), lr=0.1, momentum=0.9) for b in range(local.k)]
        for _ in range(2):
            local.train_step(batch, y, opts)
    for p, q in zip(plain.state_dict().values(), last.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-9) if p.is_floating_point() else torch.equal(p, q)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    plain = fit(tiny(tmp_path / "plain", epochs=1)).history[0]
    bf16 = fit(tiny(tmp_path / "bf16", epochs=1, amp="bf16")).history[0]
    # bf16 keeps 8 bits of mantissa: the first epoch's losses agree to a few percent, not bitwise
    for a, b in zip(plain["train_loss"], bf16["train_loss"]):
        assert abs(a - b) < 0.05 * a


def test_compile_trains_as_eager_and_keeps_the_state_dict_keys(tmp_path):
    eager = final_weights(tmp_path, "eager")
    # aot_eager traces forward and backward through dynamo and AOTAutograd without generating
    # code (inductor's C++ build takes minutes here); what the recipe option wires is the same
    compiled = final_weights(tmp_path, "compiled", compile="aot_eager")
    assert_close(eager, compiled, atol=1e-5)


def test_an_unknown_compile_backend_is_refused_at_load_in_one_line(tmp_path):
    with pytest.raises(RecipeError, match="unknown torch.compile backend 'inductr'"):
        tiny(tmp_path, compile="inductr")


def test_channels_last_and_compile_are_refused_in_the_pipeline_in_one_line(tmp_path):
    for change in ({"channels_last": True}, {"compile": True}):
        with pytest.raises(RecipeError, match="pipeline"):
            load_recipe(data={"model": {"name": "resnet32_cifar"}, "pipeline": {"enabled": True}, **change})


def test_the_fused_update_is_the_default_where_torch_has_it_and_trains_as_the_loop(tmp_path):
    from fxlocal.training.optim import make_optimizers

    local = fxlocal.convert("resnet32_cifar", k=2, input_size=(1, 28, 28), num_classes=10)
    groups = lambda recipe: [g["fused"] for opt in make_optimizers(recipe, local) for g in opt.param_groups]  # noqa: E731
    assert set(groups(tiny(tmp_path))) == {True}
    assert set(groups(tiny(tmp_path, optimizer__fused=False))) == {None}  # torch's default: its for-loop on a CPU
    make_optimizers(tiny(tmp_path, optimizer__name="lamb"), local)  # timm's Lamb takes no fused argument: it would raise
    # the same update, one kernel instead of a loop: the weights after an epoch agree
    assert_close(final_weights(tmp_path, "fused"), final_weights(tmp_path, "loop", optimizer__fused=False), atol=1e-5)


def test_fused_is_refused_in_one_line_where_torch_has_no_such_kernel(tmp_path):
    from fxlocal.errors import IncompatibleOptionsError
    from fxlocal.training.optim import make_optimizer

    with pytest.raises(RecipeError, match="'optimizer.fused': torch has no fused lamb") as err:
        tiny(tmp_path, optimizer__name="lamb", optimizer__fused=True)
    assert "\n" not in str(err.value)
    complex_weights = torch.nn.Linear(2, 2).to(torch.cfloat)
    assert make_optimizer(tiny(tmp_path), complex_weights).param_groups[0]["fused"] is None  # left open: the loop
    with pytest.raises(IncompatibleOptionsError, match="floating-point tensors on cpu or cuda only"):
        make_optimizer(tiny(tmp_path, optimizer__fused=True), complex_weights)


def test_under_a_loss_scaler_sgd_is_not_fused_unless_asked_and_then_refused(tmp_path):
    from fxlocal.errors import IncompatibleOptionsError
    from fxlocal.training.optim import fused_update

    weights = list(torch.nn.Linear(2, 2).parameters())
    sgd, adamw = tiny(tmp_path).optimizer, tiny(tmp_path, optimizer__name="adamw").optimizer
    assert fused_update(sgd, weights) and not fused_update(sgd, weights, loss_scaled=True)
    assert not fused_update(adamw, weights, loss_scaled=True)
    assert fused_update(tiny(tmp_path, optimizer__name="adamw", optimizer__fused=True).optimizer, weights, loss_scaled=True)
    with pytest.raises(IncompatibleOptionsError, match="loss scaler"):
        fused_update(tiny(tmp_path, optimizer__fused=True).optimizer, weights, loss_scaled=True)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_optimizer_keeps_the_kernel_its_recipe_asks_for(tmp_path, saved_fused):
    from fxlocal.training.optim import load_optimizer_state, make_optimizer

    module = torch.nn.Linear(3, 2)
    saved = make_optimizer(tiny(tmp_path, optimizer__fused=saved_fused), module)
    module(torch.randn(4, 3)).sum().backward()
    saved.step()
    resumed = make_optimizer(tiny(tmp_path, optimizer__fused=not saved_fused), module)
    load_optimizer_state(resumed, saved.state_dict())
    assert [bool(g["fused"]) for g in resumed.param_groups] == [not saved_fused] * len(resumed.param_groups)
    for p in module.parameters():  # and the state itself is the checkpoint's
        assert torch.equal(resumed.state[p]["momentum_buffer"], saved.state[p]["momentum_buffer"])


def test_a_recipe_trains_the_blocks_of_a_saved_plan(tmp_path):
    """``convert.plan`` cuts where a saved plan cuts (its K), not where the recipe's balance
    would: runs that must train the same blocks share one plan. A plan and cuts both choosing
    the blocks, a plan made at another input size and a missing file are refused in one line."""
    from fxlocal.training.build import build_model
    from helpers import assert_one_line_error, run_cli

    saved = fxlocal.convert("resnet32_cifar", k=3, aux="dgl", input_size=(1, 28, 28), num_classes=10,
                            cuts=["layer1.0", "layer3.0"]).plan
    path = tmp_path / "plan.json"
    saved.save(path)
    default = build_model(tiny(tmp_path))
    assert default.k == 2 and default.plan.cuts != saved.cuts
    planned = build_model(tiny(tmp_path, convert__plan=str(path)))
    assert planned.k == 3 and planned.plan.cuts == saved.cuts

    with pytest.raises(RecipeError, match="'convert.cuts' and 'convert.plan' both choose the blocks"):
        tiny(tmp_path, convert__plan=str(path), convert__cuts=["layer1.0"])
    at32 = fxlocal.convert("resnet32_cifar", k=2, aux="dgl", input_size=(1, 32, 32), num_classes=10).plan
    at32.save(tmp_path / "at32.json")
    with pytest.raises(PlanMismatchError, match=r"made at input size \(1, 32, 32\)"):  # convert's own check
        fxlocal.convert("resnet32_cifar", aux="dgl", input_size=(1, 28, 28), num_classes=10, plan=at32)
    recipe_file = tmp_path / "recipe.yaml"
    for plan, fragment in ((tmp_path / "at32.json", "was made at input size (1, 32, 32)"), (tmp_path / "none.json", "cannot read plan")):
        recipe = tiny(tmp_path, convert__plan=str(plan))
        recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
        assert_one_line_error(run_cli(["train", recipe_file]), fragment)


# A training step's activations: 40 MiB held, then freed; what the kernel faults in over ten
# steps. glibc's own behaviour depends on what the process allocated before (its mmap threshold
# rises as large blocks are freed), so both runs start from its documented initial one, fixed:
# every 4 MiB tensor mapped fresh.
STEP_FAULTS = """
import ctypes, resource, sys, torch
ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
if sys.argv[1] == "keep":
    from fxlocal.training.runtime import keep_freed_memory
    assert keep_freed_memory()
def step():
    held = [torch.ones(1 << 20) for _ in range(10)]
    del held
step(); step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_freed_memory_is_not_faulted_in_again_each_step():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    pages = 10 * 10 * (4 << 20) // 4096
    assert faults("returned") > 0.9 * pages  # each tensor's pages faulted in (and zeroed) again, every step
    assert faults("keep") < 0.05 * pages  # at most the odd tensor, where the heap had to grow


def test_fit_keeps_freed_memory_unless_the_recipe_says_not_to(tmp_path, monkeypatch):
    import fxlocal.training.loop as loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(True))
    fit(tiny(tmp_path / "kept", epochs=1, max_steps_per_epoch=1))
    fit(tiny(tmp_path / "returned", epochs=1, max_steps_per_epoch=1, keep_freed_memory=False))
    assert calls == [True]
