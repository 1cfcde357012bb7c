"""Bad input through the CLI: exit code 2, exactly one line on stderr that says what to do,
nothing on stdout and nothing written. Checkpoints load without running code, and a writer
killed at any moment leaves the previous checkpoint loadable."""

import io
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fxlocal.training.checkpoint import (
    CheckpointError,
    load_training_checkpoint,
    read_checkpoint_file,
)
from fxlocal.training.loop import fit
from helpers import assert_one_line_error, run_cli, tiny


def run(*args):
    return run_cli(args)


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run of the tiny quickstart recipe: (recipe file, its checkpoint)."""
    folder = tmp_path_factory.mktemp("trained")
    recipe = tiny(folder, epochs=1)
    fit(recipe)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path, folder / "run" / "last.pt"


# --- usage errors: click's, in fxlocal's one-line form -----------------------------------------


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["convert", "resnet18", "--num-classes", "0"], ["'--num-classes'", "greater than or equal to 1", "convert --help"]),
        (["convert", "resnet18", "--bogus"], ["No such option: --bogus", "convert --help"]),
        (["convert"], ["Missing argument", "convert --help"]),
        (["evaluate"], ["Missing argument", "evaluate --help"]),
        (["conver", "resnet18"], ["No such command 'conver'", "Did you mean 'convert'"]),
        (["convert", "resnet18", "--input-size", "3", "32"], ["--input-size", "requires 3 arguments"]),
    ],
)
def test_usage_errors_are_one_line(args, fragments):
    assert_one_line_error(run(*args), *fragments)


def test_help_still_prints_and_exits_0():
    result = run("convert", "--help")
    assert result.exit_code == 0 and "--num-classes" in result.stdout


# --- convert ------------------------------------------------------------------------------------


SMALL = ["--input-size", "3", "32", "32", "--k", "2"]


def test_save_plan_to_a_missing_folder_is_refused_before_any_work(tmp_path):
    result = run("convert", "resnet18", *SMALL, "--save-plan", tmp_path / "missing" / "plan.json")
    assert_one_line_error(result, "folder", "does not exist", "create it first")
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("[1, 2, 3]", "holds a JSON list, not an object"),
        ('"cuts"', "holds a JSON str"),
        ('{"k": 2, "blocks": [1, 2]}', "'blocks' is not a list of objects"),
        ('{"model": "resnet18", "k": 2}', "not an fxlocal plan"),
        ("{not json", "invalid JSON"),
    ],
)
def test_a_plan_file_that_is_not_a_plan_is_one_line(tmp_path, content, fragment):
    plan = tmp_path / "p.json"
    plan.write_text(content)
    assert_one_line_error(run("convert", "resnet18", *SMALL, "--plan", plan), fragment, "--save-plan")
    assert files_under(tmp_path) == {plan}


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--max-memory", "8XB"], "8XB"),
        (["--aux-option", "span"], "--aux-option takes KEY=VALUE"),
        (["--plan", "no_such_plan.json"], "cannot read plan"),
    ],
)
def test_malformed_convert_options_are_one_line(tmp_path, args, fragment):
    assert_one_line_error(run("convert", "resnet18", *SMALL, *args), fragment)


def test_unknown_memory_device_is_one_line():
    assert_one_line_error(run("memory", "resnet18", "--device", "tpu"), "unknown device 'tpu'", "fake or cuda")


# --- train --------------------------------------------------------------------------------------


def test_malformed_and_missing_recipes_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet32_cifar\nconvert: [")
    assert_one_line_error(run("train", bad), "bad.yaml")
    assert_one_line_error(run("train", tmp_path / "none.yaml"), "none.yaml")
    assert files_under(tmp_path) == {bad}


@pytest.mark.parametrize("override,fragment", [("epochs", "key.sub=value"), ("device=tpu", "device")])
def test_malformed_set_and_unknown_device_are_one_line(tmp_path, trained, override, fragment):
    recipe, _ = trained
    assert_one_line_error(run("train", recipe, "--set", override, "--output", tmp_path / "out"), fragment)
    assert files_under(tmp_path) == set()


def test_missing_dataset_through_train_writes_nothing(tmp_path, trained):
    recipe, _ = trained
    result = run("train", recipe, "--set", f"data.root={tmp_path / 'no_data'}", "--output", tmp_path / "out")
    assert_one_line_error(result, "fashion_mnist", str(tmp_path / "no_data"))
    assert files_under(tmp_path) == set()


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, trained):
    recipe, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(run("train", recipe, "--output", blocker / "run"), "is a file, not a folder", "--output DIR")
    assert files_under(tmp_path) == {blocker} and blocker.read_text() == "not a folder"


def test_train_output_sets_the_output_dir(tmp_path, trained):
    recipe, _ = trained
    out = tmp_path / "123"  # a name YAML would read as a number
    result = run("train", recipe, "--output", out, "--set", "epochs=1")
    assert result.exit_code == 0, result.output
    assert (out / "last.pt").exists() and (out / "metrics.jsonl").exists()
    assert load_training_checkpoint(out / "last.pt")["recipe"]["output_dir"] == str(out)


# --- evaluate / export: missing, truncated and partial checkpoints --------------------------------


def test_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run("evaluate", tmp_path / "none.pt"), "no such file")
    assert_one_line_error(run("export", tmp_path / "none.pt", "-o", tmp_path / "b.pt"), "no such file")
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.95])
def test_a_truncated_checkpoint_is_one_line(tmp_path, trained, keep):
    _, checkpoint = trained
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(run("evaluate", cut), "not an fxlocal checkpoint")
    assert_one_line_error(run("export", cut, "-o", tmp_path / "b.pt"), "not an fxlocal checkpoint")
    assert files_under(tmp_path) == {cut}


@pytest.mark.parametrize("drop", ["model", "plan", "recipe", "epoch"])
def test_a_partial_checkpoint_is_one_line(tmp_path, trained, drop):
    _, checkpoint = trained
    state = load_training_checkpoint(checkpoint)
    del state[drop]
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    assert_one_line_error(run("evaluate", partial), "incomplete training checkpoint", drop)
    assert_one_line_error(run("export", partial, "-o", tmp_path / "b.pt"), "incomplete training checkpoint", drop)
    assert files_under(tmp_path) == {partial}


def test_a_checkpoint_with_weights_of_another_model_is_one_line(tmp_path, trained):
    _, checkpoint = trained
    state = load_training_checkpoint(checkpoint)
    state["model"] = {k: v for i, (k, v) in enumerate(state["model"].items()) if i % 2}
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    assert_one_line_error(run("evaluate", wrong), "weights do not fit the model its plan builds", "Missing key")


def test_a_partial_checkpoint_is_not_resumed(tmp_path, trained):
    recipe, checkpoint = trained
    state = load_training_checkpoint(checkpoint)
    del state["optimizers"]
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "last.pt")
    result = run("train", recipe, "--output", tmp_path / "run", "--resume")
    assert_one_line_error(result, "cannot be resumed", "optimizers")


# --- checkpoints cannot run code ----------------------------------------------------------------


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): code a checkpoint must never get to run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("command", ["evaluate", "export", "resume"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, trained, command):
    recipe, checkpoint = trained
    marker = tmp_path / "code_ran"
    state = load_training_checkpoint(checkpoint)
    state["history"] = [_CreatesAFile(marker)]
    evil = tmp_path / "run" / "last.pt"
    evil.parent.mkdir()
    torch.save(state, evil)
    args = {
        "evaluate": ["evaluate", evil],
        "export": ["export", evil, "-o", tmp_path / "b.pt"],
        "resume": ["train", recipe, "--output", evil.parent, "--resume"],
    }[command]
    assert_one_line_error(run(*args), "refused to load", "pickled Python objects")
    assert not marker.exists()
    assert files_under(tmp_path) == {evil.parent, evil}


class _RunsAShellCommand:
    """Unpickling this calls os.system: torch blocks the whole module, not only the function."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload", [_CreatesAFile, _RunsAShellCommand])
