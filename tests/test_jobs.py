"""The job entrypoint for real, starting its own local Ray (the README's exact `ray job submit`
command runs in tests/test_auth.py, against a head with token authentication; what `--verbose`
shows, in tests/data/test_bad_input.py)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import session_pids, venv_env

ROOT = Path(__file__).resolve().parents[1]


def readme_command(prefix: str) -> str:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"README should have one line starting with {prefix!r}"
    return matches[0]


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
    # Before training, what computes on each node; after it, the FLOPs and how much of the device.
    assert any(re.fullmatch(r"node \S+ \(\w{8}\): torch \S+( \(CUDA [\d.]+\))?, \d+ x CPU \(.+\), "
                            r"collective backend gloo", line) for line in lines), output
    assert any(re.fullmatch(r"compute: [\d.]+ GFLOP per image trained \(forward and backward, torch's FLOP counter\), "
                            r"\S+ TFLOP/s per device over the compute time; utilisation unknown: no fp32 peak known for "
                            r"CPU \(.+\) \(give it with --peak-tflops\)", line) for line in lines), output
