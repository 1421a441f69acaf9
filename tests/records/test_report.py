"""`frcnn-bench report` over the results of two real tiny runs (the acceptance flow's 1x1 fp32 run,
and the session's shared run of 3 workers), and the plots each run writes."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from pipeline.records import report
from pipeline.records.plots import DPI, SIZE
from pipeline.records.report import ReportError
from pipeline.records.results import flagperf_row
from conftest import SHARED_WORKERS

PIXELS = (SIZE[0] * DPI, SIZE[1] * DPI)
ROOT = Path(__file__).resolve().parents[2]
ONE = "1x1-fp32"  # the acceptance flow's one-device fp32 run


@pytest.fixture(scope="module")
def two_runs(shared_run, acceptance_flow) -> dict:
    """The two runs' directories, by run name."""
    return {ONE: acceptance_flow["folder"] / "runs" / ONE, f"w{SHARED_WORKERS}": shared_run}


def result(runs, name) -> dict:
    return json.loads((runs[name] / "result.json").read_text())


def check_png(path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PIXELS
        image.load()


def test_report_builds_the_table_from_the_results(two_runs, tmp_path, capsys):
    cli.main(["report", *map(str, two_runs.values()), "--output-dir", str(tmp_path)])
    n = SHARED_WORKERS
    one, two = result(two_runs, ONE), result(two_runs, f"w{n}")
    table = json.loads((tmp_path / "report.json").read_text())
    assert [row["run"] for row in table] == [ONE, f"w{n}"]
    for row, source in zip(table, (one, two)):
        assert row["config"] == source["config_label"] and row["precision"] == source["config"]["precision"]
        assert row["fix_hp"] == source["config"]["fix_hp"] and row["devices"] == source["workers"]
        for key in ("e2e_time", "p_whole", "p_train", "p_core", "map", "mem"):
            assert row[key] == source[key]
    assert [row["config"] for row in table] == ["1x1", f"1x{n}"]
    assert table[0]["scaling_efficiency"] == 1.0
    assert table[1]["p_train_per_device"] == two["p_train"] / n
    assert table[1]["scaling_efficiency"] == pytest.approx(two["p_train"] / n / one["p_train"], rel=1e-12)

    with open(tmp_path / "report.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["run"], float(r["p_train"]), float(r["scaling_efficiency"])) for r in rows] == [
        (r["run"], r["p_train"], r["scaling_efficiency"]) for r in table]

    markdown = (tmp_path / "report.md").read_text().splitlines()
    assert markdown[0].startswith("| run | config | precision | fix_hp | e2e_time | p_whole | p_train | p_core | map | mem |")
    shown = flagperf_row(two)
    assert markdown[3].startswith(f"| w{n} | {' | '.join(str(shown[c]) for c in shown)} | {n} |")
    assert table[1]["tflops_per_device"] == two["achieved_tflops"] and table[1]["utilisation"] is None  # a CPU
    assert markdown[3].endswith(f" | {100 * table[1]['scaling_efficiency']:.1f}% | "
                                f"{two['achieved_tflops']:.3g} | / |")
    assert capsys.readouterr().out.startswith(markdown[0])
    check_png(tmp_path / "throughput_vs_devices.png")


def test_each_run_writes_its_plots(two_runs):
    for name, folder in two_runs.items():
        plots = result(two_runs, name)["plots"]
        assert [p.rsplit("/", 1)[1] for p in plots] == ["loss.png", "map.png", "throughput.png", "time.png"]
        for path in plots:
            check_png(folder / path.rsplit("/", 1)[1])


def test_report_refusals(two_runs, tmp_path):
    with pytest.raises(ReportError, match=f"{tmp_path}: no result.json"):
        report.main([str(tmp_path)])
    again = result(two_runs, ONE)
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "result.json").write_text(json.dumps({**again, "run_name": "again"}))
    with pytest.raises(ReportError, match=rf"2 one-device fp32 runs \({ONE}, again\)|2 one-device fp32 runs \(again, {ONE}\)"):
        report.main([*map(str, two_runs.values()), str(tmp_path / "again"), "--output-dir", str(tmp_path / "out")])
    shutil.rmtree(tmp_path / "again")


def test_report_imports_neither_ray_nor_torch(two_runs, tmp_path):
    """`frcnn-bench report` reads results anywhere, e.g. on a laptop without a cluster: it needs
    neither Ray nor torch, and imports neither."""
    code = ("import sys\nfrom pipeline import cli\ncli.main(['report', *sys.argv[1:3], '--output-dir', sys.argv[3]])\n"
            "print('HEAVY', sorted(m for m in ('ray', 'torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, two_runs.values()), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "report.json").is_file() and f"| w{SHARED_WORKERS} |" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY []"
