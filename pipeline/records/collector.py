"""The collector: one actor, owned by the driver, to which every worker sends its step rows in
batches (`StepSender`) and its epoch and worker rows; the driver computes the figures from the
tables it gathers (pipeline.records.metrics) and shows its live `snapshot`.

The actor's memory does not grow with the run: step rows stay with it only until their epoch
ends, when rank 0 has it write them to the run's step log (one Parquet file per epoch, see
pipeline.records.tables) and the checkpoint records the log's index. It keeps the small tables (a row
per epoch and worker, per worker, per attempt, per unusable image) and what the live display needs.

The actor outlives worker-group restarts. Each start of the worker group is an attempt; an
attempt that resumes from a checkpoint at epoch k keeps the step log's epochs before k and the
tables saved in that checkpoint, so work done after the checkpoint and lost with the failed
workers is counted once, as lost, never in the figures (see `begin_attempt`).
"""

import collections
import time
from pathlib import Path

import ray

from pipeline.records.tables import (SMALL_TABLES, TABLES, StepRow, empty_records, read_steps, split, step_file,
                                     step_file_rows, step_log_epochs, write_step_file)

# Live progress: "images/s now" counts the steps that ended in the last RECENT_S seconds.
RECENT_S = 10.0


class StepLogError(RuntimeError):
    """The run's step log does not match the checkpoint it resumes from."""


