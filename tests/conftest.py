"""Shared fixtures: synthetic data sets and a real Ray head on 127.0.0.1, stopped by the test."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import synthetic

RAY = str(Path(sys.executable).with_name("ray"))


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

    def __init__(self, num_cpus: int, log_dir: Path):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(log_dir / "ray-head.log", "w")
        self.process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
             "--num-cpus", str(num_cpus), "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log.name}")
            probe = subprocess.run([RAY, "status", "--address", self.address], capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray head at {self.address} not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    import ray

    head = RayHead(num_cpus=5, log_dir=tmp_path_factory.mktemp("ray"))
    try:
        yield head
    finally:
        ray.shutdown()
        head.stop()


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """7 training images (one without objects, dropped) and 7 val images, ~64 px."""
    root = tmp_path_factory.mktemp("tiny_coco")
    return synthetic.generate(root, synthetic.SyntheticSpec(
        train_images=7, val_images=7, num_categories=3, image_size=64, empty_fraction=0.15, seed=3))
