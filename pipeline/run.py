"""The driver: data set -> manifests -> Ray Data streams -> TorchTrainer -> result files."""

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray._private import ray_constants
from ray._private import utils as ray_utils
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import Config, to_dict
from pipeline.data import stream, synthetic
from pipeline.data.manifest import build_manifest, split_paths
from pipeline.preflight import (check_data_sizes, check_gpu_nodes, check_nodes_see, check_resources, describe_node,
                                node_facts)
from pipeline.progress import Progress, quiet_ray_data, quiet_ray_init_options
from pipeline.records import metrics, results
from pipeline.records.collector import Collector
from pipeline.records.tables import load_steps, write_tables
from pipeline.worker import flops
from pipeline.worker.train_loop import LoopConfig, train_loop_per_worker
from pipeline.worker.weights import checked_weights_file, download_url, fetch


class TrainingFailed(RuntimeError):
    """Training stopped with an error in the workers or in Ray Train's controller."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost of the exceptions Ray wraps around a worker's or a Ray Data task's error."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None:
            break
        error = inner
    return error


def failure_summary(error: TrainingFailedError) -> str:
    """One line per distinct failure: the ranks, the exception's type and its message's last line,
    without Ray's tracebacks."""
    failures = getattr(error, "worker_failures", None) or {"controller": getattr(error, "controller_failure", error)}
    lines = {}
    for rank, failure in failures.items():
        cause = root_cause(failure)
        text = str(cause).strip().splitlines()
        lines.setdefault(f"{type(cause).__name__}: {text[-1] if text else ''}", []).append(str(rank))
    return "; ".join(f"worker {', '.join(ranks)}: {line}" for line, ranks in lines.items())


# A worker group that cannot be placed (a lost node not back yet) is tried this many times, each
# try waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default): about 5 minutes for a lost
# node to come back before the run ends (Ray Train's own default is to try forever).
WORKER_GROUP_START_TRIES = 5


def lost_nodes() -> list[str]:
    """The addresses of the nodes that left the cluster and have not joined it again."""
    nodes = ray.nodes()
    alive = {node["NodeManagerAddress"] for node in nodes if node["Alive"]}
    return sorted({node["NodeManagerAddress"] for node in nodes if not node["Alive"]} - alive)


def process_start_time() -> float:
    """Unix time at which this process started (Linux /proc), so e2e_time counts start-up too."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """A run prepared: where its results go and what it trains and evaluates on."""
    config: Config
    run_dir: Path
    root: Path  # the data set
    paths: dict[str, tuple]  # split -> (its annotation file, its image folder)
    weights: list[Path]  # the backbone's local file, which every node must see and every worker loads ([] for "none")
    manifests: dict[str, tuple]  # split -> (manifest, its statistics)
    steps_per_epoch: int


def prepare(config: Config) -> Plan:
    """The run's name and directory, its local backbone weights checked (a URL's are fetched later,
    `fetch_weights`), the data set (generated if synthetic) and its manifests."""
    run_name = config.run_name or f"{config.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    source = config.backbone_weights
    weights = [] if source == "none" or download_url(source) else [checked_weights_file(source).resolve()]
    root = Path(config.data_root)
    if config.synthetic_train_images:
        synthetic.generate(root, synthetic.SyntheticSpec(
            train_images=config.synthetic_train_images, val_images=config.synthetic_val_images,
            image_size=config.synthetic_image_size, seed=config.seed))
    paths = {split: split_paths(root, split) for split in ("train", "val")}
    manifests = {split: build_manifest(*paths[split], drop_empty=split == "train") for split in paths}
    # Ray's equal split gives each worker floor(rows / workers) rows an epoch.
    steps_per_epoch = math.ceil(manifests["train"][0].num_rows // max(1, config.num_workers) / config.batch_size)
    return Plan(config, Path(config.output_dir).resolve() / run_name, root, paths, weights, manifests, steps_per_epoch)


def fetch_weights(plan: Plan) -> Plan:
    """The plan with its backbone's URL (torchvision's for "imagenet") fetched once, by the driver,
    into the cache every node sees (<output_dir>/.weights or weights_cache); as it is for a local
    file. Done after the cluster's checks, so that a cluster that cannot run the preset is told
    so before a download."""
    url = download_url(plan.config.backbone_weights)
    if url is None:
        return plan
    cache = Path(plan.config.weights_cache or Path(plan.config.output_dir) / ".weights")
    return dataclasses.replace(plan, weights=[fetch(url, cache).resolve()])


def connect(config: Config, verbose: bool) -> str:
    """Connects to Ray as configured; says which Ray."""
    if ray.is_initialized():
        return "already connected"
    options = quiet_ray_init_options(verbose)
    if config.ray_address or os.environ.get("RAY_ADDRESS"):
        address = config.ray_address or os.environ["RAY_ADDRESS"]
        ray.init(address=config.ray_address or None, **options)
        return f"joined the cluster at {address}"
    # A fresh local Ray with the CPUs this process may use (Ray's count heeds a container's cgroup
    # limit, where os.cpu_count() gives the host's) and at least two beside the Train workers'
    # for Ray Data's decoding, or the stream waits forever for a CPU on a small machine.
    # No dashboard: its ten processes double the instance's start-up and take CPU from the run
    # (to watch a run in Ray's dashboard, start a head with `ray start --head` and join it).
    num_cpus = max(int(ray_utils.get_num_cpus()), config.num_workers * config.cpus_per_worker + 2)
    # Nor Ray Train's preemption watcher (an actor polling for nodes being drained, as spot nodes
    # are): one local node is not preempted. Read by the trainer's controller when it starts.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with loopback_only():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    return f"started a local instance with {num_cpus} CPUs, listening on 127.0.0.1 only, without a dashboard"


@contextlib.contextmanager
def loopback_only():
    """Ray binds its servers (GCS, raylet, workers, agents) to the node's IP, which on Linux is the
    machine's routable address even when given 127.0.0.1, so a debugging instance would take jobs
    and tasks from the network. Its single-machine mode (the default on macOS and Windows, switched
    by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, which Ray reads once at import) makes the node 127.0.0.1;
    the processes it starts are told that address and bind to it."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def config_label(workers: dict) -> str:
    """FlagPerf's "<nodes>x<devices per node>" from where the workers actually ran (node ids)."""
    per_node = {}
    for node in workers["node"]:
        per_node[node] = per_node.get(node, 0) + 1
    return f"{len(per_node)}x{max(per_node.values())}"


