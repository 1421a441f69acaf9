"""The benchmark command end to end at toy size: three real runs, the stage alone, the reporting
channel, both evaluators; a report with every figure."""

import json

import ray

from pipeline.bench.benchmark import VARIANTS, main


def test_benchmark_writes_side_by_side_figures(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)  # the session's head: no Ray of its own to start
    try:
        main(["--output-dir", str(tmp_path), "--steps", "2", "--repeats", "1", "--min-size", "64", "--max-size", "96",
              "--eval-images", "5"])
    finally:
        ray.shutdown()  # the benchmark's connection to the head
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["medians"]) == set(VARIANTS)
    for variant in VARIANTS:
        figures = report["medians"][variant]
        assert figures["images"] == 2 * 2 * 2  # 2 steps x batch 2 x 2 workers
        assert figures["p_core"] >= figures["p_train"] >= figures["p_whole"] > 0
    assert report["reporting_s_per_step"] > 0 and min(report["decode_images_per_s"]) > 0
    evaluation = report["evaluation"]
    assert abs(evaluation["faster-coco-eval"]["map"] - evaluation["pycocotools"]["map"]) <= 1e-4
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "| ray |" in markdown and "| dataloader |" in markdown and "this pipeline / DataLoader baseline" in markdown
