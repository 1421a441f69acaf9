"""PNG plots (matplotlib, no display needed) drawn from a run's raw logs (pipeline.records.results) and,
for `frcnn-bench report`, from several runs' results. Each is 800 x 450 pixels.

A run's plots: loss.png (loss per step, the mean over workers), map.png (bbox mAP and AP50 per
epoch), throughput.png (each worker's images/s over the run, over a moving window of steps) and
time.png (where each worker's time went: waiting for data, compute, evaluation, and the rest of
its epochs: barriers, waiting for slower workers, the reporting channel, checkpoints).
"""

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from pipeline.records import metrics  # noqa: E402

SIZE, DPI = (8, 4.5), 100
POINTS = 2000  # per line of the throughput plot


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _axes(title: str, xlabel: str, ylabel: str):
    figure, axes = plt.subplots(figsize=SIZE)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def loss_plot(steps: dict, path: Path) -> Path:
    epoch, step = np.asarray(steps["epoch"]), np.asarray(steps["step"])
    _, index = np.unique(np.stack([epoch, step]), axis=1, return_inverse=True)  # (epoch, step) in order
    index = index.ravel()
    means = np.bincount(index, weights=np.asarray(steps["loss"], dtype=np.float64)) / np.bincount(index)
    figure, axes = _axes("Training loss", "step", "loss (mean over workers)")
    axes.plot(np.arange(1, len(means) + 1), means, linewidth=1)
    return _save(figure, path)


def map_plot(epochs: dict, path: Path) -> Path:
    rows = sorted((e, m, a) for w, e, m, a in zip(epochs["worker"], epochs["epoch"], epochs["map"], epochs["ap50"])
                  if w == 0)
    figure, axes = _axes("Validation bbox AP", "epoch", "AP")
    axes.plot([e + 1 for e, _, _ in rows], [m for _, m, _ in rows], marker="o", label="mAP @[.5:.95]")
    axes.plot([e + 1 for e, _, _ in rows], [a for _, _, a in rows], marker="s", linestyle="--", label="AP50")
    axes.legend()
    return _save(figure, path)


def throughput_plot(steps: dict, path: Path) -> Path:
    """Per worker, at each step's end: the images of its last `window` steps of the same epoch over
    the time from the first of them starting to the last ending (so evaluations are left out).
    At most POINTS points a line: every k-th step's value on long runs."""
    columns = {name: np.asarray(steps[name]) for name in ("worker", "epoch", "step", "start", "end", "images")}
    t0 = columns["start"].min()
    figure, axes = _axes("Training throughput per worker", "seconds since the first step", "images/s")
    for worker in np.unique(columns["worker"]).tolist():
        mine = np.flatnonzero(columns["worker"] == worker)
        mine = mine[np.lexsort((columns["step"][mine], columns["epoch"][mine]))]
        window, stride = max(1, len(mine) // 50), max(1, len(mine) // POINTS)
        xs, ys = [], []
        for epoch in np.unique(columns["epoch"][mine]):
            rows = mine[columns["epoch"][mine] == epoch]
            images = np.concatenate([[0], np.cumsum(columns["images"][rows])])
            last = np.arange(len(rows))
            first = np.maximum(0, last - window + 1)
            ends = columns["end"][rows]
            rates = (images[last + 1] - images[first]) / (ends - columns["start"][rows][first])
            xs += [*(ends[::stride] - t0), ends[-1] - t0]
            ys += [*rates[::stride], float("nan")]  # a break in the line where the epoch's evaluation was
        axes.plot(xs, ys, marker=".", linewidth=1, label=f"worker {worker}")
    axes.legend(fontsize="small", ncol=4)
    return _save(figure, path)


def time_plot(steps: dict, epochs: dict, path: Path) -> Path:
    workers = sorted(set(epochs["worker"]))
    totals = [metrics.sum_by(table["worker"], table[column])
              for table, column in ((steps, "data_wait_s"), (steps, "compute_s"), (epochs, "eval_s"))]
    wait, compute, evaluation = ([total.get(w, 0.0) for w in workers] for total in totals)
    # The rest of each worker's epochs: barriers, waiting for slower workers, reporting, checkpoints.
    spans = metrics.epochs_time_per_worker(epochs)
    other = [max(0.0, spans[w] - a - b - c) for w, a, b, c in zip(workers, wait, compute, evaluation)]
    figure, axes = _axes("Where each worker's time went", "worker", "seconds")
    bottom = [0.0] * len(workers)
    for label, values in (("data wait", wait), ("compute", compute), ("evaluation", evaluation), ("other", other)):
        axes.bar([str(w) for w in workers], values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.legend()
    return _save(figure, path)


def write_run_plots(run_dir: Path, steps: dict, epochs: dict) -> list[Path]:
    run_dir = Path(run_dir)
    return [loss_plot(steps, run_dir / "loss.png"), map_plot(epochs, run_dir / "map.png"),
            throughput_plot(steps, run_dir / "throughput.png"), time_plot(steps, epochs, run_dir / "time.png")]


def scaling_plot(rows: list[dict], path: Path) -> Path:
    """p_train against devices, a line per precision, with the linear scaling of its 1x1 row."""
    figure, axes = _axes("Training throughput against devices", "devices", "p_train (images/s)")
    for precision in sorted({row["precision"] for row in rows}):
        mine = sorted((row["devices"], row["p_train"]) for row in rows if row["precision"] == precision)
        line, = axes.plot([d for d, _ in mine], [p for _, p in mine], marker="o", label=precision)
        single = [p for d, p in mine if d == 1]
        if single:
            axes.plot([1, mine[-1][0]], [single[0], single[0] * mine[-1][0]], linestyle=":", color=line.get_color(),
                      label=f"{precision}, linear from 1 device")
    axes.legend()
    return _save(figure, path)
