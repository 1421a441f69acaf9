"""Every figure of the result row, each formula in one place, computed from raw timings only.

Inputs are the tables of pipeline.records.tables (where each column is defined) as columns: dicts of
equal-length lists or numpy arrays, as the collector gathers them and as the run's records store
them, so the row can be recomputed from the records; the step rows (1.5 million for 26 epochs of
COCO on 16 workers) are summed with numpy.
"""

from collections import defaultdict

import numpy as np

GIB = 1024**3


def sum_by(keys, values) -> dict:
    """Σ values per distinct key, keys in ascending order (numpy columns or lists)."""
    distinct, index = np.unique(np.asarray(keys), return_inverse=True)
    totals = np.bincount(index, weights=np.asarray(values, dtype=np.float64), minlength=len(distinct))
    return dict(zip(distinct.tolist(), totals.tolist()))


def images_trained(steps: dict) -> int:
    """Images actually processed in training steps, summed over all workers and epochs."""
    return int(np.sum(steps["images"]))


def _per_epoch_max(epochs: dict, column: str) -> float:
    slowest = defaultdict(float)
    for epoch, value in zip(epochs["epoch"], epochs[column]):
        slowest[epoch] = max(slowest[epoch], value)
    return sum(slowest.values())


def training_time(epochs: dict) -> float:
    """Sum over epochs of the slowest worker's training-phase wall time (s)."""
    return _per_epoch_max(epochs, "train_s")


def evaluation_time(epochs: dict) -> float:
    """Sum over epochs of the slowest worker's evaluation-phase wall time (s)."""
    return _per_epoch_max(epochs, "eval_s")


def compute_time(steps: dict) -> float:
    """The slowest worker's total compute time (s): the sum of its steps' compute_s."""
    return max(sum_by(steps["worker"], steps["compute_s"]).values())


def epochs_time_per_worker(epochs: dict) -> dict[int, float]:
    """Each worker's Σ over its epochs of wall_s (end - start on its monotonic clock), by worker."""
    per_worker = defaultdict(float)
    for worker, wall_s in zip(epochs["worker"], epochs["wall_s"]):
        per_worker[worker] += wall_s
    return dict(per_worker)


def whole_time(epochs: dict) -> float:
    """The slowest worker's Σ over epochs of wall_s (end - start): without restarts, the wall time from
    the first epoch's start to the last epoch's end on that worker, everything in between
    included (training, evaluation, checkpoints, reports, barriers). With restarts, the epochs
    kept from each attempt; the time lost between attempts is in time_lost_s, not here."""
    return max(epochs_time_per_worker(epochs).values())


def p_whole(steps: dict, epochs: dict) -> float:
    """images_trained / whole_time: FlagPerf's throughput over the whole training time."""
    return images_trained(steps) / whole_time(epochs)


def p_train(steps: dict, epochs: dict) -> float:
    """images_trained / training_time: training only, per-epoch evaluation excluded."""
    return images_trained(steps) / training_time(epochs)


def p_core(steps: dict) -> float:
    """images_trained / compute_time: compute only, data loading excluded.

    p_core >= p_train >= p_whole: every step's compute lies inside its worker's training phase,
    and every worker's epochs hold their training phases, which barriers align across workers
    (to within the barrier's skew, microseconds to milliseconds against phases of seconds)."""
    return images_trained(steps) / compute_time(steps)


def time_to_target(steps: dict, epochs: dict, target_map: float) -> float | None:
    """Seconds from the first training step's start to the end of the first epoch whose mAP
    reached target_map (MLPerf's time to train), the slowest worker's, each worker's on its own
    clock (its first step's start to its end of that epoch), so that no two machines' clocks
    meet in one difference; None when no epoch reached it. Wall time: a restart's lost time is
    in it."""
    reached = sorted(e for e, m in zip(epochs["epoch"], epochs["map"]) if m >= target_map)
    if not reached:
        return None
    first_start = {worker: float(np.min(np.asarray(steps["start"])[np.asarray(steps["worker"]) == worker]))
                   for worker in set(np.asarray(steps["worker"]).tolist())}
    return max(end - first_start[worker] for worker, epoch, end in zip(epochs["worker"], epochs["epoch"], epochs["end"])
               if epoch == reached[0])


def loss_scaling(steps: dict) -> dict:
    """The loss scale of the first and the last step (worker 0, after the step's update; 1.0
    without loss scaling) and the steps whose optimizer step was skipped for inf/nan gradients
    (worker 0's count: DDP's gradients, so its skips, are the same on every worker)."""
    mine = np.flatnonzero(np.asarray(steps["worker"]) == 0)
    order = mine[np.lexsort((np.asarray(steps["step"])[mine], np.asarray(steps["epoch"])[mine]))]
    scale = np.asarray(steps["loss_scale"], dtype=np.float64)
    return {"loss_scale_first": float(scale[order[0]]), "loss_scale_last": float(scale[order[-1]]),
            "skipped_steps": int(np.sum(np.asarray(steps["skipped"])[order]))}


