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
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra" / "local"))

import netcluster  # noqa: E402

from benchmarks.common import flat_tensors  # noqa: E402

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


def run_faults(cluster, tmp_path, *scenarios: str, steps: int = 24, timeout_s: float = 900) -> dict:
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "-m", "benchmarks.faults", "--state-dir", cluster.state_dir, "--steps", str(steps),
           "--out", str(out), *(a for s in scenarios for a in ("--scenario", s))]
    # The benchmark gets this environment without what earlier tests set for their own services (S3,
    # MLflow, Ray): it is the cluster's driver and takes the cluster's settings from its state file.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "K2PIPE_"))}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
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


@pytest.fixture(scope="module")
def node_kill(cluster, tmp_path_factory):
    return run_faults(cluster, tmp_path_factory.mktemp("node-kill"), "node-kill")


def test_the_cluster_has_three_worker_nodes_in_namespaces_of_their_own(cluster):
    status = cluster.status()
    assert {n: s["ray"] for n, s in status["nodes"].items()} == {"n1": "alive", "n2": "alive", "n3": "alive"}
    assert all(s["processes"] > 0 for s in status["nodes"].values())
    ips = {n.ip for n in cluster.nodes.values()} | {cluster.head_ip, cluster.s3_ip}
    assert len(ips) == 5 and all(ip.startswith("198.18.") for ip in ips)


def assert_bit_equal(cluster, checkpoint_a: str, checkpoint_b: str, steps: int) -> None:
    """Every tensor of every rank (parameters, optimizer state) equal, read back here from the cluster's S3."""
    import torch

    a, b = read_state(cluster, checkpoint_a), read_state(cluster, checkpoint_b)
    assert [s["step"] for s in a] == [s["step"] for s in b] == [steps] * len(b)
    for sa, sb in zip(a, b):
        ta = flat_tensors({"m": sa["model"], "o": sa["optimizer"]})
        tb = flat_tensors({"m": sb["model"], "o": sb["optimizer"]})
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), name


def test_a_killed_node_costs_at_most_the_steps_since_a_checkpoint_and_the_run_ends_bit_equal(cluster, node_kill):
    ref, kill = node_kill["references"]["24"], node_kill["scenarios"]["node-kill"]
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
    assert_bit_equal(cluster, kill["checkpoint"], ref["checkpoint"], 24)
    assert kill["equal"]["bit_equal"]


# ---------------------------------------------------------------------- the rest of the matrix (make test-all)
@pytest.fixture(scope="module")
def matrix(cluster, tmp_path_factory):
    return run_faults(cluster, tmp_path_factory.mktemp("matrix"), "network-cut", "s3-outage", "preemption",
                      "preemption-midrun", "elastic", "one-node", timeout_s=3600)


@pytest.mark.fault_matrix
def test_two_nodes_train_what_one_node_trains(cluster, matrix, tmp_path, monkeypatch):
    one = matrix["scenarios"]["one-node"]
    two = matrix["references"]["24"]["checkpoint"]
    assert_bit_equal(cluster, one["checkpoint"], two, 24)
    # And the Hugging Face exports of the two runs are the same bytes.
    from benchmarks.faults import fault_config
    from pipelines.hf_folder import CheckpointTensors
    from pipelines.stages.export import write_hf_folder

    for key, value in cluster.s3_env().items():
        monkeypatch.setenv(key, value)
    model = fault_config(str(tmp_path)).model
    exports = []
    for name, uri in (("one-node", one["checkpoint"]), ("two-nodes", two)):
        with CheckpointTensors(uri, model.num_experts) as source:
            written = write_hf_folder(source, model, str(tmp_path / name))
        exports.append({file: w["sha256"] for file, w in written.items()})
    assert any(file.endswith(".safetensors") for file in exports[0]), exports[0]
    assert exports[0] == exports[1]


