import pytest

from pipeline.records import metrics, results
from pipeline.records.tables import load_records, write_step_file, write_tables

GIB = 1024**3

# Worker 0 (node "a") is fast; worker 1 (node "b") is the straggler. 3 steps of 2 images each,
# 2 in epoch 0 and 1 in epoch 1. All times are exact binary fractions, so sums compare exactly.
STEPS = {
    "worker": [0, 0, 0, 1, 1, 1],
    "epoch": [0, 0, 1, 0, 0, 1],
    "step": [0, 1, 0, 0, 1, 0],
    "images": [2, 2, 2, 2, 2, 2],
    "data_wait_s": [0.25, 0.25, 0.25, 0.5, 0.5, 0.5],
    "compute_s": [0.5, 0.5, 0.5, 1.0, 1.0, 1.0],
    "loss": [2.0, 1.5, 1.0, 2.0, 1.75, 1.25],
    "lr": [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
    "start": [100.0, 101.0, 105.0, 100.0, 102.0, 106.0],
    "end": [101.0, 102.0, 106.0, 102.0, 104.0, 108.0],
    "image_pixels": [300, 400, 400, 300, 200, 400],
    "batch_pixels": [400, 400, 800, 400, 400, 800],
    # Worker 0's second step found inf gradients: skipped, its scale halved.
    "loss_scale": [65536.0, 32768.0, 32768.0, 65536.0, 32768.0, 32768.0],
    "skipped": [False, True, False, False, True, False],
}
# Each worker's epochs tile its wall time: epoch 1 starts where epoch 0 ended. Worker 1's epochs
# span 5.5 + 4.5 = 10 s, worker 0's 5 + 3 = 8 s: beyond the phases, their checkpoints and barriers.
EPOCHS = {
    "worker": [0, 0, 1, 1],
    "epoch": [0, 1, 0, 1],
    "start": [99.5, 104.5, 99.5, 105.0],
    "end": [104.5, 107.5, 105.0, 109.5],
    "wall_s": [5.0, 3.0, 5.5, 4.5],
    "train_s": [3.0, 2.0, 4.0, 3.0],
    "eval_s": [1.0, 0.5, 0.75, 1.0],
    "eval_images": [2, 2, 2, 2],
    "map": [0.1, 0.2, 0.1, 0.2],
    "ap50": [0.2, 0.4, 0.2, 0.4],
    "ap75": [0.05, 0.1, 0.05, 0.1],
    "energy_j": [300.0, 200.0, 400.0, 300.0],
}
WORKERS = {
    "worker": [0, 1],
    "node": ["a", "b"],
    "node_ip": ["10.0.0.1", "10.0.0.2"],
    "node_rank": [0, 1],
    "device": ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"],
    # NVML's used memory over NVML's total (an A100-40GB's 40960 MiB; torch's total is 39.4 GiB),
    # and PyTorch's peak reservation, less by the CUDA context and NCCL's buffers.
    "mem_peak_bytes": [5 * GIB, int(7.9 * GIB)],
    "mem_total_bytes": [40 * GIB, 40 * GIB],
    "mem_kind": ["nvml used", "nvml used"],
    "mem_torch_reserved_bytes": [int(4.25 * GIB), 7 * GIB],
    "torch": ["2.14.1+cu130", "2.14.1+cu130"],
    "tf32": [{"matmul": True, "cudnn": True}] * 2,
    "backend": ["nccl", "nccl"],
    "backend_version": ["2.27.5", "2.27.5"],
    "env": [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}],
    # Each worker's first batch: 1.5e12 FLOPs of which 0.5e12 in the box head, on 2 images
    # padded to 800 x 1216 (1,945,600 pixels).
    "flops": [1.5e12, 1.5e12],
    "box_flops": [0.5e12, 0.5e12],
    "flops_batch_pixels": [1_945_600, 1_945_600],
    "flops_images": [2, 2],
}


def test_throughput_figures():
    assert metrics.images_trained(STEPS) == 12
    assert metrics.whole_time(EPOCHS) == max(5.0 + 3.0, 5.5 + 4.5) == 10.0
    assert metrics.training_time(EPOCHS) == max(3.0, 4.0) + max(2.0, 3.0) == 7.0
    assert metrics.evaluation_time(EPOCHS) == max(1.0, 0.75) + max(0.5, 1.0) == 2.0
    assert metrics.compute_time(STEPS) == max(0.5 + 0.5 + 0.5, 1.0 + 1.0 + 1.0) == 3.0
    # FlagPerf's p_whole: over the whole wall time, not over the sum of the phases (9 s here).
    assert metrics.p_whole(STEPS, EPOCHS) == 12 / 10.0
    assert metrics.p_train(STEPS, EPOCHS) == pytest.approx(12 / 7.0)
    assert metrics.p_core(STEPS) == 12 / 3.0 == 4.0
    assert metrics.p_core(STEPS) >= metrics.p_train(STEPS, EPOCHS) >= metrics.p_whole(STEPS, EPOCHS)


