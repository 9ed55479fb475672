"""MuonClip's optimizer (k2model.optim) against direct implementations of its formulas, torch's own Muon
and AdamW, and exact resume from a name-keyed state dict."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from k2model import optim
from k2model.config import OptimizerConfig, preset_config
from k2model.model import build_model
from k2model.optim import (
    NS_DTYPES,
    MuonClip,
    build_optimizer,
    merge_state_dicts,
    newton_schulz,
    newton_schulz_flops,
    split_params,
)
from k2model.schedule import set_lr

# Defaults to optimizer.ns_dtype=auto: rerun as the other CPU kind by `make test` (tests/conftest.py).
pytestmark = pytest.mark.auto_dtype


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny_model(seed=0, **overrides):
    return build_model(preset_config("tiny", **overrides), seed=seed)


def fixed_batch(cfg, step, batch=2, seq=32):
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, opt, step):
    inputs, targets = fixed_batch(model.cfg, step)
    opt.zero_grad()
    model(inputs, targets).loss.backward()
    opt.step()


# ---------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 256), (5, 48, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_singular_values_lie_in_the_quintic_band(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=gen) * 3.0
    X = newton_schulz(G, steps=5, dtype=dtype)
    assert X.shape == G.shape and X.dtype == dtype
    s = torch.linalg.svdvals(X.float())
    # Measured on random full-rank Gaussian inputs of aspect ratio 2-3: [0.68, 1.14]. The quintic does
    # not converge to 1; it overshoots on purpose (Muon's coefficients), so the band is wide.
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # Same singular vectors as G: X is close to the polar factor U V^T in direction.
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    polar = U @ Vh
    cos = (X.float() * polar).sum((-2, -1)) / (X.float().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.98).all(), cos


def test_newton_schulz_batched_equals_per_matrix():
    gen = torch.Generator().manual_seed(1)
    for shape in [(6, 64, 128), (4, 96, 32), (2, 3, 32, 48)]:
        G = torch.randn(shape, generator=gen)
        batched = newton_schulz(G)
        per_matrix = torch.stack([newton_schulz(g) for g in G.reshape(-1, *shape[-2:])]).reshape(shape)
        # Bitwise on the CPUs this was developed on; allow bf16 rounding elsewhere.
        torch.testing.assert_close(batched.float(), per_matrix.float(), rtol=0, atol=1e-2)
        subset = newton_schulz(G.reshape(-1, *shape[-2:])[:2])
        torch.testing.assert_close(subset.float(), per_matrix.reshape(-1, *shape[-2:])[:2].float(),
                                   rtol=0, atol=1e-2)


@pytest.mark.parametrize("steps", [5, 4, 0])
def test_newton_schulz_in_chunks_equals_one_chain(steps):
    """A stack split into sub-stacks (3 matrices each, the last one shorter) gives the one-chain result;
    odd, even and zero step counts all end in the returned tensor."""
    gen = torch.Generator().manual_seed(2)
    for shape in [(8, 64, 128), (7, 96, 32)]:
        G = torch.randn(shape, generator=gen)
        whole = newton_schulz(G, steps, chunk_bytes=1 << 40)
        m, n = min(shape[-2:]), max(shape[-2:])
        chunked = newton_schulz(G, steps, chunk_bytes=3 * m * n * 2)
        torch.testing.assert_close(chunked.float(), whole.float(), rtol=0, atol=1e-2)
        if steps == 0:
            torch.testing.assert_close(whole.float(), (G / G.norm(dim=(-2, -1), keepdim=True)).float(),
                                       rtol=1e-2, atol=1e-3)


def test_newton_schulz_rejects_vectors_and_counts_flops():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(7))
    # m = 64, n = 128: per step 4*64*64*128 + 2*64^3.
    assert newton_schulz_flops(64, 128, 5) == 5 * (4 * 64 * 64 * 128 + 2 * 64**3)
    assert newton_schulz_flops(128, 64, 5) == newton_schulz_flops(64, 128, 5)


# ---------------------------------------------------------------------- Newton-Schulz dtype
# What auto resolves to, for given CPU flags and across ranks: tests/k2model/test_ns_dtype.py.
def test_a_resumed_optimizer_keeps_the_ns_dtype_it_was_saved_with(monkeypatch):
    """A checkpoint written where auto meant bf16 continues in bf16 on a CPU without it (and the reverse)."""
    W0 = torch.randn(8, 16)
    grads = [torch.randn(8, 16) for _ in range(3)]
    for saved_flags, resumed_flags in ((frozenset({"amx_bf16"}), frozenset()), (frozenset(), frozenset({"amx_bf16"}))):
        def run(flags, steps, state=None):
            monkeypatch.setattr(optim, "_cpu_flags", lambda: flags)
            w = nn.Parameter(W0.clone())
            opt = MuonClip([("w", w)], [], lr=0.02, cfg=OptimizerConfig())
            if state is not None:
                w.data.copy_(state[0])
                opt.load_state_dict(state[1])
            for g in steps:
                w.grad = g.clone()
                opt.step()
            return w.detach().clone(), opt

        straight, straight_opt = run(saved_flags, grads)
        first, first_opt = run(saved_flags, grads[:1])
        resumed, resumed_opt = run(resumed_flags, grads[1:], (first, _roundtrip(first_opt.state_dict())))
        assert resumed_opt.ns_dtype == straight_opt.ns_dtype == first_opt.ns_dtype
        assert torch.equal(resumed, straight)


# ---------------------------------------------------------------------- Muon against its formula
def reference_muon_adamw(params, grads_per_step, lr, cfg, ns_dtype=torch.bfloat16):
    """Direct, per-matrix, per-step implementation of REFERENCE.md sections 3 (Muon) and AdamW."""
    params = {n: p.detach().clone() for n, p in params.items()}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    m1 = {n: torch.zeros_like(p) for n, p in params.items()}
    m2 = {n: torch.zeros_like(p) for n, p in params.items()}
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    for t, grads in enumerate(grads_per_step, start=1):
        for name, W in params.items():
            G = grads[name]
            if W.ndim >= 2:
                momentum[name] = cfg.momentum * momentum[name] + G
                U = G + cfg.momentum * momentum[name]
                rows, cols = W.shape[-2:]
                mats = [newton_schulz(u, cfg.ns_steps, ns_dtype).float() for u in U.reshape(-1, rows, cols)]
                update = torch.stack(mats).reshape(W.shape) * (cfg.rms_scale * math.sqrt(max(rows, cols)))
            else:
                m1[name] = b1 * m1[name] + (1 - b1) * G
                m2[name] = b2 * m2[name] + (1 - b2) * G * G
                mhat, vhat = m1[name] / (1 - b1**t), m2[name] / (1 - b2**t)
                update = mhat / (vhat.sqrt() + cfg.adam_eps)
            params[name] = W - lr * (update + cfg.weight_decay * W)
    return params


def test_muon_steps_equal_the_formula_with_shape_stacking():
    gen = torch.Generator().manual_seed(2)
    shapes = {"a.weight": (8, 16), "b.weight": (24, 8), "experts": (3, 8, 16), "c.weight": (16, 8), "norm": (16,)}
    params = {n: nn.Parameter(torch.randn(s, generator=gen) * 0.1) for n, s in shapes.items()}
    cfg = OptimizerConfig()
    muon = [(n, p) for n, p in params.items() if p.ndim >= 2]
    adamw = [(n, p) for n, p in params.items() if p.ndim < 2]
    opt = MuonClip(muon, adamw, lr=0.02, cfg=cfg)
    grads_per_step = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    expected = reference_muon_adamw(params, grads_per_step, 0.02, cfg, NS_DTYPES[opt.ns_dtype])
    for grads in grads_per_step:
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7, msg=n)
    # a [8,16], c [16,8] (as its transpose) and the 3 experts [8,16] form ONE stack; b [24,8] another.
    assert opt.last_step_stats["ns_batches"] == 2
    assert opt.last_step_stats["ns_matrices"] == 6
    assert opt.last_step_stats["ns_flops"] == 5 * newton_schulz_flops(8, 16) + newton_schulz_flops(8, 24)


@pytest.mark.parametrize("shape", [(32, 64), (96, 48)])
def test_muon_agrees_with_torch_muon(shape):
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(shape, generator=gen) * 0.05
    ours, theirs = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    lr, wd = 0.02, 0.1
    opt = MuonClip([("w", ours)], [], lr=lr, cfg=OptimizerConfig(weight_decay=wd))
    ref = torch.optim.Muon([theirs], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        G = torch.randn(shape, generator=gen)
        ours.grad, theirs.grad = G.clone(), G.clone()
        before = ours.detach().clone()
        opt.step()
        ref.step()
        # torch keeps an EMA momentum ((1-mu) times ours): the same direction, so the same update up to
        # bf16 rounding. bf16 Newton-Schulz itself is ~1.5% (relative Frobenius) off its fp32 result, and
        # torch also normalises in bf16 where we normalise in fp32, so two such errors meet here.
        delta_ours, delta_theirs = ours.detach() - before, theirs.detach() - before
        rel = (delta_ours - delta_theirs).norm() / delta_theirs.norm()
        assert rel < 0.04, rel.item()
        # Parameters stay together (the step-to-step differences do not compound).
        assert (ours - theirs).norm() / (theirs - W0).norm() < 0.04


def test_adamw_baseline_matches_torch_adamw():
    model, ref = tiny_model(seed=4), tiny_model(seed=4)
    opt = build_optimizer(model, OptimizerConfig(name="adamw"), lr=3e-3)
    assert all(g["kind"] == "adamw" for g in opt.param_groups)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        # The same gradients for both (model-computed ones would let routing flips amplify rounding).
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------- routing
def test_split_params_routes_by_name_and_shape():
    model = tiny_model()
    muon, adamw = split_params(model, OptimizerConfig())
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    assert "model.embed_tokens.weight" in adamw_names and "lm_head.weight" in adamw_names
    assert all(p.ndim == 1 for n, p in adamw if n not in ("model.embed_tokens.weight", "lm_head.weight"))
    assert "model.layers.1.mlp.gate.weight" in muon_names
    assert "model.layers.1.mlp.experts.gate_proj" in muon_names
    assert "model.layers.0.mlp.gate_proj.weight" in muon_names  # dense FFN, not a router
    assert "model.layers.0.self_attn.q_b_proj.weight" in muon_names
    assert len(muon_names | adamw_names) == len(list(model.parameters()))

    muon, adamw = split_params(model, OptimizerConfig(router_on_muon=False, muon_exclude=("lm_head", "embed",
                                                                                         "o_proj")))
    muon_names = {n for n, _ in muon}
    assert "model.layers.1.mlp.gate.weight" not in muon_names
    assert "model.layers.0.mlp.gate_proj.weight" in muon_names
    assert not any("o_proj" in n for n in muon_names)
    assert split_params(model, OptimizerConfig(name="adamw"))[0] == []


def test_lr_is_taken_from_the_param_groups_each_step():
    model = tiny_model(seed=5)
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_lr(opt, 0.0)
    train_step(model, opt, 0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # lr 0: nothing moves, decay included
    set_lr(opt, 1e-2)
    train_step(model, opt, 1)
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert not torch.equal(model.model.layers[1].mlp.experts.up_proj, before["model.layers.1.mlp.experts.up_proj"])


def test_parameters_without_gradients_are_skipped():
    a, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
    opt = MuonClip([("a", a), ("b", b)], [], lr=0.1)
    a.grad = torch.randn(4, 8)
    b0 = b.detach().clone()
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state


# ---------------------------------------------------------------------- checkpoint state
def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["muonclip", "adamw"])
def test_state_dict_resume_continues_bit_for_bit(name):
    cfg = OptimizerConfig(name=name)
    total, split = 4, 2
    straight = tiny_model(seed=6)
    opt = build_optimizer(straight, cfg, lr=5e-3)
    for step in range(total):
        train_step(straight, opt, step)

    first = tiny_model(seed=6)
    opt1 = build_optimizer(first, cfg, lr=5e-3)
    for step in range(split):
        train_step(first, opt1, step)
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())
    assert set(saved_opt["state"]) == {n for n, _ in first.named_parameters()}  # keys are names

    resumed = tiny_model(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, cfg, lr=1.0)  # lr restored from the state too
    opt2.load_state_dict(saved_opt)
    for step in range(split, total):
        train_step(resumed, opt2, step)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_load_state_dict_rejects_a_different_model():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-3)
    train_step(model, opt, 0)
    state = opt.state_dict()
    other = build_model(preset_config("tiny", num_layers=3), seed=0)
    with pytest.raises(ValueError, match="parameters differ"):
        build_optimizer(other, OptimizerConfig(), lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="groups"):
        build_optimizer(model, OptimizerConfig(name="adamw"), lr=1e-3).load_state_dict(state)
    # A single-process state is its own merge.
    merged = merge_state_dicts([state])
    opt3 = build_optimizer(tiny_model(), OptimizerConfig(), lr=1e-3)
    opt3.load_state_dict(merged)
    assert opt3.momentum_numel() == opt.momentum_numel()


def test_newton_schulz_sub_stack_size_by_device():
    """On CPU a stack runs in about 1 MiB sub-stacks (two fp32 [256, 512] matrices), elsewhere in 8 MiB;
    a sub-stack always holds at least one matrix and never more than the stack."""
    from k2model.optim import ns_chunk_bytes, ns_sub_stack_size

    assert ns_chunk_bytes("cpu") == 1 << 20 and ns_chunk_bytes(torch.device("cuda", 0)) == 8 << 20
    assert ns_sub_stack_size(693, 256, 512, torch.float32, ns_chunk_bytes("cpu")) == 2
    assert ns_sub_stack_size(693, 256, 512, torch.bfloat16, ns_chunk_bytes("cpu")) == 4
    assert ns_sub_stack_size(157, 64, 128, torch.float32, ns_chunk_bytes("cpu")) == 32
    assert ns_sub_stack_size(3, 64, 128, torch.float32, 1 << 40) == 3
    assert ns_sub_stack_size(3, 2048, 7168, torch.bfloat16, ns_chunk_bytes("cpu")) == 1
