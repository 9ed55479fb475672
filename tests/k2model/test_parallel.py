"""Data + expert parallel training on gloo ranks equals single-process training on the whole batch.

Each parallel run trains ``tiny`` for a few steps with every rank reading its slice of the global batch,
under ZeRO-1 (``k2model.zero``): each rank applies plain SGD to the part of each parameter it owns (in the
optimizer's plan), then the optimizer publishes the parameters from their owners. The reference trains
the single-process model with SGD on the same global batch as one micro-batch per rank slice, each loss
divided by the number of slices (so its loss is the mean of the rank means), clipped by a float64 norm.
Compared: the gradient each rank owns after ``GradientSync.finish`` and before clipping (every element of
the model owned by exactly one rank), the global gradient norm, the loss, the summed expert load, the
router biases after ``update_router_bias`` and the parameters after the last step. Replicated parameters
and router biases must be bit-identical across ranks. (MuonClip's own arithmetic under ZeRO-1 is
test_distributed_muon's.)

Layouts: 2 ranks with ep=2 (expert parallel), 2 ranks with ep=1 (pure data parallel) and 4 ranks with
ep=2 (two ep groups: the case where expert gradients are summed over a replica group of 2).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from k2model.config import OptimizerConfig, preset_config
from k2model.distributed import ParallelLayout, all_ranks_finite
from k2model.model import build_model
from k2model.moe import update_router_bias
from k2model.optim import build_optimizer
from k2model.parallel import (
    GradientSync,
    build_parallel_model,
    clip_grad_norm_,
    expert_param_names,
    sum_expert_load,
)
from k2model.testing import WorkerError, run_workers, torch_threads

CFG = preset_config("tiny")
SEED = 3
SEQ = 16
GLOBAL_BATCH = 4
LR = 0.5
OPT = OptimizerConfig(ns_dtype="float32")
MAX_NORM = 0.3
BIAS_RATE = 0.01


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _rank_slice(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = _global_batch(step)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return inputs[rows], targets[rows]


@torch.no_grad()
def _sgd_step(opt) -> None:
    """Plain SGD on the part of each parameter this rank owns, then every rank's parameters from their
    owners (torch.optim would import torch._dynamo: seconds per process)."""
    for _, param, grad in opt.owned_parts():
        param.add_(grad, alpha=-LR)
    opt.publish()


def _owned_grads(opt) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
    """What this rank owns of each gradient: (flat span of the whole model's parameter, the values)."""
    return {n: (opt.global_span(n), g.clone()) for n, g in opt.owned_grads()}


def _train_worker(rank: int, world_size: int, ep: int, num_steps: int) -> dict:
    layout = ParallelLayout(world_size, rank, ep, timeout=timedelta(seconds=60))
    model = build_parallel_model(CFG, SEED, layout)
    model.train()
    opt = build_optimizer(model, OPT, LR, layout=layout)
    sync = GradientSync(model, layout, opt.plan)
    steps = []
    for step in range(num_steps):
        sync.prepare()
        out = model(*_rank_slice(step, rank, world_size))
        out.loss.backward()
        sync.finish()
        grads = _owned_grads(opt) if step == 0 else None
        norm = clip_grad_norm_(opt, MAX_NORM)
        if all_ranks_finite(torch.isfinite(norm) & torch.isfinite(out.loss)):
            _sgd_step(opt)
        load = sum_expert_load(model, layout)
        update_router_bias(model.routers(), load, BIAS_RATE)
        model.reset_expert_load()
        steps.append({"loss": out.loss.detach(), "norm": norm, "load": load, "grads": grads})
    finite_flags = [all_ranks_finite(rank == 0), all_ranks_finite(True),
                    all_ranks_finite(torch.tensor([1.0, float("nan") if rank == 1 else 2.0]))]
    groups = [None if g is None else dist.get_process_group_ranks(g)
              for g in (layout.ep_group, layout.expert_replica_group)]
    offsets = [m.dispatcher.local_expert_offset for m in model.moe_layers()]
    return {"steps": steps, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "biases": torch.stack([r.e_score_correction_bias for r in model.routers()]),
            "expert_names": expert_param_names(model), "finite_flags": finite_flags, "groups": groups,
            "expert_offset": offsets[0], "num_local_experts": model.moe_layers()[0].experts.num_local_experts}


def _reference_training(world_size: int, num_steps: int) -> dict:
    """Single process, all experts local; one micro-batch per rank slice, losses averaged."""
    model = build_model(CFG, SEED)
    model.train()
    opt = build_optimizer(model, OPT, LR)  # one rank: it owns everything
    steps = []
    for step in range(num_steps):
        losses = []
        for p in model.parameters():
            p.grad = None
        for rank in range(world_size):
            out = model(*_rank_slice(step, rank, world_size))
            (out.loss / world_size).backward()
            losses.append(out.loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()} if step == 0 else None
        # The norm in float64: an fp32 sum of the ~10^6 squares is off by ~1e-5 relative, more than the
        # tolerance below, and by different amounts for different splits of the sum.
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt().float()
        for p in model.parameters():
            p.grad.mul_(torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0))
        _sgd_step(opt)
        load = model.expert_load().clone()
        update_router_bias(model.routers(), load, BIAS_RATE)
        model.reset_expert_load()
        steps.append({"loss": torch.stack(losses).mean(), "norm": norm, "load": load, "grads": grads})
    return {"steps": steps, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "biases": torch.stack([r.e_score_correction_bias for r in model.routers()])}


