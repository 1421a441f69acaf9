"""COCO bbox evaluation: predictions -> AP@[.5:.95] (the row's map), AP50, AP75.

Two evaluators compute COCOeval's figures: pycocotools, the reference, and faster-coco-eval,
its C++ reimplementation, which gives the same figures (a test compares them on the same
predictions) about ten times faster; faster-coco-eval is the default, pycocotools the fallback.
"""

import builtins
import contextlib
import math

import faster_coco_eval
import pycocotools.coco
import pycocotools.cocoeval
import torch
import torch.distributed as dist

from pipeline.data.manifest import garbage_collection_paused

# A mAP is a figure of the val split only when at least this share of its images were evaluated
# (the others could not be decoded); fewer stop the run (see check_enough_evaluated).
MIN_EVALUATED_SHARE = 0.5

EVALUATORS = {
    "faster-coco-eval": (faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster),
    "pycocotools": (pycocotools.coco.COCO, pycocotools.cocoeval.COCOeval),
}


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


def gather_on_rank0(seen: list[int], detections: list[dict]) -> tuple[list[int], list[dict]]:
    """Every worker's (image ids seen, COCO detections), concatenated in rank order, on rank 0;
    the other ranks (and a run without a process group) get their own back."""
    if not dist.is_initialized():
        return seen, detections
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with garbage_collection_paused():
        dist.gather_object((seen, detections), gathered, dst=0)
    if dist.get_rank() != 0:
        return seen, detections
    return [i for ids, _ in gathered for i in ids], [d for _, dets in gathered for d in dets]


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


def load_ground_truth(annotation_file: str, evaluator: str):
    """The val annotations as the evaluator's COCO object."""
    with _quiet():
        return EVALUATORS[evaluator][0](annotation_file)


def check_exactly_once(ground_truth, evaluated_ids: list[int], left_out: list[int] = ()) -> None:
    """Every val image but those `left_out` (undecodable) must have been inferred exactly once,
    across all workers."""
    expected, seen = set(ground_truth.getImgIds()) - set(left_out), set(evaluated_ids)
    if len(evaluated_ids) != len(seen) or seen != expected:
        raise RuntimeError(f"evaluation saw {len(evaluated_ids)} inferences of {len(seen)} distinct images; "
                           f"expected each of the {len(expected)} val images once "
                           f"(missing {len(expected - seen)}, unknown {len(seen - expected)})")


class TooFewEvaluated(RuntimeError):
    pass


def check_enough_evaluated(val_images: int, evaluated: int, unusable: list[str]) -> None:
    """A mAP over fewer than MIN_EVALUATED_SHARE of the val images (none, say, when all of them
    are unreadable) would be reported as the split's: refused, naming an unusable image."""
    needed = max(1, math.ceil(MIN_EVALUATED_SHARE * val_images))
    if evaluated < needed:
        example = f"; the first: {unusable[0]}" if unusable else ""
        raise TooFewEvaluated(f"val: {evaluated} of {val_images} images could be evaluated, {len(unusable)} are "
                              f"unusable{example}; a mAP needs at least {needed} ({MIN_EVALUATED_SHARE:.0%} of the "
                              f"split)")


def coco_map(ground_truth, detections: list[dict], evaluator: str, image_ids: list[int] | None = None) -> dict:
    """bbox AP@[.5:.95] as `map`, AP50 and AP75, over the given images (default: every image of
    the ground truth, loaded by `load_ground_truth` with the same evaluator)."""
    if not detections:  # pycocotools' loadRes cannot take an empty list; nothing detected is AP 0
        return {"map": 0.0, "ap50": 0.0, "ap75": 0.0}
    with _quiet(), garbage_collection_paused():
        evaluator = EVALUATORS[evaluator][1](ground_truth, ground_truth.loadRes(detections), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a figure has no ground truth to measure; that is no score.
    stats = [max(0.0, float(s)) for s in evaluator.stats[:3]]
    return {"map": stats[0], "ap50": stats[1], "ap75": stats[2]}

