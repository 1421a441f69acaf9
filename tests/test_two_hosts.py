"""cluster/two-nodes-8gpu.yaml for real, on two hosts joined by a network link (tests/hosts.py):
`ray up` with only what its header says to edit, the README's `ray job submit` from the user's
machine with the cluster's token, a 2-worker CPU run with one worker per host, and the worker
host lost mid-epoch: brought back by the operator, the run finishes; not brought back, the run
ends in one line naming it. Then `ray down`; the hosts go whatever happens."""

import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import hosts
from test_faults import TWELVE_STEPS, check_honest_figures, latest_checkpoint_epoch, wait_for
from test_jobs import readme_command
from pipeline.data import synthetic
from pipeline.records.tables import load_records

ROOT = Path(__file__).resolve().parents[1]
HEAD, WORKER = hosts.HOSTS["frcnn-head"], hosts.HOSTS["frcnn-worker"]
SUBMIT = 'ray job submit --working-dir . -- python -m jobs.train --preset smoke --output-dir "$FRCNN_RESULTS"'
# The set and the run of tests/test_faults.py (24 training images, batch 1: 12 steps an epoch on
# each host's worker; clipped gradients), for 2 epochs. GLOO_SOCKET_IFNAME: the hosts' names
# resolve to no address of theirs (as on air-gapped nodes), and gloo would otherwise fall back
# to 127.0.0.1 (README, "Run on a cluster").
RUN = ["--synthetic-train-images", "0", "--batch-size", "1", "--max-epochs", "2", "--clip-grad-norm", "10",
       "--nodes", "2", "--placement-strategy", "STRICT_SPREAD", "--worker-env", "GLOO_SOCKET_IFNAME=eth0",
       "--max-failures", "1"]

# Skipped on a developer's machine without root or the tools; never in CI (.ci/run installs them).
pytestmark = pytest.mark.skipif((os.geteuid() != 0 or bool(hosts.missing_tools())) and not os.environ.get("CI"),
                                reason=f"needs root and {', '.join(hosts.missing_tools()) or 'nothing more'}")


