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

Scenarios:
- ``node-kill``: every process of a worker node SIGKILLed; the spare node takes its place.
- ``network-cut``: a worker node's link down for 2.5x Ray's health-check window, then healed.
- ``s3-outage``: the S3 server unreachable from every node for 10 s while a checkpoint uploads.
- ``preemption``: Ray drains a worker node with a preemption reason and a 15 s deadline (what a cloud's spot
  notice becomes); the run (checkpoints 20 steps apart) checkpoints at the notice; at the deadline the node
  is killed. The 40-step run may end near the deadline: its last step is checkpointed at once.
- ``preemption-midrun``: the same on an 80-step run (checkpoints 50 steps apart) that the deadline
  interrupts: the last step that fits before it is checkpointed and the group waits for the restart.
- ``elastic``: ``train.num_workers=1-2`` and no spare node: a worker node is killed, training goes on with
  one worker (resharded), and grows back to two when the node returns; equal to float rounding.
- ``one-node``: no fault: the same config on one machine's embedded Ray (both workers on one node) against
  the 2-node run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra" / "local"))

import netcluster  # noqa: E402

from benchmarks.common import SYNTHETIC_SEQ as SEQ  # noqa: E402
from benchmarks.common import SYNTHETIC_VOCAB as VOCAB  # noqa: E402
from benchmarks.common import flat_tensors, synthetic_shards  # noqa: E402

SCENARIOS = ("node-kill", "network-cut", "s3-outage", "preemption", "preemption-midrun", "elastic", "one-node")


# ---------------------------------------------------------------------- data and configs
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


def compare_states(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Same layout: every tensor of every rank's parameters and optimizer state, bit for bit; the largest
    relative difference of the parameters either way (experts concatenated over the ranks)."""
    import torch

    same_layout = len(a) == len(b)
    bit_equal = same_layout and all(sa["step"] == sb["step"] for sa, sb in zip(a, b))
    if bit_equal:
        for sa, sb in zip(a, b):
            fa = flat_tensors({"m": sa["model"], "o": sa["optimizer"]})
            fb = flat_tensors({"m": sb["model"], "o": sb["optimizer"]})
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

    def history(self) -> list[dict[str, Any]]:
        try:
            tag = self.client.get_run(self.run_id).data.tags.get("k2pipe.run_history")
        except Exception:
            return []
        return json.loads(tag) if tag else []

    def tag(self, name: str) -> str | None:
        try:
            return self.client.get_run(self.run_id).data.tags.get(name)
        except Exception:
            return None

    def starts(self) -> int:
        return len(self.history())


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
        fault(cluster, victims[0], figures, progress)
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
    for helper in figures.pop("_threads", []):
        helper.join(max(0.0, deadline - time.monotonic()))
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
        # The first resume after the fault; steps lost count from the last step logged when the node went.
        figures["resumed_from_step"] = state[0]["run_history"][1]["from_step"]
        gone_at = figures.get("last_logged_step_at_kill", figures["last_logged_step_at_fault"])
        figures["steps_lost"] = gone_at - figures["resumed_from_step"]
    figures["registered_checkpoints"] = registered_checkpoints(out.run_dir)
    for tag, key in (("notice", "preemption_checkpoint_step"), ("parked", "preemption_parked_step")):
        value = progress.tag(f"k2pipe.preemption_{tag}_step")
        if value is not None:
            figures[key] = int(value)
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
    return sorted(set(re.findall(r"checkpoint-step\d+(?:-a\d+)?", text)))


# ---------------------------------------------------------------------- the faults
def kill_node(cluster: netcluster.Cluster, victim: str, figures: dict[str, Any], progress: Progress) -> None:
    """Every process of the victim node SIGKILLed; the node comes back once Ray has declared it dead."""
    figures["processes_killed"] = len(cluster.kill(victim))


def cut_node(cluster: netcluster.Cluster, victim: str, figures: dict[str, Any], progress: Progress) -> None:
    """The victim's link down for 2.5x Ray's health-check window, then up; its raylet, declared dead,
    exits by itself once it hears so, and the node's Ray is started again."""
    period_ms, threshold = cluster.health_check_ms
    hold = 2.5 * period_ms * threshold / 1000
    cluster.cut(victim)
    figures["cut_seconds"] = hold

    def later() -> None:
        time.sleep(hold)
        cluster.heal(victim)
        deadline = time.monotonic() + 60
        while cluster.node_pids(victim) and time.monotonic() < deadline:
            time.sleep(0.5)
        figures["node_processes_left_after_heal"] = len(cluster.kill(victim))

    _background(later, figures)


def s3_outage(cluster: netcluster.Cluster, victim: str, figures: dict[str, Any], progress: Progress) -> None:
    """The S3 server unreachable from every node, the head included, for 10 s, during a checkpoint's upload."""
    cluster.cut("s3")
    figures["outage_seconds"] = 10.0

    def later() -> None:
        time.sleep(10.0)
        cluster.heal("s3")

    _background(later, figures)


def preempt_node(cluster: netcluster.Cluster, victim: str, figures: dict[str, Any], progress: Progress) -> None:
    """Ray's drain of the victim with a preemption reason and a 15 s deadline (what a cloud's spot notice
    becomes); at the deadline the node is killed, as the cloud would."""
    import os
    import subprocess

    import ray

    ip = cluster.node(victim).ip
    node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip)
    deadline_s = 15
    drained = subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.ray_address,
                              "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                              "--reason-message", "k2pipe fault benchmark",
                              "--deadline-remaining-seconds", str(deadline_s)],
                             capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if drained.returncode != 0:
        raise RuntimeError(f"Ray refused to drain {victim}: {drained.stderr[-2000:]}")
    figures["notice_seconds"] = deadline_s

    def later() -> None:
        time.sleep(deadline_s)
        figures["last_logged_step_at_kill"] = max(progress.steps(), default=0)
        figures["processes_killed"] = len(cluster.kill(victim))

    _background(later, figures)


