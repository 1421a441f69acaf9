"""COCO annotations -> a manifest: a pyarrow table with one row per image.

Columns: image_id, path, width, height, boxes (float32 xyxy, 4 values per box, flattened),
labels (COCO category ids, which are the model's class indices); its schema's metadata keeps
the image folder (`image_folder`), outside which no path may lead. The rules follow
torchvision's references/detection/coco_utils.py: crowd annotations are left out, COCO's
xywh boxes become xyxy clamped to the image, boxes without positive width and height are
dropped, and (for training) images left without a box are dropped and counted. No masks.

The file's structure is checked first, and its first problem stops the run with an
AnnotationError naming the file, the entry (by id, or by position while it has no usable id) and
the problem: every image, annotation and category is a JSON object with its required keys
(REQUIRED_KEYS) and an integer id, unique within its kind; an image's width and height are
positive integers and its file_name a non-empty string; an annotation refers to an image and a
category of the file (the category within COCO's 1..90), its bbox is four finite numbers, its
iscrowd, when present, 0 or 1 and its area, when present, a finite number >= 0.
"""

import contextlib
import gc
import json
import math
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
REQUIRED_KEYS = {"images": ("id", "file_name", "width", "height"),
                 "annotations": ("id", "image_id", "category_id", "bbox"),
                 "categories": ("id",)}
NOUNS = {"images": "image", "annotations": "annotation", "categories": "category"}
FOLDER_KEY = "image_folder"


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ManifestStats:
    images: int  # images in the annotation file
    kept: int  # rows in the manifest
    dropped_without_boxes: int  # training images left without a box
    crowd_boxes: int  # crowd annotations left out
    degenerate_boxes: int  # boxes without positive width and height after clamping


def image_folder(manifest: pa.Table) -> str:
    """The folder the manifest's images must be in: its split's, resolved as in the paths (so a
    symlinked split folder is the folder it links to)."""
    return manifest.schema.metadata[FOLDER_KEY.encode()].decode()


