"""Checks before training, each failing within seconds with what is missing and what exists:
the data set has enough usable images for the workers, the cluster has the devices and CPUs the
config asks for, every GPU node's driver runs this torch on its GPUs, and every node sees the
data set and the run's storage."""

import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pynvml
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import Config
from pipeline.worker import nvml
from pipeline.worker.train_loop import cpu_name, nccl_version

CHECK_TIMEOUT_S = 120


class PreflightError(RuntimeError):
    pass


def check_data_sizes(splits: dict[str, tuple], workers: int) -> None:
    """Every training worker needs a usable training image an epoch, and the evaluation a val
    image. `splits`: split -> (its annotation file, its manifest, its manifest's statistics)."""
    world = max(1, workers)
    for split, (annotations, manifest, stats) in splits.items():
        needed = world if split == "train" else 1
        if manifest.num_rows < needed:
            raise PreflightError(f"{annotations}: {manifest.num_rows} usable {split} images of {stats.images} "
                                 f"(training images need a box that is not crowd or degenerate); {needed} needed "
                                 f"for {world} workers")


def _describe(nodes: list[dict]) -> str:
    return "; ".join(f"node {n['NodeManagerAddress']}: {n['Resources'].get('GPU', 0):g} GPUs, "
                     f"{n['Resources'].get('CPU', 0):g} CPUs" for n in nodes)


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def check_resources(config: Config) -> None:
    """Enough GPUs and reserved CPUs per node (for multi-node presets, on that many nodes), and a
    CPU left for Ray Data."""
    nodes = alive_nodes()
    workers, kind = max(1, config.num_workers), "GPU" if config.use_gpu else "CPU"
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    take = f"take {config.cpus_per_worker} CPU(s) each"
    if config.use_gpu:
        per_node = -(-workers // config.nodes)
        fitting = [n for n in nodes if n["Resources"].get("GPU", 0) >= per_node
                   and n["Resources"].get("CPU", 0) >= per_node * config.cpus_per_worker]
        if len(fitting) < config.nodes:
            raise PreflightError(f"{workers} GPU workers on {config.nodes} node(s) need {config.nodes} node(s) "
                                 f"with {per_node} GPUs each (the workers {take}); the cluster has {_describe(nodes)}")
    if cpus < workers * config.cpus_per_worker + 1:
        raise PreflightError(f"{workers} {kind} workers {take} and Ray Data needs one more; "
                             f"the cluster has {_describe(nodes)}")


@dataclass(frozen=True)
class GpuFacts:
    """What a task given GPUs by Ray finds on its node, as a training worker will."""
    driver: str | None  # the NVIDIA driver's version, None where NVML cannot be loaded
    driver_cuda: str | None  # the newest CUDA the driver runs ("12.2")
    nvml_error: str | None  # why NVML cannot be loaded
    torch: str  # torch.__version__
    torch_cuda: str | None  # the CUDA torch was built for (torch.version.cuda)
    cuda_available: bool
    devices: int  # CUDA devices torch sees
    given: int  # GPUs Ray gave the task
    visible: str | None  # CUDA_VISIBLE_DEVICES as Ray set it
    device_name: str | None = None  # torch.cuda.get_device_name() of the device given
    nccl: str | None = None  # the NCCL version torch carries (on another vendor's GPU, its library's)


# The oldest driver series of each CUDA major version (NVIDIA's CUDA release notes).
MIN_DRIVER = {12: "R525", 13: "R580"}


def major(version: str) -> int:
    return int(version.split(".")[0])


def gpu_problem(facts: GpuFacts) -> str | None:
    """What stops the training workers from using the node's GPUs, or None. A driver runs every
    CUDA runtime of its own major version or older (CUDA's minor version compatibility: 535's
    CUDA 12.2 runs torch built for 12.6), so only the major versions are compared. Without NVML
    (no NVIDIA driver library, or a GPU of another vendor that Ray counts as a GPU, MetaX's) the
    driver cannot be checked, and torch seeing the devices is enough."""
    wheel, driver = facts.torch_cuda, facts.driver_cuda
    if wheel and driver and major(driver) < major(wheel):
        return (f"NVIDIA driver {facts.driver} runs CUDA {driver} at most, torch {facts.torch} is built for CUDA "
                f"{wheel}: install the same torch built for CUDA {major(driver)}.x (PyTorch's cu{major(driver)}x "
                f"wheel index; see the README, \"GPU nodes: driver and wheels\") or an NVIDIA driver "
                f"{MIN_DRIVER.get(major(wheel), 'for CUDA ' + wheel)} or newer")
    given = f"{facts.given} GPU(s) (CUDA_VISIBLE_DEVICES={facts.visible})"
    if not facts.cuda_available:
        driver_said = (f"NVML cannot be loaded ({facts.nvml_error}), so no NVIDIA driver is usable here"
                       if facts.driver is None else f"NVIDIA driver {facts.driver}, CUDA {driver}")
        return (f"torch {facts.torch} (CUDA {wheel or 'none: a CPU-only build'}) sees no CUDA device though Ray "
                f"gave this task {given}; {driver_said}")
    if facts.devices != facts.given:
        return f"torch sees {facts.devices} CUDA device(s) where Ray gave this task {given}"
    return None


@ray.remote(num_cpus=0, num_gpus=1)
def gpu_facts() -> GpuFacts:
    """The facts of gpu_problem on the node it runs on, given one GPU as each training worker is.
    Runs only on a GPU node: `frcnn-bench acceptance` runs it for real (its runs call run(), whose
    preflight this is) and shows what it found in its "GPU nodes" check; the CPU tests run it on a
    node that advertises a GPU it does not have."""
    try:
        (driver, driver_cuda), error = nvml.driver_versions(), None
    except pynvml.NVMLError as failure:
        driver, driver_cuda, error = None, None, str(failure)
    available = torch.cuda.is_available()
    return GpuFacts(driver, driver_cuda, error, torch.__version__, torch.version.cuda, available,
                    torch.cuda.device_count(), len(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES"),
                    torch.cuda.get_device_name() if available else None,
                    nccl_version() if available else None)


def node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def pinned(node: dict) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)


def check_gpu_nodes() -> list[dict]:
    """Every GPU node runs this torch on its GPUs (see gpu_problem): Ray counts GPUs through the
    driver whatever its version, so a driver too old for torch's CUDA would otherwise fail every
    worker as it builds its model. Returns each node's facts, for result.json ("gpu_nodes")."""
    nodes = [n for n in alive_nodes() if n["Resources"].get("GPU", 0) > 0]
    refs = [gpu_facts.options(scheduling_strategy=pinned(n)).remote() for n in nodes]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        silent = [node_name(n) for n, ref in zip(nodes, refs) if ref in pending]
        raise PreflightError(f"node(s) {', '.join(silent)} did not answer the GPU check in {CHECK_TIMEOUT_S} s "
                             "(their GPUs held by other work?)")
    facts = dict(zip(map(node_name, nodes), ray.get(refs)))
    problems = [f"node {name}: {problem}" for name, found in facts.items() if (problem := gpu_problem(found))]
    if problems:
        raise PreflightError("; ".join(problems))
    return [{"node": name, **dataclasses.asdict(found)} for name, found in facts.items()]


@ray.remote(num_cpus=0)
def _software() -> dict:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip,
            "cpu": cpu_name()}


