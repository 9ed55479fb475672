"""Resuming a checkpoint in another layout, with the trainer itself on gloo ranks: 2 workers with ep=2
into 1 worker, and 1 worker into 2 workers with ep=2. The loaded state is the old one, re-cut exactly
(experts re-sliced, Muon momentum moved to its new owner, AdamW moments re-cut into the new flat
shards of ZeRO-1); each rank reads exactly the tensor bytes it keeps; training on from it equals an
uninterrupted run to float rounding.

Each runs with Newton-Schulz in fp32 and in bf16, explicitly: ``optimizer.ns_dtype=auto`` would pick one
per CPU kind. In fp32 the resumed run agrees with the uninterrupted one within 2e-4 (relative, every
parameter). In bf16 another layout's order of sums changes the bf16 roundings of the Muon update, so the
continuous weights agree within BF16_REL; the router biases are compared apart, in steps: each update
moves a bias by exactly +-router_bias_update_rate by the sign of its expert's load against the mean, so
a token routed differently at a near tie flips one step and leaves a difference of 2 x rate, which no
tolerance on continuous values describes. At most BF16_MAX_BIAS_FLIPS elements may differ. The same
near-tie sends the token's gradient to another expert, so the routed-expert stacks get BF16_EXPERT_REL
(measured: up to 2.0e-2 in one stack of layer 2, where every other weight stayed under 1e-2)."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
import torch

from k2model.model import is_stacked_expert
from k2model.optim import merge_state_dicts
from k2model.testing import run_workers
from pipelines.config import load_config
from pipelines.train import checkpoint_file, checkpointing
from pipelines.train.checkpoint_file import tensor_bytes
from pipelines.train.trainer import Trainer, math_signature

SEQ, VOCAB, GLOBAL_BATCH, STEPS = 16, 128, 8, 6
FP32_REL = 2e-4
BF16_REL = 2e-2
BF16_EXPERT_REL = 3e-2
BF16_MAX_BIAS_FLIPS = 4
BIAS = "e_score_correction_bias"
NS_DTYPES = ("float32", "bfloat16")


def _config(world: int, ep: int, ns_dtype: str):
    return load_config(None, [
        f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=32",
        f"train.num_workers={world}", f"train.ep={ep}", f"train.micro_batch_size={GLOBAL_BATCH // (2 * world)}",
        f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={STEPS}", "train.warmup_steps=1",
        "train.threads_per_worker=1", "tracking.enabled=false", f"optimizer.ns_dtype={ns_dtype}"])


class GlobalBatches:
    """Step ``s``'s global batch is the same whatever the layout; rank ``r`` takes its micro-batches."""

    def __init__(self, cfg, world: int, rank: int):
        self.micro, self.world, self.rank = cfg.train.micro_batch_size, world, rank

    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(1000 + step)
        base = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
        ids = (base + torch.arange(SEQ + 1) * (1 + base % 3)) % VOCAB  # learnable: arithmetic sequences
        start = (micro * self.world + self.rank) * self.micro
        rows = ids[start:start + self.micro]
        return rows[:, :-1], rows[:, 1:]


def _trainer(rank: int, world: int, ep: int, ns_dtype: str) -> Trainer:
    cfg = _config(world, ep, ns_dtype)
    return Trainer(cfg, GlobalBatches(cfg, world, rank), [])


def _save(trainer: Trainer, folder: str, rank: int, world: int, ep: int) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, checkpointing.SHARD_NAME.format(rank=rank)), "wb") as f:
        f.write(checkpoint_file.encode(checkpointing.snapshot(trainer.state_dict())))
    if rank == 0:
        meta = {"step": trainer.global_step, "world_size": world, "ep": ep, "signature": math_signature(trainer.cfg)}
        with open(os.path.join(folder, checkpointing.META_NAME), "w") as f:
            json.dump(meta, f)


def train_and_save(rank: int, world: int, ep: int, steps: int, folder: str | None, ns_dtype: str) -> dict:
    torch.manual_seed(0)
    trainer = _trainer(rank, world, ep, ns_dtype)
    for _ in range(steps):
        trainer.step()
    if folder is not None:
        _save(trainer, folder, rank, world, ep)
    return checkpointing.snapshot(trainer.state_dict())


