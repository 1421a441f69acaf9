"""What NVML (nvidia-ml-py's `pynvml`) tells about a node's NVIDIA driver and a worker's GPU: the
driver's versions (for the preflight), the GPU's energy counter and its used memory.

NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so a worker finds its GPU by the
UUID torch gives. Where NVML cannot tell (a CPU worker, no NVML library, an older GPU) there is
no figure: None, never 0. Only a GPU machine runs this for real: `frcnn-bench acceptance` prints
the driver's versions, joules per image and NVML's memory figure from it there.
"""

import threading
from typing import Callable

import pynvml
import torch

# Between samples of the used memory: the device's used memory rises in steps and stays up, so a
# sample this often sees each step (see UsedMemoryPeak).
SAMPLE_INTERVAL_S = 0.5


def cuda_version(number: int) -> str:
    """NVML's CUDA version number as text: 12040 -> "12.4"."""
    return f"{number // 1000}.{number % 1000 // 10}"


def driver_versions() -> tuple[str, str]:
    """The NVIDIA driver's version ("535.183.01") and the newest CUDA it runs ("12.2"); raises
    pynvml.NVMLError where NVML cannot be loaded (no NVIDIA driver usable by this process)."""
    pynvml.nvmlInit()
    return pynvml.nvmlSystemGetDriverVersion(), cuda_version(pynvml.nvmlSystemGetCudaDriverVersion())


def device_handle(device: torch.device):
    """NVML's handle of this CUDA device, found by its UUID; None elsewhere or without NVML."""
    if device.type != "cuda":
        return None
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
    except pynvml.NVMLError:
        return None


def energy_meter(device: torch.device) -> Callable[[], float] | None:
    """A function returning the device's energy counter in joules (the millijoules it has used
    since its driver loaded, Volta and newer), or None where there is none. A worker reads it at
    the start and the end of each training phase; the difference is the phase's energy."""
    handle = device_handle(device)
    if handle is None:
        return None
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError:
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000


def memory_info(handle):
    """The device's memory as nvidia-smi (and so FlagPerf's monitor) shows it: NVML's version 2,
    whose `used` leaves out what the driver reserves (version 1's counts it) and whose `total`
    is the device's whole memory (torch's total_memory is less by that reservation)."""
    return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)


class UsedMemoryPeak:
    """The peak of a GPU's used memory as NVML counts it: every process's allocations on the
    device, CUDA contexts and NCCL's buffers included, FlagPerf's figure. A daemon thread samples
    it every SAMPLE_INTERVAL_S from the worker's start to `stop`. A thread rather than a read at
    each step: it costs the training thread nothing (NVML's call releases the GIL) and it sees the
    evaluation phase too; it still catches the peak because the used memory rises in steps and
    stays up (PyTorch's caching allocator keeps what it reserved, NCCL its buffers) unless
    memory is given back, which the run does not do. Runs only on a GPU worker: the acceptance
    run checks its figure against torch's peak reservation and the device's total."""

    def __init__(self, handle):
        self.handle, self.peak, self.stopped = handle, 0, threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        self.peak = max(self.peak, memory_info(self.handle).used)

    def _run(self) -> None:
        while not self.stopped.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def stop(self) -> tuple[int, int]:
        """Ends the sampling with a last sample; (peak used, total) bytes."""
        self.stopped.set()
        self.thread.join()
        self.sample()
        return self.peak, memory_info(self.handle).total


def used_memory_peak(device: torch.device) -> UsedMemoryPeak | None:
    """The sampler of this device's used memory, started; None where NVML cannot tell."""
    handle = device_handle(device)
    if handle is None:
        return None
    try:
        return UsedMemoryPeak(handle)
    except pynvml.NVMLError:  # a driver older than NVML's memory version 2 (R510)
        return None
