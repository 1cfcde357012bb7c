"""Local learning beyond classification (issue 29): torchvision's detectors and segmenters and the
reference SR network convert, isolate gradients, train and export back; the detectors' loss is
their own; GLCAN heads; the task refusals."""

import pytest
import torch
import yaml

import fxlocal
from fxlocal.aux import HeadSpec
from fxlocal.aux.glcan import GLCANHead
from fxlocal.aux.tasks import TaskSpec, detection_targets, point_targets, presence
from fxlocal.errors import TaskError
from fxlocal.models.dense import DetectionTrunk, anchor_layout, detector_family
from fxlocal.tools.verify import export_mismatch, isolation_violations
from helpers import REPO, assert_one_line_error, run_cli

SIZE = (3, 128, 128)
# two images: two items and one (label 1 + class, x0, y0, x1, y1), padded with label -1
BOXES = torch.tensor([
    [[3, 10, 10, 50, 60], [5, 60, 60, 120, 100], [-1, 0, 0, 0, 0]],
    [[1, 20, 30, 90, 90], [-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]],
], dtype=torch.float)


def _target(task: str, batch: int = 2):
    if task == "detection":
        return BOXES[:batch]
    if task == "segmentation":
        return torch.randint(0, 11, (batch, 128, 128))
    return torch.rand(batch, 3, 128, 128)


MODELS = [
    ("retinanet_resnet50_fpn", "detection", SIZE),
    ("fcos_resnet50_fpn", "detection", SIZE),
    ("ssdlite320_mobilenet_v3_large", "detection", SIZE),
    ("fasterrcnn_mobilenet_v3_large_fpn", "detection", SIZE),  # two-stage: RPN and box heads in the objective
    ("fcn_resnet50", "segmentation", SIZE),
    ("deeplabv3_mobilenet_v3_large", "segmentation", SIZE),
    ("lraspp_mobilenet_v3_large", "segmentation", SIZE),  # its low-level skip crosses the cuts beside the cut tensor
    ("segment:resnet18", "segmentation", SIZE),  # any timm CNN with a simple decoder
    ("edsr_x2", "super_resolution", (3, 64, 64)),
]


@pytest.mark.parametrize("name,task,size", MODELS, ids=[m[0] for m in MODELS])
def test_task_model_converts_isolates_trains_and_exports_back(name, task, size):
    classes = None if task == "super_resolution" else 11
    local = fxlocal.convert(name, k=4, aux="glcan", input_size=size, num_classes=classes)
    assert local.task.name == task and local.k == 4
    x, y = torch.rand(2, *size), _target(task)
    assert isolation_violations(local, x, y) == []
    before = [[p.detach().clone() for p in local.block_parameters(b)] for b in range(local.k)]
    losses = local.train_step(x, y, [torch.optim.SGD(list(local.block_parameters(b)), lr=0.01) for b in range(local.k)])
    assert all(torch.isfinite(torch.tensor(losses)))
    for b in range(local.k):
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(before[b], local.block_parameters(b))), f"block {b} did not train"
    original = fxlocal.create_model(name, classes, size)
    if task == "detection":
        original.score_thresh = local.final_objective.detector.score_thresh = 0.0  # boxes to compare, untrained
    assert export_mismatch(local, original, x) is None


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
                                  "fasterrcnn_mobilenet_v3_large_fpn"])