def test_loss_per_epoch_is_the_mean_over_all_workers_steps():
    assert metrics.loss_per_epoch(STEPS) == [(2.0 + 1.5 + 2.0 + 1.75) / 4, (1.0 + 1.25) / 2] == [1.8125, 1.125]


def test_shares_and_init_time():
    waiting, computing = 0.25 * 3 + 0.5 * 3, 0.5 * 3 + 1.0 * 3
    assert metrics.data_wait_share(STEPS) == pytest.approx(waiting / (waiting + computing)) == pytest.approx(1 / 3)
    assert metrics.padding_share(STEPS) == pytest.approx(1 - 2000 / 3200) == pytest.approx(0.375)
    assert metrics.init_time(STEPS, process_start=88.5) == 100.0 - 88.5


def test_startup_stages():
    # The driver's marks and the last worker's, unix times; step 0 of epoch 0 began at 100.0 on
    # both workers, and worker 1 waited 0.5 s for its batch.
    marks = {"imports": 90.5, "data": 91.0, "ray": 94.0, "checks": 94.5, "workers": 97.0, "model": 99.0}
    ends = metrics.startup(marks, STEPS, process_start=88.5)
    assert ends == {"imports": 2.0, "data": 2.5, "ray": 5.5, "checks": 6.0, "workers": 8.5, "model": 10.5,
                    "first_step": 11.5, "first_batch": 12.0}
    assert list(ends) == list(metrics.STARTUP_STAGES)
    assert results.startup_line(ends, 11.5) == (
        "start-up: 11.5 s to the first step = imports 2.0 + data set 0.5 + Ray 3.0 + checks 0.5 + worker group 2.5 "
        "+ model 2.0 + resume check and barrier 1.0; the first batch in hand 0.5 s after it")
    # A resumed run's start-up ends at its own first step (epoch 1 here), not at the steps it resumed.
    assert metrics.startup(marks, STEPS, process_start=103.0)["first_batch"] == 106.0 + 0.5 - 103.0
    assert metrics.startup(marks, STEPS, process_start=200.0) is None


def test_whole_time_leaves_out_the_gap_of_a_restart():
    # Epoch 1 redone by a second attempt that started 30 s after epoch 0 ended: the gap is lost
    # time (attempts.jsonl), not training time.
    epochs = {**EPOCHS, "start": [99.5, 134.5, 99.5, 135.0], "end": [104.5, 137.5, 105.0, 139.5]}
    assert metrics.whole_time(epochs) == 10.0


def test_durations_are_monotonic_not_the_wall_clock():
    # Worker 1's wall clock stepped forward by 100 s during its epoch 1 (NTP, say): its monotonic
    # span, wall_s, is what whole_time adds up.
    stepped = {**EPOCHS, "end": [104.5, 107.5, 105.0, 209.5]}
    assert metrics.whole_time(stepped) == metrics.whole_time(EPOCHS) == 10.0


def test_time_to_target_reads_each_workers_own_clock():
    # Worker 1's machine's clock runs 50 s ahead of worker 0's: each worker's figure is taken on its
    # own clock, so the skew between machines does not enter it.
    skewed_steps = {**STEPS, "start": [100.0, 101.0, 105.0, 150.0, 152.0, 156.0]}
    skewed_epochs = {**EPOCHS, "start": [99.5, 104.5, 149.5, 155.0], "end": [104.5, 107.5, 155.0, 159.5]}
    assert metrics.time_to_target(skewed_steps, skewed_epochs, 0.15) == metrics.time_to_target(STEPS, EPOCHS, 0.15)


def test_time_to_target():
    # The first step started at 100; epoch 1 first reached 0.2, ending at 109.5 on the slower worker.
    assert metrics.time_to_target(STEPS, EPOCHS, target_map=0.15) == 109.5 - 100.0
    assert metrics.time_to_target(STEPS, EPOCHS, target_map=0.1) == 105.0 - 100.0
    assert metrics.time_to_target(STEPS, EPOCHS, target_map=0.36) is None


def test_loss_scaling():
    assert metrics.loss_scaling(STEPS) == {"loss_scale_first": 65536.0, "loss_scale_last": 32768.0,
                                           "skipped_steps": 1}


