"""Distributed Muon (k2model.optim) and QK-Clip's max all-reduce in 2 gloo processes: step for step equal
to the single-process optimizer, ~1/N of the Newton-Schulz work and momentum per rank, rank-local expert
shards under expert parallelism, and exact resume from per-rank shards or a merged state."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from k2model.config import OptimizerConfig, preset_config
from k2model.distributed import ParallelLayout
from k2model.model import build_model
from k2model.optim import MuonClip, assign_owners, build_optimizer, merge_state_dicts, split_params
from k2model.parallel import GradientSync, build_parallel_model, expert_param_names
from k2model.qk_clip import qk_clip
from k2model.testing import run_workers

# Defaults to optimizer.ns_dtype=auto: rerun as the other CPU kind by `make test` (tests/conftest.py).
pytestmark = pytest.mark.auto_dtype

WORLD = 2
STEPS, SPLIT = 4, 2
LR = 1e-2


def test_assign_owners_is_greedy_largest_first_and_balanced():
    costs = {"a": 10, "b": 7, "c": 6, "d": 4, "e": 3, "f": 1}
    owners = assign_owners(costs, 2)
    # a->0 (10|0), b->1 (10|7), c->1 (10|13), d->0 (14|13), e->1 (14|16), f->0 (15|16)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1, "f": 0}
    assert assign_owners(costs, 1) == dict.fromkeys(costs, 0)
    assert assign_owners({}, 3) == {}


# ---------------------------------------------------------------------- worker helpers
def _cfg():
    return preset_config("tiny", num_layers=3)


def _half_batch(cfg, step, rank):
    gen = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, cfg.vocab_size, (2 * WORLD, 33), generator=gen)[2 * rank:2 * rank + 2]
    return tokens[:, :-1], tokens[:, 1:]


def _reference(model, opt_cfg):
    """Clones of the model's parameters under a single-process optimizer."""
    muon, adamw = split_params(model, opt_cfg)
    clones = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    opt = MuonClip([(n, clones[n]) for n, _ in muon], [(n, clones[n]) for n, _ in adamw], LR, opt_cfg,
                   distributed=False)
    return clones, opt


def _average_grads(model, local=()):
    """Every gradient averaged over the ranks (expert shards of ep=WORLD: only divided), in full on every
    rank: the optimizer must give the single-process result from it, whatever part each rank owns."""
    for n, p in model.named_parameters():
        if n not in local:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(WORLD)


def _replicated_equal_across_ranks(model, local_names=()):
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n not in local_names])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _bytes_roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _data_parallel(rank, out):
    """ep = 1: every parameter replicated; owners split the Muon matrices."""
    cfg, opt_cfg = _cfg(), OptimizerConfig()
    model = build_model(cfg, seed=0)
    opt = build_optimizer(model, opt_cfg, LR)  # distributed=None: torch.distributed is initialised
    assert opt.world_size == WORLD and opt.rank == rank
    clones, ref = _reference(model, opt_cfg)
    saved, grads_after_split = None, []
    for step in range(STEPS):
        if step == SPLIT:
            saved = (_bytes_roundtrip(model.state_dict()), _bytes_roundtrip(opt.state_dict()),
                     {n: p.detach().clone() for n, p in model.named_parameters()})
        x, y = _half_batch(cfg, step, rank)
        opt.zero_grad()
        model(x, y).loss.backward()
        _average_grads(model)
        for n, p in model.named_parameters():
            clones[n].grad = p.grad.clone()
        if step >= SPLIT:
            grads_after_split.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        ref.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, clones[n]), f"step {step}: {n} differs from the single-process optimizer"
        assert _replicated_equal_across_ranks(model), f"step {step}: replicas diverged"
    out["dp_ns_flops"] = opt.last_step_stats["ns_flops"]
    out["dp_ns_matrices"] = opt.last_step_stats["ns_matrices"]
    out["dp_momentum_numel"] = opt.momentum_numel()
    out["dp_total_ns_flops"] = ref.last_step_stats["ns_flops"]
    out["dp_total_momentum_numel"] = ref.momentum_numel()
    muon_names = {n for n, _ in split_params(model, opt_cfg)[0]}
    owned = {n for n in muon_names if opt.plan.owned(n) is not None}
    assert {opt._param_names[p] for p, s in opt.state.items() if "momentum" in s} == owned
    # Expert stacks are split into runs of experts, one per rank; other matrices have one owner.
    for n in muon_names:
        assert (n in opt.plan.expert_runs) == (".mlp.experts." in n), n

    # Resume from this rank's shard: steps SPLIT.. again must give the same parameters bit for bit.
    model_state, opt_state, params_at_split = saved
    resumed = build_model(cfg, seed=123)
    resumed.load_state_dict(model_state)
    opt2 = build_optimizer(resumed, opt_cfg, lr=1.0)
    opt2.load_state_dict(opt_state)
    for step in range(SPLIT, STEPS):
        x, y = _half_batch(cfg, step, rank)
        opt2.zero_grad()
        resumed(x, y).loss.backward()
        _average_grads(resumed)
        opt2.step()
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"resumed {n} differs"

    # The merged shards load into a single process, which continues exactly like the 2 ranks.
    shards = [None] * WORLD
    dist.all_gather_object(shards, opt_state)
    single = {n: nn.Parameter(t.clone()) for n, t in params_at_split.items()}
    muon, adamw = split_params(model, opt_cfg)
    opt1 = MuonClip([(n, single[n]) for n, _ in muon], [(n, single[n]) for n, _ in adamw], 1.0, opt_cfg,
                    distributed=False)
    opt1.load_state_dict(merge_state_dicts(shards))
    for grads in grads_after_split:
        for n, p in single.items():
            p.grad = grads[n]
        opt1.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, single[n]), f"merged-state single process: {n} differs"


