"""`frcnn-bench acceptance`: the one-command GPU acceptance run, for any CUDA machine.

It makes a COCO-like synthetic set at COCO's image sizes (about 640x480 JPEGs, COCO's aspect
ratios, 3 to 20 objects), then trains the 1x1 configuration at FlagPerf's A100 batch (16 per GPU,
800/1333, frozen-BN ResNet-50 with 3 trainable layers; lr by the linear rule, see `configs`) for
`--steps` steps over two epochs, in fp32 and in amp, and, with two GPUs or more, the amp run again as 1x2 over NCCL. It prints and checks what
only a GPU can show: the driver's and torch's CUDA versions the run's GPU check found, the
device's name, NVML's memory figure against torch's peak reservation and the device's total,
that amp's loss scale moved and its p_core beats fp32's, p_train / p_core, init_time, the energy
per image (NVML, where the GPU has the counter), the FLOPs and the device's share they used, and each run's FlagPerf row. Results: acceptance.json and acceptance.md in
--output-dir, beside each run's own results directory. Exit code 1 when a check fails.

The ImageNet backbone cannot be downloaded on a closed machine: without --backbone-weights the
backbone is a random ResNet-50 whose BatchNorm statistics are measured on the synthetic images
(so that the frozen BatchNorm normalises as a trained one does and fp16 activations stay in
range); the compute per step is the reference's either way. mAP is no goal here: a few hundred
steps do not train a detector.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models import resnet50

from pipeline.config import linear_lr, resolve
from pipeline.data import images, synthetic
from pipeline.data.manifest import build_manifest, split_paths
from pipeline.records.results import flagperf_row, markdown_table, number

# Below this p_train / p_core the input pipeline, not the device, sets the pace.
MIN_TRAIN_OVER_CORE = 0.9
INITIAL_LOSS_SCALE = 2.0**16


@dataclass(frozen=True)
class Spec:
    """What the acceptance run trains; the defaults are the GPU run."""

    steps: int = 200  # per run, over two epochs
    batch_size: int = 16
    image_size: int = 640  # the synthetic images' long side
    val_images: int = 100
    min_size: int = 800
    max_size: int = 1333
    use_gpu: bool = True
    gpus: int = 1
    backbone_weights: str = ""  # "" = a calibrated random ResNet-50 (see the module's docstring)


def make_data(root: Path, spec: Spec) -> Path:
    return synthetic.generate(root, synthetic.SyntheticSpec(
        train_images=spec.steps // 2 * spec.batch_size, val_images=spec.val_images, num_categories=80,
        image_size=spec.image_size, min_objects=3, max_objects=20, crowd_fraction=0.01, empty_fraction=0.0, seed=0))


@torch.no_grad()
def calibrated_backbone(path: Path, data_root: Path, count: int = 32) -> Path:
    """A random ResNet-50 whose BatchNorm running statistics are averaged over `count` training
    images, saved as a state dict for the frozen-BN backbone."""
    torch.manual_seed(0)
    network = resnet50()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over all the images
    network.train()
    manifest, _ = build_manifest(*split_paths(data_root, "train"), drop_empty=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for row in manifest.slice(0, count).to_pylist():
        image = torch.from_numpy(images.read_image(row["path"], row["width"], row["height"])).float() / 255
        network((image - mean).div(std)[None])
    torch.save(network.state_dict(), path)
    return path


def configs(spec: Spec, data_root: Path, weights: str, output_dir: Path) -> dict:
    """The runs, by name: the 1x1 recipe at FlagPerf's A100 batch of 16 in fp32 and amp; 1x2 amp
    with two GPUs or more. The lr is the linear rule's for the batch (0.02 for 16 images a step),
    not FlagPerf's 0.16, which a backbone without ImageNet training may not survive; the lr does
    not change the compute."""
    lr = linear_lr(spec.batch_size, 1)
    common = dict(data_root=str(data_root), output_dir=str(output_dir), backbone_weights=weights,
                  use_gpu=spec.use_gpu, batch_size=spec.batch_size, lr=lr, fix_hp=f"bs={spec.batch_size},lr={lr:g}",
                  min_size=spec.min_size, max_size=spec.max_size, max_epochs=2, synthetic_train_images=0)
    runs = {"1x1 fp32": resolve("a100-1x1", run_name="1x1-fp32", **common),
            "1x1 amp": resolve("a100-1x1-amp", run_name="1x1-amp", **common)}
    if spec.gpus >= 2:
        runs["1x2 amp"] = resolve("a100-1x1-amp", run_name="1x2-amp", num_workers=2, **common)
    return runs


def check(name: str, passed: bool, detail: str) -> dict:
    return {"check": name, "passed": bool(passed), "detail": detail}


def gpu_nodes_check(result: dict) -> dict:
    """What the run's GPU check (pipeline.preflight.check_gpu_nodes) found on each node: a run
    returns only when it passed, on at least one GPU node."""
    nodes = [f"{n['node']}: NVIDIA driver {n['driver'] or 'unknown, NVML: ' + str(n['nvml_error'])} "
             f"(CUDA {n['driver_cuda']}), torch {n['torch']} (CUDA {n['torch_cuda']}), {n['devices']} device(s) "
             f"for {n['given']} GPU(s) given" for n in result["gpu_nodes"]]
    return check("GPU nodes: driver and wheels", bool(nodes), "; ".join(nodes) or "no GPU node checked")


def memory_check(name: str, result: dict) -> dict:
    """NVML's used peak (FlagPerf's figure) holds torch's peak reservation, the CUDA context and
    NCCL's buffers besides, and fits in the device."""
    used, total, reserved = result["mem_used_gib"], result["mem_total_gib"], result["mem_torch_reserved_gib"]
    passed = result["mem_kind"] == "nvml used" and reserved is not None and 0 < reserved <= used <= total
    torch_peak = "none" if reserved is None else f"{reserved:.2f} GiB"
    return check(f"{name}: NVML memory figure", passed,
                 f"{result['mem_kind']} peak {used:.2f} GiB, torch's peak reserved {torch_peak}, of {total:.2f} GiB")


