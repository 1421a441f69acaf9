"""Real runs on a real Ray head (127.0.0.1): TorchTrainer workers, Ray Data, the collector. Most
checks are of the session's shared run (tests/conftest.py: 3 workers, 2 epochs)."""

import json

import torch
from conftest import SHARED_WORKERS
from figures_from_logs import assert_figures_match
from pipeline.config import resolve
from pipeline.records.metrics import STARTUP_STAGES
from pipeline.records.tables import load_records
from pipeline.worker.step import FLOP_COUNTS


def val_image_count(data_root):
    return len(json.loads((data_root / "annotations" / "instances_val2017.json").read_text())["images"])


def test_every_val_image_evaluated_exactly_once(shared_run, tiny_coco):
    epochs = load_records(shared_run)["epochs"]
    assert sorted(epochs["worker"]) == [0, 0, 1, 1, 2, 2]
    # 7 val images: not a multiple of 3, shared evenly in every epoch.
    for epoch in (0, 1):
        by_worker = {w: n for e, w, n in zip(epochs["epoch"], epochs["worker"], epochs["eval_images"]) if e == epoch}
        assert [by_worker[w] for w in (0, 1, 2)] == [3, 2, 2]
    assert sum(epochs["eval_images"]) == 2 * val_image_count(tiny_coco) == 2 * 7


def test_a_run_end_to_end(shared_run):
    run_dir, workers = shared_run, SHARED_WORKERS
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["run_dir"] == str(run_dir)

    # Images trained = what was fed: Ray's equal split gives each worker floor(kept / 3) images an epoch.
    kept = saved["data"]["train"]["kept"]
    assert saved["data"]["train"]["images"] == 7 and saved["data"]["train"]["dropped_without_boxes"] == 7 - kept
    assert saved["images_trained"] == workers * (kept // workers) * 2
    assert saved["epochs"] == 2 and saved["converged"] is False and len(saved["map_per_epoch"]) == 2
    assert saved["workers"] == workers and saved["nodes"] == 1 and saved["config_label"] == f"1x{workers}"
    assert saved["config"]["num_workers"] == workers and saved["config"]["max_epochs"] == 2
    assert set(saved["versions"]) == {"python", "torch", "torchvision", "ray"}
    assert [row["images"] for row in saved["per_worker"]] == [2 * (kept // workers)] * workers
    for key in ("e2e_time", "p_whole", "p_train", "p_core", "map", "ap50", "ap75", "mem"):
        assert key in saved
    assert saved["p_core"] >= saved["p_train"] >= saved["p_whole"] > 0
    assert 0 <= saved["padding_share"] < 1 and 0 < saved["data_wait_share"] < 1
    assert 0 < saved["init_time"] < saved["e2e_time"]
    # The start-up's stages, each ending after the one before, the workers' marks among them.
    ends = [saved["startup"][stage] for stage in STARTUP_STAGES]
    assert ends == sorted(ends) and ends[0] > 0 and saved["startup"]["first_step"] == saved["init_time"]
    assert 0 <= saved["map"] <= 1 and saved["mem"].endswith("(cpu rss)")
    assert saved["mem_torch_reserved_gib"] is None and saved["gpu_nodes"] == []  # CPU workers: no GPU check

    # Every figure recomputed from the raw logs, without pipeline.records.metrics, equals result.json's.
    assert_figures_match(run_dir)
    records = load_records(run_dir)
    assert records["workers"]["env"] == [{"FRCNN_PROBE": "on"}] * workers  # reached the worker processes
    # What computed, per node and per worker: the preflight's view, then each worker's own. TF32
    # off as configured, cuDNN's included, which PyTorch's default has on.
    [node] = saved["node_facts"]
    assert node["node"].endswith(f" ({records['workers']['node'][0][:8]})") and node["torch"] == torch.__version__
    assert node["device"].startswith("CPU (") and node["devices"] == 5 and node["backend"] == "gloo"
    assert records["workers"]["torch"] == [torch.__version__] * workers
    assert records["workers"]["tf32"] == [{"matmul": False, "cudnn": False}] * workers
    assert records["workers"]["backend"] == ["gloo"] * workers and saved["compute_precision"] == "fp32"
    # Each worker counted the FLOPs of its first batch: the box head a part, the rest at least as
    # much (a box head on 32 RoIs an image against a ResNet-50 on 64-96 px images).
    for whole, box, pixels, images in zip(*(records["workers"][key] for key in FLOP_COUNTS)):
        assert 0 < box < whole - box and images == 2 and pixels >= 2 * 64 * 64
    assert saved["flops_per_image"] > 1e9 and saved["achieved_tflops"] > 0
    assert saved["peak_tflops"] is None and saved["utilisation"] is None  # a CPU: no peak known
    # The epochs tile each worker's wall time: the next epoch starts where the last one ended.
    for worker in range(workers):
        starts, ends = zip(*((s, e) for w, s, e in zip(records["epochs"]["worker"], records["epochs"]["start"],
                                                       records["epochs"]["end"]) if w == worker))
        assert starts[1] == ends[0] and ends[1] > starts[1] > starts[0]
    assert saved["whole_time_s"] > saved["training_time_s"] + saved["evaluation_time_s"]
    assert saved["time_to_target_s"] is None and saved["joules_per_image"] is None
    assert len(records["steps"]["worker"]) == workers * 2 * saved["steps_per_epoch"]
    for epoch in (0, 1):
        assert sum(n for e, n in zip(records["epochs"]["epoch"], records["epochs"]["eval_images"]) if e == epoch) == 7

    row = (run_dir / "row.md").read_text().splitlines()
    assert row[0] == "| config | precision | fix_hp | e2e_time | p_whole | p_train | p_core | map | mem |"
    assert row[2].startswith(f"| 1x{workers} | fp32 | / |")


def test_every_worker_reserves_its_cpus_beside_its_device():
    from pipeline.run import scaling_config

    assert scaling_config(resolve("a100-2x8")).resources_per_worker == {"CPU": 4, "GPU": 1}
    assert scaling_config(resolve("smoke", cpus_per_worker=2)).resources_per_worker == {"CPU": 2}