def joules_per_image(steps: dict, epochs: dict) -> float | None:
    """Σ over workers and epochs of the devices' energy over the training phases (NVML's counter)
    / images_trained; None unless every worker had a counter in every epoch."""
    if any(joules is None for joules in epochs["energy_j"]):
        return None
    return sum(epochs["energy_j"]) / images_trained(steps)


def data_wait_share(steps: dict) -> float:
    """Share of step time spent waiting for data: Σ data_wait_s / Σ (data_wait_s + compute_s)."""
    waiting = float(np.sum(steps["data_wait_s"]))
    return waiting / (waiting + float(np.sum(steps["compute_s"])))


def padding_share(steps: dict) -> float:
    """Share of the batch tensors' pixels that are padding: 1 - Σ image_pixels / Σ batch_pixels."""
    return 1 - float(np.sum(steps["image_pixels"])) / float(np.sum(steps["batch_pixels"]))


def init_time(steps: dict, process_start: float) -> float | None:
    """Seconds from the driver process's start to the first training step it ran, on any worker
    (a resumed run's earlier steps belong to earlier processes); None if it ran none."""
    starts = np.asarray(steps["start"], dtype=np.float64)
    starts = starts[starts >= process_start]
    return float(starts.min()) - process_start if len(starts) else None


# The start-up's stages in order, each named by what has happened when it ends (see startup).
STARTUP_STAGES = ("imports", "data", "ray", "checks", "workers", "model", "first_step", "first_batch")


def startup(marks: dict, steps: dict, process_start: float) -> dict | None:
    """Where the time before training went: each stage's end, in seconds from the driver process's
    start. imports: the driver's imports done (run() called); data: the data set and its manifests
    ready, the run directory claimed; ray: Ray started or joined; checks: the cluster's checks and
    the collector done; workers: the last worker's train function called (Ray Train's worker group
    up, its process group formed, the data shards given); model: the last worker's model built;
    first_step: the first step begun, as init_time; first_batch: the last worker's first batch in
    hand (the end of step 0's data wait, barrier included). A resumed run's are its own process's,
    to its first step there; None if this process ran no step."""
    first = init_time(steps, process_start)
    if first is None:
        return None
    starts = np.asarray(steps["start"], dtype=np.float64)
    mine = (starts >= process_start) & (np.asarray(steps["step"]) == 0)
    mine &= np.asarray(steps["epoch"]) == np.asarray(steps["epoch"])[mine].min()
    in_hand = starts[mine] + np.asarray(steps["data_wait_s"], dtype=np.float64)[mine]
    ends = {**{name: marks[name] - process_start for name in STARTUP_STAGES[:6]},
            "first_step": first, "first_batch": float(in_hand.max()) - process_start}
    return {name: ends[name] for name in STARTUP_STAGES}


def loss_per_epoch(steps: dict) -> list[float]:
    """Mean training loss of each epoch over all workers' steps (each worker's loss is local)."""
    totals, counts = sum_by(steps["epoch"], steps["loss"]), sum_by(steps["epoch"], np.ones(len(steps["epoch"])))
    return [totals[epoch] / counts[epoch] for epoch in totals]


def e2e_time(process_start: float, results_written: float) -> float:
    """Seconds from the driver process's start to its results being written (unix times)."""
    return results_written - process_start


def memory(workers: dict) -> dict:
    """Peak memory over workers, as the row's "used/total" GiB with its kind (see the workers
    table of pipeline.records.tables): on a GPU with NVML the device's used memory over its total as
    NVML counts them, FlagPerf's figure, unlabelled; any other kind labelled with it ("torch
    reserved": PyTorch's peak reservation, a GPU without NVML; "cpu rss": the worker process's
    peak RSS over the node's RAM). Beside it PyTorch's peak reservation over workers (None on CPU
    workers), which is less than NVML's figure by the CUDA context and NCCL's buffers."""
    peak = max(range(len(workers["worker"])), key=lambda i: workers["mem_peak_bytes"][i])
    used, total = workers["mem_peak_bytes"][peak] / GIB, workers["mem_total_bytes"][peak] / GIB
    kind = workers["mem_kind"][peak]
    label = f"{used:.1f}/{total:.1f}" + ("" if kind == "nvml used" else f" ({kind})")
    reserved = workers["mem_torch_reserved_bytes"]
    return {"mem": label, "mem_used_gib": used, "mem_total_gib": total, "mem_kind": kind,
            "mem_torch_reserved_gib": None if None in reserved else max(reserved) / GIB}


