"""The worker side: `train_loop_per_worker`, run by Ray Train's TorchTrainer on every worker.

Each epoch has two phases, each between barriers: training on this worker's equal share of the
shuffled training stream, then evaluation of this worker's share of the val stream (every val
image goes to exactly one worker), gathered on rank 0 for COCOeval. Timings go to the
collector (see pipeline.records.metrics for what each one measures).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.records.collector import StepSender
from pipeline.worker import checkpoint, evaluation, recipe, step
from pipeline.worker.model import build_model
from pipeline.worker.nvml import UsedMemoryPeak, energy_meter, used_memory_peak


@dataclass(frozen=True)
class LoopConfig:
    """What the driver gives every worker (Ray Train's train_loop_config holds it as "loop")."""
    config: Config
    collector: ray.actor.ActorHandle  # the run's pipeline.records.collector.Collector
    steps_per_epoch: int
    val_annotations: str  # rank 0 loads the ground truth from it
    backbone_file: str  # the backbone's local weights file, found or fetched by the driver, or "none"


class NonFiniteLoss(RuntimeError):
    pass


def to_tensors(batch: dict) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    """A numpy batch from the stream -> image ids, uint8 CHW image tensors and targets, on the CPU,
    sharing the batch's memory."""
    with warnings.catch_warnings():
        # Ray hands out read-only views of its object store; nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = [torch.from_numpy(image) for image in batch["image"]]
    targets = [{"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
               for boxes, labels in zip(batch["boxes"], batch["labels"])]
    return [int(i) for i in batch["image_id"]], images, targets


class StreamStalled(RuntimeError):
    """No batch came from a data stream for stall_timeout_s (see stalls_end_the_run)."""


class Prefetched:
    """A pass over a stream (an epoch of the training shard, the val shard), pulled by a background
    thread from the moment it is made, so that the stream fills while the worker builds its model
    or evaluates the previous epoch instead of when the first step asks for a batch. A batch is
    waited for at most stall_timeout_s: a read that never returns then raises, it does not hang.
    `stop` ends a pass that will not be consumed (the next epoch of a run that just converged)."""

    _END = object()

    def __init__(self, shard, config: Config):
        self.queue, self.timeout, self.stopped = queue.Queue(maxsize=1), config.stall_timeout_s, threading.Event()
        batches = shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                     prefetch_batches=config.prefetch_batches)
        threading.Thread(target=self._pull, args=(iter(batches),), daemon=True).start()

    def _pull(self, batches) -> None:
        try:
            for batch in batches:
                if not self._hand_over(batch):
                    return
            self._hand_over(self._END)
        except BaseException as error:  # handed to the consuming thread, which raises it
            self._hand_over(error)
        finally:
            # Ray's iterator, closed, tells the stream's coordinator this split is done; once every
            # split is, it shuts the stream's executor down: no more decoding for this pass.
            batches.close()

    def _hand_over(self, item) -> bool:
        """Puts the item in the queue for the consumer; False once the pass is stopped."""
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Full):
                self.queue.put(item, timeout=0.2)
                return True
        return False

    def stop(self) -> None:
        self.stopped.set()

    def batch(self) -> dict | None:
        """The next numpy batch, None at the end of the pass."""
        try:
            item = self.queue.get(timeout=self.timeout)
        except queue.Empty:
            raise StreamStalled(f"no batch for {self.timeout:g} s (--stall-timeout-s)") from None
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item

    def next(self) -> tuple[list, list] | None:
        """The next training batch's (images, targets), None at the end of the epoch."""
        batch = self.batch()
        return None if batch is None else to_tensors(batch)[1:]


# A stalled stream's error names this many of the files being read, and counts the others.
FILES_NAMED = 3