def node_facts(config: Config, gpu_nodes: list[dict]) -> list[dict]:
    """What will compute on each node, for the log and result.json ("node_facts"): its torch
    build (torch.__version__: "2.14.1+cu130", a vendor's "2.x+mc...") and the CUDA or HIP it was
    built for, its devices (a GPU node: the GPU's name as torch gives it, from the GPU check's
    `gpu_nodes`, and how many Ray counts; otherwise its CPU and Ray's CPUs), and the collective
    backend Ray Train gives the workers (nccl for GPU workers, which on another vendor's GPU is
    the name its own library runs under, with the NCCL version that torch reports; gloo for CPU
    workers). The workers record the backend they then had (workers.jsonl)."""
    nodes = alive_nodes()
    refs = [_software.options(scheduling_strategy=pinned(n)).remote() for n in nodes]
    try:
        answers = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise PreflightError(f"nodes did not answer the software check in {CHECK_TIMEOUT_S} s") from None
    gpus = {gpu["node"]: gpu for gpu in gpu_nodes}
    facts = []
    for node, found in zip(nodes, answers):
        gpu = gpus.get(node_name(node))
        facts.append({"node": node_name(node), **found,
                      "device": gpu["device_name"] if gpu else found["cpu"],
                      "devices": int(node["Resources"].get("GPU" if gpu else "CPU", 0)),
                      "backend": "nccl" if config.use_gpu else "gloo",
                      "backend_version": gpu["nccl"] if gpu else None})
    return facts


def describe_node(facts: dict) -> str:
    """One node's facts as the run's log shows them."""
    built = "".join(f" ({name} {facts[key]})" for name, key in (("CUDA", "torch_cuda"), ("HIP", "torch_hip"))
                    if facts[key])
    backend = facts["backend"] + (f" {facts['backend_version']}" if facts["backend_version"] else "")
    return (f"node {facts['node']}: torch {facts['torch']}{built}, {facts['devices']} x {facts['device']}, "
            f"collective backend {backend}")


@ray.remote(num_cpus=0)
def _missing_paths(paths: list[str], marker: str) -> list[str]:
    missing = [p for p in paths if not os.path.exists(p)]
    if not os.path.exists(marker):
        missing.append(f"{marker} (written by the driver, not visible here: storage not shared)")
    return missing


def check_nodes_see(paths: list[Path], storage: Path) -> None:
    """Every node must see the data set's paths and the run's storage directory (a marker the
    driver writes there must be readable on every node): Ray Data may decode on any node and
    Ray Train writes checkpoints from every worker."""
    nodes = alive_nodes()
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f".preflight-{uuid.uuid4().hex}"
    marker.touch()
    refs = {node_name(n): _missing_paths.options(scheduling_strategy=pinned(n)).remote(
        [str(p) for p in paths], str(marker)) for n in nodes}
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=CHECK_TIMEOUT_S)))
    except ray.exceptions.GetTimeoutError:
        raise PreflightError(f"nodes did not answer the data and storage check in {CHECK_TIMEOUT_S} s") from None
    finally:
        marker.unlink()
    problems = [f"node {node} lacks {', '.join(missing)}" for node, missing in answers.items() if missing]
    if problems:
        raise PreflightError("; ".join(problems))

