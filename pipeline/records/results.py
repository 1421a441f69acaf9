"""A run's results directory, RUN_DIR = <output_dir>/<run_name>: config.json (the run's
configuration, written when it starts: see claim_run_dir), result.json, the FlagPerf row (row.md),
the plots, and the records from which every figure can be recomputed (pipeline.records.tables:
steps.parquet/, step_log.json, epochs.jsonl, workers.jsonl, attempts.jsonl, bad_images.jsonl).
A checkpoint holds the same records but the step log, whose position step_log.json records.
Every file is written whole or not at all (records.write_atomically)."""

import json
from pathlib import Path

from pipeline.records.tables import step_log_epochs, write_atomically

RUN_CONFIG = "config.json"
# What a resumed run may change: where the cluster, the results directory and the downloaded
# weights are, how many restarts, the peak that utilisation is reckoned against.
RESUME_MAY_CHANGE = ("output_dir", "ray_address", "weights_cache", "max_failures", "peak_tflops")

ROW_COLUMNS = ("config", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "map", "mem")


def number(value: float) -> str:
    """Throughput with three significant digits, so CPU runs (0.8 images/s) keep theirs too."""
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}"


def precision_label(config: dict) -> str:
    """The row's precision: the config's, with "(tf32)" when the fp32 products ran in TF32."""
    return config["precision"] + (" (tf32)" if config["tf32"] else "")


def flagperf_row(result: dict) -> dict:
    return {
        "config": result["config_label"],
        "precision": precision_label(result["config"]),
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
    lines.append(compute_line(result))
    if result["startup"] is not None:
        lines.append(startup_line(result["startup"], result["init_time"]))
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
              "  result.json, row.md; raw logs: steps.parquet/ (one file per epoch), step_log.json, epochs.jsonl, "
              "workers.jsonl, attempts.jsonl, bad_images.jsonl",
              "  plots: " + ", ".join(Path(p).name for p in result["plots"])]
    if result["attempts"] > 1:
        lines.append(f"restarts: {result['attempts'] - 1}, {result['time_lost_s']:.0f} s and "
                     f"{result['lost_images']} images of lost work (not in the figures)")
    bad = sum(len(paths) for paths in result["bad_images"].values())
    if bad:
        lines.append(f"images left out as unusable: {bad} (listed in result.json)")
    return "\n".join(lines) + "\n"


def compute_line(result: dict) -> str:
    """The FLOPs and how much of the device they used (pipeline.worker.flops)."""
    if result["flops_per_image"] is None:
        return "compute: no FLOPs measured (no worker trained a step)"
    line = (f"compute: {result['flops_per_image'] / 1e9:.1f} GFLOP per image trained (forward and backward, "
            f"torch's FLOP counter), {result['achieved_tflops']:.3g} TFLOP/s per device over the compute time; ")
    if result["utilisation"] is None:
        return line + (f"utilisation unknown: no {result['compute_precision']} peak known for "
                       f"{', '.join(result['devices'])} (give it with --peak-tflops)")
    return line + (f"utilisation {100 * result['utilisation']:.1f}% of {result['peak_tflops']:g} TFLOP/s "
                   f"({result['compute_precision']}, {result['peak_source']})")


STARTUP_NAMES = {"imports": "imports", "data": "data set", "ray": "Ray", "checks": "checks",
                 "workers": "worker group", "model": "model", "first_step": "resume check and barrier"}


def startup_line(ends: dict, init_time: float) -> str:
    """The start-up's stages as durations (result.json's `startup` holds when each ended)."""
    previous, parts = 0.0, []
    for name, label in STARTUP_NAMES.items():
        parts.append(f"{label} {ends[name] - previous:.1f}")
        previous = ends[name]
    return (f"start-up: {init_time:.1f} s to the first step = {' + '.join(parts)}; the first batch in hand "
            f"{ends['first_batch'] - ends['first_step']:.1f} s after it")


def write_result(run_dir: Path, result: dict) -> None:
    write_atomically(run_dir / "row.md", markdown_table([flagperf_row(result)]))
    write_atomically(run_dir / "result.json", json.dumps(result, indent=2) + "\n")


class RunDirError(FileExistsError):
    """A run directory that holds another run's results."""


def claim_run_dir(run_dir: Path, config: dict) -> None:
    """Makes `run_dir` this run's, refusing to mix its files with another run's. A new directory (or
    an empty one) gets config.json, this run's configuration. One that has config.json is a resume
    when the configuration is the same but for RESUME_MAY_CHANGE; another configuration is refused
    once the directory holds results (result.json, a step log or a checkpoint), and replaced while
    it holds none (a run stopped before training, say by too few GPUs). A directory with other files
    but no config.json is refused."""
    config = json.loads(json.dumps(config))
    saved_file = run_dir / RUN_CONFIG
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        changed = [key for key in sorted(set(saved) | set(config))
                   if key not in RESUME_MAY_CHANGE and saved.get(key) != config.get(key)]
        if not changed:
            return
        if has_results(run_dir):
            shown = "; ".join(f"{key}: {saved.get(key)!r} there, {config.get(key)!r} here" for key in changed[:3])
            raise RunDirError(f"{run_dir}: holds the results of run {run_dir.name!r} with another configuration "
                              f"({shown}); resume it with its own settings, or give this run another --run-name "
                              "or --output-dir")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: exists and holds files but no {RUN_CONFIG}, so not a run of this version; "
                          "give this run another --run-name or --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(saved_file, json.dumps(config, indent=2) + "\n")


def has_results(run_dir: Path) -> bool:
    return ((run_dir / "result.json").exists() or bool(step_log_epochs(run_dir))
            or any(run_dir.glob("checkpoint_*")))
