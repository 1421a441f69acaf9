"""Two Ray nodes on one machine, two training workers placed one per node (the session's
two-node run: tests/conftest.py)."""

import json


def test_one_worker_per_node_gives_node_ranks_and_per_node_rows(two_node_run):
    result, node_ids = two_node_run["result"], two_node_run["node_ids"]
    saved = json.loads((two_node_run["run_dir"] / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["nodes"] == 2 and saved["workers"] == 2 and saved["config_label"] == "2x1"
    workers = saved["per_worker"]
    assert [w["worker"] for w in workers] == [0, 1]
    assert {w["node"] for w in workers} == node_ids
    assert all(w["node_ip"] and isinstance(w["node_rank"], int) for w in workers)
    nodes = saved["per_node"]
    assert {n["node"] for n in nodes} == node_ids
    assert [n["workers"] for n in nodes] == [1, 1]
    assert sum(n["images"] for n in nodes) == saved["images_trained"] > 0
