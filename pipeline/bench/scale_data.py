"""`python -m pipeline.bench.scale_data`: the data path at COCO size, without pixels.

Two measurements on generated annotation files with COCO 2017's counts and shape (no JPEGs):
  manifest  `build_manifest` on a train file of 118,287 images and 860,001 annotations: wall and
            CPU time, peak RSS of a fresh process (its interpreter and imports included);
  val path  5,000 val images (36,781 annotations) x 100 detections, split over 4 gloo processes
            on 127.0.0.1: the gather onto rank 0 that `train_loop.evaluate` does
            (`evaluation.gather_on_rank0`) and COCOeval (`evaluation.coco_map`), with each evaluator.
The files follow COCO's shape: 80 categories with COCO's ids (person 30% of the boxes, the others
a Zipf tail), about 1% crowd regions (uncompressed RLE), polygons of about 22 vertices for the
others, images mostly 640x480 or 480x640 and others up to 640 on the long side, box sizes
41% small, 34% medium, 25% large by COCOeval's area ranges (`area` is the box's), sparse image
ids, annotations in no particular order. Results, with the machine and its load, go to
docs/bench/scale_data.json.
"""

import importlib.metadata
import json
import os
import platform
import resource
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import faster_coco_eval
import numpy as np
import pyarrow
import torch
import torch.distributed as dist
import torch.multiprocessing

from pipeline.data.manifest import build_manifest
from pipeline.data.synthetic import COCO_CATEGORY_IDS, COCO_NAMES, supercategory
from pipeline.worker import evaluation

# (images, annotations, images without any annotation) of COCO 2017's instances files.
TRAIN = (118_287, 860_001, 1_021)
VAL = (5_000, 36_781, 48)
CROWD_SHARE = 0.01
DETECTIONS_PER_IMAGE = 100  # torchvision's box_detections_per_img
WORKERS = 4
TARGETS = {"manifest_s": 60, "manifest_peak_gb": 4, "val_gather_and_cocoeval_s": 15}
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench" / "scale_data.json"


def category_shares() -> np.ndarray:
    """Share of the boxes per category (COCO_CATEGORY_IDS order): person 30%, the other 79 by
    Zipf's law, as COCO's long tail."""
    tail = 1 / np.arange(1, len(COCO_CATEGORY_IDS))
    return np.concatenate([[0.3], 0.7 * tail / tail.sum()])


