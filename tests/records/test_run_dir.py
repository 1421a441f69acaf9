"""A shared results volume: no run mixes its files with another's, a resume with the same settings
is let in, and a writer killed mid-write leaves no half-written file that `report` would read."""

import json
import os

import pytest

from pipeline.config import resolve, to_dict
from pipeline.records import report, results
from pipeline.records.results import RunDirError, claim_run_dir
from pipeline.run import run

CONFIG = {**to_dict(resolve("smoke")), "run_name": "shared"}


def test_a_new_run_writes_its_config_and_a_resume_is_let_in(tmp_path):
    run_dir = tmp_path / "shared"
    claim_run_dir(run_dir, CONFIG)
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(CONFIG))
    (run_dir / "result.json").write_text("{}")
    claim_run_dir(run_dir, CONFIG)  # the same run resumed
    claim_run_dir(run_dir, {**CONFIG, "ray_address": "10.0.0.1:6379", "max_failures": 3, "output_dir": "/x",
                            "weights_cache": "/w"})


@pytest.mark.parametrize("results_file", ["result.json", "steps.parquet/epoch-0000.parquet", "checkpoint_2026/state.pt"])
def test_another_configuration_is_refused_once_the_directory_holds_results(tmp_path, results_file):
    run_dir = tmp_path / "shared"
    claim_run_dir(run_dir, CONFIG)
    (run_dir / results_file).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / results_file).write_text("x")
    with pytest.raises(RunDirError, match=rf"{run_dir}: holds the results of run 'shared' with another configuration "
                                          r"\(lr: 0\.005 there, 0\.02 here; num_workers: 2 there, 8 here\)"):
        claim_run_dir(run_dir, {**CONFIG, "lr": 0.02, "num_workers": 8})
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.005


def test_another_configuration_replaces_a_run_that_never_trained(tmp_path):
    run_dir = tmp_path / "shared"
    claim_run_dir(run_dir, CONFIG)
    claim_run_dir(run_dir, {**CONFIG, "num_workers": 1})
    assert json.loads((run_dir / "config.json").read_text())["num_workers"] == 1


def test_a_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("someone else's")
    with pytest.raises(RunDirError, match="exists and holds files but no config.json"):
        claim_run_dir(tmp_path / "shared", CONFIG)


def test_run_refuses_before_ray_starts_and_leaves_the_other_run_as_it_was(tiny_coco, tmp_path):
    # synthetic_train_images=0: the session's tiny_coco is read as it is; the smoke preset's own
    # synthetic set would replace it (run() prepares the data before it claims the folder).
    other = resolve("smoke", data_root=str(tiny_coco), synthetic_train_images=0, output_dir=str(tmp_path),
                    run_name="shared")
    claim_run_dir(tmp_path / "shared", {**to_dict(other), "run_name": "shared"})
    (tmp_path / "shared" / "result.json").write_text('{"run_name": "shared"}\n')
    mine = resolve("smoke", data_root=str(tiny_coco), synthetic_train_images=0, output_dir=str(tmp_path),
                   run_name="shared", lr=0.01, ray_address="127.0.0.1:1")  # no Ray there: the refusal must come first
    with pytest.raises(RunDirError, match="lr: 0.005 there, 0.01 here"):
        run(mine)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["config.json", "result.json"]


def test_a_writer_killed_before_its_rename_leaves_the_previous_result(tmp_path, monkeypatch):
    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    result = {"run_name": "shared", "config_label": "1x1", "config": {"precision": "fp32", "tf32": False, "fix_hp": "/"},
              "e2e_time": 1.0, "p_whole": 1.0, "p_train": 1.0, "p_core": 1.0, "map": 0.1, "mem": "1/2"}
    results.write_result(run_dir, result)

    def killed(*_):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        results.write_result(run_dir, {**result, "map": 0.2})
    monkeypatch.undo()
    assert report.result_files([str(tmp_path)]) == [run_dir / "result.json"]
    assert json.loads((run_dir / "result.json").read_text())["map"] == 0.1
