import dataclasses
import errno
import os
import sys
import time

import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.data import images, stream
from pipeline.data.manifest import FOLDER_KEY, SCHEMA
from pipeline.records.collector import Collector, StepSender
from pipeline.worker import step
from pipeline.worker.model import build_model
from pipeline.worker.train_loop import Prefetched, StreamStalled, infer_shard, train_one_epoch


def test_ray_data_stream_keeps_sizes_and_reshuffles(ray_head, tiny_coco):
    import ray

    ray.init(address=ray_head.address, ignore_reinit_error=True)
    files = sorted((tiny_coco / "train2017").glob("*.jpg"))
    sizes = {i: Image.open(f).size for i, f in enumerate(files)}
    manifest = pa.table({"image_id": list(range(len(files))), "path": [str(f) for f in files],
                         "width": [sizes[i][0] for i in sizes], "height": [sizes[i][1] for i in sizes],
                         "boxes": [[0, 0, 4, 4] * (i % 3) for i in sizes], "labels": [[1] * (i % 3) for i in sizes]},
                        schema=SCHEMA.with_metadata({FOLDER_KEY: str(tiny_coco / "train2017")}))
    dataset = stream.train_dataset(manifest, seed=0, decode_batch_size=2, aspect_group_factor=3)
    orders = []
    for _ in range(3):
        order = []
        for batch in dataset.iter_batches(batch_size=3, batch_format="numpy"):
            for image_id, image, boxes, labels in zip(batch["image_id"], batch["image"], batch["boxes"], batch["labels"]):
                assert image.shape == (3, sizes[image_id][1], sizes[image_id][0])
                assert boxes.shape == (image_id % 3, 4) and labels.shape == (image_id % 3,)
                order.append(int(image_id))
        assert sorted(order) == list(range(len(files)))
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1, "the order should change between epochs"


def stalled_decode(batch: dict, split: str, collector) -> dict:
    """A decode task on a stalled mount: it tells the collector what it reads, as decode_batch
    does, and its read does not return (a FIFO that no one writes to)."""
    paths = [str(path) for path in batch["path"]]
    with images.reading_reported(collector, split, paths):
        for path in paths:
            with open(path, "rb") as pipe:
                pipe.read()
    return {"image_id": batch["image_id"]}


def decode_stream(path, split: str, collector):
    """A one-image stream read by stalled_decode, which Ray's workers get by value (they cannot
    import the tests)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.data.from_items([{"image_id": 139, "path": str(path)}]).map_batches(
        stalled_decode, fn_kwargs={"split": split, "collector": collector})


def release(fifo) -> None:
    """Opens the FIFO for writing and closes it, once it has a reader: the reader's open returns
    and its read ends. Without a reader for 10 s, nothing to release."""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            time.sleep(0.1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_stalled_stream_ends_the_run_naming_the_files_being_read(ray_head, tmp_path, split):
    """The worker's own consumers of its streams: training an epoch, inferring the val shard."""
    import ray

    ray.init(address=ray_head.address, ignore_reinit_error=True)
    collector = Collector.remote(str(tmp_path))
    (tmp_path / "warm.jpg").touch()
    decode_stream(tmp_path / "warm.jpg", split, collector).take_all()  # the task's worker process started
    fifo = tmp_path / f"{split}2017" / "000000000139.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    config, device = dataclasses.replace(Config(), batch_size=1, stall_timeout_s=5), torch.device("cpu")
    training = step.Training(build_model("none", 64, 96, 32), config, device) if split == "train" else None
    start = time.monotonic()
    try:
        with pytest.raises(StreamStalled) as stalled:
            stream = decode_stream(fifo, split, collector)
            if split == "train":
                train_one_epoch(training, Prefetched(stream, config), StepSender(collector), worker=1, epoch=2,
                                steps_per_epoch=1)
            else:
                infer_shard(torch.nn.Identity(), Prefetched(stream, config), device, collector, rank=1, epoch=2)
        waited = time.monotonic() - start
    finally:
        release(fifo)
    assert str(stalled.value) == (f"the {split} stream of epoch 2 gave no batch for 5 s (--stall-timeout-s); "
                                  f"decode tasks were reading {fifo}")
    assert 5 <= waited < 5 + 10
    assert ray.get(collector.fatal_error.remote()) == f"worker 1: StreamStalled: {stalled.value}"
    ray.kill(collector)


def count_decoded(batch: dict, log: str) -> dict:
    """A slow stage that leaves a mark per row it processed."""
    time.sleep(0.01 * len(batch["id"]))
    with open(log, "a") as f:
        f.write("x" * len(batch["id"]))
    return batch


@pytest.mark.timeout(120)
def test_a_stopped_pass_stops_the_streams_decoding(ray_head, tmp_path):
    """The next epoch's stream of a run that just converged: both workers stop their pass, and
    the stream stops producing, instead of decoding the epoch for nobody until shutdown."""
    import ray

    ray.init(address=ray_head.address, ignore_reinit_error=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    log, rows = tmp_path / "decoded", 3000
    log.touch()
    stream = ray.data.range(rows, override_num_blocks=100).map_batches(count_decoded, batch_size=10,
                                                                       fn_kwargs={"log": str(log)})
    passes = [Prefetched(split, dataclasses.replace(Config(), batch_size=2)) for split in
              stream.streaming_split(2, equal=True)]
    assert all(p.batch() is not None for p in passes)  # both splits are being fed
    for p in passes:
        p.stop()
    time.sleep(3)  # the tasks already running finish
    settled = log.stat().st_size
    time.sleep(3)
    assert log.stat().st_size == settled < rows


def test_val_shares_are_contiguous_and_even():
    for rows in range(0, 40):
        for parts in range(1, 6):
            found = stream.shares(rows, parts)
            lengths = [length for _, length in found]
            assert sum(lengths) == rows and max(lengths) - min(lengths) <= 1, (rows, parts, found)
            assert [offset for offset, _ in found] == [sum(lengths[:i]) for i in range(parts)]
    assert stream.shares(16, 2) == [(0, 8), (8, 8)] and stream.shares(7, 3) == [(0, 3), (3, 2), (5, 2)]
