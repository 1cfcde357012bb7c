import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

import fxlocal
from fxlocal.errors import TrainingDiverged
from fxlocal.training.build import build_model
from fxlocal.training.checkpoint import load_training_checkpoint
from fxlocal.training.data import DatasetError, build_dataset
from fxlocal.training.loop import fit
from fxlocal.training.pipeline import pipeline_obstacle
from fxlocal.training.recipe import RecipeError, load_recipe
from fxlocal.training.report import Reporter
from helpers import REPO, SHARED, assert_one_line_error, run_cli, tiny

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


# --- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"convert": {"balance": "speed"}}, "'convert.balance': Input should be 'flops', 'params', 'activations', 'memory' or 'time'"),
        ({"convert": {"aux": "dgll"}}, "'convert.aux': unknown method 'dgll'; choose one of"),
        ({"epochs": 0}, "'epochs': Input should be greater than or equal to 1"),
        ({"optimizr": {}}, "'optimizr' is not a recipe field"),
        ({"data": {"dataset": "mnist2"}}, "'data.dataset': unknown dataset 'mnist2'"),
    ],
)
def test_bad_recipe_fields_are_named(change, message):
    data = {"model": {"name": "resnet32_cifar"}, **change}
    with pytest.raises(RecipeError) as err:
        load_recipe(data=data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_field_is_named():
    with pytest.raises(RecipeError, match="recipe field 'model' is required"):
        load_recipe(data={"epochs": 3})


def test_set_overrides_any_field():
    recipe = load_recipe(
        RECIPES[0],
        ["epochs=3", "convert.aux_options.span=3", "optimizer.lr=0.05", "data.input_size=[3, 64, 64]"],
    )
    assert recipe.epochs == 3 and recipe.optimizer.lr == 0.05
    assert recipe.convert.aux_options["span"] == 3
    assert recipe.data.input_size == (3, 64, 64)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate_name_a_source_and_build(path):
    recipe = load_recipe(path)
    assert recipe.source
    local = build_model(recipe)
    assert local.k == recipe.convert.k and local.plan.aux == recipe.convert.aux
    if recipe.pipeline.enabled:  # one block per process: nothing its objectives read may be elsewhere
        assert pipeline_obstacle(local) is None


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match=f"not found at {tmp_path}"):
        build_dataset("cifar10", str(tmp_path), True, (3, 32, 32))
    with pytest.raises(DatasetError, match="fashion_mnist"):
        build_dataset("fashion_mnist", str(tmp_path), True, (1, 28, 28))


def test_shared_fashion_mnist_reads_straight_from_gz():
    """The full-size files a user's data.root points at (the shipped sample has 1000 images, so
    it cannot show that all 10 000 test images are read): ../shared/datasets, beside the
    repository in CI, holds them."""
    data = build_dataset("fashion_mnist", str(SHARED / "datasets" / "fashion-mnist"), False, (1, 28, 28))
    assert len(data) == 10000
    x, y = data[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10


# --- training -----------------------------------------------------------------------------------


class StopAfter(Reporter):
    def __init__(self, epochs):
        self.epochs = epochs

    def epoch_end(self, record):
        if record["epoch"] == self.epochs:
            raise KeyboardInterrupt


@pytest.mark.parametrize("aux", ["dgl", "mlaan"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, aux):
    straight = tiny(tmp_path / "a", convert__aux=aux)
    fit(straight)
    interrupted = tiny(tmp_path / "b", convert__aux=aux)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, reporter=StopAfter(1))
    assert load_training_checkpoint(tmp_path / "b/run/last.pt")["epoch"] == 1
    fit(interrupted, resume=True)
    a = load_training_checkpoint(tmp_path / "a/run/last.pt")
    b = load_training_checkpoint(tmp_path / "b/run/last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "test_top1" in json.loads(lines[-1])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit(recipe, reporter=StopAfter(1))
    good = (tmp_path / "run/last.pt").read_bytes()
    real_step = fxlocal.LocalModel.train_step

    def poisoned(self, *args, **kwargs):
        losses = real_step(self, *args, **kwargs)
        return [math.nan] + losses[1:]

    monkeypatch.setattr(fxlocal.LocalModel, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match="loss of block 0 is nan at epoch 2, step 1"):
        fit(recipe, resume=True)
    assert (tmp_path / "run/last.pt").read_bytes() == good


def test_one_optimizer_for_all_blocks(tmp_path):
    result = fit(tiny(tmp_path, optimizer__per_block=False, epochs=1))
    assert result.history[0]["train_loss"][0] > 0


def test_cli_train_and_evaluate(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(tmp_path).model_dump(mode="json")))
    result = run_cli(["train", str(recipe), "--set", "epochs=1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output and "summary" in result.output
    assert (tmp_path / "run/curves.png").read_bytes()[:4] == b"\x89PNG"
    top1 = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])["test_top1"]
    result = run_cli(["evaluate", str(tmp_path / "run/last.pt")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"top-1 {top1:.4f}" in result.output


def test_cli_bad_recipe_and_checkpoint_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet32_cifar}\nconvert: {balance: speed}\n")
    assert_one_line_error(run_cli(["train", str(bad)]), "convert.balance")
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli(["evaluate", str(tmp_path / "x.pt")]), "not an fxlocal checkpoint")


def test_data_parallel_with_two_processes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(tmp_path, epochs=1).model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fxlocal.cli", "train", str(recipe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert record["world_size"] == 2
    assert record["steps"] == 128 // 32 // 2  # each rank sees half the data
    assert record["replicas_in_sync"] is True


def test_recipe_max_memory_chooses_k(tmp_path):
    from fxlocal.memory import local_step, step_peak_bytes

    recipe = tiny(tmp_path, batch_size=64)
    peaks = {k: step_peak_bytes(build_model(tiny(tmp_path, batch_size=64, convert__k=k)), local_step, 64, (1, 28, 28), 10)
             for k in (1, 2)}
    limit = (peaks[1] + peaks[2]) // 2
    assert peaks[2] < limit < peaks[1]
    chosen = build_model(load_recipe(data={**recipe.model_dump(mode="json"),
                                           "convert": {**recipe.convert.model_dump(), "k": 9, "max_memory": f"{limit}B"}}))
    assert chosen.k == 2


def test_per_block_optimizers_step_a_tied_parameter_once(tmp_path):
    from fxlocal.training.optim import make_optimizers
    from nets import RotaryTokens

    local = fxlocal.convert(RotaryTokens("parameter"), k=3, input_size=(3, 16, 16), num_classes=5)
    tied = local.blocks[1].get_parameter("frequencies")
    optimizers = make_optimizers(tiny(tmp_path, optimizer__weight_decay=0.05), local)
    holding = [
        (b, group["weight_decay"]) for b, opt in enumerate(optimizers) for group in opt.param_groups
        if any(p is tied for p in group["params"])
    ]
    assert holding == [(2, 0.0)]  # the last block that uses it; a 1-D parameter: no weight decay
    stepped = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert len(stepped) == len({id(p) for p in stepped}) == len(list(local.parameters()))
