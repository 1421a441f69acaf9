"""The Ray Data stream: manifest rows -> read and decoded images -> (training) flipped at random.

Shuffling happens on the manifest's small rows, before decoding, with a seed that changes every
epoch (Ray's RandomSeedConfig reseeds on each execution), so no decoded image waits in a shuffle.
Decoded images are CHW uint8 arrays of their own size; boxes are (N, 4) float32 xyxy.
"""

import math

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


def _blocks(manifest: pa.Table) -> ray.data.Dataset:
    count = min(MAX_BLOCKS, max(1, math.ceil(manifest.num_rows / ROWS_PER_BLOCK)))
    size = math.ceil(manifest.num_rows / count)
    return ray.data.from_arrow([manifest.slice(i * size, size) for i in range(count)])


def train_dataset(manifest: pa.Table, seed: int, decode_batch_size: int) -> ray.data.Dataset:
    return (_blocks(manifest)
            .random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
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


def to_tensors(batch: dict) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    """A numpy batch from the stream -> image ids, uint8 CHW image tensors and targets, on the CPU
    (without copies: the tensors share the batch's memory)."""
    images = [torch.from_numpy(image) for image in batch["image"]]
    targets = [{"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
               for boxes, labels in zip(batch["boxes"], batch["labels"])]
    return [int(i) for i in batch["image_id"]], images, targets