@pytest.mark.fault_matrix
def test_a_cut_link_restarts_the_group_once_and_the_run_ends_bit_equal(cluster, matrix):
    cut = matrix["scenarios"]["network-cut"]
    assert len(cut["run_history"]) == 2 and cut["run_history"][1]["from_step"] % 4 == 0, cut["run_history"]
    assert 0 <= cut["steps_lost"] <= 8 and cut["steps_logged_once"], cut
    # The resumed start registered only folders of its own, each step once.
    names = cut["registered_checkpoints"]
    steps = [n.split("-a")[0] for n in names]
    assert names and all("-a" in n for n in names) and len(steps) == len(set(steps)), names
    assert_bit_equal(cluster, cut["checkpoint"], matrix["references"]["24"]["checkpoint"], 24)


@pytest.mark.fault_matrix
def test_an_s3_outage_during_an_upload_costs_no_restart(cluster, matrix):
    out = matrix["scenarios"]["s3-outage"]
    assert out["run_history"] == [{"from_step": 0, "world_size": 2, "ep": 2, "pp": 1}], out["run_history"]
    assert out["steps_logged_once"] and "checkpoint-step00000024" in out["registered_checkpoints"], out
    assert_bit_equal(cluster, out["checkpoint"], matrix["references"]["24"]["checkpoint"], 24)


@pytest.mark.fault_matrix
def test_a_preemption_notice_checkpoints_before_the_node_goes(cluster, matrix):
    pre = matrix["scenarios"]["preemption"]
    # The workers saw the notice after the drain (Ray polls drains every few seconds) and checkpointed that
    # very step (periodic checkpoints are 20 steps apart); they trained on while the deadline left room,
    # checkpointed the last step that fit and waited, so the node's departure cost no step. Where the run
    # reaches its last step first, that step is checkpointed at once, and a restart has nothing to train.
    notice = pre["preemption_checkpoint_step"]
    assert pre["steps_logged_once"], pre
    if len(pre["run_history"]) == 1:  # a fast machine: the run returned before the deadline
        assert pre["last_logged_step_at_kill"] == 40 and notice <= 40, pre
    else:
        resumed = pre["run_history"][1]["from_step"]
        assert pre["last_logged_step_at_fault"] <= notice <= resumed, pre
        assert resumed in (pre.get("preemption_parked_step"), 40), pre
        assert pre["steps_lost"] == pre["last_logged_step_at_kill"] - resumed == 0, pre
    assert_bit_equal(cluster, pre["checkpoint"], matrix["references"]["40"]["checkpoint"], 40)


@pytest.mark.fault_matrix
def test_a_deadline_mid_run_costs_no_step(cluster, matrix):
    pre = matrix["scenarios"]["preemption-midrun"]
    # 80 steps, periodic checkpoints 50 apart: the deadline comes mid-run. The group checkpointed the last
    # step that fit before it, waited, and the restarted group resumed from exactly that step.
    notice, parked = pre["preemption_checkpoint_step"], pre["preemption_parked_step"]
    resumed = pre["run_history"][1]["from_step"]
    assert pre["last_logged_step_at_fault"] <= notice < parked == resumed, pre
    assert pre["steps_lost"] == pre["last_logged_step_at_kill"] - resumed == 0, pre
    assert pre["steps_logged_once"] and len(pre["run_history"]) == 2, pre
    assert_bit_equal(cluster, pre["checkpoint"], matrix["references"]["80"]["checkpoint"], 80)


@pytest.mark.fault_matrix
def test_an_elastic_group_shrinks_without_a_spare_and_grows_back(cluster, matrix):
    el = matrix["scenarios"]["elastic"]
    sizes = [(h["world_size"], h["ep"]) for h in el["run_history"]]
    assert sizes[0] == (2, 2) and (1, 1) in sizes and sizes[-1] == (2, 2), el["run_history"]
    assert el["steps_logged_once"], el
    # Resharded twice: equal to the uninterrupted 2-worker run to float rounding, not bit for bit.
    assert el["equal"]["steps"] == [40, 40] and el["equal"]["max_relative_difference"] < 2e-4, el["equal"]