def test_joules_per_image():
    assert metrics.joules_per_image(STEPS, EPOCHS) == (300 + 200 + 400 + 300) / 12 == 100.0
    assert metrics.joules_per_image(STEPS, {**EPOCHS, "energy_j": [300.0, None, 400.0, 300.0]}) is None


def test_e2e_time():
    assert metrics.e2e_time(1000.0, 1123.5) == 123.5


def test_memory_on_a_gpu_is_nvml_used_of_the_peak_worker_with_torchs_beside_it():
    memory = metrics.memory(WORKERS)
    assert memory["mem"] == "7.9/40.0"  # FlagPerf's figure: unlabelled
    assert memory["mem_used_gib"] == pytest.approx(7.9)
    assert memory["mem_total_gib"] == 40.0
    assert memory["mem_kind"] == "nvml used"
    assert memory["mem_torch_reserved_gib"] == 7.0


def test_memory_on_a_gpu_without_nvml_is_torchs_labelled_so():
    workers = {**WORKERS, "mem_peak_bytes": [int(4.25 * GIB), 7 * GIB], "mem_total_bytes": [int(39.4 * GIB)] * 2,
               "mem_kind": ["torch reserved", "torch reserved"]}
    memory = metrics.memory(workers)
    assert memory["mem"] == "7.0/39.4 (torch reserved)"
    assert memory["mem_kind"] == "torch reserved" and memory["mem_torch_reserved_gib"] == 7.0


def test_memory_on_cpu_names_its_kind():
    workers = {**WORKERS, "mem_peak_bytes": [int(1.5 * GIB), 1 * GIB], "mem_total_bytes": [16 * GIB, 16 * GIB],
               "mem_kind": ["cpu rss", "cpu rss"], "mem_torch_reserved_bytes": [None, None]}
    memory = metrics.memory(workers)
    assert memory["mem"] == "1.5/16.0 (cpu rss)"
    assert memory["mem"].endswith(" (cpu rss)")
    assert memory["mem_kind"] == "cpu rss"
    assert memory["mem_torch_reserved_gib"] is None


def test_per_worker_shows_the_straggler():
    fast, slow = metrics.per_worker(STEPS, EPOCHS, WORKERS)
    assert fast["worker"] == 0 and fast["node"] == "a" and fast["steps"] == 3
    assert fast["node_ip"] == "10.0.0.1" and fast["node_rank"] == 0
    assert fast["device"] == "NVIDIA A100-SXM4-40GB" and slow["mem_peak_gib"] == pytest.approx(7.9)
    assert fast["images"] == 6
    assert fast["data_wait_s"] == 0.75
    assert fast["compute_s"] == 1.5
    assert fast["train_s"] == 3.0 + 2.0
    assert fast["images_per_s"] == pytest.approx(6 / 5.0)
    assert fast["core_images_per_s"] == 6 / 1.5
    assert fast["data_wait_share"] == pytest.approx(0.75 / 5.0)
    assert slow["worker"] == 1 and slow["node"] == "b" and slow["steps"] == 3
    assert slow["images"] == 6
    assert slow["data_wait_s"] == 1.5
    assert slow["compute_s"] == 3.0
    assert slow["train_s"] == 4.0 + 3.0
    assert slow["images_per_s"] == pytest.approx(6 / 7.0)
    assert slow["core_images_per_s"] == 6 / 3.0


def test_per_node_sums_workers_by_node_in_rank_order():
    b = {"node": "b", "node_ip": "10.0.0.2", "node_rank": 1}
    a = {"node": "a", "node_ip": "10.0.0.1", "node_rank": 0}
    rows = [
        {**b, "worker": 0, "images": 4, "data_wait_s": 0.5, "compute_s": 2.0},
        {**a, "worker": 1, "images": 6, "data_wait_s": 0.25, "compute_s": 1.0},
        {**b, "worker": 2, "images": 2, "data_wait_s": 0.75, "compute_s": 1.5},
    ]
    assert metrics.per_node(rows) == [
        {**a, "workers": 1, "images": 6, "data_wait_s": 0.25, "compute_s": 1.0},
        {**b, "workers": 2, "images": 4 + 2, "data_wait_s": 0.5 + 0.75, "compute_s": 2.0 + 1.5},
    ]


