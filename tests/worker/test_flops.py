"""The FLOP measurement on a model small enough to count by hand, the figures made of it on known
numbers, the peak table, and TF32 as a worker's step sets it."""

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from pipeline.config import Config
from pipeline.records import metrics
from pipeline.worker import flops, recipe, step

CHANNELS, POOLED, HIDDEN, CLASSES, ROIS_PER_IMAGE = 4, 2, 8, 3, 4


def tiny_detector() -> FasterRCNN:
    """A real torchvision FasterRCNN with one 3x3 convolution for a backbone (4 channels), one
    anchor per position, RoIAlign to 2x2, a box head of 8 features and 3 classes, 4 RoIs sampled
    per image; images resized so that their shorter side is 32 px (their longer side at most 64)."""
    torch.manual_seed(0)
    backbone = nn.Conv2d(3, CHANNELS, 3, padding=1)
    backbone.out_channels = CHANNELS
    return FasterRCNN(
        backbone, min_size=32, max_size=64,
        rpn_anchor_generator=AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=POOLED, sampling_ratio=2),
        box_head=TwoMLPHead(CHANNELS * POOLED * POOLED, HIDDEN),
        box_predictor=FastRCNNPredictor(HIDDEN, CLASSES), box_batch_size_per_image=ROIS_PER_IMAGE)


def hand_count(pixels: int, images: int) -> tuple[int, int]:
    """(whole step, box head) FLOPs by hand. A product of an m x k by a k x n matrix is 2mkn
    FLOPs, a convolution 2 x in x out x kernel area per output position; backward computes the
    weight's gradient (as much as the forward) and the input's (as much again) where the input
    needs one: the image does not, every later layer's input does."""
    backbone = 2 * 3 * CHANNELS * 9 * 2  # forward + weight gradient, per pixel (stride 1: a position a pixel)
    rpn = 3 * (2 * CHANNELS * CHANNELS * 9 + 2 * CHANNELS * 1 + 2 * CHANNELS * 4)  # 3x3 conv, objectness, deltas
    box = 3 * 2 * (CHANNELS * POOLED * POOLED * HIDDEN + HIDDEN * HIDDEN + HIDDEN * CLASSES + HIDDEN * 4 * CLASSES)
    box_total = box * ROIS_PER_IMAGE * images
    return (backbone + rpn) * pixels + box_total, box_total


def batch(sizes):
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 18.0]]), "labels": torch.tensor([1])} for _ in sizes]
    return images, targets


def test_a_step_of_the_tiny_detector_counts_as_by_hand():
    """Two 32x32 images (a 2x32x32 padded batch), then a 32x32 and a 16x32 one: the latter is
    resized to 32x64 and the batch padded to 2x32x64, whose pixels the count follows."""
    training = step.Training(tiny_detector(), Config(lr=0.01), torch.device("cpu"))
    for sizes, padded in (([(32, 32), (32, 32)], 2 * 32 * 32), ([(32, 32), (16, 32)], 2 * 32 * 64)):
        training.first_batch = batch(sizes)
        counts = training.count_flops()
        assert counts["flops_batch_pixels"] == padded and counts["flops_images"] == 2
        assert (counts["flops"], counts["box_flops"]) == hand_count(padded, 2)
    assert all(p.grad is None for p in training.model.parameters())  # the count leaves no gradient behind


def test_training_keeps_its_first_batch_for_the_count():
    training = step.Training(tiny_detector(), Config(lr=0.01, warmup_iters=1), torch.device("cpu"))
    batches = iter([batch([(32, 32), (32, 32)]), batch([(16, 32), (16, 32)])])
    rows = list(training.epoch(lambda: next(batches, None), worker=0, epoch=0, steps_per_epoch=2))
    assert [row.batch_pixels for row in rows] == [2 * 32 * 32, 2 * 32 * 64]
    counts = training.count_flops()
    assert counts["flops_batch_pixels"] == 2 * 32 * 32 and (counts["flops"], counts["box_flops"]) == hand_count(2048, 2)


def test_flop_figures_on_known_numbers():
    """Two workers measured 1000 + 400 FLOPs (box head 100 + 200) on 100 + 50 padded pixels and 2 +
    2 images: 1100 / 150 FLOPs a pixel, 300 / 4 an image. Their steps: 600 pixels and 8 images, 2 s
    and 4 s of compute."""
    workers = {"worker": [0, 1], "flops": [1000, 400], "box_flops": [100, 200], "flops_batch_pixels": [100, 50],
               "flops_images": [2, 2]}
    steps = {"worker": [0, 0, 1], "batch_pixels": [200, 200, 200], "images": [3, 3, 2], "compute_s": [1.0, 1.0, 4.0]}
    figures = metrics.flops_figures(steps, workers)
    trained = 1100 / 150 * 600 + 300 / 4 * 8
    assert figures == pytest.approx({"flops_per_pixel": 1100 / 150, "flops_per_box_image": 75.0,
                                     "flops_trained": trained, "flops_per_image": trained / 8,
                                     "achieved_tflops": trained / 4.0 / 2 / 1e12})
    unmeasured = {**workers, "flops": [None, None]}
    assert set(metrics.flops_figures(steps, unmeasured).values()) == {None}


@pytest.mark.parametrize("device, precision, tf32, given, expected", [
    ("NVIDIA A100-SXM4-40GB", "fp32", False, 0, (19.5, "fp32")),
    ("NVIDIA A100-SXM4-40GB", "fp32", True, 0, (156.0, "tf32")),
    ("NVIDIA H200", "bf16", False, 0, (989.4, "bf16")),
    ("NVIDIA H200 NVL", "amp", False, 0, (835.5, "fp16")),
    ("CPU (AMD EPYC 7B13)", "fp32", False, 0, (None, "fp32")),
    ("MetaX C500", "fp32", True, 0, (None, "tf32")),
    ("MetaX C500", "fp32", True, 45.5, (45.5, "tf32")),
])
def test_peak_by_device_and_precision(device, precision, tf32, given, expected):
    at = flops.compute_precision(precision, tf32)
    assert (flops.peak([device, device], at, given)[0], at) == expected


def test_no_peak_for_a_mix_of_devices():
    assert flops.peak(["NVIDIA A100-SXM4-40GB", "NVIDIA H200"], "fp32", 0) == (None, None)


@pytest.mark.parametrize("tf32", [True, False])
def test_a_step_sets_tf32_as_configured(tf32):
    before = recipe.tf32_state()
    try:
        recipe.set_tf32(not tf32)
        step.Training(tiny_detector(), Config(lr=0.01, tf32=tf32), torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert recipe.tf32_state() == {"matmul": tf32, "cudnn": tf32}
    finally:
        recipe.set_tf32(before["matmul"])
        torch.backends.cudnn.allow_tf32 = before["cudnn"]
