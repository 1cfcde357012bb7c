"""Pipeline-parallel local training (fxlocal.training.pipeline): one block per process, on gloo."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fxlocal
from fxlocal.aux.ema import EMATwin
from fxlocal.tools.export import load_local_model
from fxlocal.tools.verify import export_mismatch
from fxlocal.training.checkpoint import load_training_checkpoint
from fxlocal.training.loop import fit
from fxlocal.training.pipeline import PipelineError, pipeline_obstacle
from helpers import assert_one_line_error, run_cli, tiny


def _recipe_file(recipe, path):
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def _torchrun(recipe_file, *args, stages=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages),
           "-m", "fxlocal.cli", "train", str(recipe_file), "--pipeline", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _assert_same_training(a: dict, b: dict):
    """Two training checkpoints hold the same weights, BN statistics, momenta and metrics."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(a["optimizers"]) == len(b["optimizers"])
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        assert oa["state"].keys() == ob["state"].keys() and oa["state"]
        for i in oa["state"]:
            torch.testing.assert_close(oa["state"][i]["momentum_buffer"], ob["state"][i]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["test_top1"] == rb["test_top1"] and ra["test_local_top1"] == rb["test_local_top1"]


@pytest.fixture
def one_thread():
    """Each stage computes with one thread (torchrun's default); so must the sequential run,
    since a different thread count sums convolutions in another order (and a few SGD steps
    at lr 0.1 turn float rounding into visible differences)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pipeline_computes_the_updates_of_sequential_local_training(tmp_path, one_thread):
    """Same batches, seed and order: two stages on two processes end where one process ends,
    and a pipeline checkpoint resumes pipelined or not, and exports."""
    # A schedule that does not depend on the number of epochs, so that a 1-epoch run is the
    # first epoch of the 2-epoch one.
    def recipe(folder, **changes):
        return tiny(tmp_path / folder, scheduler={"name": "step", "decay_epochs": 1, "decay_rate": 0.5}, **changes)

    sequential = fit(recipe("seq"))
    expected = load_training_checkpoint(sequential.output_dir / "last.pt")
    assert expected["history"][1]["lr"] == pytest.approx(0.025)

    first_epoch = _recipe_file(recipe("pipe", epochs=1), tmp_path / "one.yaml")
    _torchrun(first_epoch)
    after_one = tmp_path / "pipe/run/last.pt"
    state = load_training_checkpoint(after_one)
    assert state["epoch"] == 1 and len(state["optimizers"]) == 2 and state["history"][0]["pipeline"] is True
    assert state["history"][0]["steps"] == 128 // 32  # the pipeline sees every batch, not a shard

    # The sequential trainer resumes the pipeline's checkpoint ...
    (tmp_path / "resumed/run").mkdir(parents=True)
    shutil.copy(after_one, tmp_path / "resumed/run/last.pt")
    resumed = fit(recipe("resumed"), resume=True)
    _assert_same_training(load_training_checkpoint(resumed.output_dir / "last.pt"), expected)

    # ... and so does the pipeline itself.
    _torchrun(_recipe_file(recipe("pipe"), tmp_path / "two.yaml"), "--resume")
    pipelined = load_training_checkpoint(after_one)
    assert [r["epoch"] for r in pipelined["history"]] == [1, 2]
    _assert_same_training(pipelined, expected)

    # export reads it: the trained backbone loads strictly into a fresh resnet32_cifar, same output.
    fresh = fxlocal.create_model("resnet32_cifar", 10, (1, 28, 28))
    assert export_mismatch(load_local_model(after_one), fresh, torch.randn(4, 1, 28, 28)) is None


def test_infopro_pipelined_is_sequential_training(tmp_path, one_thread):
    """InfoPro's heads reconstruct the model input: stage 0 sends it on with the boundary to the
    stages whose heads read it; InfoPro+MAN on three stages (the middle one both follows the last
    and is followed by the first) ends where sequential training ends."""
    def recipe(folder, **changes):
        return tiny(tmp_path / folder, convert={"k": 3, "aux": "infopro+man"}, **changes)

    expected = load_training_checkpoint(fit(recipe("seq")).output_dir / "last.pt")
    _torchrun(_recipe_file(recipe("pipe"), tmp_path / "pipe.yaml"), stages=3)
    _assert_same_training(load_training_checkpoint(tmp_path / "pipe/run/last.pt"), expected)


def test_man_pipelined_follows_the_next_stage_as_sequential_training_does(tmp_path, one_thread):
    """MAN's EMA twin on stage 0 follows block 1's first unit, which lives on stage 1: sent back
    every step (pipeline.weight_sync: 1), the pipeline ends with the sequential trainer's weights,
    twins included, also when it stops after an epoch and resumes (the weights are sent again as
    a run starts). Sent every 2 steps, the twins follow older weights and end elsewhere."""
    def recipe(folder, **changes):
        return tiny(tmp_path / folder, convert={"k": 2, "aux": "man"},
                    scheduler={"name": "step", "decay_epochs": 1, "decay_rate": 0.5}, **changes)

    expected = load_training_checkpoint(fit(recipe("seq")).output_dir / "last.pt")
    _torchrun(_recipe_file(recipe("whole"), tmp_path / "whole.yaml"))  # across the epoch boundary
    _assert_same_training(load_training_checkpoint(tmp_path / "whole/run/last.pt"), expected)
    _torchrun(_recipe_file(recipe("pipe", epochs=1), tmp_path / "one.yaml"))
    _torchrun(_recipe_file(recipe("pipe"), tmp_path / "two.yaml"), "--resume")
    pipelined = load_training_checkpoint(tmp_path / "pipe/run/last.pt")
    assert [r["epoch"] for r in pipelined["history"]] == [1, 2]
    twin = [key for key in expected["model"] if key.startswith("heads.0.pair.b.")]
    assert twin  # compared with the rest below
    _assert_same_training(pipelined, expected)

    _torchrun(_recipe_file(recipe("sync2", pipeline={"weight_sync": 2}), tmp_path / "sync2.yaml"))
    stale = load_training_checkpoint(tmp_path / "sync2/run/last.pt")
    assert not all(torch.equal(stale["model"][key], expected["model"][key]) for key in twin)


def test_mlaan_pipelined_sends_its_cascade_gradient_back_as_sequential_training_does(tmp_path, one_thread):
    """MLAAN's cascade trains the block before: stage r sends the gradient reaching its input back
    to stage r-1, which re-runs its block on that step's input and backpropagates it before its
    step. Waiting for it every step (pipeline.cascade_delay: 0), four stages end where sequential
    training ends, across the epoch boundary: the middle ones both send and receive gradients,
    and the EMA twins of stages 1 and 2 follow the first unit of their chains, on stage 3 (sent
    back to both). So does a run stopped after an epoch and resumed. Applied a step late
    (cascade_delay: 1) the updates differ, and a resumed run still ends as the uninterrupted one."""
    def recipe(folder, k=2, **changes):
        return tiny(tmp_path / folder, convert={"k": k, "aux": "mlaan"},
                    scheduler={"name": "step", "decay_epochs": 1, "decay_rate": 0.5}, **changes)

    four = recipe("seq4", k=4)
    expected = load_training_checkpoint(fit(four).output_dir / "last.pt")
    local = fxlocal.convert("resnet32_cifar", k=4, aux="mlaan", input_size=(1, 28, 28), num_classes=10)
    followed = [{b for twin in local.heads[h].modules() if isinstance(twin, EMATwin) for b in range(4)
                 if any(p is q for p in twin.live_parameters for q in local.blocks[b].parameters())} for h in range(3)]
    assert followed == [{1}, {3}, {3}]
    _torchrun(_recipe_file(recipe("pipe4", k=4), tmp_path / "pipe4.yaml"), stages=4)
    pipelined = load_training_checkpoint(tmp_path / "pipe4/run/last.pt")
    _assert_same_training(pipelined, expected)
    # Each epoch's record says where each stage's time went: with cascade_delay 0 every stage
    # but the last waits for the gradients of the stage after; the last sends nothing.
    for record in pipelined["history"]:
        waits = record["stage_wait_s"]
        assert len(waits) == len(record["stage_train_s"]) == 4
        assert all(sum(w.values()) <= s for w, s in zip(waits, record["stage_train_s"]))
        assert all(w["exchange"] > 0 for w in waits[:3]) and waits[3]["send"] == 0

    expected = load_training_checkpoint(fit(recipe("seq")).output_dir / "last.pt")
    _torchrun(_recipe_file(recipe("pipe", epochs=1), tmp_path / "one.yaml"))
    _torchrun(_recipe_file(recipe("pipe"), tmp_path / "two.yaml"), "--resume")
    pipelined = load_training_checkpoint(tmp_path / "pipe/run/last.pt")
    assert [r["epoch"] for r in pipelined["history"]] == [1, 2]
    _assert_same_training(pipelined, expected)

    late = {"cascade_delay": 1}
    _torchrun(_recipe_file(recipe("late", pipeline=late), tmp_path / "late.yaml"))
    uninterrupted = load_training_checkpoint(tmp_path / "late/run/last.pt")
    assert not torch.allclose(uninterrupted["model"]["blocks.0.conv1.weight"], expected["model"]["blocks.0.conv1.weight"])
    _torchrun(_recipe_file(recipe("late_resumed", epochs=1, pipeline=late), tmp_path / "late_one.yaml"))
    _torchrun(_recipe_file(recipe("late_resumed", pipeline=late), tmp_path / "late_two.yaml"), "--resume")
    _assert_same_training(load_training_checkpoint(tmp_path / "late_resumed/run/last.pt"), uninterrupted)


def test_mlaan_blocks_without_their_own_loss_pipeline_as_sequential_training(tmp_path, one_thread):
    """The reference's ImageNet setting: the first two blocks have no loss of their own, so block
    1's objective does not cascade and stage 1 tells stage 0 there is nothing to re-run (its
    block is then not re-run, as in sequential training). A cascade delay of an epoch or more
    would never apply a gradient: refused in one line."""
    def recipe(folder, **changes):
        return tiny(tmp_path / folder, convert={"k": 3, "aux": "mlaan", "aux_options": {"blocks_without_own_loss": 2}},
                    **changes)

    expected = load_training_checkpoint(fit(recipe("seq")).output_dir / "last.pt")
    _torchrun(_recipe_file(recipe("pipe"), tmp_path / "pipe.yaml"), stages=3)
    pipelined = load_training_checkpoint(tmp_path / "pipe/run/last.pt")
    # nothing reaches block 0 (block 1 has no loss to cascade): its optimizer never steps, in either
    assert not pipelined["optimizers"][0]["state"] and not expected["optimizers"][0]["state"]
    _assert_same_training({**pipelined, "optimizers": pipelined["optimizers"][1:]},
                          {**expected, "optimizers": expected["optimizers"][1:]})

    late = _recipe_file(recipe("late", pipeline={"cascade_delay": 4}), tmp_path / "late.yaml")  # 4 steps an epoch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "fxlocal.cli", "train", str(late), "--pipeline"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "cascade_delay is 4 but an epoch has 4 steps" in done.stderr, done.stderr[-2000:]


_STAGE = """
import os, sys, time
from fxlocal.local_model import LocalModel