def _expert_parallel(rank, out):
    """ep = 2: each rank holds half of every expert stack (rank-local), the rest is replicated."""
    cfg, opt_cfg = _cfg(), OptimizerConfig()
    layout = ParallelLayout(WORLD, rank, ep=WORLD, timeout=timedelta(seconds=60))
    model = build_parallel_model(cfg, seed=0, layout=layout)
    local = expert_param_names(model)
    assert local and model.model.layers[1].mlp.experts.num_local_experts == cfg.num_experts // WORLD
    opt = build_optimizer(model, opt_cfg, LR, layout=layout)
    assert all(opt.plan.owned(n) == (0, dict(model.named_parameters())[n].numel()) for n in local)
    clones, ref = _reference(model, opt_cfg)
    sync = GradientSync(model, layout, opt.plan)
    for step in range(3):
        x, y = _half_batch(cfg, step, rank)
        sync.prepare()
        model(x, y).loss.backward()
        _average_grads(model, set(local))
        for n, p in model.named_parameters():
            clones[n].grad = p.grad.clone()
        opt.step()
        ref.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, clones[n]), f"ep step {step}: {n} differs from the single-process optimizer"
        assert _replicated_equal_across_ranks(model, set(local)), f"ep step {step}: replicas diverged"
    # Local expert momentum lives on its own rank, whatever the owner split of the replicated matrices.
    momentum_names = {opt._param_names[p] for p, s in opt.state.items() if "momentum" in s}
    assert set(local) <= momentum_names
    out["ep_ns_flops"] = opt.last_step_stats["ns_flops"]


def _qk_clip_all_reduce(rank, out):
    """Each rank saw different maxima; both clip with the element-wise max and stay identical."""
    cfg = _cfg()
    model = build_model(cfg, seed=0)
    base = torch.arange(cfg.num_layers * cfg.num_heads, dtype=torch.float32).view(cfg.num_layers, -1)
    per_rank = [base + 1.0, base.flip(1) + 1.0]  # rank 0 larger on some heads, rank 1 on others
    stats = qk_clip(model, per_rank[rank], tau=5.5)
    expected = torch.maximum(per_rank[0], per_rank[1])
    assert torch.equal(stats.max_logit_per_head, expected)
    assert stats.num_clipped == int((expected > 5.5).sum())
    assert _replicated_equal_across_ranks(model)


def _worker(rank, world):
    out = {}
    _data_parallel(rank, out)
    _expert_parallel(rank, out)
    _qk_clip_all_reduce(rank, out)
    return out


@pytest.mark.slow
def test_distributed_muon_equals_single_process_with_1_over_n_work():
    results = run_workers(_worker, WORLD, timeout_s=300)
    total_flops = results[0]["dp_total_ns_flops"]
    total_momentum = results[0]["dp_total_momentum_numel"]
    assert sum(r["dp_ns_flops"] for r in results) == total_flops
    assert sum(r["dp_momentum_numel"] for r in results) == total_momentum
    for r in results:
        assert 0.35 <= r["dp_ns_flops"] / total_flops <= 0.65, r
        assert 0.35 <= r["dp_momentum_numel"] / total_momentum <= 0.65, r
        # Under expert parallelism each rank orthogonalises its own half of the experts plus its share
        # of the replicated matrices: less than the whole model's work.
        assert r["ep_ns_flops"] < total_flops