def utilisation_check(name: str, result: dict) -> dict:
    """The FLOPs were counted, and the device's share they used is a share: in (0, 1] where the
    device's peak is known (pipeline/worker/flops.py)."""
    achieved, share = result["achieved_tflops"], result["utilisation"]
    if achieved is None:
        return check(f"{name}: FLOPs and utilisation", False, "no FLOPs measured")
    shown = "peak not known" if share is None else (f"{100 * share:.1f}% of {result['peak_tflops']:g} "
                                                   f"{result['compute_precision']} TFLOP/s")
    return check(f"{name}: FLOPs and utilisation", share is None or 0 < share <= 1,
                 f"{result['flops_per_image'] / 1e9:.0f} GFLOP per image, {achieved:.3g} TFLOP/s per device, {shown}")


def checks(results: dict) -> list[dict]:
    """What the acceptance run asserts of its runs' results (result.json contents, by run name)."""
    fp32, amp = results["1x1 fp32"], results["1x1 amp"]
    found = [gpu_nodes_check(fp32)]
    for name, result in results.items():
        found.append(check(f"{name}: CUDA device", result["mem_kind"] != "cpu rss",
                           f"{', '.join(result['devices'])}; memory {result['mem']} GiB ({result['mem_kind']})"))
        found.append(memory_check(name, result))
        ratio = result["p_train"] / result["p_core"]
        found.append(check(f"{name}: p_train / p_core >= {MIN_TRAIN_OVER_CORE}", ratio >= MIN_TRAIN_OVER_CORE,
                           f"{ratio:.3f} (p_train {number(result['p_train'])}, p_core {number(result['p_core'])})"))
        found.append(check(f"{name}: p_core >= p_train >= p_whole",
                           result["p_core"] >= result["p_train"] >= result["p_whole"],
                           f"{number(result['p_core'])} >= {number(result['p_train'])} >= {number(result['p_whole'])}"))
        found.append(check(f"{name}: init_time", result["init_time"] is not None,
                           f"{result['init_time']:.1f} s" if result["init_time"] is not None else "no step ran"))
        found.append(utilisation_check(name, result))
    moved = amp["skipped_steps"] > 0 or amp["loss_scale_last"] != INITIAL_LOSS_SCALE
    found.append(check("1x1 amp: loss scale moved", moved,
                       f"{amp['loss_scale_first']:g} after the first step, {amp['loss_scale_last']:g} after the last, "
                       f"{amp['skipped_steps']} steps skipped for inf/nan gradients"))
    found.append(check("1x1 amp: p_core beats fp32's", amp["p_core"] > fp32["p_core"],
                       f"{number(amp['p_core'])} vs {number(fp32['p_core'])} images/s "
                       f"({amp['p_core'] / fp32['p_core']:.2f}x)"))
    if "1x2 amp" in results:
        pair = results["1x2 amp"]
        found.append(check("1x2 amp: two workers over NCCL", pair["workers"] == 2 and pair["config_label"] == "1x2",
                           f"{pair['workers']} workers, {pair['config_label']}, scaling efficiency "
                           f"{pair['p_train'] / 2 / amp['p_train']:.2f}"))
    return found


