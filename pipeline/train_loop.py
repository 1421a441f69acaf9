"""The worker side: `train_loop_per_worker`, run by Ray Train's TorchTrainer on every worker.

Each epoch has two phases, each between barriers: training on this worker's equal share of the
shuffled training stream, then evaluation of this worker's share of the val stream (every val
image goes to exactly one worker), gathered on rank 0 for COCOeval. Timings go to the
reporting actor (see pipeline.metrics for what each one measures).
"""

import contextlib
import math
import os
import platform
import queue
import resource
import threading
import time
import warnings
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import checkpoint, evaluation, recipe, step
from pipeline.config import Config
from pipeline.energy import energy_meter
from pipeline.model import build_model
from pipeline.reporting import StepLog


class NonFiniteLoss(RuntimeError):
    pass


def to_tensors(batch: dict, device: torch.device) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    """A numpy batch from the stream -> image ids, uint8 CHW image tensors and targets, on the CPU,
    sharing the batch's memory (images pinned for a CUDA device, see pipeline.step.pin)."""
    with warnings.catch_warnings():
        # Ray hands out read-only views of its object store; nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = step.pin([torch.from_numpy(image) for image in batch["image"]], device)
    targets = [{"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
               for boxes, labels in zip(batch["boxes"], batch["labels"])]
    return [int(i) for i in batch["image_id"]], images, targets


class Prefetched:
    """An epoch of the training stream, pulled by a background thread from the moment it is made,
    so that the stream fills while the worker builds its model or evaluates the previous epoch
    instead of when the first step asks for a batch."""

    _END = object()

    def __init__(self, shard, config: Config):
        self.queue = queue.Queue(maxsize=1)
        batches = shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                     prefetch_batches=config.prefetch_batches)
        threading.Thread(target=self._pull, args=(batches,), daemon=True).start()

    def _pull(self, batches) -> None:
        try:
            for batch in batches:
                self.queue.put(batch)
            self.queue.put(self._END)
        except BaseException as error:  # handed to the training thread, which raises it
            self.queue.put(error)

    def next(self):
        """The next batch, None at the end of the epoch."""
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item


def train_one_epoch(model, optimizer, scaler, batches: Prefetched, config: Config, epoch: int, steps_per_epoch: int,
                    device: torch.device, log: StepLog, padding: step.PaddingProbe) -> None:
    model.train()
    index = 0
    while True:
        start, wait_start = time.time(), time.perf_counter()
        batch = batches.next()
        if batch is None:
            break
        _, images, targets = to_tensors(batch, device)
        compute_start = time.perf_counter()
        lr = recipe.apply_learning_rate(optimizer, config, epoch, index, steps_per_epoch)
        loss, loss_scale, skipped = step.train_step(model, optimizer, scaler, images, targets, config.precision,
                                                    config.clip_grad_norm, device)
        end = time.perf_counter()
        if not math.isfinite(loss):
            reason = f"loss is {loss} at epoch {epoch} step {index} on worker {log.worker}"
            ray.get(log.actor.stop.remote(f"worker {log.worker}: NonFiniteLoss: {reason}"))
            raise NonFiniteLoss(reason)
        log.add({"epoch": epoch, "step": index, "images": len(images), "data_wait_s": compute_start - wait_start,
                 "compute_s": end - compute_start, "loss": loss, "lr": lr, "start": start,
                 "image_pixels": padding.image_pixels, "batch_pixels": padding.batch_pixels,
                 "loss_scale": loss_scale, "skipped": skipped})
        index += 1
    if index == 0:
        raise RuntimeError(f"worker {log.worker} got no training batch in epoch {epoch}")


@torch.no_grad()
def infer_shard(model, shard, config: Config, device: torch.device, reporter, rank: int,
                epoch: int) -> tuple[list[int], list[dict]]:
    """This worker's share of the val stream -> (image ids seen, COCO detections). In fp32 whatever
    the training precision, as torchvision's reference evaluates: bf16 box coordinates would be
    off by pixels. How far it got goes to the reporting actor every 2 s, for the progress display."""
    model.eval()
    seen, detections = [], []
    told = time.time()
    for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                    prefetch_batches=config.prefetch_batches):
        image_ids, images, targets = to_tensors(batch, device)
        images, _ = step.to_device(images, targets, device)
        outputs = model(images)
        seen += image_ids
        detections += evaluation.coco_detections(image_ids, outputs)
        if time.time() - told >= 2.0:
            reporter.evaluating.remote(rank, epoch, len(seen))
            told = time.time()
    reporter.evaluating.remote(rank, epoch, len(seen))
    model.train()
    return seen, detections


