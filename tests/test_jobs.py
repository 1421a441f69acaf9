"""The job entrypoint for real: the README's exact `ray job submit` command against a head this
test starts, and the same entrypoint starting its own local Ray."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import session_pids, venv_env

ROOT = Path(__file__).resolve().parents[1]


def readme_command(prefix: str) -> str:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"README should have one line starting with {prefix!r}"
    return matches[0]


def wait_for_dashboard(port: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_readme_job_command_runs_the_smoke_job(ray_head, tmp_path):
    command = readme_command("ray job submit --working-dir . -- python -m jobs.train --preset smoke")
    wait_for_dashboard(ray_head.dashboard_port)
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env=venv_env(RAY_ADDRESS=f"http://127.0.0.1:{ray_head.dashboard_port}",
                                       FRCNN_RESULTS=str(tmp_path)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    # The job's log (which `ray job submit` follows) ends with the run's summary.
    assert "| config | precision | fix_hp | e2e_time | p_whole | p_train | p_core | map | mem |" in done.stdout
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert run_dir.name.startswith("smoke-") and result["config"]["preset"] == "smoke"
    assert result["workers"] == 2 and result["images_trained"] > 0
    assert f"| {result['config_label']} | fp32 | smoke |" in done.stdout
    assert "Ray: joined the cluster at" in done.stdout and not re.search(r"\(RayTrainWorker pid=", done.stdout)


def test_verbose_shows_what_ray_says(ray_head, tiny_coco, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--preset", "smoke", "--verbose",
                           "--synthetic-train-images", "0", "--data-root", str(tiny_coco), "--output-dir", str(tmp_path)],
                          cwd=ROOT, env=venv_env(RAY_ADDRESS=ray_head.address), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\(RayTrainWorker pid=\d+\)", done.stdout + done.stderr)


def test_the_same_entrypoint_starts_a_local_ray_without_a_cluster(tmp_path):
    env = venv_env()
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "jobs.train", "--preset", "smoke", "--data-root",
                                str(tmp_path / "data"), "--output-dir", str(tmp_path / "results")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        for pid in session_pids(process.pid):  # whatever the local Ray left behind
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "Ray: started a local instance" in output
    (run_dir,) = (tmp_path / "results").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["workers"] == 2
    check_quiet_line_output(output)


# Ray's own output: lines prefixed "(ActorName pid=N)", its loggers' "INFO"/"WARNING" lines (the
# "Failed to query Ray Train Controller actor state" one among them), warnings, tracebacks.
RAY_NOISE = re.compile(r"\(\w+ pid=\d+|\b(INFO|WARNING|ERROR)\b|Failed to query|[Ww]arning:|Traceback|Dataset \w+ execution")


# The one exception: what the raylet pushes to every driver (real errors such as a worker killed
# for memory, and this warning on machines of few cores), which Ray offers no way to filter
# (ray-project/ray#63800); the README says so.
WORKER_POOL_WARNING = re.compile(r"\(raylet\)(\x1b\[0m)? WARNING: \d+ PYTHON worker processes have been started on node")


def check_quiet_line_output(output: str) -> None:
    """Output that is not a terminal's: plain lines, progress among them, none of Ray's own."""
    lines = [line for line in output.splitlines() if not WORKER_POOL_WARNING.search(line)]
    assert "\r" not in output and not [line for line in lines if "\x1b" in line]
    assert not [line for line in lines if RAY_NOISE.search(line)], output
    # A line of training or of evaluation: a 2-step epoch can pass between two polls of the display.
    assert any(re.match(r" *\d+%  epoch 1/1  (step \d+/\d+|eval \d+/\d+ images)[ ,\w]*  [\d.]+ img/s  loss [\d.]+", line)
               for line in lines), output
    assert "result row:" in lines and "per worker:" in lines