def test_detector_loss_and_boxes_are_the_detectors_own(name):
    detector = fxlocal.create_model(name, 11, SIZE)
    trunk, layout, family = DetectionTrunk(detector), anchor_layout(detector, SIZE), detector_family(detector)
    x = torch.rand(2, *SIZE)
    torch.manual_seed(1)  # Faster R-CNN samples the anchors and proposals its losses score
    own = detector.train()(list(x), detection_targets(BOXES))
    torch.manual_seed(1)
    if family.two_stage:  # its transform draws a training size per image (one uniform) before anything else
        for _ in x:
            torch.empty(1).uniform_()
    ours = family.loss(detector, detection_targets(BOXES), trunk(x), layout)
    assert own.keys() == ours.keys()
    for term in own:
        assert torch.equal(own[term], ours[term]), term
    detector.eval().score_thresh = 0.0
    with torch.no_grad():
        want, got = detector(list(x)), family.predict(detector, trunk(x), layout)
    assert len(want[0]["boxes"]) > 0
    for a, b in zip(want, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_block_trains_on_the_task_loss():
    local = fxlocal.convert("edsr_x2", k=2, aux="glcan", input_size=(3, 64, 64))
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        want = torch.nn.functional.l1_loss(local.eval()(x), y)
    assert torch.allclose(local.local_losses(x, y)[-1], want)
    assert "L1" in local.plan.blocks[-1].head


def test_point_assignment_takes_the_smallest_box_holding_each_location():
    target = torch.tensor([[[2, 0, 0, 64, 64], [4, 30, 30, 60, 60], [-1, 0, 0, 0, 0]]], dtype=torch.float)
    labels, boxes = point_targets(target, (4, 4), (32.0, 32.0))  # centres at 16, 48, 80, 112
    assert labels[0].tolist() == [[2, 2, 0, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert boxes[0, 1, 1].tolist() == [30, 30, 60, 60] and boxes[0, 0, 0].tolist() == [0, 0, 64, 64]


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"])
def test_a_detectors_own_assignment_at_a_blocks_grid_is_its_first_levels(name):
    """``assign=model``: a head predicts against the detector's first-level anchors placed on its
    block's grid; on the grid of the detector's own first level they are that level's anchors,
    and the head's loss there is the detector's own loss on those anchors."""
    from fxlocal.aux.task_objectives import detector_assignment
    from fxlocal.models.dense import level_anchors_per_location, level_layout

    detector = fxlocal.create_model(name, 11, SIZE)
    own = anchor_layout(detector, SIZE)
    side = int((own.per_level[0] // level_anchors_per_location(detector)) ** 0.5)  # a square first level
    level = level_layout(detector, (side, side), SIZE[1:])
    assert len(level.anchors) == own.per_level[0] and torch.allclose(level.anchors, own.anchors[: own.per_level[0]])
    if name.startswith("fcos"):  # its points are as large as their grid's stride (its centre sampling reads it)
        coarse = level_layout(detector, (4, 4), SIZE[1:]).anchors
        assert torch.equal(coarse[:, 2] - coarse[:, 0], torch.full((16,), 32.0))
    local = fxlocal.convert(name, k=3, aux="glcan", input_size=SIZE, num_classes=11)  # assign=model, the default
    assert all("the detector's own anchors" in b.head for b in local.plan.blocks[:-1])
    points = fxlocal.convert(name, k=3, aux="glcan", input_size=SIZE, num_classes=11, assign="points", plan=local.plan)
    assert not any("own anchors" in b.head for b in points.plan.blocks) and "conv1x1(15)" in points.plan.blocks[0].head
    x, y = torch.rand(2, *SIZE), _target("detection")
    assert isolation_violations(local, x, y) == []
    assignment = detector_assignment(DetectionTrunk(detector), SIZE)
    channels = assignment.channels(11)
    prediction = torch.randn(2, channels, 8, 8, requires_grad=True)
    loss = assignment.loss(prediction, y)
    loss.backward()
    assert torch.isfinite(loss) and prediction.grad.abs().sum() > 0


def test_presence_ignores_background_and_padding():
    labels = torch.tensor([[0, 3, 3, -1], [5, 0, 0, 0]])
    assert presence(labels, 6).tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_glcan_head_predicts_the_dense_target_and_the_global_one():
    seg = TaskSpec("segmentation", 11, (128, 128))
    head = GLCANHead(HeadSpec((32, 16, 16), "nchw", seg.global_size, 0, 4, task=seg))
    local, global_ = head(torch.randn(2, 32, 16, 16))
    assert local.shape == (2, 11, 16, 16) and global_.shape == (2, 11)
    sr = TaskSpec("super_resolution", 0, (3, 128, 128))
    head = GLCANHead(HeadSpec((32, 64, 64), "nchw", sr.global_size, 0, 4, task=sr))
    local, global_ = head(torch.randn(2, 32, 64, 64))
    assert local.shape == (2, 3, 128, 128) and global_.shape == (2, 48)  # pixel shuffle ×2; 3 × 4×4 pooled
    det = TaskSpec("detection", 11, (128, 128))
    head = GLCANHead(HeadSpec((32, 16, 16), "nchw", det.global_size, 0, 4, task=det))
    assert head(torch.randn(2, 32, 16, 16))[0].shape == (2, 15, 16, 16)  # classes + 4 box sides
    # the global branch modulates the local one: starting as the identity, trained by the local loss
    x = torch.randn(2, 32, 16, 16)
    assert torch.equal(head.modulation(head.context(head.pool(x))), torch.zeros(2, 64))  # scale and shift of 32: the width is capped at the cut's
    head(x)[0].square().mean().backward()
    assert head.modulation.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task,shape", [(TaskSpec("segmentation", 11, (128, 128)), (32, 16, 16)),
                                        (TaskSpec("super_resolution", 0, (3, 128, 128)), (32, 64, 64))])
def test_glcan_film_is_folded_into_the_prediction_exactly(task, shape):
    """The FiLM-modulated map is never made (it would be kept for backward, as large as the
    tower's): a per-sample 1×1 conv gives what conv1x1(tower(x) · (1 + scale) + shift) gives."""
    torch.manual_seed(0)
    head = GLCANHead(HeadSpec(shape, "nchw", task.global_size, 0, 4, task=task))
    torch.nn.init.normal_(head.modulation.weight)
    torch.nn.init.normal_(head.modulation.bias)
    x = torch.randn(2, *shape)
    scale, shift = head.modulation(head.context(head.pool(x)))[..., None, None].chunk(2, dim=1)
    want = head.local_out(head.tower(x) * (1 + scale) + shift)
    assert torch.allclose(head(x)[0], want, atol=1e-5)
    # BatchNorm in the tower unless asked not to (norm=false), super-resolution's too: without it
    # the SR head learned 2.3 dB worse on held-out canvases (docs/tasks.md)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in head.tower) and "no norm" not in head.summary
    bare = GLCANHead(HeadSpec(shape, "nchw", task.global_size, 0, 4, task=task), norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bare.tower) and "no norm" in bare.summary


def test_glcan_stride_runs_the_local_branch_coarser_and_keeps_the_target_resolution():
    sr = TaskSpec("super_resolution", 0, (3, 128, 128))
    head = GLCANHead(HeadSpec((32, 64, 64), "nchw", sr.global_size, 0, 4, task=sr), stride=2)
    local, _ = head(torch.randn(2, 32, 64, 64))
    assert local.shape == (2, 3, 128, 128) and head.scale == 4  # a 32×32 tower, shuffled ×4
    assert "conv3x3(64, stride 2 first)" in head.summary and "at 32×32" in head.summary  # maps as large as the cut's: 4×32 channels allowed
    seg = TaskSpec("segmentation", 11, (128, 128))
    head = GLCANHead(HeadSpec((8, 15, 15), "nchw", seg.global_size, 0, 4, task=seg), width=64, stride=2)
    assert head(torch.randn(2, 8, 15, 15))[0].shape == (2, 11, 8, 8) and "conv3x3(32," in head.summary  # 8 × 2² channels
    head.local_loss(type("Ctx", (), {"target": _target("segmentation")})(), 0, torch.randn(2, 8, 15, 15))[0].backward()
    for bad in ({"stride": 0}, {"depth": 0}):
        with pytest.raises(TaskError, match="1 or more"):
            GLCANHead(HeadSpec((8, 16, 16), "nchw", seg.global_size, 0, 4, task=seg), **bad)


def test_a_carried_tensor_gets_a_head_only_in_the_block_that_computes_it():
    """EDSR's long skip crosses every cut beside the body's tensor: the first block computes it
    and gets a head on each, a later one only hands it on, and a head there would train nothing
    of the block; the plan prices the heads built."""
    size = (3, 32, 32)
    local = fxlocal.convert("edsr_x2", k=3, aux="dgl", input_size=size, model_kwargs={"num_blocks": 4, "width": 8},
                            cuts=["body.0", "body.2"])
    first, second = local.plan.blocks[:2]
    assert first.head.endswith("logits averaged") and "handed on unchanged" in second.head
    assert second.head_params * 2 == first.head_params  # one DGL head of the two, alike
    x, y = torch.rand(2, *size), torch.rand(2, 3, 64, 64)
    assert isolation_violations(local, x, y) == []
    before = [[p.detach().clone() for p in local.block_parameters(b)] for b in range(local.k)]
    local.train_step(x, y, [torch.optim.SGD(list(local.block_parameters(b)), lr=0.1) for b in range(local.k)])
    for b in range(local.k):
        assert all(not torch.equal(p0, p1) for p0, p1 in zip(before[b], local.block_parameters(b))), f"block {b}: a parameter did not train"


def test_glcan_composes_with_man_and_plain_heads_learn_the_global_target():
    local = fxlocal.convert("deeplabv3_mobilenet_v3_large", k=3, aux="glcan+man", input_size=SIZE, num_classes=11)
    x, y = torch.rand(2, *SIZE), _target("segmentation")
    assert isolation_violations(local, x, y) == []
    assert "GLCAN" in local.plan.blocks[0].head
    dgl = fxlocal.convert("deeplabv3_mobilenet_v3_large", k=3, aux="dgl", input_size=SIZE, num_classes=11)
    with torch.no_grad():
        logits = dgl.head_logits(0, dgl.blocks[0](x))
    assert logits.shape == (2, 11)  # a classifier head over the classes present
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, presence(y, 11))
    assert torch.allclose(dgl.local_losses(x, y)[0], want)


@pytest.mark.parametrize("args,fragments", [
    (["convert", "resnet18", "--task", "detection"], ["is a classifier", "torchvision detector"]),
    (["convert", "resnet18", "--aux", "glcan"], ["glcan heads predict a dense task", "use dgl"]),
    (["convert", "edsr_x2", "--task", "classification", "--input-size", "3", "64", "64"], ["super_resolution model", "--task super_resolution"]),
    (["convert", "maskrcnn_resnet50_fpn", "--input-size", "3", "128", "128"], ["predicts masks or keypoints", "box detector"]),
    (["convert", "fcn_resnet50", "--aux", "mlaan", "--input-size", "3", "128", "128"], ["own loss over classes", "use glcan"]),
    (["convert", "resnet18", "--task", "segmentation"], ["not a (channels, height, width) map", "dense output"]),
    (["convert", "resnet18", "--task", "detectoin"], ["unknown task", "did you mean 'detection'"]),
    (["memory", "edsr_x2", "--input-size", "3", "64", "64"], ["super_resolution model", "benchmarks/tasks.py"]),
])
def test_task_refusals_are_one_line(args, fragments):
    assert_one_line_error(run_cli(args), *fragments)


def test_cli_convert_and_inspect_say_what_was_traced():
    result = run_cli(["convert", "ssdlite320_mobilenet_v3_large", "--k", "3", "--aux", "glcan", "--input-size", "3", "128", "128",
                      "--num-classes", "11"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "task: detection, 11 classes (traced: the detector's trunk" in result.output
    assert "SSD's own loss on its head's outputs" in result.output and "GLCAN detection" in result.output
    result = run_cli(["inspect", "ssdlite320_mobilenet_v3_large", "--input-size", "3", "128", "128"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "is a detector: its trunk" in result.output


def test_train_refuses_a_task_its_data_is_not_for(tmp_path):
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert_one_line_error(run_cli(["train", recipe, "--task", "segmentation"]), "fashion_mnist_mini's targets are for classification")
    with pytest.raises(TaskError, match="is a detection model"):
        fxlocal.convert("ssdlite320_mobilenet_v3_large", k=2, input_size=SIZE, task="segmentation")
    from fxlocal.training.pipeline import pipeline_obstacle

    local = fxlocal.convert("edsr_x2", k=2, aux="dgl", input_size=(3, 64, 64))
    assert "pipeline stages train classifiers" in pipeline_obstacle(local)


def test_segment_source_takes_a_vit_through_timms_feature_maps():
    # forward_intermediates gives the ViT's tokens as a (192, 8, 8) map for the decoder; its cuts
    # are token sequences, where plain heads train on the classes present (GLCAN needs maps)
    local = fxlocal.convert("segment:vit_tiny_patch16_224", k=3, aux="dgl", input_size=SIZE, num_classes=11,
                            model_kwargs={"img_size": 128})
    x, y = torch.rand(2, *SIZE), _target("segmentation")
    assert local.task.name == "segmentation" and isolation_violations(local, x, y) == []
    with torch.no_grad():
        assert local.eval()(x)["out"].shape == (2, 11, 128, 128)
    with pytest.raises(TaskError, match="need a \\(batch, channels, height, width\\) map"):
        fxlocal.convert("segment:vit_tiny_patch16_224", k=3, aux="glcan", input_size=SIZE, num_classes=11,
                        model_kwargs={"img_size": 128})


def test_real_batch_step_peak_counts_the_step_and_drops_with_blocks():
    from fxlocal.memory import batch_step_peak_bytes

    size, kwargs = (3, 32, 32), {"num_blocks": 6, "width": 16}
    x, y = torch.rand(8, *size), torch.rand(8, 3, 64, 64)
    e2e = fxlocal.convert("edsr_x2", k=1, aux="none", input_size=size, model_kwargs=kwargs)
    weights = sum(p.numel() * 4 for p in e2e.parameters())
    e2e_peak = batch_step_peak_bytes(e2e, x, y, "adamw")
    local_peak = batch_step_peak_bytes(fxlocal.convert("edsr_x2", k=4, aux="dgl", input_size=size, model_kwargs=kwargs), x, y, "adamw")
    assert e2e_peak > 4 * weights  # weights, gradients, two AdamW states, and the activations on top
    assert local_peak < e2e_peak
