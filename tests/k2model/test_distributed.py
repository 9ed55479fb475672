"""The collectives of ``k2model.distributed``: the only place that calls ``torch.distributed``
collectives (read from every module's source), each refusing a tensor on a device its backend does not
take (as NCCL refuses a CPU tensor), and a collective that a rank never reaches fails after the group's
timeout with an error naming the call instead of hanging."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from k2model.distributed import CollectiveError, agree, all_reduce_, devices_of_backend
from k2model.testing import run_workers

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "monitored_barrier",
    "all_to_all_single_autograd", "all_gather_tensor", "reduce_scatter_tensor_autograd",
}


def collective_calls(path: Path) -> list[str]:
    """Collective calls on ``torch.distributed`` (under any alias) in one file, with the line, and imports
    of collectives or of the functional collectives."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()  # names bound to torch.distributed or its functional collectives
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("torch.distributed") and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.distributed"):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed", "_functional_collectives")}

    def on_dist(value: ast.expr) -> bool:
        if isinstance(value, ast.Name):
            return value.id in aliases
        return isinstance(value, ast.Attribute) and value.attr == "distributed" and \
            isinstance(value.value, ast.Name) and value.value.id == "torch"

    where = path.relative_to(ROOT)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in COLLECTIVES and on_dist(node.func.value):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node.func)}(")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.distributed"):
            found += [f"{where}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in COLLECTIVES or "functional_collectives" in a.name
                      or "functional_collectives" in node.module]
    return found


def test_no_module_but_k2model_distributed_calls_a_collective():
    files = [p for pkg in ("k2model", "pipelines", "ray_jobs", "benchmarks") for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 40
    outside = [c for p in files if p != ROOT / "k2model" / "distributed.py" for c in collective_calls(p)]
    assert outside == [], "call these through k2model.distributed:\n" + "\n".join(outside)
    # The scan finds what it looks for.
    assert len(collective_calls(ROOT / "k2model" / "distributed.py")) >= 6


@pytest.mark.parametrize("backend, devices", [
    ("gloo", {"cpu"}), ("nccl", {"cuda"}), ("cuda:gloo", {"cuda"}), ("cpu:gloo,cuda:nccl", {"cpu", "cuda"}),
])
def test_the_devices_each_backend_takes(backend, devices):
    assert devices_of_backend(backend) == devices


def _wrong_device_and_timeout(rank: int, world_size: int) -> dict:
    out = {}
    try:  # a device the gloo group does not take, as NCCL refuses a CPU tensor
        all_reduce_(torch.zeros(2, device="meta"), name="validation loss")
    except CollectiveError as e:
        out["device"] = str(e)
    out["sum"] = all_reduce_(torch.tensor([float(rank + 1)]), name="a sum").item()
    out["agreed"] = agree(rank, dist.ReduceOp.MAX, name="a flag")
    if rank == 0:
        try:
            agree(1, dist.ReduceOp.MIN, name="checkpoint written")  # rank 1 never calls it
        except CollectiveError as e:
            out["timeout"] = str(e)
    else:
        time.sleep(4.0)  # alive past rank 0's timeout, so rank 0 times out rather than sees a closed peer
    return out


def test_a_wrong_device_is_refused_and_a_missing_rank_times_out_naming_the_call():
    rank0, rank1 = run_workers(_wrong_device_and_timeout, 2, collective_timeout_s=1.5, timeout_s=60)
    for r in (rank0, rank1):
        assert "all_reduce(validation loss): the tensor is on meta" in r["device"]
        assert "takes only cpu tensors" in r["device"]
        assert r["sum"] == 3.0 and r["agreed"] == 1
    assert "all_reduce(checkpoint written) over 2 ranks timed out (train.collective_timeout_s)" in rank0["timeout"]
    assert "timeout" not in rank1
