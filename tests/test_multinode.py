"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, as Ray's own multi-node tests do),
two training workers placed one per node."""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import free_port
from pipeline.config import resolve
from pipeline.run import run


@pytest.fixture
def two_nodes():
    # Ray picks the nodes' address itself: an explicit 127.0.0.1 here is not the address it then
    # advertises for the GCS, and the driver cannot connect.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "gcs_server_port": free_port(), "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_one_worker_per_node_gives_node_ranks_and_per_node_rows(two_nodes, tmp_path):
    config = resolve("smoke", data_root=str(tmp_path / "data"), output_dir=str(tmp_path), run_name="two-nodes",
                     placement_strategy="SPREAD", nodes=2)
    result = run(config)
    saved = json.loads((tmp_path / "two-nodes" / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert saved["nodes"] == 2 and saved["workers"] == 2 and saved["config_label"] == "2x1"
    workers = saved["per_worker"]
    assert [w["worker"] for w in workers] == [0, 1]
    assert {w["node"] for w in workers} == node_ids
    assert all(w["node_ip"] and isinstance(w["node_rank"], int) for w in workers)
    nodes = saved["per_node"]
    assert {n["node"] for n in nodes} == node_ids
    assert [n["workers"] for n in nodes] == [1, 1]
    assert sum(n["images"] for n in nodes) == saved["images_trained"] > 0
