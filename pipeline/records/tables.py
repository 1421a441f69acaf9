"""The run's records: the tables every figure is computed from, their one schema, and their files.

steps  (one row per training step per worker, a `StepRow`): the step log, one Parquet file per
       epoch in RUN_DIR/steps.parquet/, written as each epoch ends (pyarrow reads the folder as
       one table); its index, step_log.json, gives each epoch's rows, images and last step's end.
epochs (one row per epoch per worker): worker, epoch, start, end (unix times), wall_s, train_s,
       eval_s, eval_images (val images this worker inferred), map, ap50, ap75, energy_j.
       start..end is the whole epoch on that worker: its barriers, training, evaluation, the
       records sent, the checkpoint saved and reported; the next epoch starts at the same
       instant (the same clock reading), so the epochs of a run tile its training wall time.
       wall_s is that span on the worker's monotonic clock (a wall clock can be stepped
       while a run goes on, by NTP or by hand); every duration here is monotonic.
       Workers pass a barrier before and after each phase, so a phase's wall time is the
       same on all workers up to the barrier's skew; the slowest worker's figure counts.
       train_s: the epoch's training phase. eval_s: from the end of training to the end of
       the epoch's evaluation (inference, gathering, COCOeval, the stop decision).
       energy_j: the device's energy over the training phase (NVML), None without a counter.
workers (one row per worker): worker, node (Ray's node id), node_ip, node_rank (Ray
       Train's, by IP), device, mem_peak_bytes over mem_total_bytes of mem_kind: "nvml used"
       (a GPU's used memory as NVML counts it, contexts and NCCL's buffers included, over
       NVML's total: FlagPerf's figure), "torch reserved" (a GPU without NVML: PyTorch's peak
       reservation over torch's total) or "cpu rss" (the worker process's peak RSS over the
       node's RAM); mem_torch_reserved_bytes (PyTorch's peak reservation on a GPU, None on a
       CPU); torch (its torch.__version__, the build string: "2.14.1+cu130", a vendor's
       "2.x+mc..."); tf32 (the matmul and cudnn TF32 switches as the process had them);
       backend (the process group's: gloo, nccl), backend_version (NCCL's, on nccl); env (the
       configured worker_env as the worker process had it); flops, box_flops,
       flops_batch_pixels, flops_images: the FLOPs of a training step on the worker's first
       batch, its box head's share, that batch's padded pixels and images (pipeline.worker.flops),
       None for a worker that trained no step.
attempts (one row per start of the worker group), bad_images (images left out): see TABLES.

The small tables are JSON lines files (NAME.jsonl); a checkpoint holds them and step_log.json,
the run directory holds them too (pipeline.records.results). In memory every table is columns: a dict of
equal-length lists or numpy arrays, the form pipeline.records.metrics takes. Every file is written whole
or not at all (write_atomically). Nothing here needs Ray or torch.
"""

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class StepRow(NamedTuple):
    """One training step of one worker: what pipeline.worker.step measures, the worker sends to the
    collector and the step log stores (the baseline and the benchmark make the same rows)."""
    worker: int
    epoch: int
    step: int
    images: int
    # Waiting for the next batch from the data stream and making tensors of it, then for every
    # other worker to have its own (the barrier before compute, see pipeline.worker.step).
    data_wait_s: float
    # Device copy + forward + backward + optimizer step, ended by a device synchronisation on
    # accelerators so that queued work is counted where it belongs.
    compute_s: float
    loss: float
    lr: float
    # Unix times: before waiting for the batch, after the step.
    start: float
    end: float
    # Pixels of the resized images, and of the padded tensor the model's transform made of them.
    image_pixels: int
    batch_pixels: int
    # The loss scale after the step's update (1.0 without loss scaling), and whether the scaler
    # found inf/nan gradients and skipped the optimizer step.
    loss_scale: float
    skipped: bool


