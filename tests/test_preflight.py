"""Preflight on a real Ray head (127.0.0.1, 5 CPUs, no GPU): bounded, explicit failures."""

import subprocess
import sys

import pytest

from conftest import venv_env
from pipeline import synthetic
from pipeline.config import resolve
from pipeline.preflight import PreflightError, check_nodes_see
from pipeline.run import run


@pytest.fixture(scope="module")
def sixteen_images(tmp_path_factory):
    """Enough training images for the 2x8 presets' 16 workers, so that the data passes."""
    return synthetic.generate(tmp_path_factory.mktemp("coco"), synthetic.SyntheticSpec(
        train_images=16, val_images=2, num_categories=3, image_size=32, empty_fraction=0.0, crowd_fraction=0.0,
        seed=2))


def test_gpu_preset_on_a_cpu_cluster_fails_fast(ray_head, sixteen_images, tmp_path):
    config = resolve("1x8", data_root=str(sixteen_images), output_dir=str(tmp_path), ray_address=ray_head.address)
    with pytest.raises(PreflightError, match=r"8 GPU workers on 1 node\(s\) need 1 node\(s\) with 8 GPUs each "
                                             r"\(the workers take 4 CPU\(s\) each\); "
                                             r"the cluster has node [\d.]+: 0 GPUs, 5 CPUs$"):
        run(config)


def test_two_node_preset_names_what_is_missing(ray_head, sixteen_images, tmp_path):
    config = resolve("a100-2x8", data_root=str(sixteen_images), output_dir=str(tmp_path), ray_address=ray_head.address)
    with pytest.raises(PreflightError, match=r"16 GPU workers on 2 node\(s\) need 2 node\(s\) with 8 GPUs each"):
        run(config)


def test_too_many_cpu_workers_fail_instead_of_waiting(ray_head, tmp_path):
    config = resolve("smoke", num_workers=5, data_root=str(tmp_path / "data"), output_dir=str(tmp_path),
                     ray_address=ray_head.address)
    with pytest.raises(PreflightError, match=r"5 CPU workers take 1 CPU\(s\) each and Ray Data needs one more"):
        run(config)


def test_reserved_cpus_per_worker_are_counted(ray_head, tmp_path):
    config = resolve("smoke", cpus_per_worker=3, data_root=str(tmp_path / "data"), output_dir=str(tmp_path),
                     ray_address=ray_head.address)
    with pytest.raises(PreflightError, match=r"2 CPU workers take 3 CPU\(s\) each and Ray Data needs one more; "
                                             r"the cluster has node [\d.]+: 0 GPUs, 5 CPUs$"):
        run(config)


def test_the_command_line_says_it_in_one_line(ray_head, sixteen_images, tmp_path):
    """The CLI, as a user runs it: a one-line message and a non-zero exit, within the timeout."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--preset", "1x8", "--data-root", str(sixteen_images),
                           "--output-dir", str(tmp_path)], env=venv_env(RAY_ADDRESS=ray_head.address),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("frcnn-bench: 8 GPU workers on 1 node(s) need")
    assert "Traceback" not in done.stderr


def test_every_node_must_see_data_and_storage(ray_head, tmp_path):
    import ray

    ray.init(address=ray_head.address, ignore_reinit_error=True)
    check_nodes_see([tmp_path], tmp_path / "storage")  # all there: no error
    missing = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    with pytest.raises(PreflightError, match=rf"node [\d.]+ \(\w{{8}}\) lacks {missing}$"):
        check_nodes_see([tmp_path, missing], tmp_path / "storage")
    assert not list((tmp_path / "storage").iterdir()), "the marker file is removed"
