"""The plain-PyTorch baseline the benchmark compares with: a CocoDetection-style dataset read by a
`torch.utils.data.DataLoader` with worker processes, feeding the same model under torch DDP
(gloo on CPU, nccl on GPU), one process per worker, no Ray anywhere.

It decodes, flips and times steps exactly as the Ray pipeline does (same decode function, same
step boundaries, same synchronisation), and reports the same columns, so that pipeline.metrics
computes its figures with the same formulas. It trains, it does not evaluate.
"""

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.multiprocessing import spawn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from pipeline import images, recipe, step
from pipeline.config import Config
from pipeline.model import build_model


class CocoDetectionDataset(Dataset):
    """One manifest row -> (CHW uint8 image tensor, target), flipped at random like the stream."""

    def __init__(self, manifest: pa.Table):
        self.rows = manifest.to_pylist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        image = images.read_image(row["path"], row["width"], row["height"])
        boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
        if np.random.random() < 0.5:
            image, boxes = np.ascontiguousarray(image[:, :, ::-1]), images.flip_boxes(boxes, image.shape[2])
        return torch.from_numpy(image), {"boxes": torch.from_numpy(boxes), "labels": torch.tensor(row["labels"])}


def _collate(batch):
    return tuple(zip(*batch))


def _worker(rank: int, world: int, port: int, config: Config, manifest: pa.Table, loader_workers: int,
            torch_threads: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if config.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(torch_threads)
    torch.manual_seed(config.seed)
    model = build_model(config.backbone_weights, config.min_size, config.max_size, config.box_batch_size_per_image)
    model = DistributedDataParallel(model.to(device), device_ids=[device] if device.type == "cuda" else None)
    padding = step.PaddingProbe(model)
    optimizer = recipe.make_optimizer(model, config)
    scaler = recipe.grad_scaler(config.precision, device)
    sampler = DistributedSampler(CocoDetectionDataset(manifest), num_replicas=world, rank=rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    loader = DataLoader(sampler.dataset, batch_size=config.batch_size, sampler=sampler, num_workers=loader_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=loader_workers > 0)
    steps = {name: [] for name in ("worker", "epoch", "step", "images", "data_wait_s", "compute_s", "loss",
                                   "image_pixels", "batch_pixels")}
    epochs = {"worker": [], "epoch": [], "start": [], "end": [], "train_s": [], "eval_s": []}
    steps_per_epoch = len(loader)
    for epoch in range(config.max_epochs):
        sampler.set_epoch(epoch)
        epoch_start = time.time()
        dist.barrier()
        start = time.perf_counter()
        batches = iter(loader)
        for index in range(steps_per_epoch):
            wait_start = time.perf_counter()
            images, targets = next(batches)
            compute_start = time.perf_counter()
            recipe.apply_learning_rate(optimizer, config, epoch, index, steps_per_epoch)
            loss, _, _ = step.train_step(model, optimizer, scaler, images, targets, config.precision,
                                         config.clip_grad_norm, device)
            end = time.perf_counter()
            for name, value in zip(steps, (rank, epoch, index, len(images), compute_start - wait_start,
                                           end - compute_start, loss, padding.image_pixels, padding.batch_pixels)):
                steps[name].append(value)
        dist.barrier()
        for name, value in zip(epochs, (rank, epoch, epoch_start, time.time(), time.perf_counter() - start, 0.0)):
            epochs[name].append(value)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "epochs": epochs}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_baseline(config: Config, manifest: pa.Table, loader_workers: int, out_dir: Path) -> tuple[dict, dict]:
    """Train `config.max_epochs` epochs on the manifest with `config.num_workers` DDP processes
    (torch's spawn: an error in any of them is raised here); returns the steps and epochs columns
    of all of them (see pipeline.metrics)."""
    world = max(1, config.num_workers)
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn(_worker, args=(world, _free_port(), config, manifest, loader_workers, threads, str(out_dir)), nprocs=world)
    parts = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]
    return ({name: [v for part in parts for v in part["steps"][name]] for name in parts[0]["steps"]},
            {name: [v for part in parts for v in part["epochs"][name]] for name in parts[0]["epochs"]})
