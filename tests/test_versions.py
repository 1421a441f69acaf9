"""The dependencies: the locks against pyproject.toml, the versions installed against the lock in
use, and what a python with a torch below the floor is told, by the vendor install and by the
job entrypoint."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pipeline import versions

ROOT = Path(__file__).resolve().parents[1]
FLOORED = ("torch", "torchvision", "ray")
sys.path.insert(0, str(ROOT / "cluster"))
import install_keeping_torch  # noqa: E402


def pins(lock: Path) -> dict[str, str]:
    return {versions.canonical(name): version for name, version in
            (line.split("==") for line in lock.read_text().splitlines() if line and not line.startswith("#"))}


def test_the_locks_pin_every_dependency_and_the_floor_lock_the_floors():
    names = [versions.canonical(name) for name in versions.floors()] + ["pytest", "pytest-timeout"]
    reference, floor = pins(ROOT / "constraints.txt"), pins(ROOT / "constraints-floor.txt")
    assert set(names) <= set(reference) and set(names) <= set(floor)
    floors = versions.floors()
    assert all(floors[name] for name in FLOORED)
    assert {name: floor[name] for name in FLOORED} == {name: floors[name] for name in FLOORED}
    assert all(versions.release(reference[name]) >= versions.release(floors[name]) for name in FLOORED)


def test_installed_as_the_lock_in_use_pins():
    """torch, torchvision and Ray are what the lock this environment was installed with pins:
    constraints.txt, or in CI's floor lane (FRCNN_LOCK) constraints-floor.txt, the floors."""
    lock = pins(ROOT / os.environ.get("FRCNN_LOCK", "constraints.txt"))
    assert {name: metadata.version(name) for name in FLOORED} == {name: lock[name] for name in FLOORED}


def test_release_ignores_local_labels():
    assert versions.release("2.4.0+mc2.29.0.9") == (2, 4, 0) < versions.release("2.10")
    assert versions.release("2.3") == versions.release("2.3.0")


def test_the_vendor_constraints_keep_what_is_installed():
    lock = "# a comment\nnumpy==2.4.6\nray==2.58.0\ntorch==2.14.1\nTyping_Extensions==4.15.0\n"
    keep = {"torch": "2.4.0+mc2.29.0.9", "numpy": "1.26.4", "typing-extensions": "4.12.2"}
    assert install_keeping_torch.constraints(lock, keep).splitlines() == [
        "# a comment", "ray==2.58.0", "numpy==1.26.4", "torch==2.4.0+mc2.29.0.9", "typing-extensions==4.12.2"]


def fake_distributions(folder: Path, **found: str) -> Path:
    """Distribution metadata only (NAME-VERSION.dist-info/METADATA), for a python that finds
    these versions first on its path: what a vendor's old torch looks like to pip and to
    importlib.metadata."""
    for name, version in found.items():
        info = folder / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


@pytest.fixture
def old_torch(tmp_path) -> dict:
    """This python's environment with MetaX's torch 2.0.0 and its torchvision 0.15.1 first on its path."""
    folder = fake_distributions(tmp_path / "site", torch="2.0.0+mc2.18.0.8", torchvision="0.15.1")
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def test_the_vendor_install_stops_at_a_torch_below_the_floor_in_one_line(old_torch):
    done = subprocess.run([sys.executable, str(ROOT / "cluster" / "install_keeping_torch.py")], env=old_torch,
                          capture_output=True, text=True, timeout=60)
    floors = versions.floors()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"frcnn-bench: {sys.executable} (Python {sys.version.split()[0]}) has torch 2.0.0+mc2.18.0.8 "
                           f"(the floor is {floors['torch']}), torchvision 0.15.1 (the floor is {floors['torchvision']}), "
                           "below the project's floor (pyproject.toml); ask the vendor for a newer build\n")


def test_the_job_entrypoint_names_a_torch_below_the_floor(old_torch):
    done = subprocess.run([sys.executable, "-m", "jobs.train"], cwd=ROOT, env=old_torch, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert f"cannot run the project: torch 2.0.0+mc2.18.0.8 (the floor is {versions.floors()['torch']})" in done.stderr