def image_sizes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(widths, heights): 45% 640x480, 15% 480x640, 30% 640 by 300..640 either way, 10% smaller."""
    kind = rng.choice(4, count, p=[0.45, 0.15, 0.3, 0.1])
    long_side = np.where(kind == 3, rng.integers(200, 640, count), 640)
    short_side = np.select([kind < 2, kind == 2], [480, rng.integers(300, 641, count)],
                           (long_side * rng.uniform(0.5, 1.0, count)).astype(int))
    landscape = (kind == 0) | ((kind >= 2) & (rng.random(count) < 0.7))
    return np.where(landscape, long_side, short_side), np.where(landscape, short_side, long_side)


def objects_per_image(rng: np.random.Generator, images: int, boxes: int, empty: int) -> np.ndarray:
    """`boxes` annotations over `images` images, `empty` of them without any; the others get one
    each and the rest in proportion to exponential weights (COCO's long tail of crowded images)."""
    counts = np.zeros(images, int)
    holders = rng.permutation(images)[empty:]
    weights = rng.exponential(size=len(holders))
    counts[holders] = 1 + rng.multinomial(boxes - len(holders), weights / weights.sum())
    return counts


def box_sizes(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """xywh boxes inside their images: sqrt(area) log-normal, fitted to COCO's 41% of areas under
    32^2 and 76% under 96^2, aspect ratio log-normal around 1."""
    side = np.exp(rng.normal(3.734, 1.176, len(widths)))
    aspect = np.exp(rng.normal(0.0, 0.5, len(widths)))
    w = np.clip(side * np.sqrt(aspect), 1, widths)
    h = np.clip(side / np.sqrt(aspect), 1, heights)
    x, y = rng.uniform(0, widths - w), rng.uniform(0, heights - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def polygons(rng: np.random.Generator, boxes: np.ndarray) -> list[list[float]]:
    """One polygon per box, inside it: 4 + Poisson(side / 3, at most 40) vertices, vertex k of n at
    an angle of 2 pi (k + u) / n around the box's centre (u uniform in 0..1), at 30..50% of its size."""
    x, y, w, h = boxes.T
    vertices = 4 + rng.poisson(np.minimum(40, np.sqrt(w * h) / 3))
    owner = np.repeat(np.arange(len(boxes)), vertices)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(vertices) - vertices, vertices)
    angle = 2 * np.pi * (k + rng.random(len(owner))) / vertices[owner]
    radius = rng.uniform(0.6, 1.0, len(owner)) / 2
    px = x[owner] + w[owner] * (0.5 + radius * np.cos(angle))
    py = y[owner] + h[owner] * (0.5 + radius * np.sin(angle))
    flat = np.round(np.stack([px, py], axis=1), 2).ravel()
    return [part.tolist() for part in np.split(flat, 2 * np.cumsum(vertices)[:-1])]


def rectangle_rle(box: np.ndarray, width: int, height: int) -> dict:
    """A crowd region: the box's pixels as COCO's uncompressed (column-major) RLE."""
    x0, y0, width, height = int(box[0]), int(box[1]), int(width), int(height)
    x1, y1 = min(width, max(x0 + 1, int(box[0] + box[2]))), min(height, max(y0 + 1, int(box[1] + box[3])))
    rows = y1 - y0
    counts = [x0 * height + y0] + [rows, height - rows] * (x1 - x0)
    counts[-1] = height - y1 + (width - x1) * height
    return {"counts": counts, "size": [height, width]}


def coco_like_annotations(images: int, annotations: int, empty: int, seed: int) -> dict:
    """A COCO instances document with these counts (see the module docstring for its shape)."""
    rng = np.random.default_rng(seed)
    image_ids = rng.choice(np.arange(1, 600_000), images, replace=False)
    widths, heights = image_sizes(rng, images)
    owner = rng.permutation(np.repeat(np.arange(images), objects_per_image(rng, images, annotations, empty)))
    boxes = box_sizes(rng, widths[owner], heights[owner])
    crowd = rng.random(annotations) < CROWD_SHARE
    categories = rng.choice(COCO_CATEGORY_IDS, annotations, p=category_shares())
    shapes = polygons(rng, boxes)
    return {
        "info": {"description": f"COCO-shaped annotations without images (pipeline.bench.scale_data, seed {seed})"},
        "licenses": [{"id": 1, "name": "none", "url": ""}],
        "images": [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": f"http://example.invalid/{i:012d}.jpg",
                    "height": int(h), "width": int(w), "date_captured": "2013-11-14 11:18:45",
                    "flickr_url": f"http://example.invalid/flickr/{i}.jpg", "id": int(i)}
                   for i, w, h in zip(image_ids, widths, heights)],
        "annotations": [{"segmentation": rectangle_rle(box, widths[o], heights[o]) if is_crowd else [shape],
                         "area": round(float(box[2] * box[3]), 4), "iscrowd": int(is_crowd),
                         "image_id": int(image_ids[o]), "bbox": box.tolist(), "category_id": int(c), "id": n + 1}
                        for n, (o, box, is_crowd, c, shape) in enumerate(zip(owner, boxes, crowd, categories, shapes))],
        "categories": [{"supercategory": supercategory(c), "id": c, "name": COCO_NAMES[c]} for c in COCO_CATEGORY_IDS],
    }


def write_annotations(path: Path, counts: tuple[int, int, int], seed: int) -> Path:
    """coco_like_annotations(*counts) written to `path` as JSON."""
    path.write_text(json.dumps(coco_like_annotations(*counts, seed=seed)))
    return path


def peak_rss_gb() -> float:
    """This process's peak RSS in GB (VmHWM: unlike ru_maxrss, not inherited across exec from the
    parent, which generated the files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    """User and system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_manifest(annotation_file: Path) -> dict:
    """build_manifest in this (fresh) process: wall and CPU seconds (CPU below wall: the process
    waited for a core), rows, peak RSS before and after the call."""
    before, start, cpu = peak_rss_gb(), time.perf_counter(), cpu_seconds()
    table, stats = build_manifest(annotation_file, annotation_file.parent, drop_empty=True)
    return {"seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu, "rows": table.num_rows,
            "crowd_boxes": stats.crowd_boxes, "peak_rss_gb": peak_rss_gb(), "peak_rss_before_call_gb": before}


def measure_manifest(annotation_file: Path) -> dict:
    """timed_manifest in a fresh process, so that its peak RSS is the manifest's and the imports'."""
    load = os.getloadavg()[0]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        figures = pool.submit(timed_manifest, annotation_file).result()
    return {"images": TRAIN[0], "annotations": TRAIN[1], "file_mb": annotation_file.stat().st_size / 1e6,
            "load_1min_before": load, **figures}


def model_output(rng: np.random.Generator, truth: np.ndarray, labels: np.ndarray, width: int, height: int) -> dict:
    """DETECTIONS_PER_IMAGE detections as Faster R-CNN returns them (xyxy, scores sorted, labels):
    two jittered copies of each true box (one in ten with a wrong label), the rest random boxes."""
    near = np.arange(min(DETECTIONS_PER_IMAGE, 2 * len(truth))) % max(1, len(truth))
    boxes = truth[near] + rng.normal(0, 0.1, (len(near), 4)) * truth[near][:, [2, 3, 2, 3]]
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1)
    others = DETECTIONS_PER_IMAGE - len(near)
    boxes = np.concatenate([boxes, box_sizes(rng, np.full(others, width), np.full(others, height))])
    random_labels = rng.choice(COCO_CATEGORY_IDS, DETECTIONS_PER_IMAGE, p=category_shares())
    wrong = rng.random(len(near)) < 0.1
    labels = np.concatenate([np.where(wrong, random_labels[:len(near)], labels[near]), random_labels[len(near):]])
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(near)), rng.uniform(0.0, 0.5, others)])
    xyxy = np.clip(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1), 0, [width, height] * 2)
    order = np.argsort(-scores)
    return {"boxes": torch.from_numpy(xyxy[order]).float(), "scores": torch.from_numpy(scores[order]).float(),
            "labels": torch.from_numpy(labels[order])}


