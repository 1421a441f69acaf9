"""The reporting channel: workers buffer their timings and send them in batches to one
`ReportingActor`, owned by the driver, which keeps them as columns; the driver computes the
figures from them (pipeline.metrics).

The actor outlives worker-group restarts. Each start of the worker group is an attempt; an
attempt that resumes from a checkpoint at epoch k replaces the actor's rows with the rows saved
in that checkpoint (epochs before k), so work done after the checkpoint and lost with the failed
workers is counted once, as lost, never in the figures (see `begin_attempt`).
"""

import collections
import time

import ray

TABLES = {
    "steps": ("worker", "epoch", "step", "images", "data_wait_s", "compute_s", "loss", "lr", "start", "end",
              "image_pixels", "batch_pixels", "loss_scale", "skipped"),
    "epochs": ("worker", "epoch", "start", "end", "train_s", "eval_s", "eval_images", "map", "ap50", "ap75",
               "energy_j"),
    "workers": ("worker", "node", "node_ip", "node_rank", "device", "mem_peak_bytes", "mem_total_bytes", "mem_kind",
                "env"),
    # One row per start of the worker group. time_lost_s: from the end of the last step kept (or
    # the previous attempt's start) to this start; lost_*: work of the failed attempt not kept.
    "attempts": ("attempt", "start_epoch", "started", "resumed", "lost_steps", "lost_images", "time_lost_s"),
    # Images left out because they could not be used, once per split and file.
    "bad_images": ("split", "image_id", "path", "reason"),
}
STEP_COLUMNS = TABLES["steps"]
# Live progress: "images/s now" counts the steps that ended in the last RECENT_S seconds.
RECENT_S = 10.0


def empty_records() -> dict:
    return {name: {column: [] for column in columns} for name, columns in TABLES.items()}


def _keep(table: dict, rows: list[int]) -> dict:
    return {name: [values[i] for i in rows] for name, values in table.items()}


