"""The Ray Data stream: manifest rows -> read and decoded images -> (training) flipped at random.

Shuffling happens on the manifest's small rows, before decoding, with a seed that changes every
epoch (Ray's RandomSeedConfig reseeds on each execution), so no decoded image waits in a shuffle;
training rows are then grouped by aspect ratio within short windows. The per-image functions are
in pipeline.data.images.
"""

import math

import pyarrow as pa
import ray
from ray.data import RandomSeedConfig
from ray.train import DataConfig

from pipeline.data.images import decode_batch, group_by_aspect, random_flip
from pipeline.data.manifest import image_folder

# Manifest rows per block: enough blocks for parallel decoding, few enough for a cheap shuffle.
ROWS_PER_BLOCK = 64
MAX_BLOCKS = 256
# Shuffled rows reordered together by aspect group: long enough for runs of one group, short
# enough that the order stays random at the scale of an epoch.
GROUP_WINDOW = 64


def _blocks(manifest: pa.Table) -> ray.data.Dataset:
    count = min(MAX_BLOCKS, max(1, math.ceil(manifest.num_rows / ROWS_PER_BLOCK)))
    size = math.ceil(manifest.num_rows / count)
    dataset = ray.data.from_arrow([manifest.slice(i * size, size) for i in range(count)])
    # A decoding task's own error (e.g. too many bad images) reaches the run, not a generic
    # "UDF failed" wrapper.
    dataset.context.raise_original_map_exception = True
    return dataset


def train_dataset(manifest: pa.Table, seed: int, decode_batch_size: int, aspect_group_factor: int,
                  collector=None, max_bad_images: int = 0) -> ray.data.Dataset:
    shuffled = _blocks(manifest).random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if aspect_group_factor > 0:
        shuffled = shuffled.map_batches(group_by_aspect, batch_size=GROUP_WINDOW, batch_format="numpy",
                                        fn_kwargs={"factor": aspect_group_factor})
    return (shuffled
            .map_batches(decode_batch, batch_size=decode_batch_size,
                         fn_kwargs={"folder": image_folder(manifest), "split": "train", "collector": collector,
                                    "max_bad_images": max_bad_images})
            .map_batches(random_flip, batch_size=decode_batch_size))


def val_dataset(manifest: pa.Table, decode_batch_size: int, collector=None, max_bad_images: int = 0) -> ray.data.Dataset:
    return _blocks(manifest).map_batches(decode_batch, batch_size=decode_batch_size, fn_kwargs={
        "folder": image_folder(manifest), "split": "val", "collector": collector, "max_bad_images": max_bad_images})


def shares(rows: int, parts: int) -> list[tuple[int, int]]:
    """(offset, length) of `parts` contiguous shares of `rows` rows, in order, whose lengths differ
    by at most one."""
    size, extra = divmod(rows, parts)
    return [(part * size + min(part, extra), size + (part < extra)) for part in range(parts)]


class ShardingConfig(DataConfig):
    """Training data split equally (every worker takes the same number of steps, as DDP needs;
    Ray drops at most num_workers - 1 rows an epoch). The val split in `shares`: each worker
    streams its own contiguous share of the val manifest's rows, so every image goes to exactly
    one worker and the workers' shares differ by at most one image whatever the split's size
    (a streaming split hands out whole blocks, and a split of up to ROWS_PER_BLOCK images went
    to one worker). The trainer's "val" dataset only names the stream (the driver gives it the
    first share; configure never runs it).

    The shares' datasets are made here, by the driver, for `workers` workers (Ray Train's world
    size: num_workers, or 1 for the loop in the driver): making one computes its blocks' metadata
    in a Ray task (from_arrow), which in Ray Train's dataset manager, whose runtime environment no
    idle worker process has, started a process for it on every run (2.4 s of every worker's
    start-up here, docs/performance.md)."""

    def __init__(self, val_manifest: pa.Table, workers: int, **val_options):
        super().__init__()
        self.val_shares = [val_dataset(val_manifest.slice(offset, length), **val_options)
                           for offset, length in shares(val_manifest.num_rows, workers)]

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if set(datasets) != {"val"}:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        if world_size != len(self.val_shares):
            raise ValueError(f"the val split was shared for {len(self.val_shares)} workers, not {world_size}")
        outputs = []
        for share in self.val_shares:
            share.context.execution_options = self._resolve_execution_options("val")
            outputs.append({"val": share.iterator()})
        return outputs