TABLES = {
    "steps": StepRow._fields,
    "epochs": ("worker", "epoch", "start", "end", "wall_s", "train_s", "eval_s", "eval_images", "map", "ap50", "ap75",
               "energy_j"),
    "workers": ("worker", "node", "node_ip", "node_rank", "device", "mem_peak_bytes", "mem_total_bytes", "mem_kind",
                "mem_torch_reserved_bytes", "torch", "tf32", "backend", "backend_version", "env", "flops", "box_flops",
                "flops_batch_pixels", "flops_images"),
    # One row per start of the worker group. time_lost_s: from the end of the last step kept (or
    # the previous attempt's start) to this start; lost_*: work of the failed attempt not kept.
    "attempts": ("attempt", "start_epoch", "started", "resumed", "lost_steps", "lost_images", "time_lost_s"),
    # Images left out because they could not be used, once per split and file.
    "bad_images": ("split", "image_id", "path", "reason"),
}
SMALL_TABLES = tuple(name for name in TABLES if name != "steps")
STEP_SCHEMA = pa.schema([(name, {int: pa.int64(), float: pa.float64(), bool: pa.bool_()}[kind])
                         for name, kind in StepRow.__annotations__.items()])
STEP_LOG, STEP_LOG_INDEX = "steps.parquet", "step_log.json"


def empty_records() -> dict:
    return {name: {column: [] for column in columns} for name, columns in TABLES.items()}


def step_columns(rows: list[StepRow]) -> dict[str, list]:
    """Step rows as columns."""
    return {name: [row[i] for row in rows] for i, name in enumerate(StepRow._fields)}


def split(table: dict, taken) -> tuple[dict, dict]:
    """(the rows whose epoch satisfies `taken`, the others), each as columns."""
    rows = [taken(epoch) for epoch in table["epoch"]]
    return tuple({name: [v for v, keep in zip(values, rows) if keep == side] for name, values in table.items()}
                 for side in (True, False))


def step_file(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / STEP_LOG / f"epoch-{epoch:04d}.parquet"


def step_log_epochs(run_dir: str | Path) -> list[int]:
    """The epochs whose step file is in the run's step log."""
    return sorted(int(path.stem.split("-")[1]) for path in (Path(run_dir) / STEP_LOG).glob("epoch-*.parquet"))


def write_step_file(run_dir: str | Path, epoch: int, columns: dict) -> dict:
    """One epoch's step rows into the run's step log, written whole or not at all; returns the
    epoch's index entry."""
    path = step_file(run_dir, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pa.table(columns, schema=STEP_SCHEMA))
    return {"rows": len(columns["epoch"]), "images": int(sum(columns["images"])),
            "last_end": max(columns["end"], default=None)}


def step_file_rows(path: Path) -> int | None:
    """The rows of a step file, from its footer; None if there is no such file."""
    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else None


def read_steps(paths: list[Path], columns: tuple = TABLES["steps"]) -> dict[str, np.ndarray]:
    """Step files as numpy columns (about 60 MB for 1.5 million rows of every column)."""
    table = pq.read_table(paths, schema=STEP_SCHEMA, columns=list(columns)) if paths else STEP_SCHEMA.empty_table()
    return {name: table.column(name).to_numpy() for name in columns}


def load_steps(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The run's step log."""
    return read_steps([step_file(run_dir, epoch) for epoch in step_log_epochs(run_dir)])


def write_tables(folder: str | Path, records: dict) -> None:
    """Every table but the step log, and the step log's index (records["step_log"])."""
    folder = Path(folder)
    for name in SMALL_TABLES:
        columns = TABLES[name]
        rows = [dict(zip(columns, values)) for values in zip(*(records[name][column] for column in columns))]
        write_atomically(folder / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    index = {str(epoch): entry for epoch, entry in records["step_log"].items()}
    write_atomically(folder / STEP_LOG_INDEX, json.dumps(index) + "\n")


def load_tables(folder: str | Path) -> dict:
    """What write_tables wrote, as columns (the form pipeline.records.metrics takes)."""
    folder = Path(folder)
    records = {}
    for name in SMALL_TABLES:
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        records[name] = {column: [row[column] for row in rows] for column in TABLES[name]}
    index = json.loads((folder / STEP_LOG_INDEX).read_text())
    records["step_log"] = {int(epoch): entry for epoch, entry in index.items()}
    return records


def load_records(run_dir: str | Path) -> dict:
    """A results directory's raw logs: the tables and the step log."""
    return {**load_tables(run_dir), "steps": load_steps(run_dir)}



def write_atomically(path: Path, content: str | pa.Table) -> None:
    """Text, or a table as Parquet, into `path` whole or not at all: written to a temporary name
    beside it (".NAME.partial", which `report` and the step log's readers skip), then renamed over
    it, so that a process killed meanwhile leaves the previous file or none, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    if isinstance(content, str):
        partial.write_text(content)
    else:
        pq.write_table(content, partial)
    os.replace(partial, path)
