import json

import numpy as np
import pytest
import torch

from pipeline.data import synthetic
from pipeline.worker import evaluation

IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
    {"id": 2, "file_name": "b.jpg", "width": 60, "height": 90},
    {"id": 3, "file_name": "c.jpg", "width": 50, "height": 50},  # no annotations
]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 90, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 18, "bbox": [5, 5, 40, 50], "area": 2000, "iscrowd": 0},
    {"id": 4, "image_id": 2, "category_id": 18, "bbox": [0, 60, 60, 30], "area": 1800, "iscrowd": 1},
]
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]


@pytest.fixture(params=sorted(evaluation.EVALUATORS))
def evaluator(request):
    return request.param


@pytest.fixture
def ground_truth(tmp_path, evaluator):
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    return evaluation.load_ground_truth(str(path), evaluator)


def detections(shift: float = 0.0) -> list[dict]:
    """One detection per non-crowd box, moved right by `shift` of its width."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]]}
            for a in ANNOTATIONS if not a["iscrowd"]]


def test_load_ground_truth(ground_truth):
    assert sorted(ground_truth.getImgIds()) == [1, 2, 3]
    assert sorted(ground_truth.getCatIds()) == [18, 90]


def test_perfect_detections_score_one(ground_truth, evaluator):
    scores = evaluation.coco_map(ground_truth, detections(), evaluator)
    assert scores == {"map": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}


def test_shifted_detections_score_lower(ground_truth, evaluator):
    # Moved by a fifth of their width: IoU = 0.8 / 1.2 = 0.667, a match at IoU 0.50..0.65 only.
    scores = evaluation.coco_map(ground_truth, detections(shift=0.2), evaluator)
    assert 0.0 < scores["map"] < 1.0
    assert scores["map"] == pytest.approx(4 / 10)
    assert scores["ap50"] == pytest.approx(1.0)
    assert scores["ap75"] == pytest.approx(0.0)


def test_no_detections_score_zero(ground_truth, evaluator):
    assert evaluation.coco_map(ground_truth, [], evaluator) == {"map": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_coco_detections_converts_to_xywh():
    outputs = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 8.0]]),
         "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([18, 90])},
        {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[1.5, 2.5, 3.5, 4.5]], dtype=torch.bfloat16),
         "scores": torch.tensor([0.5], dtype=torch.bfloat16), "labels": torch.tensor([1])},
    ]
    assert evaluation.coco_detections([7, 8, 9], outputs) == [
        {"image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 90, "bbox": [0.0, 0.0, 5.0, 8.0], "score": 0.25},
        {"image_id": 9, "category_id": 1, "bbox": [1.5, 2.5, 2.0, 2.0], "score": 0.5},
    ]
    entry = evaluation.coco_detections([7], outputs[:1])[0]
    assert type(entry["category_id"]) is int and type(entry["image_id"]) is int
    json.dumps(entry)


def test_check_exactly_once(ground_truth):
    evaluation.check_exactly_once(ground_truth, [3, 1, 2])
    with pytest.raises(RuntimeError, match=r"missing 1, unknown 0"):
        evaluation.check_exactly_once(ground_truth, [1, 2])
    with pytest.raises(RuntimeError, match=r"evaluation saw 4 inferences of 3 distinct images"):
        evaluation.check_exactly_once(ground_truth, [1, 2, 3, 2])
    with pytest.raises(RuntimeError, match=r"missing 0, unknown 1"):
        evaluation.check_exactly_once(ground_truth, [1, 2, 3, 4])


def test_faster_coco_eval_agrees_with_pycocotools(tmp_path):
    """Thousands of noisy predictions (jittered boxes, some wrong classes, duplicates, crowds and
    empty images in the ground truth) over 40 images of up to 20 objects: same figures."""
    root = synthetic.generate(tmp_path, synthetic.SyntheticSpec(
        train_images=0, val_images=40, num_categories=80, image_size=320, min_objects=3, max_objects=20,
        crowd_fraction=0.1, empty_fraction=0.1, seed=11))
    annotation_file = str(root / "annotations" / "instances_val2017.json")
    rng = np.random.default_rng(0)
    predictions = []
    for ann in json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(3):
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(synthetic.COCO_CATEGORY_IDS))
            predictions.append({"image_id": ann["image_id"], "category_id": category, "score": float(rng.random()),
                                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]})
    assert len(predictions) > 1000
    scores = {name: evaluation.coco_map(evaluation.load_ground_truth(annotation_file, name), predictions, name)
              for name in evaluation.EVALUATORS}
    reference = scores["pycocotools"]
    assert 0.05 < reference["map"] < 0.95
    for key, value in reference.items():
        assert scores["faster-coco-eval"][key] == pytest.approx(value, abs=1e-4)
