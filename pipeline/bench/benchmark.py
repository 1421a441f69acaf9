"""`frcnn-bench benchmark`: this pipeline against a plain PyTorch baseline, side by side in one run.

On a generated COCO-like set (JPEGs of about 640x480 with COCO's mix of aspect ratios, 3 to 20
objects each, sized so that one epoch is the asked number of steps), each repetition trains one
epoch three ways with the same workers, image size, batch and precision:
  ray          this pipeline (Ray Data stream, aspect-ratio grouping, TorchTrainer);
  ray-ungrouped the same without aspect-ratio grouping;
  dataloader   pipeline.bench.baseline: DataLoader worker processes + torch DDP.
It also measures the Ray Data stage alone (decode throughput), the reporting channel's cost per
step, and COCOeval's time on thousands of predictions with both evaluators. Every throughput
figure comes from pipeline.records.metrics on the runs' step logs. Medians go to benchmark.md and all
figures to benchmark.json in --output-dir.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.bench.baseline import run_baseline
from pipeline.config import add_field_arguments, resolve
from pipeline.data import stream, synthetic
from pipeline.data.manifest import build_manifest, split_paths
from pipeline.records import metrics
from pipeline.records.collector import Collector, StepSender
from pipeline.records.tables import StepRow, load_records
from pipeline.run import connect, run
from pipeline.worker import evaluation

VARIANTS = ("ray", "ray-ungrouped", "dataloader")
# The Config fields the command line sets (the benchmark's defaults for some: see `main`).
CONFIG_FLAGS = ("num_workers", "batch_size", "min_size", "max_size", "precision", "use_gpu")


def coco_like(steps: int, batch_size: int, workers: int, seed: int) -> synthetic.SyntheticSpec:
    return synthetic.SyntheticSpec(train_images=steps * batch_size * max(1, workers), val_images=2 * max(1, workers),
                                   num_categories=80, image_size=640, min_objects=3, max_objects=20,
                                   crowd_fraction=0.02, empty_fraction=0.0, seed=seed)


def decode_throughput(manifest, config) -> list[float]:
    """Images per second out of the Ray Data training stream alone, no training: a first pass
    (its tasks' workers start cold) and a second one (warm)."""
    dataset = stream.train_dataset(manifest, config.seed, config.decode_batch_size, config.aspect_group_factor)
    rates = []
    for _ in range(2):
        start, count = time.perf_counter(), 0
        for batch in dataset.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            count += len(batch["image_id"])
        rates.append(count / (time.perf_counter() - start))
    return rates


def reporting_cost(folder: Path, steps: int = 2000) -> float:
    """Seconds a worker spends per step on the collector's channel (StepSender.add, batched sends)."""
    actor = Collector.remote(str(folder))
    sender = StepSender(actor)
    start = time.perf_counter()
    for index in range(steps):
        sender.add(StepRow(worker=0, epoch=0, step=index, images=2, data_wait_s=0.001, compute_s=0.5, loss=1.0,
                           lr=0.02, start=time.time(), end=time.time(), image_pixels=1000, batch_pixels=1200,
                           loss_scale=1.0, skipped=False))
    ray.get(sender.flush())
    cost = (time.perf_counter() - start) / steps
    ray.kill(actor)
    return cost


def evaluation_times(folder: Path, images: int = 500) -> dict:
    """COCOeval's wall time (ground truth loaded, predictions loaded, evaluate, accumulate,
    summarize) for both evaluators on the same jittered predictions, and their mAPs."""
    root = synthetic.generate(folder, synthetic.SyntheticSpec(
        train_images=0, val_images=images, num_categories=80, image_size=640, min_objects=3, max_objects=20, seed=5))
    annotations = root / "annotations" / "instances_val2017.json"
    rng = np.random.default_rng(0)
    predictions = []
    for ann in json.loads(annotations.read_text())["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(3):
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            predictions.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": float(rng.random()),
                                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]})
    times = {"predictions": len(predictions), "images": images}
    for name in evaluation.EVALUATORS:
        start = time.perf_counter()
        scores = evaluation.coco_map(evaluation.load_ground_truth(str(annotations), name), predictions, name)
        times[name] = {"seconds": time.perf_counter() - start, "map": scores["map"]}
    return times


def summarize(steps: dict, epochs: dict) -> dict:
    later = [i for i, step in enumerate(steps["step"]) if step > 0]
    return {"p_whole": metrics.p_whole(steps, epochs), "p_train": metrics.p_train(steps, epochs),
            "p_core": metrics.p_core(steps), "data_wait_share": metrics.data_wait_share(steps),
            "first_step_wait_s": max(w for w, step in zip(steps["data_wait_s"], steps["step"]) if step == 0),
            "later_steps_wait_share": metrics.data_wait_share(
                {key: [steps[key][i] for i in later] for key in ("data_wait_s", "compute_s")}),
            "padding_share": metrics.padding_share(steps), "images": metrics.images_trained(steps),
            "step_s": statistics.median(w + c for w, c in zip(steps["data_wait_s"], steps["compute_s"]))}


def one_run(variant: str, config, manifest, folder: Path, repeat: int) -> dict:
    if variant == "dataloader":
        steps, epochs = run_baseline(config, manifest, loader_workers=1, out_dir=folder / f"dataloader-{repeat}")
        return summarize(steps, epochs)
    variant_config = dataclasses.replace(config, run_name=f"{variant}-{repeat}",
                                         aspect_group_factor=config.aspect_group_factor if variant == "ray" else 0)
    called = time.time()
    result = run(variant_config)
    records = load_records(result["run_dir"])
    return {**summarize(records["steps"], records["epochs"]), "startup_s": min(records["steps"]["start"]) - called,
            "mem_used_gib": result["mem_used_gib"], "mem_total_gib": result["mem_total_gib"]}