def test_figures_collects_everything():
    figures = metrics.figures(STEPS, EPOCHS, WORKERS, target_map=0.15)
    assert figures["images_trained"] == 12
    assert figures["whole_time_s"] == 10.0 and figures["p_whole"] == 1.2
    assert figures["time_to_target_s"] == 9.5
    assert figures["skipped_steps"] == 1 and figures["joules_per_image"] == 100.0
    assert figures["training_time_s"] == 7.0
    assert figures["evaluation_time_s"] == 2.0
    assert figures["compute_time_s"] == 3.0
    assert figures["p_core"] == 4.0
    assert figures["loss_per_epoch"] == [1.8125, 1.125]
    assert figures["mem"] == "7.9/40.0"
    assert [row["worker"] for row in figures["per_worker"]] == [0, 1]
    assert [row["backend"] for row in figures["per_worker"]] == ["nccl", "nccl"]
    pixels = sum(STEPS["batch_pixels"])
    flops_trained = 1e12 / 1_945_600 * pixels + 0.25e12 * 12
    assert figures["flops_trained"] == pytest.approx(flops_trained)
    assert figures["achieved_tflops"] == pytest.approx(flops_trained / 3.0 / 2 / 1e12)
    assert figures["per_node"] == [
        {"node": "a", "node_ip": "10.0.0.1", "node_rank": 0, "workers": 1, "images": 6, "data_wait_s": 0.75,
         "compute_s": 1.5},
        {"node": "b", "node_ip": "10.0.0.2", "node_rank": 1, "workers": 1, "images": 6, "data_wait_s": 1.5,
         "compute_s": 3.0},
    ]


def test_records_round_trip(tmp_path):
    attempts = {"attempt": [0, 1], "start_epoch": [0, 1], "started": [90.0, 105.5], "resumed": [False, True],
                "lost_steps": [0, 2], "lost_images": [0, 4], "time_lost_s": [0.0, 3.5]}
    bad_images = {"split": ["train"], "image_id": [7], "path": ["/data/train2017/7.jpg"], "reason": ["file not found"]}
    index = {}
    for epoch in (0, 1):
        rows = [i for i, e in enumerate(STEPS["epoch"]) if e == epoch]
        index[epoch] = write_step_file(tmp_path, epoch, {k: [v[i] for i in rows] for k, v in STEPS.items()})
    assert index == {0: {"rows": 4, "images": 8, "last_end": 104.0}, 1: {"rows": 2, "images": 4, "last_end": 108.0}}
    tables = {"epochs": EPOCHS, "workers": WORKERS, "attempts": attempts, "bad_images": bad_images, "step_log": index}
    write_tables(tmp_path, tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attempts.jsonl", "bad_images.jsonl", "epochs.jsonl", "step_log.json", "steps.parquet", "workers.jsonl"]
    assert sorted(p.name for p in (tmp_path / "steps.parquet").iterdir()) == ["epoch-0000.parquet", "epoch-0001.parquet"]
    loaded = load_records(tmp_path)
    steps = loaded.pop("steps")
    assert loaded == tables
    order = sorted(range(6), key=lambda i: (STEPS["epoch"][i], STEPS["worker"][i]))
    assert {name: column.tolist() for name, column in steps.items()} == {
        name: [values[i] for i in order] for name, values in STEPS.items()}
    # numpy columns from the step log give the same figures as lists
    assert metrics.figures(steps, EPOCHS, WORKERS, 0.36) == metrics.figures(STEPS, EPOCHS, WORKERS, 0.36)


RESULT = {
    "config_label": "1x8 A100",
    "config": {"precision": "amp", "tf32": False, "fix_hp": "bs=16,lr=0.16"},
    "e2e_time": 1234.6,
    "p_whole": 123.4,
    "p_train": 12.345,
    "p_core": 0.8123,
    "map": 0.37,
    "mem": "7.9/40.0",
}


def test_flagperf_row():
    assert results.flagperf_row(RESULT) == {
        "config": "1x8 A100", "precision": "amp", "fix_hp": "bs=16,lr=0.16", "e2e_time": "1235",
        "p_whole": "123", "p_train": "12.3", "p_core": "0.812", "map": "37.0%", "mem": "7.9/40.0",
    }


def test_the_row_says_when_fp32_ran_in_tf32():
    tf32 = {**RESULT, "config": {**RESULT["config"], "precision": "fp32", "tf32": True}}
    assert results.flagperf_row(tf32)["precision"] == "fp32 (tf32)"


def test_markdown_table():
    table = results.markdown_table([results.flagperf_row(RESULT)])
    assert table == (
        "| config | precision | fix_hp | e2e_time | p_whole | p_train | p_core | map | mem |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| 1x8 A100 | amp | bs=16,lr=0.16 | 1235 | 123 | 12.3 | 0.812 | 37.0% | 7.9/40.0 |\n"
    )


def test_write_result(tmp_path):
    results.write_result(tmp_path, RESULT)
    assert (tmp_path / "row.md").read_text() == results.markdown_table([results.flagperf_row(RESULT)])
    assert '"map": 0.37' in (tmp_path / "result.json").read_text()
