"""The floor under a run's init_time on this machine: Ray started as `frcnn-bench run` starts it (a
fresh local instance, no dashboard, no preemption watcher), then a TorchTrainer of 2 CPU workers
whose loop does nothing (or only imports torchvision's detection models, as every worker of a run
must). Prints, in seconds from this process's start: Ray up, the worker loop called (the
`workers` stage of a run's start-up), the loop done.

    .venv/bin/python docs/bench/startup_floor.py [--torchvision]
"""

import json
import os
import sys
import tempfile
import time

START = time.time()

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402

os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
ray_constants.ENABLE_RAY_CLUSTER = False  # bound to 127.0.0.1, as pipeline.run.loopback_only
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
RAY_UP = time.time()

from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402


def loop(config: dict) -> None:
    called = time.time()
    if config["torchvision"]:
        import torchvision.models.detection  # noqa: F401
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["folder"], f"{rank}.json"), "w") as marks:
        json.dump({"called": called, "done": time.time()}, marks)


with tempfile.TemporaryDirectory() as folder:
    TorchTrainer(loop, train_loop_config={"torchvision": "--torchvision" in sys.argv, "folder": folder},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=folder)).fit()
    marks = [json.load(open(os.path.join(folder, f"{rank}.json"))) for rank in (0, 1)]
print(f"Ray up {RAY_UP - START:.1f} s; loop called {max(m['called'] for m in marks) - START:.1f} s; "
      f"loop done {max(m['done'] for m in marks) - START:.1f} s")