def per_worker(steps: dict, epochs: dict, workers: dict) -> list[dict]:
    """One row per worker, in rank order, so that stragglers show."""
    rows = []
    count, totals = sum_by(steps["worker"], np.ones(len(steps["worker"]))), {
        column: sum_by(steps["worker"], steps[column]) for column in ("images", "data_wait_s", "compute_s")}
    for i, worker in sorted(enumerate(workers["worker"]), key=lambda item: item[1]):
        images = int(totals["images"].get(worker, 0))
        data_wait = totals["data_wait_s"].get(worker, 0.0)
        compute = totals["compute_s"].get(worker, 0.0)
        train = sum(s for w, s in zip(epochs["worker"], epochs["train_s"]) if w == worker)
        rows.append({
            "worker": worker, "node": workers["node"][i], "node_ip": workers["node_ip"][i],
            "node_rank": workers["node_rank"][i], "device": workers["device"][i], "torch": workers["torch"][i],
            "tf32": workers["tf32"][i], "backend": workers["backend"][i],
            "mem_peak_gib": workers["mem_peak_bytes"][i] / GIB, "steps": int(count.get(worker, 0)), "images": images,
            "data_wait_s": data_wait, "compute_s": compute, "train_s": train,
            "images_per_s": images / train if train else 0.0,
            "core_images_per_s": images / compute if compute else 0.0,
            "data_wait_share": data_wait / train if train else 0.0,
        })
    return rows


def per_node(worker_rows: list[dict]) -> list[dict]:
    """The per-worker rows summed by node, in node-rank order."""
    nodes = {}
    for row in sorted(worker_rows, key=lambda r: (r["node_rank"], r["worker"])):
        node = nodes.setdefault(row["node"], {"node": row["node"], "node_ip": row["node_ip"],
                                              "node_rank": row["node_rank"], "workers": 0, "images": 0,
                                              "data_wait_s": 0.0, "compute_s": 0.0})
        node["workers"] += 1
        for key in ("images", "data_wait_s", "compute_s"):
            node[key] += row[key]
    return list(nodes.values())


def flop_rates(workers: dict) -> tuple[float, float] | None:
    """(FLOPs per padded pixel, FLOPs per image of the box head) from the workers' measured
    batches (pipeline.worker.flops); None if no worker measured one."""
    measured = [i for i, count in enumerate(workers["flops"]) if count is not None]
    if not measured:
        return None
    box = sum(workers["box_flops"][i] for i in measured)
    pixels = sum(workers["flops_batch_pixels"][i] for i in measured)
    return (sum(workers["flops"][i] for i in measured) - box) / pixels, box / sum(workers["flops_images"][i] for i in measured)


def flops_figures(steps: dict, workers: dict) -> dict:
    """flops_trained (every step's padded pixels and images at the measured rates), flops_per_image
    and achieved_tflops (per device, over p_core's compute time); None each without a measurement."""
    rates = flop_rates(workers)
    if rates is None:
        return dict.fromkeys(("flops_per_pixel", "flops_per_box_image", "flops_trained", "flops_per_image",
                              "achieved_tflops"))
    images = images_trained(steps)
    trained = rates[0] * float(np.sum(steps["batch_pixels"])) + rates[1] * images
    return {"flops_per_pixel": rates[0], "flops_per_box_image": rates[1], "flops_trained": trained,
            "flops_per_image": trained / images,
            "achieved_tflops": trained / compute_time(steps) / len(workers["worker"]) / 1e12}


def figures(steps: dict, epochs: dict, workers: dict, target_map: float) -> dict:
    """All throughput, time, energy and memory figures of a run."""
    workers_table = per_worker(steps, epochs, workers)
    return {
        "images_trained": images_trained(steps),
        "whole_time_s": whole_time(epochs),
        "training_time_s": training_time(epochs),
        "evaluation_time_s": evaluation_time(epochs),
        "compute_time_s": compute_time(steps),
        "time_to_target_s": time_to_target(steps, epochs, target_map),
        "p_whole": p_whole(steps, epochs),
        "p_train": p_train(steps, epochs),
        "p_core": p_core(steps),
        "data_wait_share": data_wait_share(steps),
        "padding_share": padding_share(steps),
        "loss_per_epoch": loss_per_epoch(steps),
        **loss_scaling(steps),
        "joules_per_image": joules_per_image(steps, epochs),
        **memory(workers),
        **flops_figures(steps, workers),
        "per_worker": workers_table,
        "per_node": per_node(workers_table),
    }
