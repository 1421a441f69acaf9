"""The GPU acceptance command's CPU-runnable parts: its checks on known results, its refusal on a
machine without CUDA, its calibrated backbone, and the whole flow at toy size on CPU workers
(where the CUDA checks must fail, and say so)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from conftest import venv_env
from pipeline.bench import acceptance
from pipeline.worker.model import build_model

ROOT = Path(__file__).resolve().parents[2]


GPU_NODE = {"node": "10.0.0.1 (1a2b3c4d)", "driver": "580.95.05", "driver_cuda": "13.0", "nvml_error": None,
            "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_available": True, "devices": 1, "given": 1,
            "visible": "0"}


def result(**overrides) -> dict:
    # An H200: NVML's used peak and total (143771 MiB), torch's peak reservation below it.
    values = {"devices": ["NVIDIA H200"], "mem_kind": "nvml used", "mem": "31.2/140.4", "mem_used_gib": 31.2,
              "mem_total_gib": 140.4, "mem_torch_reserved_gib": 30.1, "gpu_nodes": [GPU_NODE],
              "p_whole": 40.0, "p_train": 45.0, "p_core": 48.0, "init_time": 25.0,
              "loss_scale_first": 1.0, "loss_scale_last": 1.0, "skipped_steps": 0, "joules_per_image": None,
              "workers": 1, "config_label": "1x1", "e2e_time": 200.0, "map": 0.0,
              # About 400 GFLOP an image trained at 800 x 1216: 19.2 TFLOP/s at 48 images/s.
              "flops_per_image": 4e11, "achieved_tflops": 19.2, "peak_tflops": 66.9, "compute_precision": "fp32",
              "utilisation": 19.2 / 66.9,
              "config": {"precision": "fp32", "tf32": False, "fix_hp": "bs=16,lr=0.02"}}
    return {**values, **overrides}


def good_results() -> dict:
    amp = dict(p_whole=70.0, p_train=80.0, p_core=85.0, loss_scale_first=32768.0, loss_scale_last=8192.0,
               skipped_steps=3, joules_per_image=4.5, config={"precision": "amp", "tf32": False, "fix_hp": "bs=16,lr=0.02"})
    return {"1x1 fp32": result(), "1x1 amp": result(**amp),
            "1x2 amp": result(**{**amp, "p_train": 150.0, "p_core": 160.0, "workers": 2, "config_label": "1x2"})}


def failed(found: list[dict]) -> list[str]:
    return [c["check"] for c in found if not c["passed"]]


def test_checks_pass_on_good_gpu_results():
    found = acceptance.checks(good_results())
    assert failed(found) == []
    assert "1x2 amp: two workers over NCCL" in [c["check"] for c in found]
    text = acceptance.summary(good_results(), found)
    assert "PASS  1x1 amp: p_core beats fp32's: 85.0 vs 48.0 images/s (1.77x)" in text
    assert "scaling efficiency 0.94" in text and "1x1 amp 4.50 J/image" in text
    assert "| 1x1 fp32 | 1x1 | fp32 | bs=16,lr=0.02 | 200 | 40.0 | 45.0 | 48.0 | 0.0% | 31.2/140.4 |" in text
    assert ("PASS  GPU nodes: driver and wheels: 10.0.0.1 (1a2b3c4d): NVIDIA driver 580.95.05 (CUDA 13.0), "
            "torch 2.14.1+cu130 (CUDA 13.0), 1 device(s) for 1 GPU(s) given") in text
    assert ("PASS  1x1 fp32: NVML memory figure: nvml used peak 31.20 GiB, torch's peak reserved 30.10 GiB, "
            "of 140.40 GiB") in text
    assert "PASS  1x1 fp32: FLOPs and utilisation: 400 GFLOP per image, 19.2 TFLOP/s per device, 28.7% of 66.9 fp32" in text


@pytest.mark.parametrize("run,change,checks", [
    ("1x1 amp", dict(loss_scale_first=65536.0, loss_scale_last=65536.0, skipped_steps=0),
     ["1x1 amp: loss scale moved"]),
    ("1x1 amp", dict(p_core=40.0, p_train=39.0, p_whole=38.0), ["1x1 amp: p_core beats fp32's"]),
    ("1x1 fp32", dict(p_train=30.0, p_whole=28.0), ["1x1 fp32: p_train / p_core >= 0.9"]),
    ("1x1 fp32", dict(mem_kind="cpu rss", mem="2.0/23.5 (cpu rss)", mem_used_gib=2.0, mem_total_gib=23.5,
                      mem_torch_reserved_gib=None), ["1x1 fp32: CUDA device", "1x1 fp32: NVML memory figure"]),
    # A GPU without NVML: torch's figure, not FlagPerf's.
    ("1x1 fp32", dict(mem_kind="torch reserved", mem="30.1/139.8 (torch reserved)", mem_used_gib=30.1,
                      mem_total_gib=139.8), ["1x1 fp32: NVML memory figure"]),
    # Less than torch holds: not the device's used memory.
    ("1x1 fp32", dict(mem_used_gib=29.0, mem="29.0/140.4"), ["1x1 fp32: NVML memory figure"]),
    ("1x2 amp", dict(mem_used_gib=141.0, mem="141.0/140.4"), ["1x2 amp: NVML memory figure"]),
    ("1x1 fp32", dict(gpu_nodes=[]), ["GPU nodes: driver and wheels"]),
    ("1x1 fp32", dict(init_time=None), ["1x1 fp32: init_time"]),
    ("1x2 amp", dict(workers=1, config_label="1x1"), ["1x2 amp: two workers over NCCL"]),
    ("1x1 fp32", dict(utilisation=1.3), ["1x1 fp32: FLOPs and utilisation"]),  # a wrong count or peak
    ("1x1 amp", dict(achieved_tflops=None, flops_per_image=None, utilisation=None), ["1x1 amp: FLOPs and utilisation"]),
])
def test_each_check_fails_on_its_fault(run, change, checks):
    results = good_results()
    results[run] = {**results[run], **change}
    assert failed(acceptance.checks(results)) == checks


def test_refused_without_cuda(tmp_path):
    assert not torch.cuda.is_available()
    done = subprocess.run([sys.executable, "-m", "pipeline", "acceptance", "--output-dir", str(tmp_path)], cwd=ROOT,
                          env=venv_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("frcnn-bench: the acceptance run needs a CUDA GPU; torch sees none")
    assert not any(tmp_path.iterdir())


def test_calibrated_backbone_loads_as_the_reference_backbone(tmp_path):
    spec = acceptance.Spec(steps=2, batch_size=2, image_size=64, val_images=2)
    root = acceptance.make_data(tmp_path / "data", spec)
    path = acceptance.calibrated_backbone(tmp_path / "resnet50-random-calibrated.pth", root, count=4)
    model = build_model(str(path), 64, 96)
    bn1 = model.backbone.body.bn1
    assert isinstance(bn1, FrozenBatchNorm2d)
    state = torch.load(path, weights_only=True)
    # Measured statistics, not a fresh BatchNorm's zeros and ones, and they landed in the model.
    assert not torch.equal(state["bn1.running_mean"], torch.zeros(64))
    assert not torch.equal(state["layer3.0.bn2.running_var"], torch.ones(256))
    assert torch.equal(bn1.running_mean, state["bn1.running_mean"])


def test_the_whole_flow_at_toy_size_on_cpu(acceptance_flow):
    results, found, folder = acceptance_flow["results"], acceptance_flow["checks"], acceptance_flow["folder"]
    assert set(results) == {"1x1 fp32", "1x1 amp"}
    fp32, amp = results["1x1 fp32"], results["1x1 amp"]
    assert fp32["config"]["fix_hp"] == "bs=2,lr=0.0025" and fp32["config"]["batch_size"] == 2
    assert amp["images_trained"] == 2 * amp["data"]["train"]["kept"] == 2 * 2
    # amp ran fp16 autocast with loss scaling on the CPU workers: the scale starts at 2**16 and
    # halves on each overflowing step; fp32 has no loss scaling.
    assert amp["config"]["precision"] == "amp"
    assert 2.0**10 <= amp["loss_scale_last"] <= amp["loss_scale_first"] <= 2.0**16
    assert 2.0**16 / amp["loss_scale_last"] == 2 ** amp["skipped_steps"]
    assert fp32["loss_scale_first"] == fp32["loss_scale_last"] == 1.0 and fp32["skipped_steps"] == 0
    # CPU workers: the checks that need a GPU fail, and say why.
    assert {"GPU nodes: driver and wheels", "1x1 fp32: CUDA device", "1x1 amp: CUDA device",
            "1x1 amp: NVML memory figure"} <= set(failed(found))
    assert "1x1 amp: loss scale moved" in [c["check"] for c in found]
    text = (folder / "acceptance.md").read_text()
    assert "FAIL  1x1 fp32: CUDA device: CPU (" in text and "no counter (null)" in text
    assert (folder / "acceptance.json").exists()
