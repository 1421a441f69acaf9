"""The collector's bookkeeping, its methods called directly (the class Ray wraps; the
fault tests run it in a real Ray): step rows leave memory for the step log when their epoch ends,
a checkpoint holds the log's index, and a resume counts lost work once, from memory and the log."""

import time

import pytest

from pipeline.records.collector import Collector, StepLogError
from pipeline.records.tables import (StepRow, load_steps, load_tables, step_columns, step_file, step_log_epochs,
                                     write_step_file, write_tables)

Actor = Collector.__ray_actor_class__


def steps(epoch: int, count: int, end: float) -> list[StepRow]:
    """`count` steps of 2 images on each of 2 workers, the last one ending at `end`."""
    return [StepRow(worker=worker, epoch=epoch, step=step, images=2, data_wait_s=0.0, compute_s=1.0, loss=1.0, lr=0.1,
                    start=end - count + step, end=end - count + step + 1, image_pixels=4, batch_pixels=4,
                    loss_scale=1.0, skipped=False)
            for worker in (0, 1) for step in range(count)]


def checkpoint(actor, epoch: int, folder) -> dict:
    """What rank 0 does at an epoch's end, and what a restart reads back from the checkpoint."""
    folder.mkdir()
    write_tables(folder, actor.write_steps(epoch))
    return load_tables(folder)


def test_an_epochs_steps_go_to_the_log_and_leave_memory(tmp_path):
    actor = Actor(str(tmp_path))
    actor.begin_attempt(0, None)
    actor.add_steps(steps(0, 3, end=100.0))
    saved = checkpoint(actor, 0, tmp_path / "ckpt0")
    assert actor.tables["steps"]["epoch"] == []
    assert saved["step_log"] == {0: {"rows": 6, "images": 12, "last_end": 100.0}}
    assert len(load_steps(tmp_path)["epoch"]) == 6


def test_a_resume_counts_lost_steps_once_from_memory_and_the_log(tmp_path):
    actor = Actor(str(tmp_path))
    actor.begin_attempt(0, None)
    actor.add_steps(steps(0, 3, end=100.0))
    saved = checkpoint(actor, 0, tmp_path / "ckpt0")
    # Epoch 1's steps reach the log but its checkpoint never registers; epoch 2 has begun.
    actor.add_steps(steps(1, 3, end=200.0))
    actor.write_steps(1)
    actor.add_steps(steps(2, 1, end=201.0))
    before = time.time()
    actor.begin_attempt(1, saved)
    attempts = actor.records()["attempts"]
    assert attempts["lost_steps"] == [0, 6 + 2] and attempts["lost_images"] == [0, 16]
    assert attempts["time_lost_s"][1] >= before - 100.0  # from the end of the last step kept
    assert step_log_epochs(tmp_path) == [0] and actor.tables["steps"]["epoch"] == []
    # The redone epoch 1 replaces the lost one: each epoch once in the log.
    actor.add_steps(steps(1, 3, end=300.0))
    checkpoint(actor, 1, tmp_path / "ckpt1")
    assert sorted(load_steps(tmp_path)["epoch"].tolist()) == [0] * 6 + [1] * 6


@pytest.mark.parametrize("damage", ["missing", "shorter"])
def test_a_step_log_that_does_not_match_the_checkpoint_is_named(tmp_path, damage):
    actor = Actor(str(tmp_path))
    actor.begin_attempt(0, None)
    actor.add_steps(steps(0, 3, end=100.0))
    saved = checkpoint(actor, 0, tmp_path / "ckpt0")
    path = step_file(tmp_path, 0)
    path.unlink()
    if damage == "shorter":
        write_step_file(tmp_path, 0, step_columns(steps(0, 1, end=100.0)))
    expected = "missing" if damage == "missing" else "2 rows"
    with pytest.raises(StepLogError, match=f"{path}: {expected}, the checkpoint resumed from recorded 6"):
        Actor(str(tmp_path)).begin_attempt(1, saved)
