"""What the driver shows while a run goes, and what it keeps quiet.

Progress: a driver thread asks the collector for a snapshot every second and shows the
epoch and step (of the slowest worker), images/s now (all workers, steps ended in the last
10 s), the latest loss (mean of the workers' latest steps), the ETA and, between training
phases, how many val images have been inferred. On a terminal it is one line with a bar,
redrawn in place (a new line for each epoch and phase); otherwise (a file, a pipe, `ray job`
logs) a plain line each time the epoch or phase changes and every `interval` seconds.

ETA: the time since this attempt's first step, scaled by the steps left over the steps done in
it (evaluation time is inside that time, so it is scaled with it).

Quiet: unless verbose, Ray's own output stays in Ray's log directory (`log_to_driver=False`),
Ray's driver-side loggers show errors only, Ray Data's progress bars are off and warnings are
not shown. `--verbose` shows all of it.
"""

import logging
import sys
import threading
import time
import warnings

import ray

BAR = 24


def quiet_ray_init_options(verbose: bool) -> dict:
    """ray.init() arguments for the chosen verbosity; also quiets this process's Ray loggers."""
    if verbose:
        return {}
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars follow the driver's verbosity (they are set where the data set is made)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe(snapshot: dict, steps_per_epoch: int, max_epochs: int, val_images: int) -> tuple[tuple, str, float]:
    """(the phase: (epoch, "train" | "eval" | "start"), the line, the fraction done) of a snapshot
    from Collector.snapshot()."""
    latest, evaluated = snapshot["latest"], snapshot["evaluated"]
    total = steps_per_epoch * max_epochs
    if not latest:
        return (snapshot["start_epoch"], "start"), f"epoch {snapshot['start_epoch'] + 1}/{max_epochs}  starting", 0.0
    epoch, step = min((e, s) for e, s, _ in latest.values())
    done = epoch * steps_per_epoch + step + 1
    eval_epoch = max((e for e, _ in evaluated.values()), default=-1)
    if eval_epoch >= max(e for e, _, _ in latest.values()):  # evaluating the last epoch trained
        inferred = sum(n for e, n in evaluated.values() if e == eval_epoch)
        phase = (eval_epoch, "eval")
        where = f"eval {inferred}/{val_images} images" + ("" if inferred < val_images else ", COCOeval")
    else:
        phase = (epoch, "train")
        where = f"step {step + 1}/{steps_per_epoch}"
    parts = [f"epoch {phase[0] + 1}/{max_epochs}", where, f"{snapshot['images_per_s']:.1f} img/s"]
    parts.append(f"loss {sum(loss for _, _, loss in latest.values()) / len(latest):.3f}")
    if snapshot["last_map"] is not None:
        parts.append(f"mAP {snapshot['last_map'][1]:.3f} (epoch {snapshot['last_map'][0] + 1})")
    done_here = done - snapshot["start_epoch"] * steps_per_epoch
    if done_here > 0 and done < total:
        parts.append(f"ETA {duration((snapshot['now'] - snapshot['started']) * (total - done) / done_here)}")
    return phase, "  ".join(parts), min(1.0, done / total)


class Progress:
    """A driver thread that shows the run's progress until stopped (a context manager)."""

    def __init__(self, collector, steps_per_epoch: int, max_epochs: int, val_images: int, stream=None,
                 interval: float = 30.0, poll: float = 1.0):
        self.collector, self.steps_per_epoch, self.max_epochs = collector, steps_per_epoch, max_epochs
        self.val_images, self.interval, self.poll = val_images, interval, poll
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.phase, self.printed, self.width = None, 0.0, 0

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            try:
                self.show(ray.get(self.collector.snapshot.remote(), timeout=10))
            except (ray.exceptions.RayError, TimeoutError):
                pass  # the display waits; the run's own error handling reports failures
            if self.stopping.wait(self.poll):
                break
        if self.terminal and self.width:
            self.stream.write("\n")
            self.stream.flush()

    def show(self, snapshot: dict) -> None:
        phase, line, fraction = describe(snapshot, self.steps_per_epoch, self.max_epochs, self.val_images)
        changed, now = phase != self.phase, time.time()
        if self.terminal:
            filled = int(round(BAR * fraction))
            line = f"[{'#' * filled}{'.' * (BAR - filled)}] {100 * fraction:3.0f}%  {line}"
            self.stream.write(("\n" if changed and self.width else "\r") + line.ljust(self.width))
            self.width = len(line)
        elif changed or now - self.printed >= self.interval:
            self.stream.write(f"{100 * fraction:3.0f}%  {line}\n")
            self.printed = now
        else:
            return
        self.phase = phase
        self.stream.flush()
