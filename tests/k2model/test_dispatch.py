"""AllToAllDispatcher on 2 gloo ranks against the in-process LocalDispatcher.

One spawn runs every case (process start-up dominates the cost); the parent builds the same inputs and
the single-process reference and compares:

- the dispatcher alone, with "experts" that scale each row by (global expert id + 1): forward rows and
  input gradients exact, tokens per local expert equal to the global count;
- the MoE layer: output and input gradient of each rank's tokens equal the single-process layer run on
  both ranks' tokens; each rank's expert gradients equal the matching slices; router and shared-expert
  gradients summed over ranks equal the reference;
- routing forced so one rank receives no rows, and a rank with no tokens at all (both must neither
  hang in backward nor lose gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from k2model.config import preset_config
from k2model.dispatch import AllToAllDispatcher, LocalDispatcher
from k2model.moe import MoE
from k2model.testing import run_workers, torch_threads

WORLD = 2
CFG = preset_config("tiny").replace(seq_aux_loss_alpha=0.0)
E = CFG.num_experts
SEQ = 8

# name -> (sequences per rank, forced experts (None: the router decides), dtype)
CASES = {
    "random": ((3, 2), None, torch.float32),
    "all_to_rank0": ((2, 2), [0, 1], torch.float32),      # rank 1 receives no rows
    "all_to_rank1": ((2, 3), [E - 1, E - 3], torch.float32),  # rank 0 receives no rows
    "rank1_no_tokens": ((2, 0), None, torch.float32),
    "bf16": ((2, 2), None, torch.bfloat16),
}


def _case_inputs(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input and upstream gradient for a case, [B, SEQ, D] each."""
    batches, _, dtype = CASES[name]
    gen = torch.Generator().manual_seed(1000 * (list(CASES).index(name) + 1) + rank)
    x = torch.randn(batches[rank], SEQ, CFG.hidden_size, generator=gen)
    g = torch.randn(batches[rank], SEQ, CFG.hidden_size, generator=gen)
    return x.to(dtype), g.to(dtype)


def _reference_moe(name: str) -> MoE:
    """The single-process layer of a case: all experts local, weights from a fixed generator."""
    _, forced, dtype = CASES[name]
    moe = MoE(CFG, LocalDispatcher(E))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        if forced is not None:
            moe.gate.e_score_correction_bias[forced] = 100.0
    return _cast_params(moe, dtype)


def _cast_params(moe: MoE, dtype: torch.dtype) -> MoE:
    """Parameters in ``dtype``; the buffers (router bias, load counts) stay fp32 as in training."""
    for p in moe.parameters():
        p.data = p.data.to(dtype)
    return moe


def _ep_moe(name: str, dispatcher: AllToAllDispatcher) -> MoE:
    """The reference layer's weights with only this rank's expert slices."""
    ref = _reference_moe(name)
    moe = _cast_params(MoE(CFG, dispatcher), CASES[name][2])
    lo, hi = dispatcher.local_expert_offset, dispatcher.local_expert_offset + dispatcher.num_local_experts
    state = {k: (v[lo:hi] if k.startswith("experts.") else v) for k, v in ref.state_dict().items()}
    moe.load_state_dict(state)
    return moe


def _scaled_rows_worker_case(dispatcher: AllToAllDispatcher, rank: int) -> dict:
    """Dispatcher alone: experts multiply their rows by (global id + 1)."""
    gen = torch.Generator().manual_seed(50 + rank)
    N, K = (5, 2) if rank == 0 else (3, 2)
    x = torch.randn(N, CFG.hidden_size, generator=gen, requires_grad=True)
    topk = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    x_MD, tokens_per_local, handle = dispatcher.dispatch(x, topk)
    local_ids = torch.repeat_interleave(torch.arange(dispatcher.num_local_experts), tokens_per_local)
    y_MD = x_MD * (local_ids + dispatcher.local_expert_offset + 1).unsqueeze(-1).to(x_MD.dtype)
    y_NKD = dispatcher.combine(y_MD, handle)
    g = torch.randn(y_NKD.shape, generator=gen)
    (y_NKD * g).sum().backward()
    counts = torch.bincount(topk.reshape(-1), minlength=E)
    dist.all_reduce(counts)
    return {"x": x.detach(), "topk": topk, "g": g, "y": y_NKD.detach(), "x_grad": x.grad,
            "tokens_per_local": tokens_per_local, "global_counts": counts,
            "offset": dispatcher.local_expert_offset}


def _autocast_case(dispatcher: AllToAllDispatcher, rank: int) -> dict:
    """fp32 parameters under bf16 autocast: what dtype the rows cross the all-to-all in."""
    import k2model.dispatch as dispatch_module

    payloads = []
    exchange = dispatch_module.all_to_all_autograd

    def recording(rows, *args, name, **kwargs):
        payloads.append((name, rows.dtype))
        return exchange(rows, *args, name=name, **kwargs)

    dispatch_module.all_to_all_autograd = recording
    try:
        moe = _ep_moe("random", dispatcher)
        x, g = _case_inputs("random", rank)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(x)
        (out.float() * g).sum().backward()
    finally:
        dispatch_module.all_to_all_autograd = exchange
    return {"payloads": payloads, "out_dtype": out.dtype,
            "grad_dtypes": {p.grad.dtype for p in moe.parameters() if p.grad is not None}}