def summary(results: dict, found: list[dict]) -> str:
    energy = [f"{name} {result['joules_per_image']:.2f} J/image" for name, result in results.items()
              if result["joules_per_image"] is not None]
    lines = ["acceptance checks:"]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['detail']}" for c in found]
    lines += ["", "energy over the training phases (NVML): " + ("; ".join(energy) or "no counter (null)"), ""]
    rows = [{"run": name, **flagperf_row(result)} for name, result in results.items()]
    lines += ["rows:", markdown_table(rows, columns=tuple(rows[0]))]
    return "\n".join(lines)


def run_all(spec: Spec, output_dir: Path) -> tuple[dict, list[dict]]:
    """Makes the data and the backbone, trains each run, checks; writes acceptance.json/.md."""
    from pipeline.run import run  # imports Ray: not for `frcnn-bench acceptance --help`

    output_dir.mkdir(parents=True, exist_ok=True)
    data_root = make_data(output_dir / "data", spec)
    weights = spec.backbone_weights or str(calibrated_backbone(output_dir / "resnet50-random-calibrated.pth",
                                                               data_root))
    results = {}
    for name, config in configs(spec, data_root, weights, output_dir / "runs").items():
        print(f"acceptance: {name} ({config.num_workers} worker(s), batch {config.batch_size}, "
              f"{config.precision})", flush=True)
        results[name] = run(config, progress=sys.stdout)
    found = checks(results)
    text = summary(results, found)
    (output_dir / "acceptance.json").write_text(json.dumps(
        {"spec": dataclasses.asdict(spec), "checks": found, "results": results}, indent=2) + "\n")
    (output_dir / "acceptance.md").write_text(text)
    return results, found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench acceptance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="acceptance", help="where the data, runs and reports go")
    parser.add_argument("--steps", type=int, default=Spec.steps, help="training steps of each run, over two epochs")
    parser.add_argument("--backbone-weights", default="",
                        help="ImageNet ResNet-50 weights (path or file:// URL); default: a calibrated random one")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("frcnn-bench: the acceptance run needs a CUDA GPU; torch sees none on this machine "
                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (two epochs of a step)")
    spec = Spec(steps=args.steps, gpus=torch.cuda.device_count(), backbone_weights=args.backbone_weights)
    _, found = run_all(spec, Path(args.output_dir).resolve())
    print((Path(args.output_dir) / "acceptance.md").read_text())
    if not all(c["passed"] for c in found):
        sys.exit(1)
