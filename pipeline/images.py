"""Per-image work of the Ray Data stream, run in Ray Data tasks: read and decode, flip, group by
aspect ratio. Only numpy and Pillow here, so that a task's worker process starts in a fraction of
a second (importing torch there would cost seconds before the first batch of a run).

Decoded images are CHW uint8 arrays of their own size; boxes are (N, 4) float32 xyxy.
"""

import numpy as np
from PIL import Image, ImageOps


def read_image(path: str) -> np.ndarray:
    """A JPEG (or any format Pillow reads) as a CHW uint8 RGB array, turned upright as its EXIF
    orientation says; grayscale, palette and CMYK images become RGB."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


def decode_batch(batch: dict) -> dict:
    """Read and decode a batch of manifest rows; drops the path and flattened box columns."""
    return {
        "image_id": batch["image_id"],
        "image": [read_image(path) for path in batch["path"]],
        "boxes": [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in batch["boxes"]],
        "labels": [np.asarray(l, dtype=np.int64) for l in batch["labels"]],
    }


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror xyxy boxes in an image `width` pixels wide: x0' = width - x1, x1' = width - x0."""
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def random_flip(batch: dict, probability: float = 0.5) -> dict:
    """Horizontal flip of each image with its boxes, with the given probability."""
    rng = np.random.default_rng()
    images, boxes = list(batch["image"]), list(batch["boxes"])
    for i in np.flatnonzero(rng.random(len(images)) < probability):
        boxes[i] = flip_boxes(boxes[i], images[i].shape[2])
        images[i] = np.ascontiguousarray(images[i][:, :, ::-1])
    return {**batch, "image": images, "boxes": boxes}


def aspect_group(width: np.ndarray, height: np.ndarray, factor: int) -> np.ndarray:
    """torchvision's aspect-ratio groups: width/height quantised on the bins
    2 ** linspace(-1, 1, 2 * factor + 1), giving 2 * factor + 2 groups."""
    bins = 2.0 ** np.linspace(-1, 1, 2 * factor + 1)
    return np.digitize(np.asarray(width, dtype=np.float64) / np.asarray(height, dtype=np.float64), bins)


def group_by_aspect(batch: dict, factor: int) -> dict:
    """Reorder a window of shuffled rows so that rows of one aspect group are consecutive
    (stable, so the order inside a group stays random): batches taken in order then mostly
    hold images of one shape, and the model pads them less."""
    order = np.argsort(aspect_group(batch["width"], batch["height"], factor), kind="stable")
    return {name: column[order] for name, column in batch.items()}
