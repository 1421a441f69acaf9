"""Shared fixtures: synthetic data sets and a real Ray head started with --node-ip-address
127.0.0.1 (Ray 2.58 advertises the machine's own address for it), stopped by the test."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import synthetic

RAY = str(Path(sys.executable).with_name("ray"))


def venv_env(**extra) -> dict:
    """This environment with the test's virtualenv first on PATH: a job's `python` is then it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def free_port() -> int:
    """A free TCP port outside 10002-19999, Ray's default worker port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


class RayHead:
    """`ray start --head --block` in its own process group; stop() signals that group only."""

    def __init__(self, num_cpus: int, log_dir: Path, num_gpus: int | None = None, **env: str):
        """`num_gpus`: the GPUs the head advertises, whether it has them or not (default: those
        Ray finds). `env`: more environment for the head's processes (RAY_AUTH_MODE=token, its token)."""
        gpus = [] if num_gpus is None else ["--num-gpus", str(num_gpus)]
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = venv_env(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{self.dashboard_port}", **env)
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(log_dir / "ray-head.log", "w")
        self.process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
             "--num-cpus", str(num_cpus), *gpus, "--disable-usage-stats"],
            # Ray Train's placement-group cleaner asks the state API whether its controller lives;
            # without an address that API picks the cluster started last on this machine, and
            # removes the run's placement group when the actor is not found there.
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log.name}")
            probe = subprocess.run([RAY, "status", "--address", self.address], capture_output=True, env=self.env)
            if probe.returncode == 0:
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray head at {self.address} not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        stop_session(self.process)
        self.log.close()


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM to every process of `process`'s session (its own, from start_new_session); what is
    left after 2 s gets SIGKILL (Ray's graceful drain can take 30 s, and a test cluster has nothing
    to drain). Returns when none is left."""
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 30)):
        deadline = time.time() + wait
        for pid in session_pids(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while session_pids(process.pid) and time.time() < deadline:
            process.poll()  # reaps the session leader, which otherwise stays a zombie
            time.sleep(0.2)
    process.wait()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(pids: list[int]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in one of `pids`: the sockets in
    state 0A (LISTEN) of /proc/net/tcp and tcp6, matched to the processes' descriptors by inode."""
    listening = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].split(":")
                # The kernel prints the address as 32-bit words in host (little-endian) order.
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                listening[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.add((name, *listening[target[8:-1]]))
    return found


def session_pids(session: int) -> list[int]:
    """Live processes of a session, from /proc (field 6 of /proc/<pid>/stat; zombies excluded)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="session")
def session_head(tmp_path_factory):
    """One head for the whole session: starting one costs seconds, and runs leave nothing on it."""
    head = RayHead(num_cpus=5, log_dir=tmp_path_factory.mktemp("ray"))
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def ray_head(session_head):
    """The session's head; the test process's connection to it is closed after each module, so
    that every module starts unconnected (some start Ray instances of their own)."""
    import ray

    try:
        yield session_head
    finally:
        ray.shutdown()


def tiny_config(ray_head, data_root, output_dir, **overrides):
    """A run at toy size on `ray_head`: random init, 64/96 px, batch 2, 1 epoch."""
    from pipeline.config import resolve

    values = dict(data_root=str(data_root), output_dir=str(output_dir), ray_address=ray_head.address,
                  use_gpu=False, backbone_weights="none", min_size=64, max_size=96, box_batch_size_per_image=32,
                  batch_size=2, lr=0.005, warmup_iters=2, lr_steps=(), max_epochs=1)
    return resolve(**{**values, **overrides})


SHARED_WORKERS = 3


@pytest.fixture(scope="session")
def shared_run(session_head, tiny_coco, tmp_path_factory) -> Path:
    """One real run that several tests check different things of (tests/test_run.py,
    tests/records/test_report.py): 3 workers (7 val images: not a multiple of 3), 2 epochs, an environment
    variable for the workers. Its results folder: runs/w3 under a folder of its own."""
    import ray

    from pipeline.run import run

    folder = tmp_path_factory.mktemp("runs")
    try:
        run(tiny_config(session_head, tiny_coco, folder, num_workers=SHARED_WORKERS, max_epochs=2,
                        run_name=f"w{SHARED_WORKERS}", worker_env="FRCNN_PROBE=on"))
    finally:
        ray.shutdown()
    return folder / f"w{SHARED_WORKERS}"


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """7 training images (one without objects, dropped) and 7 val images, ~64 px. Shared by the
    session: a test that let a run replace it (a preset's synthetic set on this root) fails here."""
    root = synthetic.generate(tmp_path_factory.mktemp("tiny_coco"), synthetic.SyntheticSpec(
        train_images=7, val_images=7, num_categories=3, image_size=64, empty_fraction=0.15, seed=3))
    stamp = (root / "synthetic.json").read_text()
    yield root
    assert (root / "synthetic.json").read_text() == stamp, "a test replaced the session's tiny_coco set"


def image_file(folder: Path, name: str, size=(48, 32), mode="RGB", **save) -> Path:
    path = folder / name
    Image.new(mode, size, "red" if mode == "RGB" else 128).save(path, **save)
    return path


def truncated(path: Path) -> Path:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def make_damaged_coco(root: Path) -> Path:
    """A synthetic set whose train split has a missing, a truncated and a wrongly sized image, a
    grayscale and a PNG-named-.jpg one that are fine, and whose val split has a truncated one, a
    FIFO (which blocks whoever opens it) and an entry whose file_name leaves the folder for a
    real JPEG (../outside.jpg)."""
    from pipeline.data.manifest import split_paths

    root = synthetic.generate(root, synthetic.SyntheticSpec(
        train_images=10, val_images=5, num_categories=3, image_size=64, empty_fraction=0.0, seed=8))
    train = sorted((root / "train2017").glob("*.jpg"))
    train[0].unlink()
    truncated(train[1])
    with Image.open(train[2]) as image:
        image.resize((image.width + 8, image.height)).save(train[2])
    with Image.open(train[3]) as image:
        image.convert("L").save(train[3])
    with Image.open(train[4]) as image:
        image.save(train[4], format="PNG")
    truncated(sorted((root / "val2017").glob("*.jpg"))[0])
    os.mkfifo(root / "val2017" / "fifo.jpg")
    image_file(root, "outside.jpg")  # 48x32, as its entry says: only where it lies makes it unusable
    val_annotations = split_paths(root, "val")[0]
    doc = json.loads(val_annotations.read_text())
    doc["images"] += [{"id": 901, "file_name": "fifo.jpg", "width": 48, "height": 32},
                      {"id": 902, "file_name": "../outside.jpg", "width": 48, "height": 32}]
    val_annotations.write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="session")
def two_node_run(tmp_path_factory) -> dict:
    """One real run that two tests check different things of: the smoke preset, 2 epochs, on two
    Ray nodes on this machine (ray.cluster_utils.Cluster, as Ray's own multi-node tests do), one
    worker per node (tests/test_multinode.py), over the damaged set, whose unusable images either
    node's decoding tasks meet (tests/data/test_bad_input.py). Returns the run's result, its directory
    and the ids of the two nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import resolve
    from pipeline.run import run

    folder = tmp_path_factory.mktemp("two-nodes")
    data_root = make_damaged_coco(folder / "coco")
    ray.shutdown()  # a module's connection to the session's head
    # Ray picks the nodes' address itself: an explicit 127.0.0.1 here is not the address it then
    # advertises for the GCS, and the driver cannot connect.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "gcs_server_port": free_port(), "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        result = run(resolve("smoke", data_root=str(data_root), synthetic_train_images=0, output_dir=str(folder),
                             run_name="two-nodes", placement_strategy="SPREAD", nodes=2, max_bad_images=3,
                             max_epochs=2))
        node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"result": result, "run_dir": folder / "two-nodes", "node_ids": node_ids}


@pytest.fixture(scope="session")
def acceptance_flow(session_head, tmp_path_factory) -> dict:
    """The acceptance flow at toy size on CPU workers, on the session's head: its results and
    checks (tests/bench/test_acceptance.py); its 1x1 fp32 run is the one-device run of the report in
    tests/records/test_report.py. Returns the flow's folder, results and checks."""
    import ray

    from pipeline.bench import acceptance

    folder = tmp_path_factory.mktemp("acceptance")
    spec = acceptance.Spec(steps=2, batch_size=2, image_size=64, val_images=4, min_size=32, max_size=48,
                           use_gpu=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", session_head.address)
        try:
            results, found = acceptance.run_all(spec, folder)
        finally:
            ray.shutdown()
    return {"folder": folder, "results": results, "checks": found}
