"""How much of the device a run used: the model's FLOPs per training step, counted by torch's own
FLOP counter on real batches, the FLOP/s that the run's compute time achieved, and the device's
peak.

A Faster R-CNN training step has two parts that grow differently. The backbone, the FPN and the
RPN run over the padded batch tensor, so their FLOPs grow with its pixels (the step log's
batch_pixels); the box head runs on the RoIs sampled per image (box_batch_size_per_image), so
its FLOPs grow with the images. `measure` counts, with torch.utils.flop_counter.FlopCounterMode,
a forward and backward pass of the whole model on a real batch, then of the box head
(model.roi_heads) alone on the features, proposals and targets that pass gave it; the rest is
the pixel part. The counter counts a multiply-add as 2 FLOPs, and only matrix products and
convolutions (forward and backward): RoIAlign, NMS, resizing and elementwise work count 0. Every
training worker measures the first batch it trained on once its last epoch is done, outside
every timed phase. Then, over the workers' measurements and the run's step log:

  flops_per_pixel  = Σ (whole pass - box head pass) / Σ padded pixels of the measured batches
  flops_per_box_image = Σ box head pass / Σ images of the measured batches
  flops_trained    = flops_per_pixel x Σ batch_pixels + flops_per_box_image x Σ images (all steps)
  flops_per_image  = flops_trained / images_trained
  achieved_tflops  = flops_trained / compute_time_s / devices / 1e12, per device (compute_time_s
                     is p_core's: the slowest worker's Σ compute_s)
  utilisation      = achieved_tflops / peak_tflops, the device's dense peak at the precision the
                     run computes in (PEAKS, or the run's --peak-tflops); null when unknown.
"""

from collections import OrderedDict

import torch
from torch.utils.flop_counter import FlopCounterMode


def counted(work) -> int:
    """The FLOPs that `work()` runs, as torch's FLOP counter counts them."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def measure(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> tuple[int, int]:
    """(FLOPs of a forward and backward pass of the model in training mode on the batch, FLOPs of
    its box head's share of it). `model`: a torchvision GeneralizedRCNN (not a DDP wrapper: a pass
    through the module alone reduces no gradients); the batch on its device. The gradients the
    passes leave are cleared."""
    box_inputs = {}
    hook = model.roi_heads.register_forward_pre_hook(lambda module, args: box_inputs.update(args=args))
    try:
        whole = counted(lambda: sum(model(images, targets).values()).backward())
    finally:
        hook.remove()
    features, proposals, image_sizes, box_targets = box_inputs["args"]
    # Leaves that need their gradient, as the FPN's outputs do in the whole pass.
    features = OrderedDict((name, value.detach().requires_grad_()) for name, value in features.items())
    box = counted(lambda: sum(model.roi_heads(features, proposals, image_sizes, box_targets)[1].values()).backward())
    model.zero_grad(set_to_none=True)
    return whole, box


# Dense peak TFLOP/s (no 2:4 sparsity) of known devices, by torch's device name (a prefix), at the
# precision a run computes in: fp32 without TF32, tf32, fp16 (amp) and bf16 tensor cores.
PEAKS = (
    ("NVIDIA A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
     "NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe, 40 and 80 GB)"),
    ("NVIDIA H100 80GB HBM3", {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
     "NVIDIA H100 Tensor Core GPU datasheet (SXM5; its sparse figures halved)"),
    ("NVIDIA H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
     "NVIDIA H100 Tensor Core GPU datasheet (PCIe; its sparse figures halved)"),
    ("NVIDIA H200 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
     "NVIDIA H200 Tensor Core GPU datasheet (NVL; its sparse figures halved)"),
    ("NVIDIA H200", {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
     "NVIDIA H200 Tensor Core GPU datasheet (SXM; its sparse figures halved)"),
)


def compute_precision(precision: str, tf32: bool) -> str:
    """The precision of a run's tensor math, the key of PEAKS: amp computes in fp16."""
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    return "fp16" if precision == "amp" else precision


def peak(devices: list[str], precision: str, given: float) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, its source) of the run's device at `precision` (compute_precision): `given`
    when positive (--peak-tflops), else the PEAKS entry whose name begins the device's; None
    for several kinds of device, or one not in the table (a CPU among them)."""
    if given > 0:
        return given, "--peak-tflops"
    if len(set(devices)) != 1:
        return None, None
    for prefix, peaks, source in PEAKS:
        if devices[0].startswith(prefix) and precision in peaks:
            return peaks[precision], source
    return None, None