def shard_detections(doc: dict, rank: int, world: int) -> tuple[list[int], list[dict]]:
    """This rank's share of the val images (every world-th) and its COCO detections, made from
    model outputs by evaluation.coco_detections as infer_shard makes them."""
    rng = np.random.default_rng(rank)
    truth = {image["id"]: ([], []) for image in doc["images"]}
    for annotation in doc["annotations"]:
        truth[annotation["image_id"]][0].append(annotation["bbox"])
        truth[annotation["image_id"]][1].append(annotation["category_id"])
    seen, detections = [], []
    for image in doc["images"][rank::world]:
        boxes, labels = truth[image["id"]]
        output = model_output(rng, np.array(boxes).reshape(-1, 4), np.array(labels, dtype=np.int64),
                              image["width"], image["height"])
        seen.append(image["id"])
        detections += evaluation.coco_detections([image["id"]], [output])
    return seen, detections


def timed_evaluation(seen: list[int], detections: list[dict], annotation_file: str, evaluator: str,
                     rank: int) -> dict | None:
    """What evaluate does after inference, timed on rank 0 (None elsewhere): the gather onto rank 0,
    then COCOeval there against the ground truth (loaded beforehand, as a run loads it once)."""
    if rank == 0:
        start = time.perf_counter()
        ground_truth = evaluation.load_ground_truth(annotation_file, evaluator)
        loaded = time.perf_counter()
    dist.barrier()
    gather_start = time.perf_counter()
    all_seen, all_detections = evaluation.gather_on_rank0(seen, detections)  # fresh copies on rank 0
    if rank != 0:
        return None
    gathered, cpu = time.perf_counter(), cpu_seconds()
    scores = evaluation.coco_map(ground_truth, all_detections, evaluator, image_ids=all_seen)
    end = time.perf_counter()
    return {"load_ground_truth_s": loaded - start, "gather_s": gathered - gather_start, "coco_map_s": end - gathered,
            "coco_map_cpu_s": cpu_seconds() - cpu, "gather_and_cocoeval_s": end - gather_start,
            "detections": len(all_detections), "images": len(all_seen), **scores}


def val_path_worker(rank: int, world: int, port: int, annotation_file: str, result_file: str) -> None:
    """One of `world` gloo processes on 127.0.0.1: its share of the detections, then
    timed_evaluation with each evaluator; rank 0 writes the figures to result_file."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen, detections = shard_detections(json.loads(Path(annotation_file).read_text()), rank, world)
    figures = {"load_1min_before": os.getloadavg()[0]}
    for evaluator in evaluation.EVALUATORS:
        figures[evaluator] = timed_evaluation(seen, detections, annotation_file, evaluator, rank)
    if rank == 0:
        figures["rank0_peak_rss_gb"] = peak_rss_gb()
        Path(result_file).write_text(json.dumps(figures))
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_val_path(annotation_file: Path) -> dict:
    """val_path_worker in WORKERS processes (torch.multiprocessing.spawn)."""
    result_file = annotation_file.with_suffix(".result.json")
    torch.multiprocessing.spawn(val_path_worker, args=(WORKERS, free_port(), str(annotation_file), str(result_file)),
                                nprocs=WORKERS)
    return {"images": VAL[0], "annotations": VAL[1], "detections_per_image": DETECTIONS_PER_IMAGE,
            "workers": WORKERS, **json.loads(result_file.read_text())}


def machine() -> dict:
    """The CPU, its cores, the memory and the versions that matter here."""
    from pipeline.worker.train_loop import cpu_name  # imports Ray: kept out of the measuring processes

    return {"cpu": cpu_name(), "nproc": len(os.sched_getaffinity(0)),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__, "faster_coco_eval": faster_coco_eval.__version__,
            "pycocotools": importlib.metadata.version("pycocotools")}


def main() -> None:
    load = os.getloadavg()[0]  # before this benchmark's own work; the figures' own loads include it
    with tempfile.TemporaryDirectory() as folder:
        train = write_annotations(Path(folder) / "instances_train2017.json", TRAIN, seed=0)
        val = write_annotations(Path(folder) / "instances_val2017.json", VAL, seed=1)
        results = {"command": "python -m pipeline.bench.scale_data",
                   "machine": {**machine(), "load_1min_at_start": load},
                   "targets": TARGETS, "manifest": measure_manifest(train), "val_path": measure_val_path(val)}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