def resume_and_train(rank: int, world: int, ep: int, folder: str, steps: int, ns_dtype: str
                     ) -> tuple[dict, dict]:
    trainer = _trainer(rank, world, ep, ns_dtype)
    spec = checkpointing.ReshardSpec(trainer.cfg.model.num_experts, trainer.optimizer.global_span)
    state = checkpointing.load_rank_state(pafs.LocalFileSystem(), folder, rank, math_signature(trainer.cfg), world, ep,
                                          spec)
    trainer.load_state_dict(state)
    loaded = checkpointing.snapshot(state)
    for _ in range(steps):
        trainer.step()
    return loaded, checkpointing.snapshot(trainer.state_dict())


def _assert_entries_are_cut_from(state: dict, whole: dict) -> None:
    """Every optimizer entry of ``state`` is the part its ``span`` names of the whole-parameter entry in
    ``whole`` (a ``merge_state_dicts`` result, or a single process's state)."""
    for name, entry in state.items():
        lo, hi = entry["span"]
        full = whole[name]
        assert full["span"][0] == 0 and set(entry) == set(full), name
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value.reshape(-1), full[key].reshape(-1)[lo:hi]), (name, key)
            elif key != "span":
                assert value == full[key], (name, key)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def _assert_close_params(a: dict, b: dict, what: str, ns_dtype: str) -> None:
    """``a`` equals ``b`` to float rounding under ``ns_dtype`` (see the module docstring)."""
    if ns_dtype == "float32":
        worst = max(_relative_difference(a[n], b[n]) for n in b)
        assert worst < FP32_REL, f"{what}: largest relative parameter difference {worst:.2e}"
        return
    continuous = [n for n in b if not n.endswith(BIAS)]
    for bound, names in ((BF16_REL, [n for n in continuous if not is_stacked_expert(n)]),
                         (BF16_EXPERT_REL, [n for n in continuous if is_stacked_expert(n)])):
        worst = max((_relative_difference(a[n], b[n]) for n in names), default=0.0)
        assert worst < bound, f"{what}: largest relative difference of a continuous weight {worst:.2e}"
    rate = _config(1, 1, ns_dtype).model.router_bias_update_rate
    flips = sum(int(((a[n] - b[n]).abs() > rate / 2).sum()) for n in b if n.endswith(BIAS))
    assert flips <= BF16_MAX_BIAS_FLIPS, f"{what}: {flips} router-bias elements differ by a step or more"


def train_both_dtypes(rank: int, world: int, ep: int, folders: dict[str, str]) -> dict[str, tuple[dict, dict]]:
    """For each Newton-Schulz dtype, one after the other in these processes: the run saved at step 3, and
    the same run carried on uninterrupted to STEPS."""
    return {d: (train_and_save(rank, world, ep, 3, folders[d], d), train_and_save(rank, world, ep, STEPS, None, d))
            for d in NS_DTYPES}


def resume_both_dtypes(rank: int, world: int, ep: int, folders: dict[str, str], steps: int
                       ) -> dict[str, tuple[dict, dict]]:
    return {d: resume_and_train(rank, world, ep, folders[d], steps, d) for d in NS_DTYPES}


@pytest.fixture(scope="module")
def two_worker_ep2_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ep2")
    folders = {d: str(base / d / "checkpoint-step00000003") for d in NS_DTYPES}
    per_rank = run_workers(train_both_dtypes, 2, 2, folders)
    return {d: (folders[d], [r[d][0] for r in per_rank], [r[d][1] for r in per_rank]) for d in NS_DTYPES}


@pytest.fixture(params=NS_DTYPES)
def two_worker_ep2(request, two_worker_ep2_runs):
    """A 2-worker ep=2 run saved at step 3, and the same run carried on uninterrupted to STEPS."""
    return (*two_worker_ep2_runs[request.param], request.param)


def test_two_workers_ep2_into_one_worker(two_worker_ep2):
    folder, saved, uninterrupted, ns_dtype = two_worker_ep2
    loaded, final = resume_and_train(0, 1, 1, folder, STEPS - 3, ns_dtype)
    assert loaded["step"] == 3 and loaded["resharded_from"]["world_size"] == 2
    # Every expert stack is the two old halves end to end; the rest is rank 0's (identical on both).
    for name, tensor in loaded["model"].items():
        if is_stacked_expert(name):
            assert torch.equal(tensor, torch.cat([saved[0]["model"][name], saved[1]["model"][name]])), name
        else:
            assert torch.equal(tensor, saved[0]["model"][name]), name
    # The single worker keeps every optimizer entry whole: Muon momentum from its old owner, expert momentum
    # and the AdamW moments' flat shards re-joined, step counts as saved.
    whole = merge_state_dicts([s["optimizer"] for s in saved])["state"]
    state = loaded["optimizer"]["state"]
    assert set(state) == set(whole)
    assert all(e["span"] == whole[n]["span"] for n, e in state.items())
    _assert_entries_are_cut_from(state, whole)
    # Of the tensors, exactly what the state holds was read.
    assert sum(loaded["resharded_from"]["tensor_bytes_read"]) == tensor_bytes(
        {k: v for k, v in loaded.items() if k != "resharded_from"})
    # Training on from it is the uninterrupted 2-worker run, to float rounding.
    full = {n: (torch.cat([uninterrupted[0]["model"][n], uninterrupted[1]["model"][n]]) if is_stacked_expert(n)
                else uninterrupted[0]["model"][n]) for n in final["model"]}
    assert final["step"] == STEPS
    _assert_close_params(final["model"], full, "2 workers ep=2 -> 1 worker", ns_dtype)


