import json

import pytest
import torch

from fxlocal.training.checkpoint import load_converted
from helpers import assert_one_line_error, run_cli


def run(*args):
    return run_cli(list(args), env={"COLUMNS": "200"})


def test_convert_prints_plan_and_saves(tmp_path):
    out, plan = tmp_path / "local.pt", tmp_path / "plan.json"
    result = run(
        "convert", "resnet18", "--k", "3", "--input-size", "3", "32", "32", "--num-classes", "4",
        "--output", str(out), "--save-plan", str(plan),
    )
    assert result.exit_code == 0, result.output
    assert "K=3" in result.output and "layer" in result.output and "head 0: DGL" in result.output
    data = json.loads(plan.read_text())
    assert data["k"] == 3 and len(data["cuts"]) == 2
    local = load_converted(out).eval()
    assert local.k == 3 and local.plan.cuts == data["cuts"]
    assert local(torch.randn(1, 3, 32, 32)).shape == (1, 4)



def test_convert_times_its_balance_under_the_allocator_training_uses(monkeypatch):
    """balance=time measures the blocks as fxlocal train will run them: with freed memory kept
    (the recipe's default keep_freed_memory); other balances measure nothing and leave it."""
    import fxlocal.training.runtime as runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True))
    size = ["--input-size", "1", "28", "28", "--num-classes", "10"]
    assert run("convert", "resnet32_cifar", "--k", "2", *size).exit_code == 0
    assert calls == []
    result = run("convert", "resnet32_cifar", "--k", "2", "--balance", "time", *size)
    assert result.exit_code == 0, result.output
    assert calls == [True]

def test_convert_names_tied_parameters_and_saves_them_once(tmp_path):
    out = tmp_path / "local.pt"
    result = run(
        "convert", "nets:rotary_tokens_with_learned_frequencies", "--k", "3",
        "--input-size", "3", "16", "16", "--output", str(out),
    )
    assert result.exit_code == 0, result.output
    assert "tied: frequencies is used by blocks 1, 2 (a table each recomputes); each one's loss trains it, block 2 steps it" in result.output
    local = load_converted(out)
    assert local.tied_parameters() == {"frequencies": [1, 2]}
    assert local.blocks[1].get_parameter("frequencies") is local.blocks[2].get_parameter("frequencies")


def test_inspect_lists_candidates():
    result = run("inspect", "resnet18", "--input-size", "3", "32", "32")
    assert result.exit_code == 0, result.output
    assert "22 cut candidates, K can be 1 to 23" in result.output
    assert "layer1_0_act2" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "resnet1O1"], "did you mean resnet101"),
        (["convert", "resnet18", "--k", "0"], "k must be at least 1"),
        (["convert", "resnet18", "--k", "99", "--input-size", "3", "32", "32"], "k can be 1 to 23"),
        # TNT's pixel stream is (batch·patches, …), never carried beside its patch stream, so
        # its blocks are one unit; DGL cuts it elsewhere too
        (["convert", "tnt_s_patch16_224", "--aux", "auglocal"],
         "1 unit boundary to cut at, so k can be 1 to 2; aux='dgl' can cut at its 8 cut candidates"),
        (["convert", "efficientformer_l1", "--input-size", "3", "64", "64"], "made for --input-size 3 224 224"),
        (["convert", "resnet18", "--aux", "dgll"], "did you mean 'dgl'"),
        (["convert", "resnet18", "--balance", "speed"], "choose one of flops, params, activations"),
        (["convert", "torchvision:resnet18", "--input-size", "1", "32", "32"], "rejects input size"),
        (["convert", "torchvision:vit_b_16", "--input-size", "3", "30", "30"], "input size"),
        (["inspect", "no_such_net"], "unknown model"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    assert_one_line_error(run(*args), message)


def test_output_to_missing_folder_is_a_clear_error(tmp_path):
    result = run("convert", "resnet18", "--k", "2", "--input-size", "3", "32", "32", "--output", str(tmp_path / "no" / "m.pt"))
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "no").exists()


def test_inspect_plot_draws_the_plan(tmp_path):
    out = tmp_path / "plan.png"
    result = run("inspect", "resnet32_cifar", "--input-size", "3", "32", "32", "--k", "4", "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
