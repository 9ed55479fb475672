"""Faults on a real multi-node Ray cluster built on this machine (``infra/local/netcluster.py``): what each
costs a pretraining run, and whether the run still ends where an uninterrupted one ends.

    sudo .venv/bin/python -m benchmarks.faults [--scenario node-kill ...] [--out benchmarks/results/faults.json]

Each scenario trains ``tiny`` (vocabulary 256, 32-token windows, synthetic shards in the cluster's S3) on
two worker nodes of a 3-node cluster, one Ray Train worker a node (``train.worker_resources=k2node:1``),
logging every step to the cluster's MLflow server, and injects its fault once MLflow shows step
``fault_step``. It reports:

- ``steps_lost``: steps trained before the fault that were trained again (the last logged step at the
  fault minus the step the run resumed from);
- ``seconds_to_restart``: from the fault to the new worker group's start (its ``k2pipe.run_history`` tag);
- ``seconds_to_progress``: from the fault to the first step beyond the last one logged before it;
- ``equal``: the final training state (parameters, optimizer state, step) against the uninterrupted run's
  on the same cluster: ``bit_equal``, or the largest relative difference where the layout changed;
- ``steps_logged_once``: every step 1..N holds exactly one ``train/loss`` value in the MLflow run.

Scenarios: ``node-kill`` (every process of a worker node SIGKILLed, a spare node takes over),
``network-cut`` (a worker node's link down for longer than Ray's health check, then healed).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra" / "local"))

import netcluster  # noqa: E402

SEQ = 32
VOCAB = 256
SCENARIOS = ("node-kill", "network-cut")


# ---------------------------------------------------------------------- data and configs
def synthetic_shards(root: str, num_shards: int = 2, rows: int = 64) -> dict[str, Any]:
    """Packed shards with learnable structure, in the shard stage's manifest layout (any storage URI)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    fs, path = storage.resolve(root)
    fs.create_dir(path, recursive=True)
    shards = []
    for s in range(num_shards):
        data = [((np.arange(SEQ + 1) * (i % 7 + 1) + i + s) % 200).astype(np.int32) for i in range(rows)]
        table = pa.table({"input_ids": pa.array([list(r) for r in data], type=pa.list_(pa.int32()))})
        with fs.open_output_stream(f"{path}/train-{s:05d}.parquet") as f:
            pq.write_table(table, f, row_group_size=16)
        shards.append({"path": f"train-{s:05d}.parquet", "num_rows": rows})
    return {"seq_len": SEQ, "vocab_size": VOCAB, "config_hash": "synthetic", "tokenizer_sha256": "synthetic",
            "splits": {"train": {"num_windows": rows * num_shards, "shards": shards},
                       "val": {"num_windows": rows, "shards": shards[:1]}}}


def fault_config(root: str, *extra: str, steps: int = 24, name: str = "faults"):
    """``tiny`` on 2 workers (ep=2), one per node; fp32 Newton-Schulz whatever the CPU kind."""
    from pipelines.config import load_config

    return load_config(None, [
        "optimizer.ns_dtype=float32", f"storage.root={root}", f"model.vocab_size={VOCAB}",
        f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=64", "train.num_workers=2",
        "train.ep=2", f"train.steps={steps}", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=0", "train.stats_every=0",
        "train.warmup_steps=2", "train.cpus_per_worker=0.5", "train.max_failures=3",
        "train.worker_resources=k2node:1", *extra], run_name=name)