def elastic_kill(cluster: netcluster.Cluster, victim: str, figures: dict[str, Any], progress: Progress) -> None:
    """No spare node: the victim is killed, the group goes on with fewer workers; once it has trained a few
    steps so, the node comes back and the group grows again."""
    figures["processes_killed"] = len(cluster.kill(victim))

    def later() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # 3 new steps logged by the smaller group
            if len(progress.history()) >= 2 and max(progress.steps(), default=0) >= figures[
                    "last_logged_step_at_fault"] + 3:
                break
            time.sleep(0.5)
        figures["node_back_at_step"] = max(progress.steps(), default=0)
        cluster.start_node(victim)

    _background(later, figures)


def _background(fn, figures: dict[str, Any]) -> None:
    def run() -> None:
        try:
            fn()
        except Exception as e:  # reported with the figures
            figures.setdefault("errors", []).append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    figures.setdefault("_threads", []).append(thread)


SCENARIO_SPECS: dict[str, dict[str, Any]] = {
    # fault, the step after which it comes, extra config, whether the run must end bit-equal
    # Steps of at least 1 s: on a fast machine the run would otherwise end before the fault takes hold.
    "node-kill": {"fault": kill_node, "at": 10, "extra": ("train.min_step_s=1",), "bit_equal": True},
    "network-cut": {"fault": cut_node, "at": 10, "extra": ("train.min_step_s=1",), "bit_equal": True},
    "s3-outage": {"fault": s3_outage, "at": 7, "extra": ("train.min_step_s=1",), "bit_equal": True},
    # Checkpoints 20 steps apart: without the notice's checkpoint the kill would cost up to 20 steps.
    "preemption": {"fault": preempt_node, "at": 6, "extra": ("train.checkpoint_every=20",), "bit_equal": True,
                   "steps": 40},
    # Long enough that the deadline comes mid-run: the last step that fits is checkpointed and the group waits.
    "preemption-midrun": {"fault": preempt_node, "at": 6, "extra": ("train.checkpoint_every=50",),
                          "bit_equal": True, "steps": 80},
    "elastic": {"fault": elastic_kill, "at": 8, "bit_equal": False, "spare": False, "steps": 40,
                "extra": ("train.num_workers=1-2", "train.elastic_resize_check_s=3")},
}


