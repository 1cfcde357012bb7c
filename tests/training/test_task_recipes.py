"""The task recipes (issue 29): every one builds, finishes a ``--quick`` run and is evaluated back."""

import pytest
import torch

from helpers import REPO, SHARED, run_cli

RECIPES = sorted((REPO / "recipes").glob("fashion_mnist_*_*.yaml"))


def test_every_task_recipe_builds():
    from fxlocal.training.build import build_model
    from fxlocal.training.recipe import load_recipe

    assert len(RECIPES) == 9
    for path in RECIPES:
        recipe = load_recipe(path)
        local = build_model(recipe)
        assert local.task.name == {"detect": "detection", "segment": "segmentation", "sr": "super_resolution"}[
            path.stem.split("_")[2]], path.name
        assert local.k == recipe.convert.k and local.plan.aux == recipe.convert.aux
        if recipe.model.bn_momentum is not None:  # every BatchNorm's, the heads' included
            norms = [m for m in local.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert norms and all(m.momentum == recipe.model.bn_momentum for m in norms)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_task_recipe_finishes_a_quick_run_and_evaluates(tmp_path, recipe):
    task = recipe.stem.split("_")[2]
    root = SHARED / "datasets" / "fashion-mnist"
    result = run_cli(["train", recipe, "--quick", "--set", f"data.root={root}", "--set", "batch_size=4", "-o", tmp_path / "run",
                      "--set", "device=cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    metric = {"detect": "mAP", "segment": "mIoU", "sr": "PSNR"}[task]
    assert f"test {metric}" in result.output
    result = run_cli(["evaluate", tmp_path / "run" / "last.pt"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "32 test images" in result.output and metric in result.output, result.output