def run(config: Config, verbose: bool = False, progress=None) -> dict:
    """Trains as configured and writes the results directory; returns result.json's content.
    Unless `verbose`, Ray's own output stays in its logs; with a `progress` stream (stdout) the
    run's progress is shown on it (see pipeline.progress)."""
    process_start = process_start_time()
    marks = {"imports": time.time()}  # the start-up's stages, when each ended (see metrics.startup)
    plan = prepare(config)
    check_data_sizes({split: (plan.paths[split][0], *plan.manifests[split]) for split in plan.paths},
                     config.num_workers)
    results.claim_run_dir(plan.run_dir, {**to_dict(config), "run_name": plan.run_dir.name})
    marks["data"] = time.time()
    connection = connect(config, verbose)
    marks["ray"] = time.time()
    if progress is not None:
        print(f"Ray: {connection}; results: {plan.run_dir}", file=progress, flush=True)
    quiet_ray_data(verbose)
    check_resources(config)
    gpu_nodes = check_gpu_nodes() if config.use_gpu else []
    nodes = node_facts(config, gpu_nodes)
    if progress is not None:
        print("\n".join(map(describe_node, nodes)), file=progress, flush=True)
    plan = fetch_weights(plan)
    annotations, images = zip(*plan.paths.values())
    check_nodes_see([p.resolve() for p in (*annotations, *images, *plan.weights)], plan.run_dir.parent)
    # On the driver's node: the run's bookkeeping must not go down with a lost worker node.
    collector = Collector.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote(str(plan.run_dir))
    marks["checks"] = time.time()
    fitted = train(plan, collector, progress)
    if progress is not None and fitted.checkpoint is not None:
        print(f"last checkpoint: {fitted.checkpoint.path}", file=progress, flush=True)
    records, worker_marks = ray.get([collector.records.remote(), collector.startup.remote()])
    ray.kill(collector)
    data_facts = {"root": str(plan.root.resolve()),
                  **{split: stats.__dict__ for split, (_, stats) in plan.manifests.items()}}
    return write_results(config, plan.run_dir, records, {"process_start": process_start, "gpu_nodes": gpu_nodes,
                                                         "node_facts": nodes, "startup": {**marks, **worker_marks},
                                                         "steps_per_epoch": plan.steps_per_epoch, "data": data_facts})


def scaling_config(config: Config) -> ScalingConfig:
    """The workers, each with its device and its reserved CPUs (without a CPU figure a GPU worker
    reserves only its GPU, and Ray Data would decode on every core beside the training processes)."""
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    return ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                         resources_per_worker=resources, placement_strategy=config.placement_strategy)


def worker_config(plan: Plan, collector) -> LoopConfig:
    """What every worker is given: the config as the user gave it, and the backbone's local file
    (the workers never download)."""
    return LoopConfig(plan.config, collector, plan.steps_per_epoch, str(plan.paths["val"][0].resolve()),
                      backbone_file=str(plan.weights[0]) if plan.weights else "none")