def files_read(collector, split: str) -> str:
    """The files of the split that decode tasks began and have not finished reading, as the
    collector has them: a task reports its decode batch whole, so the file that blocks is one of
    its batch's, the earliest named first."""
    files = ray.get(collector.files_being_read.remote(split))
    if not files:
        return "no decode task was reading a file"
    more = f" and {len(files) - FILES_NAMED} more" if len(files) > FILES_NAMED else ""
    return f"decode tasks were reading {', '.join(files[:FILES_NAMED])}{more}"


@contextlib.contextmanager
def stalls_end_the_run(collector, split: str, epoch: int, worker: int):
    """A StreamStalled inside ends the run, however many restarts are left (collector.stop): a
    restart would read the same storage, and a stall that persists would hold the run another
    stall_timeout_s on every attempt; once the storage answers, a rerun with the same run name
    resumes from the last checkpoint. The error names the split, the epoch and the files that
    the split's decode tasks, on whichever node, said they were reading (files_read); the worker
    is named by Ray Train's failure line."""
    try:
        yield
    except StreamStalled as error:
        message = f"the {split} stream of epoch {epoch} gave {error}; {files_read(collector, split)}"
        ray.get(collector.stop.remote(f"worker {worker}: StreamStalled: {message}"))
        raise StreamStalled(message) from None


def watched(batches: Prefetched, collector, split: str, epoch: int, worker: int) -> Iterator[dict]:
    """The pass's numpy batches; a stall ends the run (stalls_end_the_run)."""
    with stalls_end_the_run(collector, split, epoch, worker):
        while (batch := batches.batch()) is not None:
            yield batch


def train_one_epoch(training: step.Training, batches: Prefetched, sender: StepSender, worker: int, epoch: int,
                    steps_per_epoch: int) -> None:
    training.model.train()
    steps = 0
    with stalls_end_the_run(sender.collector, "train", epoch, worker):
        for row in training.epoch(batches.next, worker, epoch, steps_per_epoch):
            if not math.isfinite(row.loss):
                reason = f"loss is {row.loss} at epoch {epoch} step {row.step} on worker {worker}"
                ray.get(sender.collector.stop.remote(f"worker {worker}: NonFiniteLoss: {reason}"))
                raise NonFiniteLoss(reason)
            sender.add(row)
            steps += 1
    if steps == 0:
        raise RuntimeError(f"worker {worker} got no training batch in epoch {epoch}")


@torch.no_grad()
def infer_shard(model, batches: Prefetched, device: torch.device, collector, rank: int,
                epoch: int) -> tuple[list[int], list[dict]]:
    """A pass over this worker's share of the val stream (see stream.ShardingConfig) -> (image ids
    seen, COCO detections). In fp32 whatever the training precision, as torchvision's reference
    evaluates: bf16 box coordinates would be off by pixels. How far it got goes to the collector
    every 2 s, for the progress display. A stalled val stream ends the run too (watched)."""
    model.eval()
    seen, detections = [], []
    told = time.time()
    for batch in watched(batches, collector, "val", epoch, rank):
        image_ids, images, targets = to_tensors(batch)
        images, _ = step.to_device(images, targets, device)
        outputs = model(images)
        seen += image_ids
        detections += evaluation.coco_detections(image_ids, outputs)
        if time.time() - told >= 2.0:
            collector.evaluating.remote(rank, epoch, len(seen))
            told = time.time()
    collector.evaluating.remote(rank, epoch, len(seen))
    model.train()
    return seen, detections


