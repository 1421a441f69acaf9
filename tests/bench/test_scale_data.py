"""`python -m pipeline.bench.scale_data` writes its results where docs/performance.md reads them."""

from pathlib import Path

from pipeline.bench import scale_data

ROOT = Path(__file__).resolve().parents[2]


def test_the_results_go_to_the_committed_file():
    assert scale_data.RESULTS == ROOT / "docs" / "bench" / "scale_data.json"
