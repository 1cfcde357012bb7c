"""The canvas tasks made from real Fashion-MNIST (detection, segmentation, super-resolution):
deterministic, their targets matching what was pasted, and their metrics matching hand-computed
cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from fxlocal.aux.tasks import detection_targets
from fxlocal.training.canvas import (
    FOREGROUND,
    MAX_ITEMS,
    MAX_SHARED,
    CanvasTask,
    compose_canvas,
)
from fxlocal.training.data import DatasetError, IdxFashionMNIST, build_dataset
from fxlocal.training.task_metrics import task_metric
from helpers import SHARED

FULL = SHARED / "datasets" / "fashion-mnist"


@pytest.fixture(scope="module")
def split():
    source = IdxFashionMNIST(str(FULL), train=False)
    return source.data, source.targets


def test_same_seed_same_bytes_and_canvases_independent_of_order(split):
    images, labels = split
    a = [compose_canvas(images, labels, i, train=False, seed=3) for i in (0, 1, 7)]
    b = compose_canvas(images, labels, 7, train=False, seed=3)  # made alone
    assert torch.equal(a[2].image, b.image) and torch.equal(a[2].boxes, b.boxes) and torch.equal(a[2].mask, b.mask)
    again = compose_canvas(images, labels, 0, train=False, seed=3)
    assert again.image.numpy().tobytes() == a[0].image.numpy().tobytes()
    other_seed = compose_canvas(images, labels, 0, train=False, seed=4)
    other_split = compose_canvas(images, labels, 0, train=True, seed=3)
    assert not torch.equal(other_seed.image, a[0].image) and not torch.equal(other_split.image, a[0].image)


def test_boxes_and_masks_match_the_pasted_items(split):
    images, labels = split
    counts = []
    for i in range(60):
        c = compose_canvas(images, labels, i, train=False)
        n = len(c.labels)
        counts.append(n)
        assert 1 <= n <= MAX_ITEMS and c.boxes.shape == (n, 4) and c.item_masks.shape == (n, 128, 128)
        seen = torch.zeros(128, 128, dtype=torch.long)
        for j in range(n):
            ys, xs = c.item_masks[j].nonzero(as_tuple=True)
            # the box is the tight box of the item's foreground
            assert c.boxes[j].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            seen[c.item_masks[j]] = c.labels[j] + 1  # later items over earlier ones
            for k in range(j):
                w = min(c.boxes[j, 2], c.boxes[k, 2]) - max(c.boxes[j, 0], c.boxes[k, 0])
                h = min(c.boxes[j, 3], c.boxes[k, 3]) - max(c.boxes[j, 1], c.boxes[k, 1])
                smaller = min((b[2] - b[0]) * (b[3] - b[1]) for b in (c.boxes[j], c.boxes[k]))
                assert max(w, 0) * max(h, 0) / smaller <= MAX_SHARED + 1e-6
        assert torch.equal(seen, c.mask)
        # the image shows an item exactly where the mask says one is
        assert (c.image[c.mask > 0] > FOREGROUND).all() and (c.image[c.mask == 0] == 0).all()
        # the last item pasted is whole: its every foreground pixel carries its class
        assert (c.mask[c.item_masks[-1]] == c.labels[-1] + 1).all()
    assert set(counts) == set(range(1, MAX_ITEMS + 1))


def test_items_of_each_task(split):
    images, labels = split
    det = CanvasTask(images, labels, False, "detection", channels=3)
    image, target = det[5]
    canvas = det.canvas(5)
    assert image.shape == (3, 128, 128) and torch.equal(image[1], canvas.image.float() / 255)
    n = len(canvas.labels)
    assert target.shape == (MAX_ITEMS, 5) and (target[n:, 0] == -1).all()
    assert torch.equal(target[:n, 1:], canvas.boxes) and torch.equal(target[:n, 0].long(), canvas.labels + 1)
    (unpadded,) = detection_targets(target[None])
    assert torch.equal(unpadded["boxes"], canvas.boxes) and torch.equal(unpadded["labels"], canvas.labels + 1)
    image, mask = CanvasTask(images, labels, False, "segmentation")[5]
    assert image.shape == (1, 128, 128) and torch.equal(mask, canvas.mask)
    low, high = CanvasTask(images, labels, False, "super_resolution")[5]
    assert low.shape == (1, 64, 64) and torch.equal(high[0], canvas.image.float() / 255)
    want = F.interpolate(high[None], scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    assert torch.equal(low, want)


def test_registered_over_the_full_splits_with_clear_errors(tmp_path):
    train = build_dataset("fashion_mnist_detect", str(FULL), True, (1, 128, 128))
    test = build_dataset("fashion_mnist_segment", str(FULL), False, (3, 128, 128))
    assert len(train) == 60000 and len(test) == 10000
    assert test[0][0].shape == (3, 128, 128)
    assert build_dataset("fashion_mnist_sr", str(FULL), False, (1, 64, 64))[0][0].shape == (1, 64, 64)
    with pytest.raises(DatasetError, match=r"set data.input_size to \[1, 128, 128\]"):
        build_dataset("fashion_mnist_detect", str(FULL), True, (1, 64, 64))
    with pytest.raises(DatasetError, match="set data.augment to none"):
        build_dataset("fashion_mnist_segment", str(FULL), True, (1, 128, 128), augment="crop_flip")
    with pytest.raises(DatasetError, match="fashion_mnist"):
        build_dataset("fashion_mnist_sr", str(tmp_path), True, (1, 64, 64))


def test_detection_map_matches_hand_computed_cases():
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([3])}]
    perfect = task_metric("detection")
    perfect.update([{**truth[0], "scores": torch.tensor([0.9])}], truth)
    assert perfect.compute() == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0)}
    # IoU 0.62: a match at the thresholds 0.50, 0.55 and 0.60 of the ten, each then AP 1
    shifted = task_metric("detection")
    shifted.update([{"boxes": torch.tensor([[0.0, 0.0, 10.0, 6.2]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([3])}], truth)
    assert shifted.compute() == {"map": pytest.approx(0.3), "map_50": pytest.approx(1.0)}
    wrong_class = task_metric("detection")
    wrong_class.update([{**truth[0], "scores": torch.tensor([0.9]), "labels": torch.tensor([4])}], truth)
    assert wrong_class.compute()["map_50"] == pytest.approx(0.0)


def test_miou_psnr_ssim_match_hand_computed_cases():
    miou = task_metric("segmentation")
    miou.update(torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[[0, 1], [1, 1]]]))
    # class 0: 1 shared of 2 pixels; class 1: 2 of 3; the other nine classes do not occur
    assert miou.compute()["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    sr = task_metric("super_resolution")
    target = torch.zeros(1, 1, 16, 16)
    sr.update(target + 0.1, target)
    assert sr.compute()["psnr"] == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)
    same = task_metric("super_resolution")
    image = torch.rand(2, 1, 32, 32)
    same.update(image, image)
    assert same.compute()["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_reference_sr_network_doubles_and_learns_the_sr_task(split):
    import fxlocal

    images, labels = split
    data = CanvasTask(images, labels, False, "super_resolution")
    low, high = (torch.stack(t) for t in zip(*(data[i] for i in range(4))))
    net = fxlocal.create_model("edsr_x2", None, (1, 64, 64), num_blocks=3, width=8)
    assert net(low).shape == (4, 1, 128, 128)
    gm = fxlocal.trace(net, (1, 64, 64))
    units = fxlocal.graph.units.find_units(gm, fxlocal.find_cut_candidates(gm))
    assert [u.name for u in units][1:4] == ["body.0", "body.1", "body.2"]  # its residual blocks
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.l1_loss(net(low), high)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    quality = task_metric("super_resolution")
    quality.update(net(low).detach(), high)
    bicubic = task_metric("super_resolution")
    bicubic.update(F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False), high)
    assert quality.compute()["psnr"] > 10 and bicubic.compute()["psnr"] > 15
