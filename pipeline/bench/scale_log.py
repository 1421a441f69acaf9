"""The run's bookkeeping at the size of the real job, without the model: `python -m pipeline.bench.scale_log`.

COCO 2017 train for 26 epochs on 2x8 devices is 16 workers x 3,665 steps x 26 epochs, about
1.5 million step rows. Synthetic rows of that count go through the real channel: 16 Ray actors
stand in for the training workers, each with the real worker-side `StepSender`; the real
`Collector`; at each epoch's end the real per-epoch bookkeeping of rank 0 (the step log's
flush and the checkpoint's records); in the middle of epoch 13 a failure and a resume from the
epoch-12 checkpoint (half an epoch lost, counted); at the end the figures, the result files and
`frcnn-bench report`. Measured: the actor's peak memory (VmHWM), each epoch's bookkeeping time
and the checkpoint's size, the figures + result writing time, the report's time. The model's
own state (about 330 MB for R50-FPN with its optimizer) is not part of it.
"""

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import pyarrow
import ray

from pipeline.config import resolve
from pipeline.records import report
from pipeline.records.collector import Collector, StepSender
from pipeline.records.tables import TABLES, StepRow, load_tables
from pipeline.run import write_results
from pipeline.worker import checkpoint

WORKERS, STEPS, EPOCHS = 16, 3665, 26


@ray.remote(num_cpus=0)
class Worker:
    """A training worker's reporting, without training: one step row per step through StepSender."""

    def __init__(self, collector, rank: int):
        self.sender, self.rank = StepSender(collector), rank
        self.random = random.Random(rank)  # values that vary as measured ones do, so they compress alike

    def train(self, epoch: int, steps: int) -> None:
        draw = self.random.random
        for index in range(steps):
            compute, wait = 0.2 + 0.1 * draw(), 0.01 * draw()
            pixels = 2 * int(800 * (1000 + 333 * draw()))
            self.sender.add(StepRow(
                worker=self.rank, epoch=epoch, step=index, images=2, data_wait_s=wait, compute_s=compute,
                loss=(1 + draw()) / (1 + epoch), lr=0.02 * min(1.0, (index + 1) / 500),
                start=time.time() - compute - wait, end=time.time(), image_pixels=pixels,
                batch_pixels=pixels + 2 * int(32 * 800 * draw()), loss_scale=65536.0, skipped=draw() < 1e-4))
        ray.get(self.sender.flush())


def memory_bytes(actor, field: str) -> int:
    """The actor process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc on this machine."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def epoch_row(rank: int, epoch: int, start: float) -> dict:
    return {"worker": rank, "epoch": epoch, "start": start, "end": time.time(), "wall_s": time.time() - start, "train_s": 900.0, "eval_s": 60.0,
            "eval_images": 5000 // WORKERS, "map": 0.01 * epoch, "ap50": 0.02 * epoch, "ap75": 0.01 * epoch,
            "energy_j": None}


def bookkeeping(collector, epoch: int, checkpoint_dir: Path) -> tuple[float, int]:
    """Rank 0's work at an epoch's end, before Ray Train copies the checkpoint: (seconds, bytes)."""
    start = time.perf_counter()
    folder = checkpoint_dir / f"epoch-{epoch}"
    folder.mkdir()
    checkpoint.save_records(folder, collector, epoch)
    return time.perf_counter() - start, folder_bytes(folder)


def run_epochs(collector, workers: list, epochs: range, steps: int, checkpoint_dir: Path, timings: list) -> None:
    for epoch in epochs:
        start = time.time()
        ray.get([worker.train.remote(epoch, steps) for worker in workers])
        ray.get([collector.add_epoch.remote(epoch_row(rank, epoch, start)) for rank in range(len(workers))])
        seconds, size = bookkeeping(collector, epoch, checkpoint_dir)
        timings.append({"epoch": epoch, "bookkeeping_s": seconds, "checkpoint_bytes": size,
                        "actor_rss_bytes": memory_bytes(collector, "VmRSS")})
        end = time.time()
        ray.get([collector.end_epoch.remote(rank, epoch, end, end - start) for rank in range(len(workers))])
        print(f"epoch {epoch}: bookkeeping {seconds:.2f} s, checkpoint records {size / 1e6:.1f} MB, actor "
              f"{timings[-1]['actor_rss_bytes'] / 1e6:.0f} MB", flush=True)


def measure(workers: int, steps: int, epochs: int, fail_epoch: int, out: Path) -> dict:
    run_dir, checkpoints = out / "run", out / "checkpoints"
    checkpoints.mkdir(parents=True)
    collector = Collector.remote(str(run_dir))
    team = [Worker.remote(collector, rank) for rank in range(workers)]
    timings = []
    ray.get(collector.begin_attempt.remote(0, None))
    run_epochs(collector, team, range(fail_epoch), steps, checkpoints, timings)
    ray.get([worker.train.remote(fail_epoch, steps // 2) for worker in team])  # then the workers fail
    saved = load_tables(checkpoints / f"epoch-{fail_epoch - 1}")
    ray.get(collector.begin_attempt.remote(fail_epoch, saved))
    run_epochs(collector, team, range(fail_epoch, epochs), steps, checkpoints, timings)
    ray.get([collector.add_worker.remote({**dict.fromkeys(TABLES["workers"]), "worker": rank, "node": "node",
                                          "node_ip": "127.0.0.1", "node_rank": 0, "device": "none",
                                          "mem_peak_bytes": 1, "mem_total_bytes": 2, "mem_kind": "cpu rss",
                                          "env": {}})
             for rank in range(workers)])
    actor_peak = memory_bytes(collector, "VmHWM")

    start = time.perf_counter()
    records = ray.get(collector.records.remote())
    write_results(resolve("2x8-amp"), run_dir, records, {"process_start": time.time(), "steps_per_epoch": steps,
                                                         "data": {}, "gpu_nodes": [], "node_facts": [], "startup": {}})
    finishing = time.perf_counter() - start
    start = time.perf_counter()
    report.main([str(run_dir), "--output-dir", str(out / "report")])
    reporting = time.perf_counter() - start
    return {"rows": sum(entry["rows"] for entry in records["step_log"].values()),
            "lost_steps": records["attempts"]["lost_steps"], "actor_peak_rss_bytes": actor_peak,
            "bookkeeping_s_max": max(t["bookkeeping_s"] for t in timings),
            "checkpoint_records_bytes_max": max(t["checkpoint_bytes"] for t in timings),
            "figures_and_result_s": finishing, "report_s": reporting, "per_epoch": timings}


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {memory:.0f} GiB; "
            f"Python {platform.python_version()}, Ray {ray.__version__}, pyarrow {pyarrow.__version__}; "
            f"load average before: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.scale_log", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per epoch per worker")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--output", default=None, help="where the figures go as JSON (default: printed only)")
    args = parser.parse_args()
    about = machine()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as folder:
            figures = measure(args.workers, args.steps, args.epochs, args.epochs // 2, Path(folder))
    finally:
        ray.shutdown()
    figures = {"machine": about, "settings": vars(args), **figures}
    text = json.dumps(figures, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
