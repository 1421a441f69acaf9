"""PNG plots (matplotlib, no display needed) drawn from a run's raw logs (pipeline.results) and,
for `frcnn-bench report`, from several runs' results. Each is 800 x 450 pixels.

A run's plots: loss.png (loss per step, the mean over workers), map.png (bbox mAP and AP50 per
epoch), throughput.png (each worker's images/s over the run, over a moving window of steps) and
time.png (where each worker's time went: waiting for data, compute, evaluation, and the rest of
its epochs: barriers, waiting for slower workers, the reporting channel, checkpoints).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from pipeline import metrics  # noqa: E402

SIZE, DPI = (8, 4.5), 100


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
    losses = {}
    for epoch, step, loss in zip(steps["epoch"], steps["step"], steps["loss"]):
        losses.setdefault((epoch, step), []).append(loss)
    keys = sorted(losses)
    figure, axes = _axes("Training loss", "step", "loss (mean over workers)")
    axes.plot(range(1, len(keys) + 1), [sum(losses[k]) / len(losses[k]) for k in keys], linewidth=1)
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
    the time from the first of them starting to the last ending (so evaluations are left out)."""
    t0 = min(steps["start"])
    figure, axes = _axes("Training throughput per worker", "seconds since the first step", "images/s")
    for worker in sorted(set(steps["worker"])):
        rows = sorted((ep, end, start, n) for w, ep, end, start, n in zip(
            steps["worker"], steps["epoch"], steps["end"], steps["start"], steps["images"]) if w == worker)
        window = max(1, len(rows) // 50)
        xs, ys = [], []
        for epoch in sorted({row[0] for row in rows}):
            mine = [row[1:] for row in rows if row[0] == epoch]
            for i, (end, _, _) in enumerate(mine):
                first = max(0, i - window + 1)
                xs.append(end - t0)
                ys.append(sum(n for _, _, n in mine[first:i + 1]) / (end - mine[first][1]))
            xs.append(xs[-1])
            ys.append(float("nan"))  # a break in the line where the epoch's evaluation was
        axes.plot(xs, ys, marker=".", linewidth=1, label=f"worker {worker}")
    axes.legend(fontsize="small", ncol=4)
    return _save(figure, path)


def time_plot(steps: dict, epochs: dict, path: Path) -> Path:
    workers = sorted(set(epochs["worker"]))
    def total(table, column, worker):
        return sum(v for w, v in zip(table["worker"], table[column]) if w == worker)
    wait = [total(steps, "data_wait_s", w) for w in workers]
    compute = [total(steps, "compute_s", w) for w in workers]
    evaluation = [total(epochs, "eval_s", w) for w in workers]
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


def write_run_plots(run_dir: Path, records: dict) -> list[Path]:
    run_dir = Path(run_dir)
    steps, epochs = records["steps"], records["epochs"]
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