def evaluate(model, batches: Prefetched, config: Config, device: torch.device, ground_truth, collector,
             epoch: int) -> tuple[dict, int]:
    """Infer this worker's share, gather on rank 0, COCOeval there over every val image but those
    that could not be decoded (recorded with the collector), share the result with all.
    Returns the scores and the number of images this worker inferred. The gather and the
    broadcast run over gloo in the tests (CPU workers) and over NCCL only on GPU workers: the
    acceptance run's 1x2 run (machines with 2+ GPUs) covers that."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    seen, detections = infer_shard(step.unwrap(model), batches, device, collector, rank, epoch)
    inferred = len(seen)
    seen, detections = evaluation.gather_on_rank0(seen, detections)
    result = [None]
    if ground_truth is not None:
        unusable = ray.get(collector.bad_images.remote("val"))
        evaluation.check_exactly_once(ground_truth, seen, list(unusable))
        try:
            evaluation.check_enough_evaluated(len(ground_truth.getImgIds()), len(seen), list(unusable.values()))
        except evaluation.TooFewEvaluated as error:
            # The same images would fail again after a restart: end the run, not the attempt.
            ray.get(collector.stop.remote(f"worker 0: TooFewEvaluated: {error}"))
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


def nccl_version() -> str:
    """The NCCL version torch carries ("2.27.5"; on another vendor's GPU, its own library's)."""
    return ".".join(map(str, torch.cuda.nccl.version()))


def memory_record(device: torch.device, used_memory: UsedMemoryPeak | None) -> dict:
    """The worker's device and peak memory (its row of the workers table). On CUDA the device's
    used memory as NVML counts it, over NVML's total ("nvml used", FlagPerf's figure), or where
    NVML cannot tell, PyTorch's peak reservation over torch's total ("torch reserved"); torch's
    peak reservation beside it either way. The CUDA branch runs only on GPU workers: the
    acceptance run checks its figures (torch's peak <= NVML's peak <= the device's total)."""
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device)
        if used_memory is None:
            kind, (peak, total) = "torch reserved", (reserved, torch.cuda.get_device_properties(device).total_memory)
        else:
            kind, (peak, total) = "nvml used", used_memory.stop()
        return {"device": torch.cuda.get_device_name(device), "mem_kind": kind, "mem_peak_bytes": peak,
                "mem_total_bytes": total, "mem_torch_reserved_bytes": reserved}
    return {"device": cpu_name(), "mem_kind": "cpu rss",
            "mem_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "mem_torch_reserved_bytes": None}


def collective() -> dict:
    """The process group's backend as torch.distributed has it ("nccl": on a GPU of another vendor,
    the name under which its own collective library runs), with NCCL's version on nccl (what that
    library reports on such hardware); None without a process group."""
    backend = dist.get_backend() if dist.is_initialized() else None
    version = nccl_version() if backend == "nccl" else None
    return {"backend": backend, "backend_version": version}


def torch_threads(config: Config) -> int:
    """A worker's torch threads: its reserved CPUs (config.cpus_per_worker), so that compute and
    Ray Data's decoding on the other CPUs do not oversubscribe the cores; OMP_NUM_THREADS instead
    when worker_env sets it. Not the process's inherited OMP_NUM_THREADS: Ray's launcher runs the
    nodes' start commands with OMP_NUM_THREADS=1 exported, which every worker would inherit."""
    return int(config.worker_env.get("OMP_NUM_THREADS", config.cpus_per_worker))


def train_loop_per_worker(loop_config: dict) -> None:
    worker = Worker(loop_config["loop"])
    if not worker.begin():
        return  # retrying a non-finite loss from the same checkpoint would diverge again
    for epoch in range(worker.start_epoch, worker.config.max_epochs):
        if worker.converged:
            break
        worker.run_epoch(epoch)
    worker.finish()


class Worker:
    """One training worker of the run: its streams, model, collector channel and epoch clock."""

    def __init__(self, loop: LoopConfig):
        called = time.time()
        self.loop, self.config, self.collector = loop, loop.config, loop.collector
        self.context = ray.train.get_context()
        self.rank = self.context.get_world_rank()
        torch.set_num_threads(torch_threads(self.config))
        torch.manual_seed(self.config.seed)
        self.device = ray.train.torch.get_device()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.train_batches = Prefetched(self.train_shard, self.config)  # fills while the model is built
        model = ray.train.torch.prepare_model(build_model(loop.backbone_file, self.config.min_size,
                                                          self.config.max_size, self.config.box_batch_size_per_image))
        self.training = step.Training(model, self.config, self.device)
        self.collector.worker_started.remote(self.rank, {"workers": called, "model": time.time()})
        self.ground_truth = (evaluation.load_ground_truth(loop.val_annotations, self.config.coco_evaluator)
                             if self.rank == 0 else None)
        self.sender = StepSender(self.collector)
        self.energy = energy_meter(self.device)
        self.used_memory = used_memory_peak(self.device)  # sampled until finish()

    def begin(self) -> bool:
        """Resumes from the run's latest checkpoint, if any; False if the run has already failed
        for good (a non-finite loss)."""
        self.start_epoch, self.converged, saved = checkpoint.restore(self.training)
        if ray.get(self.collector.fatal_error.remote()):
            return False
        if self.rank == 0:
            ray.get(self.collector.begin_attempt.remote(self.start_epoch, saved))
        self.epoch_start, self.epoch_clock = time.time(), time.perf_counter()
        return True

    def run_epoch(self, epoch: int) -> None:
        """Training, then evaluation, each between barriers; the epoch's row; the checkpoint."""
        device, training = self.device, self.training
        step.barrier(device)
        start, joules = time.perf_counter(), self.energy and self.energy()
        train_one_epoch(training, self.train_batches, self.sender, self.rank, epoch, self.loop.steps_per_epoch)
        step.synchronize(device)
        step.barrier(device)
        train_end, joules = time.perf_counter(), self.energy and self.energy() - joules
        # The val pass begins with the evaluation, not before: its stream starts in this process
        # (a worker's share is its own stream), and started during training it took 2.7 s of the
        # first step's compute here.
        val_batches = Prefetched(self.val_shard, self.config)
        if epoch + 1 < self.config.max_epochs:
            self.train_batches = Prefetched(self.train_shard, self.config)  # fills during evaluation
        scores, inferred = evaluate(training.model, val_batches, self.config, device, self.ground_truth,
                                    self.collector, epoch)
        step.barrier(device)
        end = time.perf_counter()
        epoch_row = {"worker": self.rank, "epoch": epoch, "start": self.epoch_start, "end": time.time(),
                     "wall_s": end - self.epoch_clock, "train_s": train_end - start, "eval_s": end - train_end, "eval_images": inferred,
                     "energy_j": joules, **scores}
        ray.get([self.sender.flush(), self.collector.add_epoch.remote(epoch_row)])
        step.barrier(device)  # every worker's rows are with the actor before rank 0 saves them
        self.converged = scores["map"] >= self.config.target_map
        if self.converged and epoch + 1 < self.config.max_epochs:
            self.train_batches.stop()  # the next epoch's stream, started during the evaluation
        checkpoint.save_epoch(training, scores, epoch, self.converged, self.rank, self.collector)
        # The epoch ends once its checkpoint is saved; the next one starts at the same instant,
        # so that the epochs tile the training wall time (see pipeline.records.metrics.whole_time).
        self.epoch_start, clock = time.time(), time.perf_counter()
        self.collector.end_epoch.remote(self.rank, epoch, self.epoch_start, clock - self.epoch_clock)
        self.epoch_clock = clock

    def finish(self) -> None:
        """The worker's row: where it ran, its device and peak memory, what computed (torch, the
        TF32 switches, the collective backend), its environment, and the FLOPs of its first
        batch (counted now, after every timed phase: see pipeline.worker.flops)."""
        memory = memory_record(self.device, self.used_memory)  # before the count's own allocations
        counts = self.training.count_flops()
        ray.get(self.collector.add_worker.remote({
            "worker": self.rank, "node": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "node_rank": self.context.get_node_rank(),
            **memory, "torch": torch.__version__, "tf32": recipe.tf32_state(), **collective(),
            # The configured environment as this process actually had it.
            "env": {name: os.environ.get(name) for name in self.config.worker_env}, **counts}))
