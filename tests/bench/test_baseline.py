"""The plain DataLoader + DDP baseline, for real: two gloo processes, DataLoader worker processes."""

import subprocess
import sys

import numpy as np

from pipeline.bench.baseline import CocoDetectionDataset, run_baseline
from pipeline.config import resolve
from pipeline.data.manifest import build_manifest, split_paths
from pipeline.records import metrics


def test_dataset_reads_like_the_stream(tiny_coco):
    manifest, _ = build_manifest(*split_paths(tiny_coco, "train"), drop_empty=True)
    dataset = CocoDetectionDataset(manifest)
    assert len(dataset) == manifest.num_rows
    row = manifest.to_pylist()[0]
    image, target = dataset[0]
    assert tuple(image.shape) == (3, row["height"], row["width"])
    boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
    flipped = boxes.copy()
    flipped[:, [0, 2]] = row["width"] - boxes[:, [2, 0]]
    assert any(np.allclose(target["boxes"].numpy(), b) for b in (boxes, flipped))
    assert target["labels"].tolist() == row["labels"]


def test_two_ddp_processes_train_and_report_the_same_columns(tiny_coco, tmp_path):
    manifest, _ = build_manifest(*split_paths(tiny_coco, "train"), drop_empty=True)
    config = resolve("smoke", data_root=str(tiny_coco), synthetic_train_images=0)
    steps, epochs = run_baseline(config, manifest, loader_workers=1, out_dir=tmp_path)
    per_worker = manifest.num_rows // 2  # DistributedSampler(drop_last=True)
    assert sorted(set(steps["worker"])) == [0, 1]
    assert metrics.images_trained(steps) == 2 * per_worker
    assert len(steps["step"]) == 2 * -(-per_worker // config.batch_size)
    assert sorted(epochs["worker"]) == [0, 1] and epochs["eval_s"] == [0.0, 0.0]
    assert metrics.p_core(steps) >= metrics.p_train(steps, epochs) > 0
    assert 0 <= metrics.padding_share(steps) < 1


def test_the_baseline_and_the_step_import_no_ray_and_the_records_no_torch():
    script = ("import sys\n"
              "import pipeline.records.tables\n"
              "assert not {'ray', 'torch'} & set(sys.modules), 'records'\n"
              "import pipeline.bench.baseline, pipeline.worker.step\n"
              "assert 'ray' not in sys.modules, 'baseline'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
