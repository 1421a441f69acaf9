"""One timed training step, the same on every device and in both trainers: a `Training` (the model,
its optimizer and loss scaler, the padding probe) makes one `StepRow` per step, for the Ray worker
(pipeline.worker.train_loop) and the plain baseline (pipeline.bench.baseline) alike; nothing here needs Ray.
The tests run it on the CPU with the fp16 autocast and the enabled loss scaler that `amp` uses on
a GPU.

Two pieces only do something on CUDA; each is one small function below, and `frcnn-bench
acceptance` (pipeline/bench/acceptance.py) is what runs them for real on a GPU machine: `synchronize`
(waits for the device's queued work, so that the time measured around a step holds all of it) and
`barrier` (NCCL's barrier needs the device it runs on). The host-to-device copy is a plain copy
inside the step's compute time: no copy overlaps compute (no pinned memory, no side stream).
"""

import itertools
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.records.tables import StepRow
from pipeline.worker import flops, recipe


def synchronize(device: torch.device) -> None:
    """Waits until the device has done all queued work (CUDA); nothing to wait for on the CPU.
    Covered on a GPU by the acceptance run, whose p_core check (amp beats fp32 in compute time)
    needs it: without it the step times would hold only the time to queue the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    """All workers meet here (no-op without a process group). NCCL needs the device id; gloo
    takes none. Covered on a GPU by the acceptance run's 1x2 run on machines with 2+ GPUs."""
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class PaddingProbe:
    """Reads the batch the model's transform builds (resized images padded to one tensor): the
    pixels of the images and of the padded tensor, for the padding share."""

    def __init__(self, model: torch.nn.Module):
        self.image_pixels = self.batch_pixels = 0
        unwrap(model).transform.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        images = output[0]
        count, _, height, width = images.tensors.shape
        self.batch_pixels = count * height * width
        self.image_pixels = sum(h * w for h, w in images.image_sizes)


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    """uint8 CHW images -> float images in [0, 1] on the device (the model's transform then
    normalises them with ImageNet's mean and std), targets on the device."""
    images = [image.to(device).float().div_(255) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


FLOP_COUNTS = ("flops", "box_flops", "flops_batch_pixels", "flops_images")


class Training:
    """One worker's training: the model (DDP-wrapped or not), SGD and the loss scaler of the
    precision (pipeline.worker.recipe), and the probe of the padded batches. `epoch` trains one epoch."""

    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.optimizer = recipe.make_optimizer(model, config)
        self.scaler = recipe.grad_scaler(config.precision, device)
        self.padding = PaddingProbe(model)
        self.first_batch = None  # (images, targets) of the first step, kept for count_flops
        recipe.set_tf32(config.tf32)

    def epoch(self, next_batch: Callable, worker: int, epoch: int, steps_per_epoch: int) -> Iterator[StepRow]:
        """Steps until `next_batch()` (which gives (images, targets) on the CPU) gives None: each
        waits for its batch, meets the other workers, sets the scheduled lr and trains on it;
        yields each step's row.

        The workers meet (a barrier) once every one has its batch, and that wait is data wait:
        compute then starts together. Without it a worker still waiting for its batch joins DDP's
        gradient all-reduce late, and every other worker's compute time (which ends after the
        all-reduce) holds that wait, so p_core, taken from the slowest worker, would count data
        loading as compute."""
        for index in itertools.count():
            start, wait_start = time.time(), time.perf_counter()
            batch = next_batch()
            if batch is None:
                return
            barrier(self.device)
            images, targets = batch
            if self.first_batch is None:  # copied: the batch's memory is the stream's
                self.first_batch = ([image.clone() for image in images],
                                    [{k: v.clone() for k, v in target.items()} for target in targets])
            compute_start = time.perf_counter()
            lr = recipe.apply_learning_rate(self.optimizer, self.config, epoch, index, steps_per_epoch)
            loss, loss_scale, skipped = self.train_step(images, targets)
            end = time.perf_counter()
            yield StepRow(worker=worker, epoch=epoch, step=index, images=len(images),
                          data_wait_s=compute_start - wait_start, compute_s=end - compute_start, loss=loss, lr=lr,
                          start=start, end=time.time(), image_pixels=self.padding.image_pixels,
                          batch_pixels=self.padding.batch_pixels, loss_scale=loss_scale, skipped=skipped)

    def train_step(self, images: list[torch.Tensor], targets: list[dict]) -> tuple[float, float, bool]:
        """One step's compute: device copy, forward under the precision's autocast, backward of the
        scaled loss, gradients unscaled before clipping (so that the clip sees their true norm), the
        optimizer step (which the scaler skips when a gradient is inf or nan), the scale's update,
        and a device synchronisation so that the time measured around the call holds all of its
        work. The caller sets the lr. Returns (loss, the loss scale after the update, whether the
        optimizer step was skipped); without loss scaling the scale is 1.0 and nothing is skipped."""
        scaler, optimizer = self.scaler, self.optimizer
        scale = scaler.get_scale()  # before any work is queued: reading it waits for none
        images, targets = to_device(images, targets, self.device)
        with recipe.autocast(self.config.precision, self.device):
            loss = sum(self.model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.config.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        # The scale halves exactly when the step found inf/nan gradients and skipped the update.
        new_scale = scaler.get_scale()
        loss_value = loss.item()
        synchronize(self.device)
        return loss_value, new_scale, new_scale < scale

    def count_flops(self) -> dict:
        """FLOP_COUNTS of a training step on the first batch this trainer trained on (see
        pipeline.worker.flops.measure): the whole pass, the box head's share, the batch's padded pixels
        and images; None each before any step. No optimizer step: the model is left as it was."""
        if self.first_batch is None:
            return dict.fromkeys(FLOP_COUNTS)
        images, targets = to_device(*self.first_batch, self.device)
        whole, box = flops.measure(unwrap(self.model), images, targets)
        return dict(zip(FLOP_COUNTS, (whole, box, self.padding.batch_pixels, len(images))))
