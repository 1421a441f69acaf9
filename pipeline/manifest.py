"""COCO annotations -> a manifest: a pyarrow table with one row per image.

Columns: image_id, path, width, height, boxes (float32 xyxy, 4 values per box, flattened),
labels (COCO category ids, which are the model's class indices). The rules follow
torchvision's references/detection/coco_utils.py: crowd annotations are left out, COCO's
xywh boxes become xyxy clamped to the image, boxes without positive width and height are
dropped, and (for training) images left without a box are dropped and counted. No masks.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

# The model's classes are COCO's category ids (1..90) and the background (0).
NUM_CLASSES = 91
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int64())),
])


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ManifestStats:
    images: int  # images in the annotation file
    kept: int  # rows in the manifest
    dropped_without_boxes: int  # training images left without a box
    crowd_boxes: int  # crowd annotations left out
    degenerate_boxes: int  # boxes without positive width and height after clamping


def split_paths(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO 2017 split, e.g. split="val"."""
    root = Path(data_root)
    return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"


def load_annotations(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise AnnotationError(f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    return doc


def xywh_to_clamped_xyxy(bbox, width: int, height: int) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([min(max(x, 0), width), min(max(y, 0), height),
                     min(max(x + w, 0), width), min(max(y + h, 0), height)], dtype=np.float32)


def build_manifest(annotation_file: str | Path, image_dir: str | Path, drop_empty: bool) -> tuple[pa.Table, ManifestStats]:
    annotation_file, image_dir = Path(annotation_file), Path(image_dir).resolve()
    doc = load_annotations(annotation_file)
    objects: dict[int, list] = {image["id"]: [] for image in doc["images"]}
    categories = {category["id"] for category in doc["categories"]}
    crowd = degenerate = 0
    for ann in doc["annotations"]:
        if ann["image_id"] not in objects:
            raise AnnotationError(f"{annotation_file}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
        if ann["category_id"] not in categories or not 1 <= ann["category_id"] < NUM_CLASSES:
            raise AnnotationError(f"{annotation_file}: annotation {ann.get('id')} has category id {ann['category_id']}, "
                                  f"not one of the file's categories within COCO's 1..{NUM_CLASSES - 1}")
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        objects[ann["image_id"]].append(ann)
    rows = {name: [] for name in SCHEMA.names}
    for image in doc["images"]:
        boxes, labels = [], []
        for ann in objects[image["id"]]:
            box = xywh_to_clamped_xyxy(ann["bbox"], image["width"], image["height"])
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                labels.append(int(ann["category_id"]))
            else:
                degenerate += 1
        if drop_empty and not boxes:
            continue
        rows["image_id"].append(int(image["id"]))
        rows["path"].append(str(image_dir / image["file_name"]))
        rows["width"].append(int(image["width"]))
        rows["height"].append(int(image["height"]))
        rows["boxes"].append(np.concatenate(boxes) if boxes else np.zeros(0, np.float32))
        rows["labels"].append(labels)
    table = pa.table(rows, schema=SCHEMA)
    stats = ManifestStats(images=len(doc["images"]), kept=table.num_rows,
                          dropped_without_boxes=len(doc["images"]) - table.num_rows,
                          crowd_boxes=crowd, degenerate_boxes=degenerate)
    return table, stats