def test_a_pickle_that_would_run_code_is_refused_as_a_converted_model(tmp_path, payload):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "model.pt"
    torch.save({"format": "fxlocal.converted/1", "config": payload(marker)}, evil)
    from fxlocal.training.checkpoint import load_converted

    with pytest.raises(CheckpointError, match="refused to load"):
        load_converted(evil)
    assert not marker.exists()


def test_a_checkpoint_of_the_previous_format_resumes(tmp_path, trained):
    """Format 1 kept numpy's RNG key as a numpy array; it loads, and resuming restores numpy's RNG."""
    recipe, checkpoint = trained
    state = load_training_checkpoint(checkpoint)
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    state["rng"]["numpy"] = np.random.get_state()  # (str, ndarray, int, int, float), as format 1
    state["epoch"], state["history"] = 0, []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "last.pt", "wb") as f:
        torch.save(state, f)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / "last.pt")
    loaded = load_training_checkpoint(run_dir / "last.pt")
    from fxlocal.training.recipe import load_recipe

    seen = []

    class Spy:
        def run_start(self, *args):
            seen.append(np.random.random(3))

        def __getattr__(self, name):
            return lambda *a, **k: None

    resumed = load_recipe(data={**loaded["recipe"], "output_dir": str(run_dir)})
    fit(resumed, resume=True, reporter=Spy())
    assert np.allclose(seen[0], expected)


def test_new_checkpoints_hold_no_numpy_objects(trained):
    _, checkpoint = trained
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []


# --- a writer killed at any moment leaves the previous checkpoint loadable ----------------------

def _write_forever(path: Path, first_written) -> None:
    """Checkpoints of growing step numbers, each a tensor full of its step, until killed."""
    from fxlocal.graph.plan import atomic_write_bytes

    step = 0
    while True:
        step += 1
        buffer = io.BytesIO()
        torch.save({"step": step, "weights": torch.full((2048, 512), float(step))}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        first_written.set()


def test_a_writer_killed_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")  # no re-import of torch per writer
    for _ in range(5):
        first_written = fork.Event()
        writer = fork.Process(target=_write_forever, args=(path, first_written))
        writer.start()
        assert first_written.wait(timeout=120)  # at least one checkpoint written by this writer
        time.sleep(rng.uniform(0.0, 0.25))  # each 4 MiB write and fsync takes milliseconds: kill inside one
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        payload = read_checkpoint_file(path)
        assert payload["step"] >= 1 and torch.equal(payload["weights"], torch.full((2048, 512), float(payload["step"])))


@pytest.mark.parametrize("pipeline", [False, True])
def test_resuming_with_no_checkpoint_is_one_line(tmp_path, trained, pipeline):
    recipe, _ = trained
    out = tmp_path / "empty"
    args = ["train", recipe, "--resume", "--output", out, *(["--pipeline"] if pipeline else [])]
    assert_one_line_error(run(*args), "nothing to resume: no checkpoint at", str(out / "last.pt"))
    assert not out.exists()
