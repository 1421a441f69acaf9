"""The worker's own settings, without a run (the runs are in test_run.py and the others)."""

from pipeline.config import resolve
from pipeline.worker.train_loop import torch_threads


def test_torch_threads_are_the_reserved_cpus_or_the_presets_omp_setting():
    assert torch_threads(resolve("1x8")) == 4
    assert torch_threads(resolve("smoke", cpus_per_worker=3)) == 3
    assert torch_threads(resolve("a100-1x8")) == 1  # its worker_env: OMP_NUM_THREADS=1, as FlagPerf's
    assert torch_threads(resolve("1x8", worker_env="OMP_NUM_THREADS=2")) == 2
