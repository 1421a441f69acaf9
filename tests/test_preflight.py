"""Preflight on a real Ray head (127.0.0.1, 5 CPUs, no GPU): bounded, explicit failures; the GPU
nodes' check decided on the facts of real drivers and wheels, and run on a head that advertises a
GPU it does not have."""

import subprocess
import sys

import pytest

from conftest import RayHead, venv_env
from pipeline.config import resolve
from pipeline.data import synthetic
from pipeline.preflight import (GpuFacts, PreflightError, check_gpu_nodes, check_nodes_see, describe_node,
                                gpu_problem)
from pipeline.run import run
from pipeline.worker.nvml import cuda_version


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


def facts(**changes) -> GpuFacts:
    """A node with driver 580.95.05 (CUDA 13.0) and torch 2.14.1's default wheel, CUDA 13.0, as a
    task given one GPU by Ray sees it; `changes` as GpuFacts' fields."""
    fine = dict(driver="580.95.05", driver_cuda="13.0", nvml_error=None, torch="2.14.1+cu130", torch_cuda="13.0",
                cuda_available=True, devices=1, given=1, visible="3")
    return GpuFacts(**{**fine, **changes})


# torch's default wheel on an R535 driver, as it is there: torch.cuda finds no device.
OLD_DRIVER = dict(driver="535.183.01", driver_cuda="12.2", cuda_available=False, devices=0)


def test_nvml_cuda_versions_read_as_text():
    assert [cuda_version(n) for n in (12020, 12040, 13000)] == ["12.2", "12.4", "13.0"]


def test_a_driver_for_the_wheels_cuda_passes():
    assert gpu_problem(facts()) is None
    # CUDA's minor version compatibility: R535 (CUDA 12.2) runs torch built for CUDA 12.6.
    assert gpu_problem(facts(driver="535.183.01", driver_cuda="12.2", torch="2.14.1+cu126", torch_cuda="12.6")) is None


@pytest.mark.parametrize("driver,driver_cuda", [("535.183.01", "12.2"), ("570.133.20", "12.8")])
def test_a_driver_too_old_for_the_wheels_is_refused_with_what_to_do(driver, driver_cuda):
    problem = gpu_problem(facts(**{**OLD_DRIVER, "driver": driver, "driver_cuda": driver_cuda}))
    assert problem == (f"NVIDIA driver {driver} runs CUDA {driver_cuda} at most, torch 2.14.1+cu130 is built for CUDA "
                       "13.0: install the same torch built for CUDA 12.x (PyTorch's cu12x wheel index; see the README, "
                       '"GPU nodes: driver and wheels") or an NVIDIA driver R580 or newer')


def test_no_nvml_is_said_when_torch_sees_no_device():
    problem = gpu_problem(facts(driver=None, driver_cuda=None, nvml_error="NVML Shared Library Not Found",
                                cuda_available=False, devices=0))
    assert problem == ("torch 2.14.1+cu130 (CUDA 13.0) sees no CUDA device though Ray gave this task 1 GPU(s) "
                       "(CUDA_VISIBLE_DEVICES=3); NVML cannot be loaded (NVML Shared Library Not Found), so no NVIDIA "
                       "driver is usable here")
    # A GPU that Ray counts without NVML (MetaX's) and torch uses: nothing to refuse.
    assert gpu_problem(facts(driver=None, driver_cuda=None, nvml_error="NVML Shared Library Not Found")) is None


def test_no_cuda_device_for_torch_though_ray_gave_a_gpu():
    assert gpu_problem(facts(cuda_available=False, devices=0)) == (
        "torch 2.14.1+cu130 (CUDA 13.0) sees no CUDA device though Ray gave this task 1 GPU(s) "
        "(CUDA_VISIBLE_DEVICES=3); NVIDIA driver 580.95.05, CUDA 13.0")
    assert "(CUDA none: a CPU-only build) sees no CUDA device" in gpu_problem(
        facts(torch="2.14.1+cpu", torch_cuda=None, cuda_available=False, devices=0))


def test_more_devices_than_ray_gave_are_refused():
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set on the node: each worker would see all 8.
    assert gpu_problem(facts(devices=8, visible=None)) == (
        "torch sees 8 CUDA device(s) where Ray gave this task 1 GPU(s) (CUDA_VISIBLE_DEVICES=None)")


def test_the_gpu_check_runs_on_each_gpu_node_and_names_it(tmp_path):
    """A head that advertises a GPU this machine does not have: the check's task is pinned there,
    given the GPU, finds no driver, and the node is named with what it found."""
    import ray

    ray.shutdown()
    head = RayHead(num_cpus=1, num_gpus=1, log_dir=tmp_path)
    try:
        ray.init(address=head.address)
        with pytest.raises(PreflightError, match=r"^node [\d.]+ \(\w{8}\): torch \S+ \(CUDA [\d.]+\) sees no CUDA "
                                                 r"device though Ray gave this task 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0\); "
                                                 r"NVML cannot be loaded \(.+\), so no NVIDIA driver is usable here$"):
            check_gpu_nodes()
    finally:
        ray.shutdown()
        head.stop()


def test_the_log_line_of_a_node_says_what_computes_there():
    metax = {"node": "10.0.0.5 (ab12cd34)", "torch": "2.4.0+mc2.29.0.9", "torch_cuda": "11.6", "torch_hip": None,
             "cpu": "CPU (Hygon C86 7390)", "device": "MetaX C500", "devices": 8, "backend": "nccl",
             "backend_version": "2.18.3"}
    assert describe_node(metax) == ("node 10.0.0.5 (ab12cd34): torch 2.4.0+mc2.29.0.9 (CUDA 11.6), 8 x MetaX C500, "
                                    "collective backend nccl 2.18.3")
    cpu = {**metax, "torch": "2.14.1+cpu", "torch_cuda": None, "device": "CPU (Hygon C86 7390)", "devices": 64,
           "backend": "gloo", "backend_version": None}
    assert describe_node(cpu) == ("node 10.0.0.5 (ab12cd34): torch 2.14.1+cpu, 64 x CPU (Hygon C86 7390), "
                                  "collective backend gloo")