def train(plan: Plan, collector, progress) -> ray.train.Result:
    """The TorchTrainer over the Ray Data streams, fitted; its result (the last checkpoint)."""
    config, val_manifest = plan.config, plan.manifests["val"][0]
    loop = worker_config(plan, collector)
    val_options = {"decode_batch_size": config.decode_batch_size, "collector": collector,
                   "max_bad_images": config.max_bad_images}
    sharding = stream.ShardingConfig(val_manifest, max(1, config.num_workers), **val_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=scaling_config(config),
        run_config=RunConfig(name=plan.run_dir.name, storage_path=str(plan.run_dir.parent),
                             failure_config=FailureConfig(max_failures=config.max_failures,
                                                          controller_failure_limit=WORKER_GROUP_START_TRIES),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": config.worker_env}),
        datasets={"train": stream.train_dataset(plan.manifests["train"][0], config.seed, config.decode_batch_size,
                                              config.aspect_group_factor, collector, config.max_bad_images),
                  "val": sharding.val_shares[0]},  # names the stream: each worker gets its own share
        dataset_config=sharding,
    )
    try:
        with (contextlib.nullcontext() if progress is None else
              Progress(collector, plan.steps_per_epoch, config.max_epochs, val_manifest.num_rows, progress)):
            fitted = trainer.fit()
    except TrainingFailedError as error:
        summary = failure_summary(error)
        unplaced = isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError)
        if unplaced and (lost := lost_nodes()):
            summary += f"; lost, not back after {WORKER_GROUP_START_TRIES} tries: node {', '.join(lost)}"
        raise TrainingFailed(summary) from error
    if fatal := ray.get(collector.fatal_error.remote()):  # ended early: the restarts did not train
        raise TrainingFailed(fatal)
    return fitted


def write_results(config: Config, run_dir: Path, records: dict, facts: dict) -> dict:
    """The figures from the step log and the tables, result.json, row.md, the tables and the
    plots into the run directory; returns result.json's content. `facts`: process_start, startup
    (the driver's and the workers' marks: metrics.startup), steps_per_epoch, data, gpu_nodes
    (what the GPU check found) and node_facts (preflight.node_facts), as result.json shows them."""
    steps = load_steps(run_dir)
    figures = metrics.figures(steps, records["epochs"], records["workers"], config.target_map)
    epochs = records["epochs"]
    rank0 = [i for i, worker in enumerate(epochs["worker"]) if worker == 0]
    final = rank0[-1]
    precision = flops.compute_precision(config.precision, config.tf32)
    peak, peak_source = flops.peak(records["workers"]["device"], precision, config.peak_tflops)
    achieved = figures["achieved_tflops"]
    result = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "config_label": config_label(records["workers"]),
        "map": epochs["map"][final], "ap50": epochs["ap50"][final], "ap75": epochs["ap75"][final],
        "map_per_epoch": [epochs["map"][i] for i in rank0],
        "epochs": len(rank0),
        "converged": epochs["map"][final] >= config.target_map,
        **figures,
        "process_start": facts["process_start"],
        "init_time": metrics.init_time(steps, facts["process_start"]),
        "startup": metrics.startup(facts["startup"], steps, facts["process_start"]),
        "steps_per_epoch": facts["steps_per_epoch"],
        # Work lost to failures is not in the figures above (see pipeline/records/collector.py).
        "attempts": len(records["attempts"]["attempt"]),
        "time_lost_s": sum(records["attempts"]["time_lost_s"]),
        "lost_images": sum(records["attempts"]["lost_images"]),
        "bad_images": {split: [f"{path}: {reason}" for s, path, reason in zip(
            records["bad_images"]["split"], records["bad_images"]["path"], records["bad_images"]["reason"]) if s == split]
            for split in ("train", "val")},
        "data": facts["data"],
        "workers": len(records["workers"]["worker"]),
        "nodes": len(set(records["workers"]["node"])),
        "devices": sorted(set(records["workers"]["device"])),
        "gpu_nodes": facts["gpu_nodes"],
        "node_facts": facts["node_facts"],
        # The precision of the tensor math: what the peak is taken at, and the row shows.
        "compute_precision": precision,
        "peak_tflops": peak, "peak_source": peak_source,
        "utilisation": achieved / peak if peak and achieved is not None else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": importlib.metadata.version("torchvision"), "ray": ray.__version__},
        "config": to_dict(config),
    }
    write_tables(run_dir, records)
    from pipeline.records import plots  # matplotlib: imported once the run is done, not before its first step

    result["plots"] = [str(path) for path in plots.write_run_plots(run_dir, steps, epochs)]
    result["e2e_time"] = metrics.e2e_time(facts["process_start"], time.time())
    results.write_result(run_dir, result)
    return result
