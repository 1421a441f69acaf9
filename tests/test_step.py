"""The training step a GPU runs with amp, run on the CPU: a real R50-FPN under fp16 autocast with an
enabled loss scaler (pipeline.recipe makes exactly these for amp on every device)."""

import math

import pytest
import torch

from pipeline import recipe, step
from pipeline.config import Config
from pipeline.model import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator),
              torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=generator)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[8.0, 10.0, 30.0, 50.0], [2.0, 2.0, 20.0, 20.0]]),
                "labels": torch.tensor([18, 90])}]
    return images, targets


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