def _dispatch_worker(rank: int, world_size: int) -> dict:
    dispatcher = AllToAllDispatcher(E, dist.group.WORLD)
    results = {"scaled_rows": _scaled_rows_worker_case(dispatcher, rank)}
    for name in CASES:
        moe = _ep_moe(name, dispatcher)
        x, g = _case_inputs(name, rank)
        x.requires_grad_(True)
        out = moe(x)
        (out * g).sum().backward()
        results[name] = {"out": out.detach(), "x_grad": x.grad,
                         "grads": {n: p.grad for n, p in moe.named_parameters()},
                         "tokens_per_expert": moe.tokens_per_expert.clone()}
    results["autocast"] = _autocast_case(dispatcher, rank)
    try:
        AllToAllDispatcher(E - 1, dist.group.WORLD)
        results["bad_split"] = None
    except ValueError as e:
        results["bad_split"] = str(e)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_workers(_dispatch_worker, WORLD)


def test_expert_ranges(ranks):
    assert [r["scaled_rows"]["offset"] for r in ranks] == [0, E // 2]
    assert "num_experts=15" in ranks[0]["bad_split"] and "2" in ranks[0]["bad_split"]


def test_dispatch_combine_route_every_row_exactly(ranks):
    for r in ranks:
        c = r["scaled_rows"]
        expected = c["x"].unsqueeze(1) * (c["topk"] + 1).unsqueeze(-1)
        torch.testing.assert_close(c["y"], expected, rtol=0, atol=0)
        torch.testing.assert_close(c["x_grad"], (c["g"] * (c["topk"] + 1).unsqueeze(-1)).sum(1),
                                   rtol=1e-6, atol=1e-6)
        lo = c["offset"]
        assert c["tokens_per_local"].tolist() == c["global_counts"][lo:lo + E // WORLD].tolist()


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _reference_run(name: str) -> dict:
    ref = _reference_moe(name)
    inputs = [_case_inputs(name, rank) for rank in range(WORLD)]
    x = torch.cat([x for x, _ in inputs]).requires_grad_(True)
    g = torch.cat([g for _, g in inputs])
    out = ref(x)
    (out * g).sum().backward()
    sizes = [len(x) for x, _ in inputs]
    return {"out": out.detach().split(sizes), "x_grad": x.grad.split(sizes),
            "grads": {n: p.grad for n, p in ref.named_parameters()},
            "tokens_per_expert": ref.tokens_per_expert}


def _assert_matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: elementwise to 1e-5. bf16: relative error of the whole tensor under 2% (single elements
    round differently when partial sums are added in another order)."""
    if dtype == torch.bfloat16:
        err = (got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        assert err < 2e-2, f"{what}: relative error {err:.3g}"
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_moe_matches_local_dispatcher(ranks, name):
    with torch_threads(1):
        ref = _reference_run(name)
    dtype = CASES[name][2]
    for rank, r in enumerate(ranks):
        _assert_matches(r[name]["out"], ref["out"][rank], dtype, f"rank {rank} output")
        _assert_matches(r[name]["x_grad"], ref["x_grad"][rank], dtype, f"rank {rank} input grad")
    half = E // WORLD
    for n, ref_grad in ref["grads"].items():
        if n.startswith("experts."):
            slices = [_grad_or_zeros(r[name]["grads"][n], ref_grad[:half]) for r in ranks]
            assert all(g.shape[0] == half for g in slices)
            got = torch.cat(slices)
        else:
            got = sum(r[name]["grads"][n].float() for r in ranks).to(ref_grad.dtype)
        _assert_matches(got, ref_grad, dtype, f"grad of {n}")
    load = sum(r[name]["tokens_per_expert"] for r in ranks)
    assert load.tolist() == ref["tokens_per_expert"].tolist()


def test_forced_routing_really_starves_a_rank(ranks):
    """The zero-row cases do exercise empty splits (guards against the bias no longer forcing)."""
    for name, starved in (("all_to_rank0", 1), ("all_to_rank1", 0)):
        load = sum(r[name]["tokens_per_expert"] for r in ranks)
        half = E // WORLD
        assert load[starved * half:(starved + 1) * half].sum() == 0
        # The starved rank's experts get no gradient (moe.grouped_linear's empty path links only its own
        # weight, so gate/up come back None; the gradient sync treats None as zero).
        for proj in ("gate_proj", "up_proj", "down_proj"):
            grad = ranks[starved][name]["grads"][f"experts.{proj}"]
            assert grad is None or torch.count_nonzero(grad) == 0


def test_under_bf16_autocast_rows_cross_the_all_to_all_in_bf16(ranks):
    """fp32 master weights under bf16 autocast: both exchanges carry bf16 rows (half the bytes of fp32),
    the layer's output is fp32 like its input (the residual stream), every gradient is fp32."""
    for r in ranks:
        assert r["autocast"]["payloads"] == [("dispatch", torch.bfloat16), ("combine", torch.bfloat16)]
        assert r["autocast"]["out_dtype"] == torch.float32
        assert r["autocast"]["grad_dtypes"] == {torch.float32}
