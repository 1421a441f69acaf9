"""The training step a GPU runs with amp, run on the CPU: a real R50-FPN under fp16 autocast with an
enabled loss scaler (pipeline.worker.recipe makes exactly these for amp on every device); and what a
worker whose batches arrive late does to the others' timings, with two DDP processes over gloo."""

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import spawn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Config
from pipeline.worker import recipe, step
from pipeline.worker.model import build_model

CPU = torch.device("cpu")


def make_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator),
              torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=generator)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[8.0, 10.0, 30.0, 50.0], [2.0, 2.0, 20.0, 20.0]]),
                "labels": torch.tensor([18, 90])}]
    return images, targets


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("none", 64, 64, box_batch_size_per_image=32)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_step(model, scaler, batch, clip_grad_norm=0.0, precision="amp"):
    training = step.Training(model, Config(lr=0.01, precision=precision, clip_grad_norm=clip_grad_norm), CPU)
    training.scaler = scaler
    return training.train_step(*batch)


def test_amp_recipe_is_fp16_autocast_with_loss_scaling_on_the_cpu_too(model, batch):
    dtypes = []
    model.backbone.body.layer1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    scaler = recipe.grad_scaler("amp", CPU)
    loss, scale, skipped = run_step(model, scaler, batch)
    assert dtypes == [torch.float16]
    assert math.isfinite(loss) and scaler.is_enabled()
    # 2**16 at first; a first fp16 step of a random model may overflow at that scale and halve it.
    assert scale == scaler.get_scale() and (scale, skipped) in ((2.0**16, False), (2.0**15, True))


def test_loss_scale_grows_after_good_steps(model, batch):
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2)
    before = [p.detach().clone() for p in trainable(model)]
    results = [run_step(model, scaler, batch) for _ in range(2)]
    assert [(scale, skipped) for _, scale, skipped in results] == [(1.0, False), (2.0, False)]
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable(model)))


def test_inf_gradient_skips_the_optimizer_step_and_halves_the_scale(model, batch):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    poisoned = model.roi_heads.box_predictor.cls_score.weight
    hook = poisoned.register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = [p.detach().clone() for p in trainable(model)]
    loss, scale, skipped = run_step(model, scaler, batch)
    hook.remove()
    assert math.isfinite(loss) and skipped and scale == 512.0
    assert all(torch.equal(b, p) for b, p in zip(before, trainable(model)))


def test_gradients_are_unscaled_before_clipping(model, batch):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, _, skipped = run_step(model, scaler, batch, clip_grad_norm=1e-3)
    assert not skipped
    # Clipped in true units the gradients' norm is the clip; clipped while still scaled it
    # would be the clip / 1024 once the scaler divided them for the optimizer step.
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable(model)]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_fp32_step_has_no_scaling(model, batch):
    loss, scale, skipped = run_step(model, recipe.grad_scaler("fp32", CPU), batch, precision="fp32")
    assert math.isfinite(loss) and (scale, skipped) == (1.0, False)


def test_to_device_scales_pixels_to_the_unit_range(batch):
    images, targets = step.to_device(*batch, CPU)
    assert images[0].dtype == torch.float32
    assert torch.equal(images[0], batch[0][0].float() / 255)
    assert 0.0 <= float(images[0].min()) and float(images[0].max()) <= 1.0
    assert torch.equal(targets[1]["boxes"], batch[1][1]["boxes"])


LATE_S, LATE_STEPS = 2.0, 3


def _worker_with_a_slow_source(rank: int, port: int, out: str) -> None:
    """One of two DDP workers over gloo; worker 1's data source takes LATE_S longer per batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("none", 64, 64, box_batch_size_per_image=32))
    training = step.Training(model, Config(lr=0.01), CPU)
    batches = iter([make_batch()] * LATE_STEPS)

    def next_batch():
        if rank == 1:
            time.sleep(LATE_S)  # a slow source: a cold disk, a busy decoder
        return next(batches, None)

    rows = [row._asdict() for row in training.epoch(next_batch, rank, 0, LATE_STEPS)]
    Path(out, f"{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def test_a_late_batch_is_data_wait_on_every_worker_not_compute(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_worker_with_a_slow_source, args=(port, str(tmp_path)), nprocs=2)
    prompt, late = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert len(prompt) == len(late) == LATE_STEPS
    for on_time, delayed in zip(prompt, late):
        # Worker 0 had its batch at once and waited for worker 1's: that wait is data wait, and its
        # compute is that of the late worker, which joined the all-reduce with no one to wait for.
        assert on_time["data_wait_s"] >= 0.8 * LATE_S
        assert on_time["compute_s"] < delayed["compute_s"] + LATE_S / 2, (on_time, delayed)