def split_paths(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO 2017 split, e.g. split="val"."""
    root = Path(data_root)
    return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"


@contextlib.contextmanager
def garbage_collection_paused():
    """Python's cyclic garbage collector off for the duration. Making millions of small objects
    that form no cycles (parsed JSON, unpickled detections, COCOeval's index of them) otherwise
    sets off its passes over all of them again and again: 40% of a COCO-sized JSON parse, 80% of
    unpickling 500,000 detections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _without_segmentation(pairs: list) -> dict:
    return {key: value for key, value in pairs if key != "segmentation"}


def parse_without_masks(text: str):
    """The JSON document with every "segmentation" left out as soon as its object is parsed: the
    masks are most of COCO's file and no business of a box detector's (parsing COCO train's size
    peaks at 1.1 GB instead of 2.8, the text included)."""
    with garbage_collection_paused():
        return json.loads(text, object_pairs_hook=_without_segmentation)


def load_annotations(path: Path) -> dict:
    """The annotation file, parsed without its masks and checked (see the module docstring)."""
    try:
        doc = parse_without_masks(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in REQUIRED_KEYS):
        raise AnnotationError(f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    problem = structural_problem(doc)
    if problem:
        raise AnnotationError(f"{path}: {problem}")
    return doc


def is_integer(value) -> bool:
    return type(value) is int  # JSON's integers; not true/false, not 3.0


def are_finite_numbers(values: list) -> bool:
    try:
        return all(type(v) in (int, float) and math.isfinite(v) for v in values)
    except OverflowError:  # an integer beyond a float's range
        return False


def entry_problem(kind: str, index: int, entry) -> str | None:
    """What keeps an entry of doc[kind] from being an object with its required keys and an integer id."""
    if type(entry) is not dict:
        return f"{kind}[{index}] is {entry!r:.60}, not a JSON object"
    name = f"{NOUNS[kind]} {entry['id']}" if is_integer(entry.get("id")) else f"{kind}[{index}]"
    for key in REQUIRED_KEYS[kind]:
        if key not in entry:
            return f"{name} has no '{key}'"
    if not is_integer(entry["id"]):
        return f"{name} has id {entry['id']!r:.60}, not an integer"
    return None


def image_problem(image: dict) -> str | None:
    if type(image["file_name"]) is not str or not image["file_name"]:
        return f"has file_name {image['file_name']!r:.60}, not a file name"
    for key in ("width", "height"):
        if not is_integer(image[key]) or image[key] < 1:
            return f"has {key} {image[key]!r:.60}, not a positive integer"
    return None


def annotation_problem(annotation: dict, image_ids: set, category_ids: set) -> str | None:
    image_id, category_id = annotation["image_id"], annotation["category_id"]
    if not is_integer(image_id) or image_id not in image_ids:
        return f"refers to unknown image id {image_id!r:.60}"
    if not is_integer(category_id) or category_id not in category_ids or not 1 <= category_id < NUM_CLASSES:
        return (f"has category id {category_id!r:.60}, not one of the file's categories within COCO's "
                f"1..{NUM_CLASSES - 1}")
    bbox, area = annotation["bbox"], annotation.get("area", 0)
    if type(bbox) is not list or len(bbox) != 4 or not are_finite_numbers(bbox):
        return f"has bbox {bbox!r:.60}, not four finite numbers"
    if annotation.get("iscrowd", 0) not in (0, 1):
        return f"has iscrowd {annotation['iscrowd']!r:.60}, not 0 or 1"
    if not are_finite_numbers([area]) or area < 0:  # COCOeval's area ranges (pycocotools reads it)
        return f"has area {area!r:.60}, not a finite number >= 0"
    return None


def structural_problem(doc: dict) -> str | None:
    """The first structural problem of a COCO instances document (the rules: the module
    docstring), or None."""
    ids_of = {kind: set() for kind in REQUIRED_KEYS}
    for kind, ids in ids_of.items():
        for index, entry in enumerate(doc[kind]):
            problem = entry_problem(kind, index, entry)
            if problem:
                return problem
            if entry["id"] in ids:
                return f"{NOUNS[kind]} id {entry['id']} appears twice"
            ids.add(entry["id"])
    for image in doc["images"]:
        problem = image_problem(image)
        if problem:
            return f"image {image['id']} {problem}"
    for annotation in doc["annotations"]:
        problem = annotation_problem(annotation, ids_of["images"], ids_of["categories"])
        if problem:
            return f"annotation {annotation['id']} {problem}"
    return None


def clamped_xyxy(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """COCO's xywh boxes (n, 4) -> float32 xyxy clamped to their images' width and height (n,)."""
    x, y = xywh[:, 0], xywh[:, 1]
    return np.stack([np.clip(x, 0, width), np.clip(y, 0, height), np.clip(x + xywh[:, 2], 0, width),
                     np.clip(y + xywh[:, 3], 0, height)], axis=1).astype(np.float32)


def list_column(values: np.ndarray, counts: np.ndarray) -> pa.ListArray:
    """Rows of `counts[i]` consecutive items of `values` each, as an arrow list column."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build_manifest(annotation_file: str | Path, image_dir: str | Path, drop_empty: bool) -> tuple[pa.Table, ManifestStats]:
    annotation_file, image_dir = Path(annotation_file), Path(image_dir).resolve()
    doc = load_annotations(annotation_file)
    images, annotations = doc["images"], doc["annotations"]
    row_of = {image["id"]: row for row, image in enumerate(images)}
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    objects = [a for a, is_crowd in zip(annotations, crowd) if not is_crowd]
    rows = np.array([row_of[a["image_id"]] for a in objects], dtype=np.int64)
    labels = np.array([a["category_id"] for a in objects], dtype=np.int64)
    width = np.array([image["width"] for image in images], dtype=np.float64)
    height = np.array([image["height"] for image in images], dtype=np.float64)
    boxes = clamped_xyxy(np.array([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4),
                         width[rows], height[rows])
    usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.argsort(rows[usable], kind="stable")  # each image's boxes in the file's order
    counts = np.bincount(rows[usable], minlength=len(images))
    table = pa.table({
        "image_id": [image["id"] for image in images],
        "path": [str(image_dir / image["file_name"]) for image in images],
        "width": width.astype(np.int32), "height": height.astype(np.int32),
        "boxes": list_column(boxes[usable][order].ravel(), 4 * counts),
        "labels": list_column(labels[usable][order], counts),
    }, schema=SCHEMA)
    if drop_empty:
        table = table.filter(pa.array(counts > 0))
    table = table.replace_schema_metadata({FOLDER_KEY: str(image_dir)})
    stats = ManifestStats(images=len(images), kept=table.num_rows, dropped_without_boxes=len(images) - table.num_rows,
                          crowd_boxes=int(crowd.sum()), degenerate_boxes=int((~usable).sum()))
    return table, stats
