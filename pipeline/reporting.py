"""The reporting channel: workers buffer their timings and send them in batches to one
`ReportingActor`, owned by the driver, which keeps them as columns and computes the figures."""

import time

import ray

from pipeline import metrics

STEP_COLUMNS = ("worker", "epoch", "step", "images", "data_wait_s", "compute_s", "loss", "lr", "start", "end",
                "image_pixels", "batch_pixels")
EPOCH_COLUMNS = ("worker", "epoch", "train_s", "eval_s", "eval_images", "map", "ap50", "ap75")
WORKER_COLUMNS = ("worker", "node", "node_ip", "node_rank", "device", "mem_peak_bytes", "mem_total_bytes", "mem_kind",
                  "env")


def _columns(names) -> dict:
    return {name: [] for name in names}


@ray.remote(num_cpus=0)
class ReportingActor:
    def __init__(self):
        self.steps = _columns(STEP_COLUMNS)
        self.epochs = _columns(EPOCH_COLUMNS)
        self.workers = _columns(WORKER_COLUMNS)

    def add_steps(self, rows: list[tuple]) -> None:
        for row in rows:
            for name, value in zip(STEP_COLUMNS, row):
                self.steps[name].append(value)

    def add_epoch(self, row: dict) -> None:
        for name in EPOCH_COLUMNS:
            self.epochs[name].append(row[name])

    def add_worker(self, row: dict) -> None:
        for name in WORKER_COLUMNS:
            self.workers[name].append(row[name])

    def records(self) -> dict:
        return {"steps": self.steps, "epochs": self.epochs, "workers": self.workers}

    def figures(self) -> dict:
        return metrics.figures(self.steps, self.epochs, self.workers)


class StepLog:
    """A worker's side of the channel: one tuple per step, sent every `flush_every` steps."""

    def __init__(self, actor, worker: int, flush_every: int = 50):
        self.actor, self.worker, self.flush_every = actor, worker, flush_every
        self.rows: list[tuple] = []

    def add(self, epoch: int, step: int, images: int, data_wait_s: float, compute_s: float,
            loss: float, lr: float, start: float, image_pixels: int, batch_pixels: int) -> None:
        self.rows.append((self.worker, epoch, step, images, data_wait_s, compute_s, loss, lr, start, time.time(),
                          image_pixels, batch_pixels))
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> ray.ObjectRef:
        ref = self.actor.add_steps.remote(self.rows)
        self.rows = []
        return ref
