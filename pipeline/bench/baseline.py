"""The plain-PyTorch baseline the benchmark compares with: a CocoDetection-style dataset read by a
`torch.utils.data.DataLoader` with worker processes, feeding the same model under torch DDP
(gloo on CPU, nccl on GPU), one process per worker, no Ray anywhere.

It decodes and flips as the Ray pipeline does (same decode function) and trains and times its
steps with the very same `pipeline.worker.step.Training`, so that its step rows are the pipeline's and
pipeline.records.metrics computes its figures with the same formulas. It trains, it does not evaluate.
"""

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.multiprocessing import spawn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from pipeline.config import Config
from pipeline.data import images
from pipeline.data.manifest import image_folder
from pipeline.records.tables import StepRow, step_columns
from pipeline.worker import step
from pipeline.worker.model import build_model


class CocoDetectionDataset(Dataset):
    """One manifest row -> (CHW uint8 image tensor, target), flipped at random like the stream."""

    def __init__(self, manifest: pa.Table):
        self.rows, self.folder = manifest.to_pylist(), image_folder(manifest)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        image = images.read_image(row["path"], row["width"], row["height"], self.folder)
        boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
        if np.random.random() < 0.5:
            image, boxes = np.ascontiguousarray(image[:, :, ::-1]), images.flip_boxes(boxes, image.shape[2])
        return torch.from_numpy(image), {"boxes": torch.from_numpy(boxes), "labels": torch.tensor(row["labels"])}


def _collate(batch):
    return tuple(zip(*batch))


@dataclass(frozen=True)
class Job:
    """What every baseline process is given."""
    world: int
    port: int
    config: Config
    manifest: pa.Table
    loader_workers: int
    torch_threads: int
    out_dir: str


def _worker(rank: int, job: Job) -> None:
    config = job.config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    device = torch.device(f"cuda:{rank}") if config.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=job.world)
    torch.set_num_threads(job.torch_threads)
    torch.manual_seed(config.seed)
    model = build_model(config.backbone_weights, config.min_size, config.max_size, config.box_batch_size_per_image)
    training = step.Training(DistributedDataParallel(model.to(device), device_ids=[device] if device.type == "cuda"
                                                     else None), config, device)
    sampler = DistributedSampler(CocoDetectionDataset(job.manifest), num_replicas=job.world, rank=rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    loader = DataLoader(sampler.dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=job.loader_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                        persistent_workers=job.loader_workers > 0)
    steps, epochs = [], []
    for epoch in range(config.max_epochs):
        sampler.set_epoch(epoch)
        epoch_start, clock = time.time(), time.perf_counter()
        dist.barrier()
        start = time.perf_counter()
        batches = iter(loader)
        steps += training.epoch(lambda: next(batches, None), rank, epoch, len(loader))
        dist.barrier()
        epochs.append({"worker": rank, "epoch": epoch, "start": epoch_start, "end": time.time(),
                       "wall_s": time.perf_counter() - clock, "train_s": time.perf_counter() - start, "eval_s": 0.0})
    Path(job.out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "epochs": epochs}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_baseline(config: Config, manifest: pa.Table, loader_workers: int, out_dir: Path) -> tuple[dict, dict]:
    """Train `config.max_epochs` epochs on the manifest with `config.num_workers` DDP processes
    (torch's spawn: an error in any of them is raised here); returns the steps and epochs tables
    of all of them, as columns (see pipeline.records.tables)."""
    world = max(1, config.num_workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn(_worker, args=(Job(world, _free_port(), config, manifest, loader_workers,
                             max(1, len(os.sched_getaffinity(0)) // world), str(out_dir)),), nprocs=world)
    parts = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]
    steps = [StepRow(*row) for part in parts for row in part["steps"]]
    epochs = [row for part in parts for row in part["epochs"]]
    return step_columns(steps), {name: [row[name] for row in epochs] for name in epochs[0]}