@ray.remote(num_cpus=0)
class ReportingActor:
    def __init__(self):
        self.tables = empty_records()
        self.fatal = ""
        self._reset_live(start_epoch=0)

    def _reset_live(self, start_epoch: int) -> None:
        self.start_epoch, self.started = start_epoch, None  # this attempt's first epoch, first step's start
        self.latest: dict[int, tuple] = {}  # worker -> (epoch, step, loss) of its latest step
        self.recent: collections.deque = collections.deque()  # (end, images) of recent steps
        self.evaluated: dict[int, tuple] = {}  # worker -> (epoch, val images inferred so far)

    def stop(self, reason: str) -> None:
        """A failure that a restart cannot mend (a non-finite loss): attempts after it end at once."""
        self.fatal = reason

    def fatal_error(self) -> str:
        return self.fatal

    def _append(self, table: str, row: dict) -> None:
        for name in TABLES[table]:
            self.tables[table][name].append(row[name])

    def add_steps(self, rows: list[tuple]) -> None:
        for row in rows:
            step = dict(zip(STEP_COLUMNS, row))
            for name, value in step.items():
                self.tables["steps"][name].append(value)
            self.latest[step["worker"]] = (step["epoch"], step["step"], step["loss"])
            self.recent.append((step["end"], step["images"]))
            self.started = min(self.started or step["start"], step["start"])

    def evaluating(self, worker: int, epoch: int, images: int) -> None:
        self.evaluated[worker] = (epoch, images)

    def progress(self) -> dict:
        """What the driver's progress display shows; cheap however long the run (see RECENT_S)."""
        now = time.time()
        while self.recent and self.recent[0][0] < now - RECENT_S:
            self.recent.popleft()
        window = min(RECENT_S, now - self.started) if self.started else 0.0
        epochs = self.tables["epochs"]
        scores = [(e, m) for w, e, m in zip(epochs["worker"], epochs["epoch"], epochs["map"]) if w == 0]
        return {"now": now, "started": self.started, "start_epoch": self.start_epoch, "latest": dict(self.latest),
                "images_per_s": sum(images for _, images in self.recent) / window if window > 0 else 0.0,
                "evaluated": dict(self.evaluated), "last_map": scores[-1] if scores else None}

    def add_epoch(self, row: dict) -> None:
        self._append("epochs", row)

    def end_epoch(self, worker: int, epoch: int, end: float) -> None:
        """The epoch's end on this worker, known only after its checkpoint is saved: the row
        added before it (and saved in that checkpoint) ends where the checkpoint began."""
        epochs = self.tables["epochs"]
        for i in range(len(epochs["epoch"]) - 1, -1, -1):
            if epochs["worker"][i] == worker and epochs["epoch"][i] == epoch:
                epochs["end"][i] = end
                return

    def add_worker(self, row: dict) -> None:
        self._append("workers", row)

    def add_bad_image(self, split: str, image_id: int, path: str, reason: str) -> int:
        """Records an image that could not be used; returns how many distinct ones the split has."""
        bad = self.tables["bad_images"]
        if (split, path) not in zip(bad["split"], bad["path"]):
            self._append("bad_images", {"split": split, "image_id": image_id, "path": path, "reason": reason})
        return bad["split"].count(split)

    def bad_images(self, split: str) -> dict[int, str]:
        """The split's unusable images: image id -> "path: reason"."""
        bad = self.tables["bad_images"]
        return {i: f"{path}: {reason}" for s, i, path, reason in zip(bad["split"], bad["image_id"], bad["path"],
                                                                    bad["reason"]) if s == split}

    def begin_attempt(self, start_epoch: int, saved: dict | None) -> None:
        """A start of the worker group at `start_epoch`, from the records saved in the checkpoint
        it resumes from (None without a checkpoint). Rows of epochs from start_epoch on are the
        failed attempt's lost work: counted in this attempt's row, dropped from the figures."""
        steps = self.tables["steps"]
        lost = [i for i, epoch in enumerate(steps["epoch"]) if epoch >= start_epoch]
        # This driver's attempts if it has had one (they include the history it resumed from),
        # else the history saved with the checkpoint (a new driver resuming a run).
        attempts = self.tables["attempts"] if self.tables["attempts"]["attempt"] or saved is None else saved["attempts"]
        if saved is not None:
            self.tables = {**saved, "workers": self.tables["workers"], "attempts": attempts}
        else:
            for name in ("steps", "epochs"):
                table = self.tables[name]
                self.tables[name] = _keep(table, [i for i, e in enumerate(table["epoch"]) if e < start_epoch])
        self._reset_live(start_epoch)
        now = time.time()
        kept_end = max(self.tables["steps"]["end"], default=None)
        previous = attempts["started"][-1] if attempts["started"] else None
        self._append("attempts", {
            "attempt": len(attempts["attempt"]), "start_epoch": start_epoch, "started": now,
            "resumed": saved is not None, "lost_steps": len(lost), "lost_images": sum(steps["images"][i] for i in lost),
            "time_lost_s": 0.0 if previous is None else now - (kept_end if kept_end is not None else previous)})

    def records(self) -> dict:
        return self.tables


class StepLog:
    """A worker's side of the channel: one tuple per step, sent every `flush_every` steps or
    `flush_s` seconds, whichever comes first (the driver's progress display lags by at most that)."""

    def __init__(self, actor, worker: int, flush_every: int = 50, flush_s: float = 2.0):
        self.actor, self.worker, self.flush_every, self.flush_s = actor, worker, flush_every, flush_s
        self.rows: list[tuple] = []
        self.flushed = time.time()

    def add(self, row: dict) -> None:
        """A step's row: every column of TABLES["steps"] but worker and end, which are added here."""
        now = time.time()
        self.rows.append(tuple({**row, "worker": self.worker, "end": now}[name] for name in STEP_COLUMNS))
        if len(self.rows) >= self.flush_every or now - self.flushed >= self.flush_s:
            self.flush()

    def flush(self) -> ray.ObjectRef:
        ref = self.actor.add_steps.remote(self.rows)
        self.rows, self.flushed = [], time.time()
        return ref