def evaluate(model, shard, config: Config, device: torch.device, ground_truth, reporter,
             epoch: int) -> tuple[dict, int]:
    """Infer this worker's share, gather on rank 0, COCOeval there over every val image but those
    that could not be decoded (recorded with the reporting actor), share the result with all.
    Returns the scores and the number of images this worker inferred. The gather and the
    broadcast run over gloo in the tests (CPU workers) and over NCCL only on GPU workers: the
    acceptance run's 1x2 run (machines with 2+ GPUs) covers that."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    seen, detections = infer_shard(step.unwrap(model), shard, config, device, reporter, rank, epoch)
    inferred = len(seen)
    seen, detections = evaluation.gather_on_rank0(seen, detections)
    result = [None]
    if ground_truth is not None:
        unusable = ray.get(reporter.bad_images.remote("val"))
        evaluation.check_exactly_once(ground_truth, seen, list(unusable))
        try:
            evaluation.check_enough_evaluated(len(ground_truth.getImgIds()), len(seen), list(unusable.values()))
        except evaluation.TooFewEvaluated as error:
            # The same images would fail again after a restart: end the run, not the attempt.
            ray.get(reporter.stop.remote(f"worker 0: TooFewEvaluated: {error}"))
            raise
        result = [evaluation.coco_map(ground_truth, detections, config.coco_evaluator, image_ids=seen)]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0], inferred


def cpu_name() -> str:
    """"CPU (<model name>)" from /proc/cpuinfo, or the machine's architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()})"
    return f"CPU ({platform.machine()})"


def memory_record(device: torch.device) -> dict:
    """The worker's device and peak memory. The CUDA branch runs only on GPU workers: the
    acceptance run checks its figure (a CUDA device, 0 < peak <= total)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "mem_kind": "cuda",
                "mem_peak_bytes": torch.cuda.max_memory_reserved(device),
                "mem_total_bytes": torch.cuda.get_device_properties(device).total_memory}
    return {"device": cpu_name(), "mem_kind": "cpu rss",
            "mem_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def train_loop_per_worker(loop_config: dict) -> None:
    config: Config = loop_config["config"]
    reporter, steps_per_epoch = loop_config["reporter"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Logical CPUs are a scheduling budget, not threads: share this node's cores between its
    # workers so that compute and Ray Data's decoding do not oversubscribe them.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, context.get_local_world_size())))
    torch.manual_seed(config.seed)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    train_batches = Prefetched(train_shard, config)  # fills while the model is built
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_model(config.backbone_weights, config.min_size, config.max_size,
                                                         config.box_batch_size_per_image))
    optimizer = recipe.make_optimizer(model, config)
    scaler = recipe.grad_scaler(config.precision, device)
    ground_truth = (evaluation.load_ground_truth(loop_config["val_annotations"], config.coco_evaluator)
                    if rank == 0 else None)
    log = StepLog(reporter, rank)
    padding = step.PaddingProbe(model)
    start_epoch, converged, saved = checkpoint.restore(step.unwrap(model), optimizer, scaler)
    if ray.get(reporter.fatal_error.remote()):
        return  # retrying a non-finite loss from the same checkpoint would diverge again
    if rank == 0:
        ray.get(reporter.begin_attempt.remote(start_epoch, saved))

    energy = energy_meter(device)
    epoch_start = time.time()
    for epoch in range(start_epoch, config.max_epochs):
        if converged:
            break
        step.barrier(device)
        start, joules = time.perf_counter(), energy and energy()
        train_one_epoch(model, optimizer, scaler, train_batches, config, epoch, steps_per_epoch, device, log, padding)
        step.synchronize(device)
        step.barrier(device)
        train_end, joules = time.perf_counter(), energy and energy() - joules
        if epoch + 1 < config.max_epochs:
            train_batches = Prefetched(train_shard, config)  # the next epoch fills during evaluation
        scores, inferred = evaluate(model, val_shard, config, device, ground_truth, reporter, epoch)
        step.barrier(device)
        end = time.perf_counter()
        epoch_row = {"worker": rank, "epoch": epoch, "start": epoch_start, "end": time.time(),
                     "train_s": train_end - start, "eval_s": end - train_end, "eval_images": inferred,
                     "energy_j": joules, **scores}
        ray.get([log.flush(), reporter.add_epoch.remote(epoch_row)])
        step.barrier(device)  # every worker's rows are with the actor before rank 0 saves them
        converged = scores["map"] >= config.target_map
        checkpoint.report_epoch(scores, epoch, converged, config.seed, rank, step.unwrap(model), optimizer, scaler,
                                reporter)
        # The epoch ends once its checkpoint is saved; the next one starts at the same instant,
        # so that the epochs tile the training wall time (see pipeline.metrics.whole_time).
        epoch_start = time.time()
        reporter.end_epoch.remote(rank, epoch, epoch_start)

    ray.get(reporter.add_worker.remote({
        "worker": rank, "node": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
        "node_rank": context.get_node_rank(), **memory_record(device),
        # The configured environment as this process actually had it.
        "env": {name: os.environ.get(name) for name in config.worker_env}}))