def one_node_run(cluster: netcluster.Cluster, data_uri: str, root: str, steps: int) -> dict[str, Any]:
    """The reference config on one machine's embedded Ray (no cluster, no worker resources), in a process of
    its own, reading the same shards from the cluster's S3; returns its figures."""
    import os
    import subprocess

    env = {**os.environ, **cluster.s3_env()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.faults", "--local-run", data_uri, root, str(steps)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the one-node run failed: {done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _local_run(data_uri: str, root: str, steps: int) -> None:
    import ray

    from pipelines import storage
    from pipelines.stages.pretrain import run_pretrain

    manifest = json.loads(storage.read_bytes(storage.join(data_uri, "manifest.json")))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    started = time.time()
    out = run_pretrain(fault_config(root, "train.worker_resources=", steps=steps), data_uri, manifest)
    print(json.dumps({"checkpoint": out.checkpoint_uri, "seconds": round(time.time() - started, 2)}))


def run_scenarios(cluster: netcluster.Cluster, scenarios: list[str], steps: int = 24) -> dict[str, Any]:
    connect(cluster)
    root = f"{cluster.storage}/faults-{time.strftime('%Y%m%d-%H%M%S')}"  # never resume an earlier invocation's runs
    data_uri = f"{root}/faults-data"
    manifest = synthetic_shards(data_uri)
    results: dict[str, Any] = {"cluster": {"nodes": len(cluster.nodes), "health_check_ms": cluster.health_check_ms},
                               "steps": steps, "scenarios": {}}
    references: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def reference(n: int) -> list[dict[str, Any]]:
        if n not in references:
            figures = train(cluster, fault_config(f"{root}/reference-{n}", steps=n), data_uri, manifest,
                            f"reference-{n}")
            references[n] = (figures, figures.pop("_state"))
            results.setdefault("references", {})[str(n)] = figures
        return references[n][1]

    reference(steps)
    if "one-node" in scenarios:
        figures = one_node_run(cluster, data_uri, f"{root}/one-node", steps)
        figures["equal"] = compare_states(final_state(figures["checkpoint"]), reference(steps))
        results["scenarios"]["one-node"] = figures
    spare = sorted(cluster.nodes)[-1]
    for name in (s for s in scenarios if s != "one-node"):
        spec = SCENARIO_SPECS[name]
        if not spec.get("spare", True):
            cluster.kill(spare)  # only as many nodes as the group's largest size
        n = spec.get("steps", steps)
        figures = train(cluster, fault_config(f"{root}/{name}", *spec["extra"], steps=n), data_uri, manifest,
                        name, fault=spec["fault"], fault_step=spec["at"])
        figures["fault"] = name
        figures["equal"] = compare_states(figures.pop("_state"), reference(n))
        figures["bit_equal_expected"] = spec["bit_equal"]
        results["scenarios"][name] = figures
        # Back to three live nodes for the next scenario.
        for node in cluster.nodes:
            if not cluster.node_pids(node) or cluster.link_state(node) == "down":
                cluster.heal(node)
                cluster.kill(node)
                cluster.start_node(node)
        cluster.heal("s3")
        cluster.wait_for_nodes(set(cluster.nodes), 120)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The scenarios as a Markdown table."""
    rows = ["| scenario | fault node | last step logged at the fault | resumed from | steps lost | s to restart | "
            "s to progress | starts (world, ep) | equal to the uninterrupted run | every step in MLflow once |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in results["scenarios"].items():
        eq = f["equal"]
        equal = "bit for bit" if eq["bit_equal"] else f"max relative difference {eq['max_relative_difference']:.1e}"
        starts = ", ".join(f"({h['world_size']}, {h['ep']}) from {h['from_step']}" for h in f.get("run_history", []))
        rows.append(f"| {name} | {f.get('fault_node', '-')} | {f.get('last_logged_step_at_fault', '-')} | "
                    f"{f.get('resumed_from_step', '-')} | {f.get('steps_lost', '-')} | "
                    f"{f.get('seconds_to_restart', '-')} | {f.get('seconds_to_progress', '-')} | {starts or '-'} | "
                    f"{equal} | {f.get('steps_logged_once', '-')} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    def extra(p) -> None:
        p.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
        p.add_argument("--net", type=int, default=17, help="the cluster's subnet 198.18.NET.0/24")
        p.add_argument("--state-dir", default=None, help="use the cluster that `netcluster.py up` made there")
        p.add_argument("--steps", type=int, default=24)
        p.add_argument("--local-run", nargs=3, metavar=("DATA", "ROOT", "STEPS"), help=argparse.SUPPRESS)

    args = parse_args(__doc__.split("\n\n")[0], argv, extra)
    if args.local_run:
        _local_run(args.local_run[0], args.local_run[1], int(args.local_run[2]))
        return 0
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
    write_json(args.out, results)
    print(markdown(results))
    if args.out:
        head = (f"<!-- {time.strftime('%Y-%m-%d')}; command: python -m benchmarks.faults "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}; figures in {Path(args.out).name} -->\n\n")
        Path(args.out).with_suffix(".md").write_text(head + markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
