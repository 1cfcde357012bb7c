import torch
from torch.distributed._tools.mem_tracker import MemTracker

import fxlocal
from fxlocal.memory import e2e_step, predict_memory, step_peak_bytes
from helpers import assert_one_line_error, run_cli


def test_fake_prediction_equals_a_real_cpu_step():
    model = fxlocal.create_model("resnet18", 10, (3, 32, 32))
    predicted = step_peak_bytes(model, e2e_step, 8, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    e2e_step(model, opt, x, y)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        e2e_step(model, opt, x, y)
    real = max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    assert predicted == real


def test_local_step_needs_less_memory_than_end_to_end():
    original = fxlocal.create_model("resnet32_cifar", 10, (3, 32, 32))
    local = fxlocal.convert(original, k=4, input_size=(3, 32, 32), balance="activations")
    report = predict_memory(original, local, 128)
    assert report.local_peak_mib < 0.6 * report.e2e_peak_mib
    assert len(report.blocks) == 4
    assert sum(b.params_mib for b in report.blocks) * 2**20 == sum(p.numel() * 4 for p in original.parameters())
    assert all(b.activations_mib > 0 for b in report.blocks)


def test_memory_cli():
    result = run_cli(["memory", "resnet32_cifar", "--k", "4", "--batch", "32", "--input-size", "3", "32", "32"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "peak: end-to-end" in result.output and "× end-to-end" in result.output
    assert_one_line_error(run_cli(["memory", "resnet32_cifar", "--optimizer", "lion"]), "choose one of sgd, adamw")


def test_max_memory_picks_the_smallest_k_that_fits():
    import pytest

    from fxlocal.memory import (
        MemoryLimitError,
        local_step,
        max_blocks,
        parse_bytes,
        smallest_k_that_fits,
        step_peak_bytes,
    )

    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("1.5 MiB") == 3 * 2**19 and parse_bytes("2GB") == 2 * 10**9
    analyzed = fxlocal.analyze_model("resnet32_cifar", (3, 32, 32), num_classes=10)

    def convert(k):
        return fxlocal.convert(analyzed, k=k, balance="memory")

    peaks = {k: step_peak_bytes(convert(k), local_step, 64, (3, 32, 32), 10, per_block=True) for k in (1, 2, 3)}
    limit = (peaks[2] + peaks[1]) // 2  # K=1 is too big, K=2 fits
    assert peaks[2] < limit < peaks[1]
    k, local, peak_mib = smallest_k_that_fits(convert, limit, 64, max_blocks(analyzed, "dgl"))
    assert k == 2 and local.k == 2 and peak_mib * 2**20 == peaks[2]
    with pytest.raises(MemoryLimitError, match="no K fits 1 MiB: the smallest predicted peak is"):
        smallest_k_that_fits(convert, 2**20, 64, 3)
    result = run_cli(["convert", "resnet32_cifar", "--input-size", "3", "32", "32", "--batch", "64",
                                      "--balance", "memory", "--max-memory", f"{limit}B"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "K=2 is the smallest that fits" in result.output


def test_fake_prediction_of_a_cascaded_local_step_equals_a_real_cpu_step():
    from fxlocal.memory import local_step, make_step_optimizers, step_tracker_class

    local = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=(3, 32, 32))
    predicted = step_peak_bytes(local, local_step, 8, (3, 32, 32), 10, per_block=True)
    opt = make_step_optimizers(local, "sgd", per_block=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    local_step(local, opt, x, y)
    tracker = step_tracker_class()()
    tracker.track_external(local, *opt)
    with tracker:
        local_step(local, opt, x, y)
    assert predicted == max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())


def test_step_tracker_counts_a_module_input_only_while_it_lives():
    """MemTracker's module tracker keeps every module input that requires grad (a cascade's
    block input) and its gradient alive; the step tracker does not: three inputs used one after
    the other peak as one."""
    from fxlocal.memory import step_tracker_class

    linear = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(1024, 256)

    def peak(uses: int) -> int:
        tracker = step_tracker_class()()
        tracker.track_external(linear)
        with tracker:
            for _ in range(uses):
                leaf = x.clone().requires_grad_()
                linear(leaf).sum().backward()
                del leaf
        return max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())

    assert peak(3) == peak(1)


def test_block_step_peaks_say_which_block_binds():
    """Each block's part of the step peaks on its own; the largest is the step's peak. Cutting
    right after the stem leaves block 1 the rest of the stages, so it binds."""
    from fxlocal.memory import block_step_peaks, local_step

    size = (3, 32, 32)
    original = fxlocal.create_model("resnet32_cifar", 10, size)
    plan = fxlocal.convert(original, k=2, input_size=size).plan
    plan.blocks[0].cut_node = "act1"  # after the stem
    local = fxlocal.convert(original, input_size=size, plan=plan)
    peaks = block_step_peaks(local, 32, size, 10)
    assert len(peaks) == 2 and peaks[1] > peaks[0] > 0
    assert max(peaks) == step_peak_bytes(local, local_step, 32, size, 10, per_block=True)


def test_step_flops_counts_forward_and_weight_gradient_products_and_a_local_steps_heads():
    from fxlocal.memory import step_flops

    # Linear 12 -> 4 on a batch of 2: forward 2·2·12·4 FLOPs, the weight gradient as many; the
    # input needs no gradient, so nothing more
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    assert step_flops(linear, 2, (3, 2, 2), 4) == 2 * (2 * 2 * 12 * 4)
    model = fxlocal.create_model("resnet32_cifar", 10, (3, 32, 32))
    e2e = step_flops(model, 2, (3, 32, 32), 10)
    dgl = fxlocal.convert(model, k=4, aux="dgl", input_size=(3, 32, 32))
    mlaan = fxlocal.convert(model, k=4, aux="mlaan", input_size=(3, 32, 32))
    dgl_flops, mlaan_flops = (step_flops(m, 2, (3, 32, 32), 10, per_block=True) for m in (dgl, mlaan))
    # DGL adds small heads but skips the input gradients at its three cuts; MLAAN's cascades and
    # chains more than double the arithmetic
    assert 0.9 * e2e < dgl_flops < 1.1 * e2e
    assert mlaan_flops > 2 * e2e
