"""Faults for real, on the session's test head: a training worker killed by its pid mid-epoch, then
the driver killed and the run resumed by its name; a loss that diverges. The driver runs as
`python -m pipeline run`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.util.state import list_actors

from conftest import session_pids, venv_env
from figures_from_logs import assert_figures_match
from pipeline.data import synthetic
from pipeline.records.tables import load_records

ROOT = Path(__file__).resolve().parents[1]


# 24 training images: 12 steps an epoch per worker at batch 1 with 2 workers.
TWELVE_STEPS = synthetic.SyntheticSpec(train_images=24, val_images=4, num_categories=3, image_size=64,
                                       empty_fraction=0.0, seed=4)


@pytest.fixture(scope="module")
def twelve_steps(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("data"), TWELVE_STEPS)


def start_driver(ray_head, data_root: Path, output_dir: Path, run_name: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "run", "--preset", "smoke", "--synthetic-train-images", "0",
               "--data-root", str(data_root), "--output-dir", str(output_dir), "--run-name", run_name,
               "--batch-size", "1", "--max-epochs", "3", "--clip-grad-norm", "10", *extra]
    with open(output_dir / f"{run_name}-driver.log", "a") as log:
        return subprocess.Popen(command, cwd=ROOT, env=venv_env(RAY_ADDRESS=ray_head.address), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def training_worker_pids(ray_head) -> list[int]:
    """The pids of the run's training workers, from this head's state API (an explicit address:
    without one, Ray would ask whichever cluster was started last on this machine)."""
    actors = list_actors(address=f"http://127.0.0.1:{ray_head.dashboard_port}",
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(actor.pid for actor in actors)


def kill_session(driver: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of the driver's session (its own, from start_new_session)."""
    for pid in session_pids(driver.pid):
        os.kill(pid, signal.SIGKILL)


def finish(driver: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Waits for the driver to succeed; whatever is left of its session is killed in any case."""
    try:
        code = driver.wait(timeout=timeout)
    finally:
        kill_session(driver)
    assert code == 0, log.read_text()[-4000:]


def check_honest_figures(run_dir: Path, epochs: int) -> dict:
    saved = json.loads((run_dir / "result.json").read_text())
    records = load_records(run_dir)
    assert saved["epochs"] == epochs
    assert sorted(set(records["steps"]["epoch"])) == list(range(epochs))
    # Each epoch counted once: 12 steps of 1 image per worker and epoch, whatever was redone.
    assert saved["images_trained"] == epochs * 2 * 12
    assert sorted(records["epochs"]["epoch"]) == sorted(list(range(epochs)) * 2)
    assert_figures_match(run_dir)
    return saved


def latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train has registered (written to its snapshot, so
    that a restart gets it: a checkpoint folder alone may not be registered yet), if any."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = snapshot["latest_checkpoint_result"]
    return None if latest is None else latest["metrics"]["epoch"]


def test_a_killed_worker_restarts_and_a_stopped_driver_resumes_by_its_name(ray_head, twelve_steps, tmp_path):
    """One run, two faults: a training worker killed by its pid in the second epoch (Ray Train
    restarts the group from the last checkpoint), then the driver killed after the restarted
    group's next checkpoint, and the run resumed by its name from there."""
    first = start_driver(ray_head, twelve_steps, tmp_path, "faults", "--max-failures", "1")
    run_dir = tmp_path / "faults"
    try:
        wait_for(lambda: latest_checkpoint_epoch(run_dir) is not None or first.poll() is not None, "the first checkpoint")
        pids = training_worker_pids(ray_head)
        assert len(pids) == 2
        time.sleep(1.0)  # into the second epoch's training
        os.kill(pids[0], signal.SIGKILL)
        killed_after = latest_checkpoint_epoch(run_dir)
        wait_for(lambda: (latest_checkpoint_epoch(run_dir) or 0) > killed_after or first.poll() is not None,
                 "the restarted group's checkpoint")
        assert first.poll() is None, "the first driver ended before it could be stopped"
    finally:
        kill_session(first)
        first.wait()
    assert not (run_dir / "result.json").exists()
    second = start_driver(ray_head, twelve_steps, tmp_path, "faults", "--max-failures", "1")
    finish(second, tmp_path / "faults-driver.log")
    saved = check_honest_figures(run_dir, epochs=3)
    attempts = load_records(run_dir)["attempts"]
    assert saved["attempts"] == 3 and attempts["attempt"] == [0, 1, 2]
    assert attempts["resumed"] == [False, True, True]
    assert attempts["start_epoch"][0] == 0 and attempts["start_epoch"][1] in (1, 2)
    assert attempts["start_epoch"][2] > attempts["start_epoch"][1]
    assert attempts["time_lost_s"][1] > 0 and saved["time_lost_s"] == sum(attempts["time_lost_s"])
    assert saved["lost_images"] == sum(attempts["lost_images"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ray_head, twelve_steps, tmp_path):
    # Epoch 0 trains normally; from epoch 1 the lr is multiplied by 1e30, so the loss diverges.
    # A restart is allowed, to show that a non-finite loss is not retried.
    driver = start_driver(ray_head, twelve_steps, tmp_path, "diverged", "--max-epochs", "2", "--lr-steps", "1",
                          "--lr-gamma", "1e30", "--max-failures", "1")
    log = tmp_path / "diverged-driver.log"
    try:
        code = driver.wait(timeout=240)
    finally:
        kill_session(driver)
    output = log.read_text()
    assert code == 1, output[-4000:]
    last = [line for line in output.splitlines() if line.startswith("frcnn-bench:")][-1]
    assert re.match(r"frcnn-bench: training failed: worker (\d): NonFiniteLoss: "
                    r"loss is (nan|inf|-inf) at epoch 1 step \d+ on worker \1 \(tracebacks: ", last), last
    snapshot = json.loads((tmp_path / "diverged" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["metrics"]["epoch"] == 0