calls = []
original = LocalModel.train_block

def patched(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        {action}
    return original(self, *args, **kwargs)

LocalModel.train_block = patched
from fxlocal.cli import main
sys.argv = ["fxlocal", "train", sys.argv[1], "--pipeline"]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure,action", [("dies", "os._exit(3)"), ("hangs", "time.sleep(600)")])
def test_a_failing_stage_stops_the_other_with_a_clear_error(tmp_path, failure, action):
    """Stage 0 dies (or hangs) at its second batch: stage 1 exits with one clear line, within the
    timeout, instead of waiting forever for the next batch."""
    recipe = _recipe_file(tiny(tmp_path, epochs=1, pipeline={"timeout_s": 5}), tmp_path / "r.yaml")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    failing = subprocess.Popen([sys.executable, "-c", _STAGE.format(action=action, at=2), str(recipe)],
                               env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        other = subprocess.run([sys.executable, "-m", "fxlocal.cli", "train", str(recipe), "--pipeline"],
                               env={**env, "RANK": "1", "LOCAL_RANK": "1"}, capture_output=True, text=True, timeout=300)
        waited = time.monotonic() - started
    finally:
        failing.kill()
        failing.wait()
    assert other.returncode == 2, other.stderr[-2000:]
    assert "pipeline stage 1 lost stage 0" in other.stderr and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert waited < 120  # startup (two imports of torch and timm) + at most the 5 s timeout


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, one_thread):
    """Stage 0 is killed in epoch 2 (its 6th batch of 4 per epoch), stage 1 stops with one line;
    `--resume` continues from epoch 1's checkpoint and ends with the weights of an uninterrupted
    run (the sequential trainer's, which the pipeline computes exactly)."""
    recipe = tiny(tmp_path / "run", scheduler={"name": "step", "decay_epochs": 1, "decay_rate": 0.5},
                  pipeline={"timeout_s": 5})
    recipe_file = _recipe_file(recipe, tmp_path / "r.yaml")
    expected = load_training_checkpoint(fit(recipe.model_copy(update={"output_dir": str(tmp_path / "seq")})).output_dir / "last.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-c", _STAGE.format(action="os._exit(9)", at=6), str(recipe_file)],
                              env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        other = subprocess.run([sys.executable, "-m", "fxlocal.cli", "train", str(recipe_file), "--pipeline"],
                               env={**env, "RANK": "1", "LOCAL_RANK": "1"}, capture_output=True, text=True, timeout=300)
    finally:
        killed.kill()
        killed.wait()
    assert killed.returncode == 9 and other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert load_training_checkpoint(Path(recipe.output_dir) / "last.pt")["epoch"] == 1
    _torchrun(recipe_file, "--resume")
    _assert_same_training(load_training_checkpoint(Path(recipe.output_dir) / "last.pt"), expected)


def test_pipeline_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PipelineError, match="torchrun --nproc-per-node 2"):
        fit(tiny(tmp_path, pipeline={"enabled": True}))
    with pytest.raises(PipelineError, match="optimizer.per_block: true"):
        fit(tiny(tmp_path, pipeline={"enabled": True}, optimizer__per_block=False))
    with pytest.raises(PipelineError, match="re-runs 2 earlier blocks"):
        fit(tiny(tmp_path, pipeline={"enabled": True}, convert__aux="mlaan", convert__aux_options={"span": 3}))
    done = run_cli(["train", str(_recipe_file(tiny(tmp_path), tmp_path / "r.yaml")), "--pipeline"])
    assert_one_line_error(done, "torchrun --nproc-per-node 2")


