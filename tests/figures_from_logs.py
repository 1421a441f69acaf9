"""Every figure of a run recomputed from its raw logs with plain pyarrow and json, from the
definitions in the README's figures table, without pipeline.records.metrics: a test compares these with
result.json, so a wrong formula there shows as a difference here."""

import json
from pathlib import Path

import pyarrow.parquet as pq

GIB = 1024**3


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def figures_from_logs(run_dir: Path, target_map: float, process_start: float) -> dict:
    steps = pq.read_table(run_dir / "steps.parquet").to_pylist()
    epochs = _rows(run_dir / "epochs.jsonl")
    workers = _rows(run_dir / "workers.jsonl")
    ranks = sorted({row["worker"] for row in epochs})
    numbers = sorted({row["epoch"] for row in epochs})

    images = sum(row["images"] for row in steps)
    whole = max(sum(row["wall_s"] for row in epochs if row["worker"] == rank) for rank in ranks)
    training = sum(max(row["train_s"] for row in epochs if row["epoch"] == n) for n in numbers)
    evaluation = sum(max(row["eval_s"] for row in epochs if row["epoch"] == n) for n in numbers)
    compute = max(sum(row["compute_s"] for row in steps if row["worker"] == rank) for rank in ranks)
    waiting = sum(row["data_wait_s"] for row in steps)

    reached = [n for n in numbers if any(row["map"] >= target_map for row in epochs if row["epoch"] == n)]
    to_target = (max(row["end"] - min(step["start"] for step in steps if step["worker"] == row["worker"])
                     for row in epochs if row["epoch"] == reached[0]) if reached else None)
    rank0 = sorted((row for row in steps if row["worker"] == 0), key=lambda row: (row["epoch"], row["step"]))
    energy = [row["energy_j"] for row in epochs]
    peak = max(workers, key=lambda row: row["mem_peak_bytes"])
    used, total = peak["mem_peak_bytes"] / GIB, peak["mem_total_bytes"] / GIB
    reserved = [row["mem_torch_reserved_bytes"] for row in workers]
    own = [row["start"] for row in steps if row["start"] >= process_start]
    # FLOPs: each worker's first batch measured, at the rates of all of them (pipeline/worker/flops.py).
    box = sum(row["box_flops"] for row in workers)
    per_pixel = (sum(row["flops"] for row in workers) - box) / sum(row["flops_batch_pixels"] for row in workers)
    flops = per_pixel * sum(row["batch_pixels"] for row in steps) + box / sum(row["flops_images"] for row in workers) * images
    return {
        "images_trained": images,
        "whole_time_s": whole,
        "training_time_s": training,
        "evaluation_time_s": evaluation,
        "compute_time_s": compute,
        "p_whole": images / whole,
        "p_train": images / training,
        "p_core": images / compute,
        "data_wait_share": waiting / (waiting + sum(row["compute_s"] for row in steps)),
        "padding_share": 1 - sum(row["image_pixels"] for row in steps) / sum(row["batch_pixels"] for row in steps),
        "loss_per_epoch": [sum(r["loss"] for r in steps if r["epoch"] == n) / sum(r["epoch"] == n for r in steps)
                           for n in numbers],
        "time_to_target_s": to_target,
        "loss_scale_first": rank0[0]["loss_scale"],
        "loss_scale_last": rank0[-1]["loss_scale"],
        "skipped_steps": sum(row["skipped"] for row in rank0),
        "joules_per_image": None if None in energy else sum(energy) / images,
        "mem": f"{used:.1f}/{total:.1f}" + ("" if peak["mem_kind"] == "nvml used" else f" ({peak['mem_kind']})"),
        "mem_torch_reserved_gib": None if None in reserved else max(reserved) / GIB,
        "init_time": min(own) - process_start if own else None,
        "flops_per_image": flops / images,
        "achieved_tflops": flops / compute / len(workers) / 1e12,
        "map": [row["map"] for row in epochs if row["worker"] == 0][-1],
    }


def assert_figures_match(run_dir: Path) -> dict:
    """result.json's figures equal the recomputed ones (floats to 1e-9 relative: sums may be
    added up in another order). Returns result.json."""
    saved = json.loads((run_dir / "result.json").read_text())
    recomputed = figures_from_logs(run_dir, saved["config"]["target_map"], saved["process_start"])
    for name, value in recomputed.items():
        if isinstance(value, float):
            assert abs(saved[name] - value) <= 1e-9 * abs(value), (name, saved[name], value)
        elif isinstance(value, list):
            assert len(saved[name]) == len(value) and all(
                abs(a - b) <= 1e-9 * abs(b) for a, b in zip(saved[name], value)), (name, saved[name], value)
        else:
            assert saved[name] == value, (name, saved[name], value)
    return saved
