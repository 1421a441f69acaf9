"""The progress display's lines from known snapshots of the collector, on a real terminal
(a pty) and on a pipe-like stream."""

import io
import os
import pty

from pipeline.progress import Progress, describe, duration

TRAINING = {"now": 1000.0, "started": 900.0, "start_epoch": 0, "images_per_s": 12.34,
            "latest": {0: (1, 4, 2.0), 1: (1, 3, 1.0)}, "evaluated": {0: (0, 8), 1: (0, 8)}, "last_map": (0, 0.1234)}


def test_a_training_line_shows_the_slowest_worker_and_the_eta():
    phase, line, fraction = describe(TRAINING, steps_per_epoch=10, max_epochs=4, val_images=16)
    # Slowest worker: epoch 1, step 3 -> 14 of 40 steps done, in the 100 s since the first step.
    assert phase == (1, "train") and fraction == 14 / 40
    assert line == f"epoch 2/4  step 4/10  12.3 img/s  loss 1.500  mAP 0.123 (epoch 1)  ETA {duration(100 * 26 / 14)}"
    assert duration(100 * 26 / 14) == "3m06s"


def test_evaluation_counts_the_val_images_inferred_by_all_workers():
    snapshot = {**TRAINING, "latest": {0: (1, 9, 1.0), 1: (1, 9, 1.0)}, "evaluated": {0: (1, 5), 1: (1, 3)}}
    phase, line, _ = describe(snapshot, 10, 4, 16)
    assert phase == (1, "eval") and line.startswith("epoch 2/4  eval 8/16 images  12.3 img/s")
    snapshot["evaluated"] = {0: (1, 9), 1: (1, 7)}
    assert "eval 16/16 images, COCOeval" in describe(snapshot, 10, 4, 16)[1]


def test_a_resumed_run_counts_its_eta_from_its_own_steps():
    # Resumed at epoch 3 of 4: 35 of 40 steps done, 5 of them in this attempt's 100 s.
    snapshot = {**TRAINING, "start_epoch": 3, "latest": {0: (3, 4, 1.0)}, "last_map": None}
    _, line, fraction = describe(snapshot, 10, 4, 16)
    assert fraction == 35 / 40 and line.endswith("loss 1.000  ETA 1m40s")


def test_before_the_first_step():
    snapshot = {**TRAINING, "latest": {}, "evaluated": {}, "last_map": None}
    assert describe(snapshot, 10, 4, 16) == ((0, "start"), "epoch 1/4  starting", 0.0)


def test_durations():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3700)] == ["0s", "59s", "1m01s", "59m59s", "1h01m"]


def test_not_a_terminal_a_line_per_phase_and_interval():
    stream = io.StringIO()
    progress = Progress(None, steps_per_epoch=10, max_epochs=4, val_images=16, stream=stream, interval=3600)
    progress.show(TRAINING)
    progress.show({**TRAINING, "now": 1001.0})  # same phase, within the interval: no line
    progress.show({**TRAINING, "latest": {0: (1, 9, 1.0)}, "evaluated": {0: (1, 2)}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(" 35%  epoch 2/4  step 4/10")
    assert lines[1].startswith(" 50%  epoch 2/4  eval 2/16 images")


def read_all(master: int) -> str:
    """Everything written to the pty, whose writing end is closed: one read may return only part
    of it, so read until the kernel says the closed end is drained (EIO on Linux)."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: drained, and the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_on_a_terminal_one_line_redrawn_with_a_bar():
    master, slave = pty.openpty()
    with open(slave, "w") as stream:
        progress = Progress(None, steps_per_epoch=10, max_epochs=4, val_images=16, stream=stream)
        progress.show(TRAINING)
        progress.show({**TRAINING, "latest": {0: (1, 5, 2.0), 1: (1, 5, 1.0)}})
        progress.show({**TRAINING, "latest": {0: (1, 9, 1.0)}, "evaluated": {0: (1, 2)}})
    shown = read_all(master)
    os.close(master)
    # The pty turns "\n" into "\r\n"; a redraw is a bare "\r".
    first, second = shown.split("\r\n")
    assert first.startswith("\r[########................]  35%  epoch 2/4  step 4/10")
    assert "\r[##########..............]  40%  epoch 2/4  step 6/10" in first
    assert second.startswith("[############............]  50%  epoch 2/4  eval 2/16 images")