@pytest.mark.parametrize("aux,options,stage_local", [
    ("dgl", {}, True), ("auglocal", {}, True), ("man", {}, True), ("mlaan", {}, True), ("mlaan", {"span": 3}, False),
    ("infopro", {}, True),
])
def test_pipeline_obstacle_names_objectives_that_read_other_blocks(aux, options, stage_local):
    local = fxlocal.convert("resnet32_cifar", k=3, aux=aux, input_size=(1, 28, 28), num_classes=10, **options)
    obstacle = pipeline_obstacle(local)
    assert (obstacle is None) == stage_local, obstacle


_LINK = """
import sys, torch, torch.distributed as dist
from fxlocal.training.pipeline import END, TRAIN, _Link

rank = int(sys.argv[1])
dist.init_process_group("gloo")
link = _Link(rank, 2, torch.device("cpu"), max_in_flight=1, timeout_s=30)
if rank == 0:
    pickled = []
    send_object_list = dist.send_object_list
    dist.send_object_list = lambda objects, *a, **k: (pickled.append(objects), send_object_list(objects, *a, **k))
    link.send(TRAIN, (torch.arange(6.0).view(2, 3), torch.full((2, 4), 0.5), 7, torch.Size([3])), torch.tensor([4, 5]))
    link.send(TRAIN, (torch.ones(1, 2, dtype=torch.bfloat16),), torch.tensor([9]))
    link.send(TRAIN, (torch.zeros(1, 3, 2), torch.ones(1, 5, dtype=torch.float16)), torch.tensor([1]))
    link.send(TRAIN, (torch.ones(2, 3), 5), torch.tensor([2, 3]), torch.full((2, 1, 4, 4), 0.25))  # and the model input
    link.send(END)
    link.flush()
    assert pickled == [[[7, torch.Size([3])]], [[5]]], pickled  # tensors go as tensors, only plain values pickled
else:
    torch.save(list(link.receive(TRAIN)), sys.argv[2])
dist.destroy_process_group()
"""