def first_init_time(runs_dir: Path) -> float:
    """init_time of the first Ray run, the only one whose process start is its own: the runs of one
    benchmark share the process, so it is the smallest."""
    return min(json.loads(path.read_text())["init_time"] for path in runs_dir.glob("*/result.json"))


def memory_kind(runs_dir: Path) -> str:
    """The kind of the Ray runs' memory figure (see pipeline.records.metrics.memory), one device for all."""
    return json.loads(next(runs_dir.glob("*/result.json")).read_text())["mem_kind"]


def median_table(runs: dict) -> dict:
    return {variant: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
            for variant, rows in runs.items()}


def markdown(report: dict) -> str:
    medians, settings = report["medians"], report["settings"]
    lines = [f"Machine: {report['machine']}", f"Command: `{report['command']}`",
             f"Settings: {settings}", f"Repetitions: {report['repeats']} (medians below)", "",
             "| variant | p_whole | p_train | p_core | p_train / p_core | data wait share | first step's wait s "
             "| wait share after step 0 | padding share | median step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant in VARIANTS:
        m = medians[variant]
        lines.append(f"| {variant} | {m['p_whole']:.3f} | {m['p_train']:.3f} | {m['p_core']:.3f} | "
                     f"{m['p_train'] / m['p_core']:.3f} | {m['data_wait_share']:.2%} | {m['first_step_wait_s']:.2f} | "
                     f"{m['later_steps_wait_share']:.2%} | {m['padding_share']:.2%} | {m['step_s']:.2f} |")
    ours, base = medians["ray"], medians["dataloader"]
    evals = report["evaluation"]
    lines += ["", f"- p_train, this pipeline / DataLoader baseline: {ours['p_train'] / base['p_train']:.3f}",
              f"- p_core, this pipeline / DataLoader baseline: {ours['p_core'] / base['p_core']:.3f}",
              f"- start-up, run() called to first step (Ray already up), median: {ours['startup_s']:.1f} s; "
              f"process start to first step (init_time) of the first run: {report['init_time']:.1f} s",
              f"- peak memory of a worker (this pipeline, median): {ours['mem_used_gib']:.1f}/{ours['mem_total_gib']:.1f} GiB "
              f"({report['mem_kind']})",
              f"- Ray Data stage alone, median: {report['decode_images_per_s'][1]:.1f} images/s warm, "
              f"{report['decode_images_per_s'][0]:.1f} images/s on the first pass (cold task workers)",
              f"- reporting channel: {report['reporting_s_per_step'] * 1e6:.1f} us per step, "
              f"{report['reporting_s_per_step'] / ours['step_s']:.4%} of the median step",
              f"- COCOeval on {evals['predictions']} predictions over {evals['images']} images: "
              + ", ".join(f"{name} {evals[name]['seconds']:.2f} s (mAP {evals[name]['map']:.6f})"
                          for name in evaluation.EVALUATORS)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="bench-results")
    parser.add_argument("--steps", type=int, default=20, help="training steps per worker and run")
    parser.add_argument("--repeats", type=int, default=3)
    add_field_arguments(parser, CONFIG_FLAGS, defaults={"num_workers": 2, "min_size": 384, "max_size": 640,
                                                       "use_gpu": False})
    parser.add_argument("--eval-images", type=int, default=500, help="val images of the COCOeval timing")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the wait after the first step is one of the figures")
    out = Path(args.output_dir).resolve()
    config = resolve(output_dir=str(out / "runs"), backbone_weights="none", lr=0.01, clip_grad_norm=10.0, max_epochs=1,
                     target_map=1.0, **{name: getattr(args, name) for name in CONFIG_FLAGS})
    root = synthetic.generate(out / "data", coco_like(args.steps, config.batch_size, config.num_workers, seed=0))
    config = dataclasses.replace(config, data_root=str(root))
    manifest, _ = build_manifest(*split_paths(root, "train"), drop_empty=True)
    connect(config, verbose=False)
    decode, runs = [], {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        decode.append(decode_throughput(manifest, config))
        for variant in VARIANTS[repeat % 3:] + VARIANTS[:repeat % 3]:  # each goes first in turn
            runs[variant].append(one_run(variant, config, manifest, out, repeat))
            print(f"repeat {repeat} {variant}: {runs[variant][-1]}", flush=True)
    report = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB, "
                   + (torch.cuda.get_device_name() if config.use_gpu else "no GPU used"),
        "command": "frcnn-bench benchmark " + " ".join(sys.argv[2:] if argv is None else argv),
        "settings": {**vars(args), **{name: getattr(config, name) for name in CONFIG_FLAGS},
                     "images": manifest.num_rows},
        "repeats": args.repeats, "runs": runs, "medians": median_table(runs),
        "init_time": first_init_time(out / "runs"),
        "mem_kind": memory_kind(out / "runs"),
        "decode_images_per_s": [statistics.median(rates[i] for rates in decode) for i in (0, 1)],
        "decode_runs": decode,
        "reporting_s_per_step": reporting_cost(out), "evaluation": evaluation_times(out / "eval-set", args.eval_images),
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
    }
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
