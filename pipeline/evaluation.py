"""COCO bbox evaluation with pycocotools: predictions -> AP@[.5:.95] (the row's map), AP50, AP75."""

import builtins
import contextlib

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_detections(image_ids: list[int], outputs: list[dict]) -> list[dict]:
    """Model outputs (xyxy boxes, scores, labels = COCO category ids) -> COCO result entries (xywh)."""
    detections = []
    for image_id, output in zip(image_ids, outputs):
        xyxy = output["boxes"].float().cpu()
        boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        for box, score, label in zip(boxes.tolist(), output["scores"].float().cpu().tolist(),
                                     output["labels"].cpu().tolist()):
            detections.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    return detections


@contextlib.contextmanager
def _quiet():
    """pycocotools prints its progress. Ray Train workers turn print() into log records, which
    redirect_stdout does not catch, so print itself is swapped out for the duration."""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = saved


def load_ground_truth(annotation_file: str) -> COCO:
    with _quiet():
        return COCO(annotation_file)


def check_exactly_once(ground_truth: COCO, evaluated_ids: list[int]) -> None:
    """Every val image must have been inferred exactly once, across all workers."""
    expected, seen = set(ground_truth.getImgIds()), set(evaluated_ids)
    if len(evaluated_ids) != len(seen) or seen != expected:
        raise RuntimeError(f"evaluation saw {len(evaluated_ids)} inferences of {len(seen)} distinct images; "
                           f"expected each of the {len(expected)} val images once "
                           f"(missing {len(expected - seen)}, unknown {len(seen - expected)})")


def coco_map(ground_truth: COCO, detections: list[dict]) -> dict:
    """bbox AP@[.5:.95] as `map`, AP50 and AP75, over every image of the ground truth."""
    if not detections:  # pycocotools' loadRes cannot take an empty list; nothing detected is AP 0
        return {"map": 0.0, "ap50": 0.0, "ap75": 0.0}
    with _quiet():
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a figure has no ground truth to measure; that is no score.
    stats = [max(0.0, float(s)) for s in evaluator.stats[:3]]
    return {"map": stats[0], "ap50": stats[1], "ap75": stats[2]}

