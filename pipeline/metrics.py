"""Every figure of the result row, each formula in one place, computed from raw timings only.

Inputs are columns (dict of equal-length lists), as the reporting actor gathers them and as
the run's raw logs store them, so the row can be recomputed from the logs:

steps  (one row per training step per worker): worker, epoch, step, images, data_wait_s,
       compute_s, loss, lr, start, end (unix times), image_pixels (of the resized images)
       and batch_pixels (of the padded tensor the model's transform made of them).
       data_wait_s: waiting for the next batch from Ray Data and making tensors of it.
       compute_s: device copy + forward + backward + optimizer step, ended by a device
       synchronisation on accelerators so that queued work is counted where it belongs.
epochs (one row per epoch per worker): worker, epoch, train_s, eval_s, eval_images (val
       images this worker inferred), map, ap50, ap75.
       Workers pass a barrier before and after each phase, so a phase's wall time is the
       same on all workers up to the barrier's skew; the slowest worker's figure counts.
       train_s: the epoch's training phase. eval_s: from the end of training to the end of
       the epoch (inference, gathering, COCOeval, the stop decision).
workers (one row per worker): worker, node (Ray's node id), node_ip, node_rank (Ray
       Train's, by IP), device, mem_peak_bytes, mem_total_bytes, mem_kind, env (the
       configured worker_env as the worker process had it).
"""

from collections import defaultdict

GIB = 1024**3


def images_trained(steps: dict) -> int:
    """Images actually processed in training steps, summed over all workers and epochs."""
    return int(sum(steps["images"]))


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
    per_worker = defaultdict(float)
    for worker, seconds in zip(steps["worker"], steps["compute_s"]):
        per_worker[worker] += seconds
    return max(per_worker.values())


def p_whole(steps: dict, epochs: dict) -> float:
    """images_trained / (training_time + evaluation_time): whole training, evaluation included."""
    return images_trained(steps) / (training_time(epochs) + evaluation_time(epochs))


def p_train(steps: dict, epochs: dict) -> float:
    """images_trained / training_time: training only, per-epoch evaluation excluded."""
    return images_trained(steps) / training_time(epochs)


def p_core(steps: dict) -> float:
    """images_trained / compute_time: compute only, data loading excluded.

    p_core >= p_train >= p_whole holds by construction: every step's compute lies inside its
    worker's training phase, and evaluation time is never negative."""
    return images_trained(steps) / compute_time(steps)


def data_wait_share(steps: dict) -> float:
    """Share of step time spent waiting for data: Σ data_wait_s / Σ (data_wait_s + compute_s)."""
    waiting = sum(steps["data_wait_s"])
    return waiting / (waiting + sum(steps["compute_s"]))


def padding_share(steps: dict) -> float:
    """Share of the batch tensors' pixels that are padding: 1 - Σ image_pixels / Σ batch_pixels."""
    return 1 - sum(steps["image_pixels"]) / sum(steps["batch_pixels"])


def init_time(steps: dict, process_start: float) -> float | None:
    """Seconds from the driver process's start to the first training step it ran, on any worker
    (a resumed run's earlier steps belong to earlier processes); None if it ran none."""
    starts = [start for start in steps["start"] if start >= process_start]
    return min(starts) - process_start if starts else None


def loss_per_epoch(steps: dict) -> list[float]:
    """Mean training loss of each epoch over all workers' steps (each worker's loss is local)."""
    losses = defaultdict(list)
    for epoch, loss in zip(steps["epoch"], steps["loss"]):
        losses[epoch].append(loss)
    return [sum(values) / len(values) for _, values in sorted(losses.items())]


def e2e_time(process_start: float, results_written: float) -> float:
    """Seconds from the driver process's start to its results being written (unix times)."""
    return results_written - process_start


def memory(workers: dict) -> dict:
    """Peak device memory over workers, as the row's "used/total GiB" with its kind: on CUDA the
    PyTorch allocator's peak reservation of the device; on CPU the worker process's peak RSS
    against the node's physical memory."""
    peak = max(range(len(workers["worker"])), key=lambda i: workers["mem_peak_bytes"][i])
    used, total = workers["mem_peak_bytes"][peak] / GIB, workers["mem_total_bytes"][peak] / GIB
    kind = workers["mem_kind"][peak]
    label = f"{used:.1f}/{total:.1f}" + ("" if kind == "cuda" else f" ({kind})")
    return {"mem": label, "mem_used_gib": used, "mem_total_gib": total, "mem_kind": kind}


def per_worker(steps: dict, epochs: dict, workers: dict) -> list[dict]:
    """One row per worker, in rank order, so that stragglers show."""
    rows = []
    for i, worker in sorted(enumerate(workers["worker"]), key=lambda item: item[1]):
        mine = [j for j, w in enumerate(steps["worker"]) if w == worker]
        images = sum(steps["images"][j] for j in mine)
        data_wait = sum(steps["data_wait_s"][j] for j in mine)
        compute = sum(steps["compute_s"][j] for j in mine)
        train = sum(s for w, s in zip(epochs["worker"], epochs["train_s"]) if w == worker)
        rows.append({
            "worker": worker, "node": workers["node"][i], "node_ip": workers["node_ip"][i],
            "node_rank": workers["node_rank"][i], "device": workers["device"][i],
            "mem_peak_gib": workers["mem_peak_bytes"][i] / GIB, "steps": len(mine), "images": images,
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


def figures(steps: dict, epochs: dict, workers: dict) -> dict:
    """All throughput and memory figures of a run."""
    workers_table = per_worker(steps, epochs, workers)
    return {
        "images_trained": images_trained(steps),
        "training_time_s": training_time(epochs),
        "evaluation_time_s": evaluation_time(epochs),
        "compute_time_s": compute_time(steps),
        "p_whole": p_whole(steps, epochs),
        "p_train": p_train(steps, epochs),
        "p_core": p_core(steps),
        "data_wait_share": data_wait_share(steps),
        "padding_share": padding_share(steps),
        "loss_per_epoch": loss_per_epoch(steps),
        **memory(workers),
        "per_worker": workers_table,
        "per_node": per_node(workers_table),
    }
