"""The Ray Data stream: manifest rows -> read and decoded images -> (training) flipped at random.

Shuffling happens on the manifest's small rows, before decoding, with a seed that changes every
epoch (Ray's RandomSeedConfig reseeds on each execution), so no decoded image waits in a shuffle.
Decoded images are CHW uint8 arrays of their own size; boxes are (N, 4) float32 xyxy.
"""

import math
import warnings

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import RandomSeedConfig
from ray.train import DataConfig
from torchvision.io import ImageReadMode, decode_image

# Manifest rows per block: enough blocks for parallel decoding, few enough for a cheap shuffle.
ROWS_PER_BLOCK = 64
MAX_BLOCKS = 256
# Shuffled rows reordered together by aspect group: long enough for runs of one group, short
# enough that the order stays random at the scale of an epoch.
GROUP_WINDOW = 64


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True).numpy()


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


def _blocks(manifest: pa.Table) -> ray.data.Dataset:
    count = min(MAX_BLOCKS, max(1, math.ceil(manifest.num_rows / ROWS_PER_BLOCK)))
    size = math.ceil(manifest.num_rows / count)
    return ray.data.from_arrow([manifest.slice(i * size, size) for i in range(count)])


def train_dataset(manifest: pa.Table, seed: int, decode_batch_size: int, aspect_group_factor: int) -> ray.data.Dataset:
    shuffled = _blocks(manifest).random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if aspect_group_factor > 0:
        shuffled = shuffled.map_batches(group_by_aspect, batch_size=GROUP_WINDOW, batch_format="numpy",
                                        fn_kwargs={"factor": aspect_group_factor})
    return (shuffled
            .map_batches(decode_batch, batch_size=decode_batch_size)
            .map_batches(random_flip, batch_size=decode_batch_size))


def val_dataset(manifest: pa.Table, decode_batch_size: int) -> ray.data.Dataset:
    return _blocks(manifest).map_batches(decode_batch, batch_size=decode_batch_size)


class ShardingConfig(DataConfig):
    """Training data split equally (every worker takes the same number of steps, as DDP needs;
    Ray drops at most num_workers - 1 rows an epoch); evaluation data split unequally so that
    every image goes to exactly one worker, whatever the worker count."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if set(datasets) != {"val"}:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        ds = datasets["val"].copy(datasets["val"])
        ds.context.execution_options = self._resolve_execution_options("val")
        splits = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
        return [{"val": split} for split in splits]


def to_tensors(batch: dict, pin: bool = False) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    """A numpy batch from the stream -> image ids, uint8 CHW image tensors and targets, on the CPU,
    sharing the batch's memory; or, with `pin`, copied to pinned memory so that the copy to the
    GPU can run asynchronously."""
    with warnings.catch_warnings():
        # Ray hands out read-only views of its object store; nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = [torch.from_numpy(image) for image in batch["image"]]
    if pin:
        images = [image.pin_memory() for image in images]
    targets = [{"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
               for boxes, labels in zip(batch["boxes"], batch["labels"])]
    return [int(i) for i in batch["image_id"]], images, targets
