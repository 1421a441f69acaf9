import contextlib

import pytest
import torch

from pipeline.config import Config
from pipeline.worker import recipe

CPU = torch.device("cpu")


def torchvision_schedule(config: Config, epochs: int, steps_per_epoch: int) -> list[float]:
    """The lr of every step as torchvision's references/detection run it: MultiStepLR made before
    training and stepped per epoch; in epoch 0 only, a LinearLR warm-up made at the start of the
    epoch and stepped after every iteration."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_steps), gamma=config.lr_gamma)
    lrs = []
    for epoch in range(epochs):
        warmup = None
        if epoch == 0:
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=config.warmup_factor,
                total_iters=min(config.warmup_iters, steps_per_epoch - 1))
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            parameter.grad = torch.zeros(1)
            optimizer.step()
            if warmup is not None:
                warmup.step()
        main.step()
    return lrs


@pytest.mark.parametrize("warmup_iters", [10, 4])
def test_learning_rate_matches_torch_schedulers(warmup_iters):
    config = Config(lr=0.02, lr_steps=(2, 4), lr_gamma=0.1, warmup_factor=0.001, warmup_iters=warmup_iters)
    epochs, steps_per_epoch = 5, 7
    expected = torchvision_schedule(config, epochs, steps_per_epoch)
    ours = [recipe.learning_rate(config, epoch, step, steps_per_epoch)
            for epoch in range(epochs) for step in range(steps_per_epoch)]
    assert ours == pytest.approx(expected, rel=1e-9)
    # The shape, by hand: warm-up from lr * 0.001, then lr, lr / 10 from epoch 2, lr / 100 from epoch 4.
    assert ours[0] == pytest.approx(0.02 * 0.001)
    assert ours[steps_per_epoch - 1] == pytest.approx(0.02)
    assert ours[2 * steps_per_epoch] == pytest.approx(0.002)
    assert ours[-1] == pytest.approx(0.0002)


def test_warmup_iterations_is_capped_by_the_epoch():
    assert recipe.warmup_iterations(Config(warmup_iters=1000), 7) == 6
    assert recipe.warmup_iterations(Config(warmup_iters=3), 7) == 3


def test_make_optimizer_takes_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    optimizer = recipe.make_optimizer(model, Config(lr=0.05, momentum=0.8, weight_decay=0.001))
    (group,) = optimizer.param_groups
    assert [p.shape for p in group["params"]] == [torch.Size([1, 2]), torch.Size([1])]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.8, 0.001)


def test_fp32_has_no_autocast():
    context = recipe.autocast("fp32", CPU)
    assert isinstance(context, contextlib.nullcontext)
    with context:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("precision,dtype", [("amp", torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_dtype_is_the_same_on_the_cpu_as_on_a_gpu(precision, dtype):
    with recipe.autocast(precision, CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


@pytest.mark.parametrize("precision,enabled", [("fp32", False), ("amp", True), ("bf16", False)])
def test_loss_scaling_for_amp_only(precision, enabled):
    scaler = recipe.grad_scaler(precision, CPU)
    assert scaler.is_enabled() is enabled
    assert scaler.get_scale() == (2.0**16 if enabled else 1.0)