def repository_copy(target: Path) -> Path:
    """The checkout as `ray up` should see it: tracked and untracked files, without what git ignores
    (a local .venv would be hashed file by file)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((ROOT / name).read_bytes())
    return target


def launcher_config(key: Path) -> str:
    """The shipped YAML with what its header tells a user to edit, and the setup command reusing
    this virtualenv instead of installing one; every other line as shipped."""
    text = (ROOT / "cluster" / "two-nodes-8gpu.yaml").read_text()
    edits = [("head_ip: 10.0.0.1", f"head_ip: {HEAD}"), ("- 10.0.0.2 ", f"- {WORKER} "),
             ("ssh_user: ubuntu", f"ssh_user: {hosts.USER}"),
             ("# ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {key}"),
             ("python3.11 -m venv .venv && .venv/bin/pip install -e . -c constraints.txt", f"ln -sfn {Path(sys.prefix)} .venv")]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.hosts = hosts.Hosts(folder)
        self.repo = folder / "repo"
        self.shared = folder / "shared"
        self.config = folder / "cluster.yaml"
        home = self.home = folder / "client"
        (home / "tmp").mkdir(parents=True)  # where `ray up` caches the resolved config (tempfile's TMPDIR)
        self.env = {**os.environ, "HOME": str(home), "TMPDIR": str(home / "tmp"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            self.env.pop(name, None)
        # Where Ray's ssh runner keeps this cluster's ControlMaster sockets, on the user's machine
        # and on the head (the same /tmp here): /tmp/ray_ssh_<user hash>/<cluster name hash>.
        name = yaml.safe_load((ROOT / "cluster" / "two-nodes-8gpu.yaml").read_text())["cluster_name"]
        user, cluster = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), name))
        self.ssh_sockets = Path(f"/tmp/ray_ssh_{user}") / cluster

    def remove(self) -> None:
        """The hosts, and what Ray's ssh runner left outside the test's folder."""
        self.hosts.stop()
        shutil.rmtree(self.ssh_sockets, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.ssh_sockets.parent.rmdir()  # if no other cluster's sockets are there

    def up(self) -> float:
        """Hosts, token, `ray up`; the seconds from `ray up` until the head's `ray status` shows two nodes."""
        self.remove()  # what a killed run left
        self.hosts.start()
        repository_copy(self.repo)
        synthetic.generate(self.shared / "coco", TWELVE_STEPS)
        self.config.write_text(launcher_config(self.hosts.key))
        subprocess.run(["bash", "-c", readme_command("`RAY_AUTH_MODE=token ray get-auth-token --generate").strip("`")],
                       env=self.env, check=True)
        started = time.time()
        self.launcher("up", "-y", "--no-config-cache")
        wait_for(lambda: re.search(r"Active:\s+2 local.cluster.node", self.head("ray status").stdout),
                 "both nodes in the head's ray status", timeout=120)
        return time.time() - started

    def launcher(self, *args: str) -> None:
        done = self.hosts.client(["ray", *args, str(self.config)], cwd=self.repo, env=self.env, capture_output=True,
                                 text=True, timeout=300)
        (self.folder / f"ray-{args[0]}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    def head(self, command: str) -> subprocess.CompletedProcess:
        environment = "export RAY_AUTH_MODE=token PATH=~/frcnn-ray-bench/.venv/bin:$PATH"
        return self.hosts.ssh("frcnn-head", f"{environment}; {command}")

    def alive_nodes(self) -> set[str]:
        token = (self.home / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(f"http://{HEAD}:8265/api/v0/nodes?detail=1",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        return {node["node_ip"] for node in nodes if node["state"] == "ALIVE"}

    def restart_worker(self) -> None:
        """What an operator does once the worker host is up again: the YAML's worker start commands
        on it (the head's autoscaler does not restart Ray on a node it has seen die)."""
        commands = yaml.safe_load(self.config.read_text())["worker_start_ray_commands"]
        self.hosts.ssh("frcnn-worker", "; ".join([f"export RAY_HEAD_IP={HEAD}", *commands]), timeout=120)
        wait_for(lambda: self.alive_nodes() == {HEAD, WORKER}, "the worker host back in the cluster", timeout=60)

    def ensure_worker(self) -> None:
        """The worker host up and in the cluster, brought back if a test left it lost."""
        if "frcnn-worker" not in self.hosts.processes:
            self.hosts.boot("frcnn-worker")
            self.hosts.wait_for_ssh("frcnn-worker")
            self.restart_worker()

    def submit(self, *extra: str, entry: str = SUBMIT, **env: str | None) -> subprocess.Popen:
        """The README's job command from the user's machine with the cluster's token (`env`: more
        environment; None unsets a name)."""
        command = readme_command(SUBMIT).replace(SUBMIT, entry) + " " + " ".join(extra)
        environment = {**self.env, "RAY_ADDRESS": f"http://{HEAD}:8265", "RAY_AUTH_MODE": "token",
                       "FRCNN_RESULTS": str(self.shared / "results"), **env}
        environment = {name: value for name, value in environment.items() if value is not None}
        return subprocess.Popen(["bash", "-c", command], cwd=self.repo, env=environment, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("two-hosts"))
    try:
        ready_s = cluster.up()
        print(f"ray up to both nodes in the head's ray status: {ready_s:.1f} s")
        yield cluster
        cluster.ensure_worker()
        cluster.launcher("down", "-y")
    finally:
        cluster.remove()


def training_worker_on(host: str) -> bool:
    """Whether a process of `host` is a Ray Train worker (Ray titles it ray::RayTrainWorker)."""
    titles = []
    for pid in hosts.netns_pids(host):
        with contextlib.suppress(OSError):
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return any(b"RayTrainWorker" in title for title in titles)


def finished(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = job.communicate(timeout=timeout)
    return job.returncode, output


def test_a_job_needs_the_token_and_a_python_that_can_run_the_project(cluster):
    code, output = finished(cluster.submit(RAY_AUTH_MODE=None))
    assert code != 0 and "Authentication required" in output, output[-2000:]
    # A node whose PATH gives a python without the project (here the system's own).
    code, output = finished(cluster.submit(entry=SUBMIT.replace("python -m", "env PATH=/usr/bin:/bin python3 -m")))
    lines = [line for line in output.splitlines() if line.startswith("frcnn-bench: ")]
    assert code != 0 and lines, output[-2000:]
    expected = r"frcnn-bench: /usr/bin/python3 \(Python 3\.\d+\.\d+\) cannot run the project: .*not installed; "
    assert re.match(expected, lines[-1]), output[-2000:]


def test_a_host_that_does_not_come_back_ends_the_run_in_one_line(cluster):
    # Each try to place the workers waits 3 s here instead of 60 (Ray Train's setting, which the
    # driver passes on to its controller).
    entry = SUBMIT.replace("python -m", "env RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=3 python -m")
    job = cluster.submit(*RUN, "--data-root", str(cluster.shared / "coco"), "--run-name", "not-back", entry=entry)
    wait_for(lambda: training_worker_on("frcnn-worker") or job.poll() is not None, "the worker host's training worker")
    cluster.hosts.kill("frcnn-worker")
    code, output = finished(job)
    assert code != 0
    line = [line for line in output.splitlines() if line.startswith("frcnn-bench: ")][-1]
    assert re.match(rf"frcnn-bench: training failed: worker controller: WorkerGroupStartupTimeoutError: .*; lost, "
                    rf"not back after \d+ tries: node {re.escape(WORKER)} \(tracebacks: ", line), line


def test_the_run_trains_across_the_link_and_survives_losing_the_worker_host(cluster):
    cluster.ensure_worker()
    run_dir = cluster.shared / "results" / "across"
    job = cluster.submit(*RUN, "--data-root", str(cluster.shared / "coco"), "--run-name", "across")
    wait_for(lambda: latest_checkpoint_epoch(run_dir) is not None or job.poll() is not None, "the first checkpoint")
    time.sleep(1.0)  # into the last epoch
    cluster.hosts.kill("frcnn-worker")
    lost_at = time.time()
    cluster.ensure_worker()
    print(f"the worker host back in the cluster {time.time() - lost_at:.1f} s after it was lost")
    code, output = finished(job)
    assert code == 0, output[-4000:]
    saved = check_honest_figures(run_dir, epochs=2)  # exact image counts, figures from the raw logs
    # The job's log (which `ray job submit` follows): the run joined the cluster and ended with its
    # summary and row.
    assert "Ray: joined the cluster at" in output and f"| {saved['config_label']} | fp32 | smoke |" in output
    assert {node["node_ip"] for node in saved["per_node"]} == {HEAD, WORKER}
    attempts = load_records(run_dir)["attempts"]
    assert saved["attempts"] == 2 and attempts["resumed"] == [False, True]
    assert attempts["time_lost_s"][1] > 0 and saved["lost_images"] == sum(attempts["lost_images"])
    assert list(run_dir.glob("checkpoint_*"))
    print(f"init_time {saved['init_time']:.1f} s, whole time {saved['whole_time_s']:.1f} s over 2 epochs")