@ray.remote(num_cpus=0)
class Collector:
    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self.tables = empty_records()  # "steps": only those of epochs not yet in the step log
        self.step_log: dict[int, dict] = {}  # the step log's index: epoch -> rows, images, last_end
        self.fatal = ""
        # split -> the files its decode tasks are reading (a dict for its order: the earliest begun first)
        self.being_read: dict[str, dict] = collections.defaultdict(dict)
        self.started_up: dict[int, dict] = {}  # worker -> its start-up marks (unix times)
        self._reset_live(start_epoch=0)

    def _reset_live(self, start_epoch: int) -> None:
        self.start_epoch, self.started = start_epoch, None  # this attempt's first epoch, first step's start
        self.latest: dict[int, tuple] = {}  # worker -> (epoch, step, loss) of its latest step
        self.recent: collections.deque = collections.deque()  # (end, images) of recent steps
        self.evaluated: dict[int, tuple] = {}  # worker -> (epoch, val images inferred so far)

    def stop(self, reason: str) -> None:
        """A failure that a restart cannot mend (a non-finite loss, a stalled stream): attempts after
        it end at once."""
        self.fatal = reason

    def fatal_error(self) -> str:
        return self.fatal

    def _append(self, table: str, row: dict) -> None:
        for name in TABLES[table]:
            self.tables[table][name].append(row[name])

    def add_steps(self, rows: list[tuple]) -> None:
        """Step rows (StepRow's fields, as plain tuples)."""
        steps = self.tables["steps"]
        for row in map(StepRow._make, rows):
            for name, value in zip(StepRow._fields, row):
                steps[name].append(value)
            self.latest[row.worker] = (row.epoch, row.step, row.loss)
            self.recent.append((row.end, row.images))
            self.started = min(self.started or row.start, row.start)
        self._forget_before(time.time() - RECENT_S)

    def _forget_before(self, moment: float) -> None:
        """Recent steps are kept for RECENT_S seconds, whether or not a display asks for them."""
        while self.recent and self.recent[0][0] < moment:
            self.recent.popleft()

    def evaluating(self, worker: int, epoch: int, images: int) -> None:
        self.evaluated[worker] = (epoch, images)

    def snapshot(self) -> dict:
        """What the driver's progress display shows; cheap however long the run (see RECENT_S)."""
        now = time.time()
        self._forget_before(now - RECENT_S)
        window = min(RECENT_S, now - self.started) if self.started else 0.0
        epochs = self.tables["epochs"]
        scores = [(e, m) for w, e, m in zip(epochs["worker"], epochs["epoch"], epochs["map"]) if w == 0]
        return {"now": now, "started": self.started, "start_epoch": self.start_epoch, "latest": dict(self.latest),
                "images_per_s": sum(images for _, images in self.recent) / window if window > 0 else 0.0,
                "evaluated": dict(self.evaluated), "last_map": scores[-1] if scores else None}

    def worker_started(self, worker: int, marks: dict) -> None:
        """A worker's start-up marks (its train function called, its model built); a restarted
        worker's are not the run's start-up, the first are kept."""
        self.started_up.setdefault(worker, marks)

    def startup(self) -> dict:
        """The workers' start-up marks, each when the last worker reached it."""
        return {name: max(marks[name] for marks in self.started_up.values())
                for name in next(iter(self.started_up.values()), {})}

    def add_epoch(self, row: dict) -> None:
        self._append("epochs", row)

    def end_epoch(self, worker: int, epoch: int, end: float, wall_s: float) -> None:
        """The epoch's end (unix time) and span (monotonic) on this worker, known only after its
        checkpoint is saved: the row added before it (and saved in that checkpoint) ends where
        the checkpoint began."""
        epochs = self.tables["epochs"]
        for i in range(len(epochs["epoch"]) - 1, -1, -1):
            if epochs["worker"][i] == worker and epochs["epoch"][i] == epoch:
                epochs["end"][i], epochs["wall_s"][i] = end, wall_s
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

    def reading(self, split: str, paths: list[str]) -> None:
        """A decode task is about to read these files (pipeline.data.images.reading_reported)."""
        self.being_read[split].update(dict.fromkeys(paths))

    def read(self, split: str, paths: list[str]) -> None:
        """The decode task that was reading these files is done with them."""
        for path in paths:
            self.being_read[split].pop(path, None)

    def files_being_read(self, split: str) -> list[str]:
        """The split's files that a decode task began and did not finish reading, the earliest begun
        first: where a stalled stream waits."""
        return list(self.being_read[split])

    def write_steps(self, epoch: int) -> dict:
        """The epoch's step rows (every worker's, all with the actor) to the run's step log, and
        out of memory; returns the tables a checkpoint keeps, with the step log's index."""
        written, self.tables["steps"] = split(self.tables["steps"], lambda e: e == epoch)
        self.step_log[epoch] = write_step_file(self.run_dir, epoch, written)
        return self.records()

    def _drop_lost_steps(self, start_epoch: int) -> tuple[int, int]:
        """Step rows of epochs from start_epoch on, in memory or in the step log, dropped:
        (steps, images)."""
        lost, self.tables["steps"] = split(self.tables["steps"], lambda e: e >= start_epoch)
        count, images = len(lost["epoch"]), sum(lost["images"])
        for epoch in step_log_epochs(self.run_dir):
            if epoch >= start_epoch:
                path = step_file(self.run_dir, epoch)
                written = read_steps([path], ("images",))["images"]
                count, images = count + len(written), images + int(written.sum())
                path.unlink()
        return count, images

    def _check_step_log(self) -> None:
        for epoch, entry in self.step_log.items():
            path = step_file(self.run_dir, epoch)
            rows = step_file_rows(path)
            if rows != entry["rows"]:
                raise StepLogError(f"{path}: {'missing' if rows is None else f'{rows} rows'}, the checkpoint "
                                   f"resumed from recorded {entry['rows']}")

    def begin_attempt(self, start_epoch: int, saved: dict | None) -> None:
        """A start of the worker group at `start_epoch`, from the tables saved in the checkpoint
        it resumes from (None without a checkpoint). Steps of epochs from start_epoch on are the
        failed attempt's lost work: counted in this attempt's row, dropped from the figures."""
        lost_steps, lost_images = self._drop_lost_steps(start_epoch)
        # This driver's attempts if it has had one (they include the history it resumed from),
        # else the history saved with the checkpoint (a new driver resuming a run).
        attempts = self.tables["attempts"] if self.tables["attempts"]["attempt"] or saved is None else saved["attempts"]
        if saved is not None:
            self.tables.update(epochs=saved["epochs"], bad_images=saved["bad_images"], attempts=attempts)
            self.step_log = dict(saved["step_log"])
            self._check_step_log()
        else:
            _, self.tables["epochs"] = split(self.tables["epochs"], lambda e: e >= start_epoch)
            self.step_log = {}
        self._reset_live(start_epoch)
        now = time.time()
        kept_end = max((entry["last_end"] for entry in self.step_log.values()), default=None)
        previous = attempts["started"][-1] if attempts["started"] else None
        self._append("attempts", {
            "attempt": len(attempts["attempt"]), "start_epoch": start_epoch, "started": now,
            "resumed": saved is not None, "lost_steps": lost_steps, "lost_images": lost_images,
            "time_lost_s": 0.0 if previous is None else now - (kept_end if kept_end is not None else previous)})

    def records(self) -> dict:
        """Every table but the steps (those are in the step log), and the step log's index."""
        return {**{name: self.tables[name] for name in SMALL_TABLES}, "step_log": self.step_log}


class StepSender:
    """A worker's side of the channel: its step rows, sent every `flush_every` steps or `flush_s`
    seconds, whichever comes first (the driver's progress display lags by at most that)."""

    def __init__(self, collector, flush_every: int = 50, flush_s: float = 2.0):
        self.collector, self.flush_every, self.flush_s = collector, flush_every, flush_s
        self.rows: list[tuple] = []
        self.flushed = time.time()

    def add(self, row: StepRow) -> None:
        self.rows.append(tuple(row))
        if len(self.rows) >= self.flush_every or row.end - self.flushed >= self.flush_s:
            self.flush()

    def flush(self) -> ray.ObjectRef:
        ref = self.collector.add_steps.remote(self.rows)
        self.rows, self.flushed = [], time.time()
        return ref