def _expert_slice(name: str, tensor: torch.Tensor, result: dict, expert_names: list[str]) -> torch.Tensor:
    """The part of a single-process tensor that a rank holds."""
    if name not in expert_names:
        return tensor
    lo = result["expert_offset"]
    return tensor[lo:lo + result["num_local_experts"]]


def _check_against_reference(ranks: list[dict], ref: dict, world_size: int, ep: int) -> None:
    expert_names = ranks[0]["expert_names"]
    assert len(expert_names) == 3 * CFG.num_moe_layers
    assert all(n.endswith(("gate_proj", "up_proj", "down_proj")) and ".mlp.experts." in n for n in expert_names)
    for r in ranks:
        assert r["num_local_experts"] == CFG.num_experts // ep
    # The norm is computed on every rank and must agree bit for bit (ranks clip and skip alike).
    for s, ref_step in enumerate(ref["steps"]):
        norms = [r["steps"][s]["norm"] for r in ranks]
        assert all(torch.equal(n, norms[0]) for n in norms), f"step {s}: norms differ across ranks {norms}"
        torch.testing.assert_close(norms[0], ref_step["norm"], rtol=1e-5, atol=1e-7)
        rank_mean_loss = torch.stack([r["steps"][s]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(rank_mean_loss, ref_step["loss"], rtol=1e-5, atol=1e-6)
        for r in ranks:
            assert torch.equal(r["steps"][s]["load"], ref_step["load"].to(torch.float64)), f"step {s} load"
    assert max(float(s["norm"]) for s in ref["steps"]) > MAX_NORM, "clipping was never exercised"

    # Every element of every gradient is owned by exactly one rank, and its value is the reference's.
    owned_numel = {n: 0 for n in ref["steps"][0]["grads"]}
    for rank, r in enumerate(ranks):
        for n, ((lo, hi), grad) in r["steps"][0]["grads"].items():
            torch.testing.assert_close(grad, ref["steps"][0]["grads"][n].reshape(-1)[lo:hi], rtol=1e-4, atol=1e-7,
                                       msg=lambda m, n=n, k=rank: f"rank {k} grad {n}: {m}")
            owned_numel[n] += hi - lo
    assert owned_numel == {n: g.numel() for n, g in ref["steps"][0]["grads"].items()}
    for rank, r in enumerate(ranks):
        for n, ref_param in ref["params"].items():
            torch.testing.assert_close(r["params"][n], _expert_slice(n, ref_param, r, expert_names),
                                       rtol=1e-4, atol=1e-6, msg=lambda m, n=n, k=rank: f"rank {k} param {n}: {m}")
        assert torch.equal(r["biases"], ref["biases"]), f"rank {rank} router biases"

    for r in ranks[1:]:
        for n, p in r["params"].items():
            if n not in expert_names:
                assert torch.equal(p, ranks[0]["params"][n]), f"replicated {n} diverged across ranks"
            elif r["expert_offset"] == ranks[0]["expert_offset"]:
                assert torch.equal(p, ranks[0]["params"][n]), f"expert replica {n} diverged across ranks"
    assert [r["finite_flags"] for r in ranks] == [[False, True, False]] * world_size


def _layouts_worker(rank: int, world_size: int, runs: list[tuple[int, int]]) -> list[dict]:
    """Several (ep, num_steps) trainings in one spawn: starting processes costs more than training."""
    return [_train_worker(rank, world_size, ep, num_steps) for ep, num_steps in runs]


TWO_RANK_RUNS = [(2, 3), (1, 3)]


@pytest.fixture(scope="module")
def two_rank_runs() -> list[list[dict]]:
    """Per entry of TWO_RANK_RUNS, the results of ranks 0 and 1."""
    per_rank = run_workers(_layouts_worker, 2, TWO_RANK_RUNS)
    return [list(ranks) for ranks in zip(*per_rank)]


def _check_run(ranks: list[dict], world_size: int, ep: int, num_steps: int) -> None:
    for rank, r in enumerate(ranks):
        layout = ParallelLayout(world_size, rank, ep, create_groups=False)
        ep_group, replica_group = r["groups"]
        assert ep_group == (None if ep == 1 else layout.ep_group_ranks())
        assert replica_group == (None if ep == world_size else layout.expert_replica_ranks())
    with torch_threads(1):
        reference = _reference_training(world_size, num_steps)
    _check_against_reference(ranks, reference, world_size, ep)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(len(TWO_RANK_RUNS)), ids=["ep2-of-2", "dp2-ep1"])
def test_two_rank_training_matches_single_process(two_rank_runs, run):
    ep, num_steps = TWO_RANK_RUNS[run]
    _check_run(two_rank_runs[run], 2, ep, num_steps)


@pytest.mark.slow
def test_two_ep_groups_of_two_match_single_process():
    """4 ranks, ep=2: expert gradients are summed over replica groups {0, 2} and {1, 3}."""
    ranks = [runs[0] for runs in run_workers(_layouts_worker, 4, [(2, 2)])]
    _check_run(ranks, 4, 2, 2)


def _overlap_worker(rank: int, world_size: int, ep_degrees: list[int]) -> list[dict]:
    """Per ep: the same two-micro-batch steps on two copies of the model, one synchronised by an armed
    ``GradientSync`` (small buckets, reductions launched during the last backward), one by an unarmed one
    (everything in ``finish``)."""
    results = []
    for ep in ep_degrees:
        layout = ParallelLayout(world_size, rank, ep, timeout=timedelta(seconds=60))
        overlapped, blocking = build_parallel_model(CFG, SEED, layout), build_parallel_model(CFG, SEED, layout)
        opts = [build_optimizer(m, OPT, LR, layout=layout, bucket_numel=4096) for m in (overlapped, blocking)]
        syncs = [GradientSync(m, layout, opt.plan) for m, opt in zip((overlapped, blocking), opts)]
        mismatches, overlapped_units = [], []
        for step in range(2):
            for model, sync in zip((overlapped, blocking), syncs):
                sync.prepare()
                for micro in range(2):
                    if model is overlapped and micro == 1:
                        sync.arm()
                    (model(*_rank_slice(2 * step + micro, rank, world_size)).loss / 2).backward()
                sync.finish()
            overlapped_units.append(syncs[0].last_num_overlapped)
            owned = [dict(opt.owned_grads()) for opt in opts]
            mismatches += [f"step {step} {n}" for n, g in owned[0].items() if not torch.equal(g, owned[1][n])]
        results.append({"mismatches": mismatches, "overlapped": overlapped_units, "units": len(opts[0].plan.units),
                        "buckets": len(opts[0].plan.buckets)})
    return results


@pytest.mark.slow
def test_overlapped_gradient_sync_equals_blocking_sync():
    """Bit-identical owned gradients, with most reductions started while the backward (and, for ep=2, its
    expert all-to-alls in another group) was still running."""
    for rank_results in run_workers(_overlap_worker, 2, [1, 2]):
        for r in rank_results:
            assert r["mismatches"] == []
            assert r["units"] > 10 and r["buckets"] > 1
            assert all(n >= r["units"] // 2 for n in r["overlapped"]), r


def _init_worker(rank: int, world_size: int, layouts: list[tuple[int, int]]) -> list[dict]:
    """Per (ep, pp): this rank's freshly built parameters and its first global expert."""
    from k2model.pipeline import partition_layers

    out = []
    for ep, pp in layouts:
        layout = ParallelLayout(world_size, rank, ep, pp, timeout=timedelta(seconds=60))
        stages = partition_layers(CFG, pp, SEQ) if pp > 1 else None
        model = build_parallel_model(CFG, SEED, layout, stage_layers=stages[layout.stage] if stages else None)
        out.append({"params": {n: p.detach() for n, p in model.named_parameters()},
                    "first_expert": layout.local_experts(CFG.num_experts).start})
    return out


@pytest.mark.slow
def test_every_layout_starts_from_the_single_process_weights():
    """ep=2 and ep=2 x pp=2 on 4 ranks: each rank's tensors are bit-equal to the matching slice of the
    single-process model (itself checked against the init recipe in test_model)."""
    whole = dict(build_model(CFG, SEED).named_parameters())
    layouts = [(2, 1), (2, 2)]
    per_rank = run_workers(_init_worker, 4, layouts)
    for (ep, pp), ranks in zip(layouts, zip(*per_rank)):
        held = set()
        for r in ranks:
            for name, p in r["params"].items():
                expected = whole[name]
                if ".mlp.experts." in name:
                    expected = expected[r["first_expert"]:r["first_expert"] + p.shape[0]]
                assert torch.equal(p, expected), (ep, pp, name)
                held.add(name)
        assert held == set(whole), (ep, pp)


def test_layout_rank_arithmetic():
    layout = ParallelLayout(8, 5, ep=4, create_groups=False)
    assert (layout.ep_rank, layout.ep_group_index, layout.num_expert_replicas) == (1, 1, 2)
    assert layout.ep_group_ranks() == [4, 5, 6, 7]
    assert layout.expert_replica_ranks() == [1, 5]
    assert layout.local_experts(16) == range(4, 8)
    every_rank = sorted(r for g in range(layout.num_expert_replicas) for r in layout.ep_group_ranks(g))
    assert every_rank == list(range(8))
    assert sorted(r for i in range(4) for r in layout.expert_replica_ranks(i)) == list(range(8))


def test_layout_rejects_bad_degrees():
    with pytest.raises(ValueError, match=r"ep=3 .*world_size=8"):
        ParallelLayout(8, 0, ep=3, create_groups=False)
    with pytest.raises(ValueError, match=r"ep=4 must divide num_experts=6"):
        ParallelLayout(8, 0, ep=4, create_groups=False).check_num_experts(6)
    with pytest.raises(ValueError, match=r"ep=4 must divide num_experts=6"):
        build_parallel_model(CFG.replace(num_experts=6), SEED, ParallelLayout(8, 0, ep=4, create_groups=False))
    with pytest.raises(ValueError, match=r"rank=2"):
        ParallelLayout(2, 2, ep=1, create_groups=False)
    with pytest.raises(RuntimeError, match="create_groups=False"):
        build_parallel_model(CFG, SEED, ParallelLayout(2, 0, ep=2, create_groups=False))


def test_single_process_layout_is_a_no_op():
    layout = ParallelLayout(1, 0, ep=1)
    model = build_parallel_model(CFG, SEED, layout)
    opt = build_optimizer(model, OPT, LR, layout=layout)
    sync = GradientSync(model, layout, opt.plan)
    assert not opt.plan.units and not sync.buffers and not sync._hooks
    model(*_rank_slice(0, 0, 1)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    sync.finish()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    expected = torch.stack([g.double().square().sum() for g in grads.values()]).sum().sqrt().float()
    torch.testing.assert_close(clip_grad_norm_(opt, 1e9), expected, rtol=1e-7, atol=0)
    assert torch.equal(sum_expert_load(model, layout), model.expert_load().double())
    assert all_ranks_finite(torch.tensor(1.0)) and not all_ranks_finite(torch.tensor(float("inf")))


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("boom on rank 1")
    dist.barrier()  # rank 0 waits in a collective the failed rank never joins


def test_run_workers_reports_a_failing_rank_quickly():
    with pytest.raises(WorkerError, match="boom on rank 1") as info:
        run_workers(_failing_worker, 2, timeout_s=100)
    assert "rank 1 raised" in str(info.value)