def test_link_carries_tensors_labels_and_plain_values(tmp_path):
    """A boundary may carry a second tensor and plain values after its tensor (shapes, ints);
    dtypes and shapes vary; the model input may travel beside it (for InfoPro's heads)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    got = tmp_path / "got.pt"
    ranks = [subprocess.Popen([sys.executable, "-c", _LINK, str(r), str(got)], env={**env, "RANK": str(r)}) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    (first, y1, x1), (second, y2, x2), (third, y3, x3), (fourth, y4, x4) = torch.load(got)
    assert x1 is None and x2 is None and x3 is None
    assert len(fourth) == 2 and torch.equal(fourth[0], torch.ones(2, 3)) and fourth[1] == 5 and torch.equal(y4, torch.tensor([2, 3]))
    assert torch.equal(x4, torch.full((2, 1, 4, 4), 0.25))
    assert torch.equal(first[0], torch.arange(6.0).view(2, 3)) and first[2:] == (7, torch.Size([3]))
    assert torch.equal(first[1], torch.full((2, 4), 0.5))
    assert torch.equal(y1, torch.tensor([4, 5])) and torch.equal(y2, torch.tensor([9]))
    assert second[0].dtype == torch.bfloat16 and second[0].shape == (1, 2) and len(second) == 1
    assert len(third) == 2 and torch.equal(third[0], torch.zeros(1, 3, 2)) and torch.equal(y3, torch.tensor([1]))
    assert third[1].dtype == torch.float16 and torch.equal(third[1], torch.ones(1, 5, dtype=torch.float16))
