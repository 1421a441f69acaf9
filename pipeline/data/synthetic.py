"""A synthetic data set in the COCO 2017 layout, deterministic by seed.

It stands in for COCO where COCO is not available (tests, the demo): real JPEG files under
``train2017/`` and ``val2017/`` and ``annotations/instances_{train,val}2017.json`` with COCO's
own category ids and names. Each category is drawn as its own shape and colour on a noisy
background, so that a detector can learn it in a few hundred steps. Some annotations are crowd
regions (a cluster of small objects, ``iscrowd=1``, RLE segmentation) and some images hold no
object at all, as in COCO.
"""

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# COCO's category table: the index is the category id; gaps are "N/A", 0 is the background
# (torchvision's FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"], written out so that the
# driver, which generates the demo's set, does not import torchvision: tests/data/test_synthetic.py).
COCO_NAMES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]
COCO_CATEGORY_IDS = [i for i, name in enumerate(COCO_NAMES) if name not in ("__background__", "N/A")]
# COCO's supercategories cover consecutive id ranges: (first id, supercategory).
_SUPERCATEGORIES = [
    (1, "person"), (2, "vehicle"), (10, "outdoor"), (16, "animal"), (27, "accessory"),
    (34, "sports"), (44, "kitchen"), (52, "food"), (62, "furniture"), (72, "electronic"),
    (78, "appliance"), (84, "indoor"),
]
SHAPES = ("rectangle", "ellipse", "triangle", "cross")
PATTERNS = ("solid", "outline", "stripe", "dot")
_HUES = [(230, 40, 40), (40, 190, 60), (50, 80, 230), (240, 200, 30), (200, 60, 210),
         (30, 200, 210), (250, 130, 20), (250, 250, 250), (120, 70, 30), (20, 20, 20)]
