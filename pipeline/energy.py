"""GPU energy over the training phases, from NVML's energy counter (nvidia-ml-py's `pynvml`).

NVML counts the millijoules a GPU has used since its driver loaded (Volta and newer). A worker
reads its device's counter at the start and the end of each training phase; the difference is
the phase's energy. Where there is no counter (a CPU worker, no NVML library, an older GPU)
there is no figure: None, never 0. Only a GPU machine runs this for real: `frcnn-bench
acceptance` prints joules per image from it there.
"""

from typing import Callable

import pynvml
import torch


def energy_meter(device: torch.device) -> Callable[[], float] | None:
    """A function returning the device's energy counter in joules, or None where there is none."""
    if device.type != "cuda":
        return None
    try:
        pynvml.nvmlInit()
        # NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES: find this one by its UUID.
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError:
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000
