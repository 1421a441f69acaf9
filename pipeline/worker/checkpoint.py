"""Per-epoch checkpoints through Ray Train (run inside the workers).

A checkpoint holds what a run needs to continue exactly where the epoch ended: the model,
optimizer and grad-scaler states, the epoch, the base shuffle seed, whether the run converged,
and the collector's tables up to that epoch with the index of the run's step log (the
same files as a results directory, but the step log itself, which stays in the run directory),
so that a restarted worker group or a new driver resuming the run continues the same logs.
"""

import tempfile
from pathlib import Path

import ray
import ray.train
import torch

from pipeline.records.tables import load_tables, write_tables
from pipeline.worker.step import Training, unwrap

STATE = "state.pt"


def save_epoch(training: Training, scores: dict, epoch: int, converged: bool, rank: int, collector) -> None:
    """ray.train.report for every worker (a barrier); rank 0 attaches the checkpoint."""
    metrics = {"epoch": epoch, **scores}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": unwrap(training.model).state_dict(), "optimizer": training.optimizer.state_dict(),
                    "scaler": training.scaler.state_dict(), "epoch": epoch, "converged": converged,
                    "seed": training.config.seed}, Path(folder) / STATE)
        save_records(folder, collector, epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def save_records(folder: str | Path, collector, epoch: int) -> None:
    """The epoch's step rows to the run's step log; the tables and the log's index to `folder`."""
    write_tables(folder, ray.get(collector.write_steps.remote(epoch)))


def restore(training: Training) -> tuple[int, bool, dict | None]:
    """From the run's latest checkpoint, if it has one: loads the states and returns (the epoch
    to start at, whether the run had converged, the saved tables); else (0, False, None)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, False, None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)
        records = load_tables(folder)
    unwrap(training.model).load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["converged"], records