# (width, height) per unit of `image_size`: landscape, portrait and square, as in COCO.
ASPECTS = [(1.0, 0.75), (0.75, 1.0), (1.0, 1.0), (1.0, 0.5625), (0.67, 1.0)]


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. `image_size` is the long side in pixels (sizes vary by +-25%)."""

    train_images: int = 64
    val_images: int = 16
    num_categories: int = 4
    image_size: int = 160
    min_objects: int = 1
    max_objects: int = 3
    crowd_fraction: float = 0.05
    empty_fraction: float = 0.05
    seed: int = 0


def supercategory(category_id: int) -> str:
    return [name for first, name in _SUPERCATEGORIES if category_id >= first][-1]


def category_look(category_id: int) -> tuple[str, tuple[int, int, int], str]:
    """Shape, colour and pattern of a category: (k mod 4, k mod 10, k div 20) is unique for k < 80."""
    k = COCO_CATEGORY_IDS.index(category_id)
    return SHAPES[k % len(SHAPES)], _HUES[k % len(_HUES)], PATTERNS[k // 20]


def _draw(draw: ImageDraw.ImageDraw, category_id: int, box: tuple[float, float, float, float]):
    shape, colour, pattern = category_look(category_id)
    x0, y0, x1, y1 = box
    fill, outline = (None, colour) if pattern == "outline" else (colour, None)
    width = max(2, int(min(x1 - x0, y1 - y0) / 8))
    if shape == "rectangle":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "ellipse":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    else:
        a, b, c, d = x0 + (x1 - x0) / 3, x1 - (x1 - x0) / 3, y0 + (y1 - y0) / 3, y1 - (y1 - y0) / 3
        cross = [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d), (x0, c), (a, c)]
        draw.polygon(cross, fill=fill, outline=outline, width=width)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 8
    inverse = tuple(255 - v for v in colour)
    if pattern == "stripe":
        draw.rectangle((x0 + 2 * r, cy - r / 2, x1 - 2 * r, cy + r / 2), fill=inverse)
    elif pattern == "dot":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=inverse)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.integers(60, 180, size=3)
    ramp = np.linspace(-30, 30, width)[None, :, None] * rng.choice([-1, 1])
    noise = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _place(rng, width, height, lo, hi, taken) -> tuple[float, float, float, float] | None:
    for _ in range(20):
        w, h = rng.uniform(lo, hi) * min(width, height), rng.uniform(lo, hi) * min(width, height)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
        if all(_iou(box, other) < 0.2 for other in taken):
            return box
    return None


def _crowd_rle(width: int, height: int, parts: list) -> dict:
    canvas = Image.new("L", (width, height))
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        draw.rectangle(part, fill=1)
    rle = mask_utils.encode(np.asfortranarray(np.array(canvas, dtype=np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [height, width]}


def make_image(spec: SyntheticSpec, split: str, index: int, categories: list[int]):
    """One image and its annotations (without ids), deterministic in (seed, split, index)."""
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, index])
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    scale = spec.image_size * rng.uniform(0.75, 1.25)
    width, height = int(aspect[0] * scale), int(aspect[1] * scale)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    annotations, taken = [], []
    if rng.random() >= spec.empty_fraction:
        count = rng.integers(spec.min_objects, spec.max_objects + 1)
        shrink = min(1.0, (3 / count) ** 0.5)  # many objects are smaller ones, so that they fit
        for _ in range(count):
            category_id = int(rng.choice(categories))
            crowd = rng.random() < spec.crowd_fraction
            lo, hi = (0.35, 0.6) if crowd else (0.2, 0.45)
            box = _place(rng, width, height, lo * shrink, hi * shrink, taken)
            if box is None:
                continue
            taken.append(box)
            if crowd:
                # A crowd region: a grid of small instances, annotated as one iscrowd box.
                x0, y0, x1, y1 = box
                cw, ch = (x1 - x0) / 3, (y1 - y0) / 3
                parts = [(x0 + i * cw + 1, y0 + j * ch + 1, x0 + (i + 1) * cw - 1, y0 + (j + 1) * ch - 1)
                         for i in range(3) for j in range(3)]
                for part in parts:
                    _draw(draw, category_id, part)
                segmentation = _crowd_rle(width, height, parts)
            else:
                _draw(draw, category_id, box)
                x0, y0, x1, y1 = box
                segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            bbox = [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]
            annotations.append({"category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3],
                                "iscrowd": int(crowd), "segmentation": segmentation})
    return image, annotations


def write_split(root: Path, split: str, count: int, spec: SyntheticSpec, categories: list[int]) -> None:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1 if split == "train" else 1_000_000 + index + 1
        image, objects = make_image(spec, split, index, categories)
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    doc = {
        "info": {"description": f"synthetic COCO-format data set, {spec}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": COCO_NAMES[c], "supercategory": supercategory(c)}
                       for c in COCO_CATEGORY_IDS],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))


def generate(root: str | Path, spec: SyntheticSpec) -> Path:
    """Write the data set under `root`, or reuse it when `root` already holds the same spec.
    A set made for another spec is replaced; a folder holding other annotations is refused."""
    root = Path(root)
    stamp = root / "synthetic.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if stamp.exists():
        if stamp.read_text() == wanted:
            return root
        for folder in ("train2017", "val2017", "annotations"):
            shutil.rmtree(root / folder, ignore_errors=True)
    elif (root / "annotations").exists():
        raise FileExistsError(f"{root} holds annotations not written by this generator; not overwriting them")
    if not 1 <= spec.num_categories <= len(COCO_CATEGORY_IDS):
        raise ValueError(f"num_categories must be 1..{len(COCO_CATEGORY_IDS)}, got {spec.num_categories}")
    # Stepping by 21 (coprime with 80) spreads the categories over COCO's id range, gaps
    # included, and gives consecutive picks different shapes and colours.
    categories = [COCO_CATEGORY_IDS[(i * 21) % len(COCO_CATEGORY_IDS)] for i in range(spec.num_categories)]
    write_split(root, "train", spec.train_images, spec, categories)
    write_split(root, "val", spec.val_images, spec, categories)
    stamp.write_text(wanted)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic COCO 2017-format data set.")
    parser.add_argument("root", help="output folder (train2017/, val2017/, annotations/)")
    for name, default in SyntheticSpec().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    root = generate(args.pop("root"), SyntheticSpec(**args))
    print(f"synthetic COCO data set in {root}")
