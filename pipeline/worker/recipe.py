"""The training recipe: SGD, the learning-rate schedule and the precision modes."""

import contextlib

import torch

from pipeline.config import Config


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def warmup_iterations(config: Config, steps_per_epoch: int) -> int:
    """torchvision's reference: min(warmup_iters, steps_per_epoch - 1) iterations of epoch 0."""
    return min(config.warmup_iters, steps_per_epoch - 1)


def learning_rate(config: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """lr for `step` (0-based) of `epoch`: the MultiStepLR decay (gamma per milestone passed),
    times, in epoch 0, torchvision's LinearLR warm-up factor, which rises linearly from
    warmup_factor at step 0 to 1 at step warmup_iterations and stays 1 after."""
    lr = config.lr * config.lr_gamma ** sum(epoch >= milestone for milestone in config.lr_steps)
    warmup = warmup_iterations(config, steps_per_epoch)
    if epoch == 0 and step < warmup:
        lr *= config.warmup_factor + (1 - config.warmup_factor) * step / warmup
    return lr


def apply_learning_rate(optimizer: torch.optim.Optimizer, config: Config, epoch: int, step: int,
                        steps_per_epoch: int) -> float:
    """Sets `learning_rate(...)` on every parameter group; returns it."""
    lr = learning_rate(config, epoch, step, steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def autocast(precision: str, device: torch.device):
    """The autocast context for a precision, the same on every device: amp is fp16 autocast (with
    loss scaling, see `grad_scaler`), bf16 is bf16 autocast, fp32 is none. On the CPU, amp runs
    the very fp16 path a GPU runs, so that it can be tested there; it is slow there (about ten
    times fp32 here: CPUs have few fp16 kernels), which is why bf16 exists for CPU runs."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for amp, on every device: fp16 gradients can underflow. bf16 has fp32's range
    and needs none; the scaler is then disabled (its scale reads 1.0)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "amp")


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for this process's fp32 matmuls and cuDNN convolutions (the Config's tf32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> dict:
    """The two TF32 switches as this process has them."""
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
