"""Token authentication for real: a head started with RAY_AUTH_MODE=token, as both cluster
configurations start theirs. Without the token neither `ray job submit` nor the dashboard's HTTP
job API lets anyone in; with it the README's exact job command reaches the entrypoint (asked for
its help, which ends the job in seconds: tests/test_two_hosts.py runs the same command to the end,
under CI on every run). And the Ray that `run` starts for debugging takes connections from this
machine only."""

import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import LOOPBACK, RayHead, listening_sockets, session_pids, stop_session, venv_env
from test_jobs import readme_command

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = "ray job submit --working-dir . -- python -m jobs.train --preset smoke"


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    token = secrets.token_hex(32)
    head = RayHead(num_cpus=5, log_dir=tmp_path_factory.mktemp("ray"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        wait_for_dashboard_with(head.dashboard_port, token)
        yield head, token
    finally:
        head.stop()


def jobs_api(port: int, token: str | None) -> int:
    """The HTTP status of the dashboard's job list, with `token` as a bearer token or without one."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers),
                                    timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_dashboard_with(port: int, token: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if jobs_api(port, token) == 200:
                return
        except OSError:  # not listening yet
            pass
        assert time.time() < deadline, f"the dashboard on port {port} did not answer with the token"
        time.sleep(1)


def submit(head: RayHead, home: Path, tmp_path: Path, *extra: str, **auth: str) -> subprocess.CompletedProcess:
    """The smoke job submitted from a clean HOME (no ~/.ray/auth_token) with `auth` in the
    environment; `extra`: more arguments for the entrypoint."""
    home.mkdir(exist_ok=True)
    env = {name: value for name, value in venv_env().items() if not name.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_ADDRESS=f"http://127.0.0.1:{head.dashboard_port}", FRCNN_RESULTS=str(tmp_path),
               **auth)
    return subprocess.run(["bash", "-c", " ".join([readme_command(SUBMIT), *extra])], cwd=ROOT, capture_output=True, text=True,
                          timeout=280, env=env)


def test_the_job_api_answers_401_without_the_token(token_head):
    head, token = token_head
    assert jobs_api(head.dashboard_port, None) == 401
    assert jobs_api(head.dashboard_port, "not-the-token") in (401, 403)
    assert jobs_api(head.dashboard_port, token) == 200


def test_a_job_without_the_token_is_refused_and_with_it_runs(token_head, tmp_path):
    head, token = token_head
    refused = submit(head, tmp_path / "home", tmp_path)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stderr + refused.stdout, refused.stderr[-2000:]
    wrong = submit(head, tmp_path / "home", tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode != 0 and not list(tmp_path.glob("smoke-*"))
    done = submit(head, tmp_path / "home", tmp_path, "--help", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--peak-tflops" in done.stdout  # the entrypoint's help, from the job's log
    print(f"refused:\n{refused.stderr[-600:]}\nwrong token:\n{wrong.stderr[-600:]}\naccepted:\n{done.stdout[-400:]}")


def test_the_local_ray_that_run_starts_listens_on_127_0_0_1_only():
    script = ("import sys, ray\n"
              "from pipeline.config import resolve\n"
              "from pipeline.run import connect\n"
              "print(connect(resolve('smoke'), verbose=False), flush=True)\n"
              "sys.stdin.read()\n"
              "ray.shutdown()\n")
    env = {name: value for name, value in venv_env().items() if name != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True, start_new_session=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        said = process.stdout.readline()
        assert "started a local instance" in said and "listening on 127.0.0.1 only" in said, said
        sockets = listening_sockets(session_pids(process.pid))
        # The probe sees Ray's servers (else an empty set would pass), and none listens beyond loopback.
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
        assert {s for s in sockets if s[1] not in LOOPBACK} == set()
        print("\n".join(f"{name:16} {address}:{port}" for name, address, port in sorted(sockets)))
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        stop_session(process)

