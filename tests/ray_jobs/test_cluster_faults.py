"""Pretraining on a real multi-node Ray cluster built on this machine (``infra/local/netcluster.py``): a head
on a bridge, the S3 server and each of 3 worker nodes in network namespaces of their own, one Ray Train
worker a node. A worker node loses every process mid-run; the run goes on from its latest checkpoint on
the spare node and ends bit-equal to the uninterrupted run, with every step in MLflow once.

The scenarios run through ``benchmarks/faults.py`` in a process of their own (it becomes the cluster's
driver); this module checks what it reports and, independently, the checkpoints it left in the cluster's
S3. The scenarios beyond the node kill carry the ``fault_matrix`` marker: CI skips them, ``make test-all``
runs them. Without root or ``ip netns`` every test here skips, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra" / "local"))

import netcluster  # noqa: E402

WHY_NOT = netcluster.check_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    net = netcluster.free_net(100)
    c = netcluster.Cluster(net, str(tmp_path_factory.mktemp("netcluster")))
    try:
        c.up(3)
        yield c
    finally:
        c.down()
        assert not netcluster.leftovers(c), "the cluster left processes or links behind"


def run_faults(cluster, tmp_path, *scenarios: str, steps: int = 24) -> dict:
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "-m", "benchmarks.faults", "--state-dir", cluster.state_dir, "--steps", str(steps),
           "--out", str(out), *(a for s in scenarios for a in ("--scenario", s))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def s3_filesystem(cluster):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=cluster.s3_url.removeprefix("http://"), scheme="http",
                             access_key="testing", secret_key="testing", region="us-east-1")


def read_state(cluster, checkpoint_uri: str) -> list[dict]:
    """Every rank's shard of a checkpoint in the cluster's S3, read here (not through the benchmark)."""
    from pipelines.train import checkpoint_file

    fs = s3_filesystem(cluster)
    path = checkpoint_uri.removeprefix("s3://")
    with fs.open_input_stream(f"{path}/meta.json") as f:
        world = json.loads(f.read())["world_size"]
    states = []
    for r in range(world):
        with fs.open_input_stream(f"{path}/rank-{r:05d}.shard") as f:
            states.append(checkpoint_file.decode(f.read()))
    return states


def tensors(obj, prefix=""):
    import torch

    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


@pytest.fixture(scope="module")
def node_kill(cluster, tmp_path_factory):
    return run_faults(cluster, tmp_path_factory.mktemp("node-kill"), "node-kill")


def test_the_cluster_has_three_worker_nodes_in_namespaces_of_their_own(cluster):
    status = cluster.status()
    assert {n: s["ray"] for n, s in status["nodes"].items()} == {"n1": "alive", "n2": "alive", "n3": "alive"}
    assert all(s["processes"] > 0 for s in status["nodes"].values())
    ips = {n.ip for n in cluster.nodes.values()} | {cluster.head_ip, cluster.s3_ip}
    assert len(ips) == 5 and all(ip.startswith("198.18.") for ip in ips)


def test_a_killed_node_costs_at_most_the_steps_since_a_checkpoint_and_the_run_ends_bit_equal(cluster, node_kill):
    import torch

    ref, kill = node_kill["reference"], node_kill["scenarios"]["node-kill"]
    assert ref["run_history"] == [{"from_step": 0, "world_size": 2, "ep": 2, "pp": 1}]
    # The worker group started again once, on the spare node, from a checkpoint taken before the fault
    # (every 4 steps) and at most one checkpoint behind it (Ray Train registers a report asynchronously).
    first, resumed = kill["run_history"]
    assert first["from_step"] == 0 and resumed["world_size"] == 2 and resumed["from_step"] % 4 == 0
    assert 0 <= kill["steps_lost"] <= 8, kill
    assert kill["processes_killed"] > 0 and kill["seconds_to_progress"] is not None
    # Every step 1..24 sits in the MLflow run exactly once, though steps were trained twice.
    assert kill["steps_logged_once"] and ref["steps_logged_once"]
    # The resumed start wrote folders of its own: nothing it registered shares a name with the first start's.
    assert kill["registered_checkpoints"] and all("-a" in name for name in kill["registered_checkpoints"])
    # Bit-equal to the uninterrupted run, read back here from the cluster's S3.
    a, b = read_state(cluster, kill["checkpoint"]), read_state(cluster, ref["checkpoint"])
    assert [s["step"] for s in a] == [s["step"] for s in b] == [24, 24]
    for sa, sb in zip(a, b):
        ta, tb = dict(tensors({"m": sa["model"], "o": sa["optimizer"]})), dict(tensors({"m": sb["model"],
                                                                                         "o": sb["optimizer"]}))
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), name
    assert kill["equal"]["bit_equal"]
