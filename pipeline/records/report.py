"""`frcnn-bench report RUN_DIR...`: FlagPerf's result table built from runs' result.json files.

A path is a run's results directory (it holds result.json) or a folder of them. One row per run,
with the seed's columns (config, precision, fix_hp, e2e_time, p_whole, p_train, p_core, map, mem)
and, to show how the job scales:

  devices             the run's training workers (one device each);
  p_train_per_device  p_train / devices;
  scaling_efficiency  p_train_per_device / the p_train of the 1-device run of the same precision
                      (none without such a run; two such runs are an error: say which one);
  tflops_per_device   the TFLOP/s each device achieved over the compute time (pipeline.worker.flops);
  utilisation         tflops_per_device / the device's peak at the run's precision (none when
                      the peak is not known).

Written to --output-dir: report.md, report.csv and report.json (the numbers unrounded) and
throughput_vs_devices.png.
"""

import argparse
import csv
import json
from pathlib import Path

from pipeline.records import plots
from pipeline.records.results import ROW_COLUMNS, flagperf_row, markdown_table, number, precision_label

COLUMNS = ("run", *ROW_COLUMNS, "devices", "p_train_per_device", "scaling_efficiency", "tflops_per_device",
           "utilisation")


class ReportError(ValueError):
    pass


def result_files(paths: list[str]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        files = [path / "result.json"] if (path / "result.json").is_file() else sorted(path.glob("*/result.json"))
        if not files:
            raise ReportError(f"{path}: no result.json in it or in the folders it holds")
        found += files
    return found


def rows(results: list[dict]) -> list[dict]:
    """One row per result, the numbers unrounded, ordered by precision then devices."""
    table = []
    for result in results:
        devices = result["workers"]
        table.append({"run": result["run_name"], "config": result["config_label"],
                      "precision": precision_label(result["config"]), "fix_hp": result["config"]["fix_hp"],
                      **{key: result[key] for key in ("e2e_time", "p_whole", "p_train", "p_core", "map", "mem")},
                      "devices": devices, "p_train_per_device": result["p_train"] / devices,
                      "tflops_per_device": result["achieved_tflops"], "utilisation": result["utilisation"]})
    for row in table:
        singles = [r for r in table if r["devices"] == 1 and r["precision"] == row["precision"]]
        if len(singles) > 1:
            raise ReportError(f"{len(singles)} one-device {row['precision']} runs ({', '.join(r['run'] for r in singles)}): "
                              "scaling efficiency needs one; leave the others out")
        row["scaling_efficiency"] = row["p_train_per_device"] / singles[0]["p_train"] if singles else None
    return sorted(table, key=lambda r: (r["precision"], r["devices"], r["run"]))


def markdown(table: list[dict], results_by_run: dict) -> str:
    shown = []
    for row in table:
        efficiency = row["scaling_efficiency"]
        shown.append({"run": row["run"], **flagperf_row(results_by_run[row["run"]]), "devices": row["devices"],
                      "p_train_per_device": number(row["p_train_per_device"]),
                      "scaling_efficiency": "/" if efficiency is None else f"{100 * efficiency:.1f}%",
                      "tflops_per_device": "/" if row["tflops_per_device"] is None else f"{row['tflops_per_device']:.3g}",
                      "utilisation": "/" if row["utilisation"] is None else f"{100 * row['utilisation']:.1f}%"})
    return markdown_table(shown, columns=COLUMNS)


def write(table: list[dict], results_by_run: dict, output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(table, results_by_run)
    (output_dir / "report.md").write_text(text)
    with open(output_dir / "report.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    (output_dir / "report.json").write_text(json.dumps(table, indent=2) + "\n")
    plots.scaling_plot(table, output_dir / "throughput_vs_devices.png")
    return text


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="results directories of runs, or folders holding them")
    parser.add_argument("--output-dir", default="report", help="where the table and the plot go (default: report)")
    args = parser.parse_args(argv)
    results = []
    for path in result_files(args.paths):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not a result.json ({error})") from None
    by_run = {result["run_name"]: result for result in results}
    if len(by_run) < len(results):
        raise ReportError("two results have the same run name; give each run its own --run-name")
    print(write(rows(results), by_run, Path(args.output_dir)), end="")
    print(f"\nwritten to {args.output_dir}: report.md, report.csv, report.json, throughput_vs_devices.png")
