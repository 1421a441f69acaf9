"""A run's results directory: result.json, the FlagPerf row (row.md) and the raw logs from which
every figure can be recomputed: steps.parquet (one row per step per worker), epochs.jsonl (one
row per epoch per worker), workers.jsonl (one row per worker), attempts.jsonl (one row per start
of the worker group) and bad_images.jsonl (images left out). Checkpoints hold the same files."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.reporting import TABLES

ROW_COLUMNS = ("config", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "map", "mem")


def number(value: float) -> str:
    """Throughput with three significant digits, so CPU runs (0.8 images/s) keep theirs too."""
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}"


def flagperf_row(result: dict) -> dict:
    return {
        "config": result["config_label"],
        "precision": result["config"]["precision"],
        "fix_hp": result["config"]["fix_hp"],
        "e2e_time": f"{result['e2e_time']:.0f}",
        "p_whole": number(result["p_whole"]),
        "p_train": number(result["p_train"]),
        "p_core": number(result["p_core"]),
        "map": f"{100 * result['map']:.1f}%",
        "mem": result["mem"],
    }


def markdown_table(rows: list[dict], columns=ROW_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """What `frcnn-bench run` prints at the end: loss and mAP per epoch, the result row, the
    per-worker table and where the files are."""
    lines = ["epoch  mean loss  bbox mAP"]
    lines += [f"{epoch + 1:5d}  {loss:9.3f}  {score:8.3f}"
              for epoch, (loss, score) in enumerate(zip(result["loss_per_epoch"], result["map_per_epoch"]))]
    other = result["whole_time_s"] - result["training_time_s"] - result["evaluation_time_s"]
    target = result["time_to_target_s"]
    energy = result["joules_per_image"]
    lines += ["", f"time: {result['whole_time_s']:.1f} s from the first epoch's start to the last one's end = "
                  f"training {result['training_time_s']:.1f} + evaluation {result['evaluation_time_s']:.1f} + "
                  f"checkpoints, reports and barriers {other:.1f}; time to target mAP "
                  f"{result['config']['target_map']}: " + (f"{target:.1f} s" if target is not None else "not reached"),
              "energy: " + (f"{energy:.2f} J per image over the training phases (NVML)" if energy is not None
                            else "no energy counter on these devices (null)")]
    if result["config"]["precision"] == "amp":
        lines.append(f"loss scale: {result['loss_scale_first']:g} after the first step, {result['loss_scale_last']:g} "
                     f"after the last; {result['skipped_steps']} steps skipped for inf/nan gradients")
    lines += ["", "result row:", markdown_table([flagperf_row(result)]), "per worker:"]
    workers = [{"worker": w["worker"], "node": w["node_ip"], "device": w["device"], "steps": w["steps"],
                "images": w["images"], "images/s": number(w["images_per_s"]),
                "compute images/s": number(w["core_images_per_s"]),
                "data wait": f"{100 * w['data_wait_share']:.1f}%", "mem peak GiB": f"{w['mem_peak_gib']:.1f}"}
               for w in result["per_worker"]]
    lines += [markdown_table(workers, columns=tuple(workers[0])), f"files in {result['run_dir']}:",
              "  result.json, row.md; raw logs: steps.parquet, epochs.jsonl, workers.jsonl, attempts.jsonl, "
              "bad_images.jsonl",
              "  plots: " + ", ".join(Path(p).name for p in result["plots"])]
    if result["attempts"] > 1:
        lines.append(f"restarts: {result['attempts'] - 1}, {result['time_lost_s']:.0f} s and "
                     f"{result['lost_images']} images of lost work (not in the figures)")
    bad = sum(len(paths) for paths in result["bad_images"].values())
    if bad:
        lines.append(f"images left out as unusable: {bad} (listed in result.json)")
    return "\n".join(lines) + "\n"


def write_records(folder: Path, records: dict) -> None:
    folder = Path(folder)
    for name, columns in TABLES.items():
        table = records[name]
        if name == "steps":
            pq.write_table(pa.table({column: table[column] for column in columns}), folder / "steps.parquet")
        else:
            rows = [dict(zip(columns, values)) for values in zip(*(table[column] for column in columns))]
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def load_records(folder: str | Path) -> dict:
    """The raw logs as columns, the form pipeline.metrics takes."""
    folder = Path(folder)
    records = {"steps": pq.read_table(folder / "steps.parquet").to_pydict()}
    for name, columns in TABLES.items():
        if name != "steps":
            rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            records[name] = {column: [row[column] for row in rows] for column in columns}
    return records


def write_result(run_dir: Path, result: dict) -> None:
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "row.md").write_text(markdown_table([flagperf_row(result)]))