# ---------------------------------------------------------------------- reading results
def final_state(checkpoint_uri: str) -> list[dict[str, Any]]:
    """Every rank's shard of a checkpoint folder, decoded."""
    from pipelines import storage
    from pipelines.train import checkpoint_file, checkpointing

    meta = json.loads(storage.read_bytes(storage.join(checkpoint_uri, checkpointing.META_NAME)))
    names = [checkpointing.SHARD_NAME.format(rank=r) for r in range(meta["world_size"])]
    return [checkpoint_file.decode(storage.read_bytes(storage.join(checkpoint_uri, n))) for n in names]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def compare_states(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Same layout: every tensor of every rank's parameters and optimizer state, bit for bit; the largest
    relative difference of the parameters either way (experts concatenated over the ranks)."""
    import torch

    same_layout = len(a) == len(b)
    bit_equal = same_layout and all(sa["step"] == sb["step"] for sa, sb in zip(a, b))
    if bit_equal:
        for sa, sb in zip(a, b):
            fa, fb = _flat({"m": sa["model"], "o": sa["optimizer"]}), _flat({"m": sb["model"], "o": sb["optimizer"]})
            if fa.keys() != fb.keys() or not all(torch.equal(fa[k], fb[k]) for k in fa):
                bit_equal = False
                break

    def whole(state: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {name: (torch.cat([s["model"][name] for s in state]) if ".mlp.experts." in name else t)
                for name, t in state[0]["model"].items()}

    wa, wb = whole(a), whole(b)
    rel = max(float((wa[n].float() - wb[n].float()).abs().max() / wb[n].float().abs().max().clamp_min(1e-30))
              for n in wb)
    return {"bit_equal": bit_equal, "max_relative_difference": rel, "steps": [a[0]["step"], b[0]["step"]]}


class Progress:
    """What the MLflow run shows: the highest step logged and the run-history tag, polled."""

    def __init__(self, tracking_uri: str, run_id: str):
        from pipelines import tracking

        self.client = tracking.client(tracking_uri)
        self.run_id = run_id

    def steps(self) -> list[int]:
        try:
            return [m.step for m in self.client.get_metric_history(self.run_id, "train/loss")]
        except Exception:  # the server is busy or briefly unreachable: nothing new
            return []

    def starts(self) -> int:
        try:
            tag = self.client.get_run(self.run_id).data.tags.get("k2pipe.run_history")
        except Exception:
            return 0
        return len(json.loads(tag)) if tag else 0


# ---------------------------------------------------------------------- the cluster side
def connect(cluster: netcluster.Cluster) -> None:
    """This process as the driver, on the head node, with the cluster's S3 and MLflow in its environment."""
    import os

    import ray

    os.environ.update(cluster.s3_env())
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        ray.init(address=cluster.ray_address, _node_ip_address=cluster.head_ip, log_to_driver=False)


def worker_nodes(cluster: netcluster.Cluster) -> list[str]:
    """The cluster's node names that host a live Ray Train worker now."""
    import ray
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    actors = list_actors(address=cluster.dashboard_url,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    hosting = {ips.get(a.node_id) for a in actors}
    return sorted(name for name, n in cluster.nodes.items() if n.ip in hosting)


def train(cluster: netcluster.Cluster, cfg, data_uri: str, manifest: dict[str, Any], run_name: str,
          fault=None, fault_step: int = 0, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run pretraining on the cluster as an MLflow run; ``fault(cluster, victim) -> dict`` is called once the
    run has logged ``fault_step``, with ``victim`` a node hosting a worker. Returns the figures."""
    from pipelines import tracking
    from pipelines.stages.pretrain import run_pretrain

    c = tracking.client(cluster.mlflow_url)
    experiment = tracking.ensure_experiment(cluster.mlflow_url, "k2pipe-faults")
    run_id = c.create_run(experiment, run_name=run_name).info.run_id
    progress = Progress(cluster.mlflow_url, run_id)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = run_pretrain(cfg, data_uri, manifest, mlflow_run_id=run_id, tracking_uri=cluster.mlflow_url)
        except BaseException as e:  # reported below
            box["error"] = e

    started = time.time()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    figures: dict[str, Any] = {"run": run_name, "mlflow_run_id": run_id}
    deadline = time.monotonic() + timeout_s
    if fault is not None:
        while max(progress.steps(), default=0) < fault_step:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{run_name}: the run ended or stalled before step {fault_step}: {box.get('error')}")
            time.sleep(0.2)
        victims = worker_nodes(cluster)
        if not victims:
            raise RuntimeError(f"{run_name}: no node hosts a Ray Train worker")
        at_fault = max(progress.steps())
        starts_before = progress.starts()
        t_fault = time.time()
        figures.update(fault_node=victims[0], last_logged_step_at_fault=at_fault, seconds_into_run=t_fault - started)
        figures.update(fault(cluster, victims[0]) or {})
        t_restart = t_progress = None
        while thread.is_alive() and time.monotonic() < deadline:
            if t_restart is None and progress.starts() > starts_before:
                t_restart = time.time()
            if t_progress is None and max(progress.steps(), default=0) > at_fault:
                t_progress = time.time()
            if t_restart is not None and t_progress is not None:
                break
            time.sleep(0.2)
        figures["seconds_to_restart"] = None if t_restart is None else round(t_restart - t_fault, 2)
        figures["seconds_to_progress"] = None if t_progress is None else round(t_progress - t_fault, 2)
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise RuntimeError(f"{run_name}: not finished within {timeout_s:.0f} s")
    if "error" in box:
        raise RuntimeError(f"{run_name} failed: {box['error']}") from box["error"]
    out = box["out"]
    figures["seconds"] = round(time.time() - started, 2)
    figures["checkpoint"] = out.checkpoint_uri
    steps = progress.steps()
    figures["steps_logged_once"] = sorted(steps) == list(range(1, cfg.train.steps + 1))
    state = final_state(out.checkpoint_uri)
    figures["run_history"] = state[0]["run_history"]
    if fault is not None and len(state[0]["run_history"]) > 1:
        figures["resumed_from_step"] = state[0]["run_history"][-1]["from_step"]
        figures["steps_lost"] = figures["last_logged_step_at_fault"] - figures["resumed_from_step"]
    figures["registered_checkpoints"] = registered_checkpoints(out.run_dir)
    box["state"] = state
    figures["_state"] = state
    return figures


def registered_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders Ray Train holds as registered for the run (its snapshot file), by name."""
    from pipelines import storage

    try:
        snap = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    except (FileNotFoundError, OSError):
        return []
    text = json.dumps(snap)
    import re

    return sorted(set(re.findall(r"checkpoint-step\d+(?:-a\d+)?", text)))


# ---------------------------------------------------------------------- the faults
def kill_node(cluster: netcluster.Cluster, victim: str) -> dict[str, Any]:
    killed = cluster.kill(victim)
    return {"fault": "node-kill", "processes_killed": len(killed)}


def cut_node(hold_s: float):
    """Cut the victim's link for ``hold_s`` seconds (longer than Ray's health check), heal it, and bring its
    Ray back (a raylet the head declared dead exits by itself once it hears so)."""

    def fault(cluster: netcluster.Cluster, victim: str) -> dict[str, Any]:
        cluster.cut(victim)

        def later() -> None:
            time.sleep(hold_s)
            cluster.heal(victim)
            deadline = time.monotonic() + 60
            while cluster.node_pids(victim) and time.monotonic() < deadline:
                time.sleep(0.5)
            cluster.kill(victim)  # whatever did not exit by itself
            cluster.start_node(victim, wait=False)

        threading.Thread(target=later, daemon=True).start()
        return {"fault": "network-cut", "cut_seconds": hold_s}

    return fault


def run_scenarios(cluster: netcluster.Cluster, scenarios: list[str], steps: int = 24, fault_step: int = 10,
                  ) -> dict[str, Any]:
    connect(cluster)
    root = f"{cluster.storage}/faults-{time.strftime('%Y%m%d-%H%M%S')}"  # never resume an earlier invocation's runs
    data_uri = f"{root}/faults-data"
    manifest = synthetic_shards(data_uri)
    results: dict[str, Any] = {"cluster": {"nodes": len(cluster.nodes), "health_check_ms": cluster.health_check_ms},
                               "steps": steps, "fault_step": fault_step, "scenarios": {}}
    reference = train(cluster, fault_config(f"{root}/reference", steps=steps), data_uri, manifest, "reference")
    ref_state = reference.pop("_state")
    results["reference"] = reference
    for name in scenarios:
        fault = {"node-kill": kill_node, "network-cut": cut_node(2.5 * cluster.health_check_ms[0] *
                                                                cluster.health_check_ms[1] / 1000)}[name]
        figures = train(cluster, fault_config(f"{root}/{name}", steps=steps), data_uri, manifest, name,
                        fault=fault, fault_step=fault_step)
        figures["equal"] = compare_states(figures.pop("_state"), ref_state)
        results["scenarios"][name] = figures
        if name == "node-kill":
            cluster.start_node(figures["fault_node"])  # the node comes back for the next scenario
        else:
            cluster.wait_for_nodes(set(cluster.nodes), 120)
    return results


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    def extra(p) -> None:
        p.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
        p.add_argument("--net", type=int, default=17, help="the cluster's subnet 198.18.NET.0/24")
        p.add_argument("--state-dir", default=None, help="use the cluster that `netcluster.py up` made there")
        p.add_argument("--steps", type=int, default=24)

    args = parse_args(__doc__.split("\n\n")[0], argv, extra)
    own = args.state_dir is None
    if own:
        why = netcluster.check_available()
        if why:
            print(f"faults: cannot build the cluster: {why}", file=sys.stderr)
            return 2
        cluster = netcluster.Cluster(args.net, netcluster.default_state_dir(args.net)).up(3)
    else:
        cluster = netcluster.Cluster.load(args.state_dir)
    try:
        results = run_scenarios(cluster, args.scenario or list(SCENARIOS), steps=args.steps)
    finally:
        if own:
            cluster.down()
    for name, f in results["scenarios"].items():
        print(f"{name:<12} steps lost {f.get('steps_lost')}  restart {f.get('seconds_to_restart')} s  "
              f"progress {f.get('seconds_to_progress')} s  bit-equal {f['equal']['bit_equal']}  "
              f"logged once {f['steps_logged_once']}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