@pytest.fixture(scope="module")
def one_worker_runs(tmp_path_factory):
    """1-worker runs (saved at step 3, and uninterrupted), each resumed on 2 workers with ep=2."""
    base = tmp_path_factory.mktemp("one")
    folders = {d: str(base / d / "checkpoint-step00000003") for d in NS_DTYPES}
    single = train_both_dtypes(0, 1, 1, folders)
    per_rank = run_workers(resume_both_dtypes, 2, 2, folders, STEPS - 3)
    return {d: (*single[d], [r[d] for r in per_rank]) for d in NS_DTYPES}


@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
def test_one_worker_into_two_workers_ep2(one_worker_runs, ns_dtype):
    saved, uninterrupted, results = one_worker_runs[ns_dtype]
    num_experts = _config(1, 1, ns_dtype).model.num_experts
    half = num_experts // 2
    owned: list[set[str]] = []
    spans: list[dict[str, list[int]]] = []
    for rank, (loaded, final) in enumerate(results):
        rows = range(rank * half, (rank + 1) * half)
        for name, tensor in loaded["model"].items():
            want = saved["model"][name][rows.start:rows.stop] if is_stacked_expert(name) else saved["model"][name]
            assert torch.equal(tensor, want), name
        state = loaded["optimizer"]["state"]
        _assert_entries_are_cut_from(state, saved["optimizer"]["state"])
        spans.append({n: e["span"] for n, e in state.items()})
        owned.append({n for n in state if "momentum" in state[n] and not is_stacked_expert(n)})
        # Each rank read only the tensor bytes it keeps: half the experts, its share of the momenta.
        assert sum(loaded["resharded_from"]["tensor_bytes_read"]) == tensor_bytes(
            {k: v for k, v in loaded.items() if k != "resharded_from"})
        for name, tensor in final["model"].items():
            want = uninterrupted["model"][name]
            if is_stacked_expert(name):
                want = want[rows.start:rows.stop]
            _assert_close_params({name: tensor}, {name: want}, f"1 worker -> 2 workers ep=2, rank {rank}", ns_dtype)
    # The replicated Muon matrices' momenta now live on exactly one of the two ranks each; each rank keeps
    # the AdamW moments of its flat shard, and together the two tile every parameter.
    muon = {n for n, e in saved["optimizer"]["state"].items() if "momentum" in e and not is_stacked_expert(n)}
    assert owned[0] | owned[1] == muon and not owned[0] & owned[1] and owned[0] and owned[1]
    for name, entry in saved["optimizer"]["state"].items():
        pieces = sorted(tuple(s[name]) for s in spans if name in s)
        assert pieces[0][0] == 0 and pieces[-1][1] == entry["span"][1], name
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), (name, pieces)
    # Flat shards: the AdamW elements split evenly (one bucket here, so up to one element of padding).
    adamw = [n for n, e in saved["optimizer"]["state"].items() if "exp_avg" in e]
    shares = [sum(s[n][1] - s[n][0] for n in adamw if n in s) for s in spans]
    assert sum(shares) == sum(saved["optimizer"]["state"][n]["span"][1] for n in adamw)
    assert abs(shares[0] - shares[1]) <= 1, shares


def test_without_a_reshard_spec_another_layout_is_refused(two_worker_ep2):
    folder, _, _, ns_dtype = two_worker_ep2
    cfg = _config(1, 1, ns_dtype)
    with pytest.raises(ValueError, match="written by 2 workers with ep=2; this run has 1 workers with ep=1"):
        checkpointing.load_rank_state(pafs.LocalFileSystem(), folder, 0, math_signature(cfg), 1, 1)
