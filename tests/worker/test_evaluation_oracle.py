"""An evaluation oracle through the real worker path: the val split decoded by Ray Data, inferred by
`train_loop.evaluate` (tensors, device copy, model outputs -> COCO detections, the exactly-once
and enough-images checks, COCOeval) with a "model" that answers each image with its ground-truth
boxes, as the stream delivered them. Right answers must score 1.0; the mistakes a pipeline can
make with boxes and labels must score clearly lower."""

import hashlib

import numpy as np
import pytest
import ray
import torch

from pipeline.config import resolve
from pipeline.data import stream, synthetic
from pipeline.data.images import flip_boxes
from pipeline.data.manifest import build_manifest, split_paths
from pipeline.records.collector import Collector
from pipeline.worker import evaluation
from pipeline.worker.train_loop import Prefetched, evaluate

CPU = torch.device("cpu")


def fingerprint(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def next_category(label: int) -> int:
    ids = synthetic.COCO_CATEGORY_IDS
    return ids[(ids.index(label) + 1) % len(ids)]


MISTAKES = {
    "right": lambda boxes, labels, width: (boxes, labels),
    "boxes scaled by 1.5": lambda boxes, labels, width: (boxes * 1.5, labels),
    "labels shifted to the neighbouring category": lambda boxes, labels, width: (
        boxes, np.array([next_category(int(label)) for label in labels])),
    "flipped image, boxes not flipped back": lambda boxes, labels, width: (flip_boxes(boxes, width), labels),
}


class Oracle(torch.nn.Module):
    """Answers each image (found by its pixels) with the ground truth the stream gave for it, after
    `mistake`, as a detector's outputs: xyxy boxes in the image's own pixels, scores, labels."""

    def __init__(self, truth: dict, mistake):
        super().__init__()
        self.truth, self.mistake = truth, mistake

    def forward(self, images):
        outputs = []
        for image in images:
            pixels = (image * 255).round().to(torch.uint8).numpy()  # undoes to_device's scaling exactly
            boxes, labels = self.mistake(*self.truth[fingerprint(pixels)], pixels.shape[2])
            outputs.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                            "labels": torch.as_tensor(labels, dtype=torch.int64),
                            "scores": torch.ones(len(labels))})
        return outputs


@pytest.fixture(scope="module")
def val_stream(ray_head, tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("oracle"), synthetic.SyntheticSpec(
        train_images=0, val_images=24, num_categories=6, image_size=96, min_objects=1, max_objects=4, seed=21))
    ray.init(address=ray_head.address)
    manifest, _ = build_manifest(*split_paths(root, "val"), drop_empty=False)
    dataset = stream.val_dataset(manifest, decode_batch_size=4)
    truth = {}
    for batch in dataset.iter_batches(batch_size=4, batch_format="numpy"):
        for image, boxes, labels in zip(batch["image"], batch["boxes"], batch["labels"]):
            truth[fingerprint(image)] = (boxes, labels)
    assert len(truth) == 24
    yield root, dataset, truth
    ray.shutdown()


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_oracle_detections_score_one_and_mistakes_score_lower(val_stream, mistake, tmp_path):
    root, dataset, truth = val_stream
    config = resolve(batch_size=2, num_workers=1, coco_evaluator="faster-coco-eval")
    ground_truth = evaluation.load_ground_truth(str(split_paths(root, "val")[0]), config.coco_evaluator)
    collector = Collector.remote(str(tmp_path))
    scores, inferred = evaluate(Oracle(truth, MISTAKES[mistake]), Prefetched(dataset, config), config, CPU,
                                ground_truth, collector, 0)
    ray.kill(collector)
    assert inferred == 24
    if mistake == "right":
        assert scores == {"map": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}
    elif mistake.startswith("labels"):
        assert scores["map"] < 0.05
    else:
        assert scores["map"] < 0.5
