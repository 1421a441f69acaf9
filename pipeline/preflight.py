"""Checks before training, each failing within seconds with what is missing and what exists:
the data set has enough usable images for the workers, the cluster has the devices and CPUs the
config asks for, and every node sees the data set and the run's storage."""

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import Config

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
    refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _missing_paths.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
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

