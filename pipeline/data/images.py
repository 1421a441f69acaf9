"""Per-image work of the Ray Data stream, run in Ray Data tasks (and by the baseline's DataLoader):
read and decode, flip, group by aspect ratio. Only numpy and Pillow here, so that a task's worker
process starts in a fraction of a second (importing torch there would cost seconds before the
first batch of a run), and Ray only where an unusable image is recorded with the collector.

Only a regular file inside its split's folder is opened: a FIFO or a device can block `open` or
`read` for ever, and a file_name that leaves the folder (../x.jpg, an absolute path elsewhere)
would train on what is not in the data set.

Decoded images are CHW uint8 arrays of their own size; boxes are (N, 4) float32 xyxy.
"""

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class UnusableImage(ValueError):
    """An image file that cannot be used; the message says why."""


class TooManyBadImages(RuntimeError):
    pass


def check_openable(path: str, folder: str | None) -> None:
    """Raises UnusableImage unless `path` is inside `folder` (when given) and a regular file.
    Inside is lexical, on the normalised path (so ../ and absolute file_names that leave the
    folder are outside, and nothing is read to decide); a symlinked folder or image is fine, and
    stat follows links, so a link to a FIFO is no regular file. A missing file raises stat's
    FileNotFoundError, which read_image turns into "file not found"."""
    if folder is not None and not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder)):
        raise UnusableImage(f"outside the split's folder {Path(folder).name}/")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UnusableImage("not a regular file")  # a FIFO would block the open, a device the read


def read_image(path: str, width: int | None = None, height: int | None = None,
               folder: str | None = None) -> np.ndarray:
    """An image file (JPEG or anything Pillow reads, whatever its name says) as a CHW uint8 RGB
    array; grayscale, palette and CMYK images become RGB. With the annotations' width and height:
    the stored pixels are used when their size matches (as torchvision's reference reads COCO,
    ignoring EXIF); else the image turned upright as its EXIF orientation says, when that size
    matches; else the image is unusable (its boxes would not fit it). With its split's `folder`,
    a file outside it is unusable (see check_openable)."""
    try:
        check_openable(path, folder)
        with Image.open(path) as image:
            image.load()
            if width is not None and image.size != (width, height):
                upright = ImageOps.exif_transpose(image)
                if upright.size != (width, height):
                    raise UnusableImage(f"decoded {image.width}x{image.height}, the annotations say {width}x{height}")
                image = upright
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise UnusableImage("file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, UnusableImage):
            raise
        raise UnusableImage(f"cannot decode: {error}") from None
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


@contextlib.contextmanager
def reading_reported(collector, split: str, paths: list[str]):
    """Tells the collector which files of the split this task is about to read and, however it
    ends, that it is done with them, so that a worker whose stream stalls can name the files
    still being read (pipeline.worker.train_loop.stalls_end_the_run). Two fire-and-forget actor calls
    per decode batch: cheap next to decoding its images. Without a collector, nothing is told."""
    if collector is None:
        yield
        return
    collector.reading.remote(split, paths)
    try:
        yield
    finally:
        collector.read.remote(split, paths)


def decode_batch(batch: dict, folder: str, split: str = "train", collector=None, max_bad_images: int = 0) -> dict:
    """Read and decode a batch of manifest rows, whose files must be in the split's `folder`;
    drops the path and flattened box columns.

    An unusable image raises, or, with a collector, is left out and recorded there (once
    per split and file); more than `max_bad_images` in a split stops the run."""
    keep, images = [], []
    paths = [str(path) for path in batch["path"]]
    with reading_reported(collector, split, paths):
        for i, (image_id, path, width, height) in enumerate(zip(batch["image_id"], paths, batch["width"],
                                                                batch["height"])):
            try:
                images.append(read_image(path, int(width), int(height), folder))
                keep.append(i)
            except UnusableImage as error:
                if collector is None:
                    raise UnusableImage(f"{path}: {error}") from None
                import ray  # here, not at the top: the baseline reads images without Ray

                count = ray.get(collector.add_bad_image.remote(split, int(image_id), path, str(error)))
                if count > max_bad_images:
                    raise TooManyBadImages(f"{count} {split} images could not be used, more than max_bad_images="
                                           f"{max_bad_images}; the latest: {path}: {error}") from None
    return {
        "image_id": batch["image_id"][keep],
        "image": images,
        "boxes": [np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4) for i in keep],
        "labels": [np.asarray(batch["labels"][i], dtype=np.int64) for i in keep],
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
