"""The K2 architecture against slow references: MLA, MoE routing and experts, max-logit recording,
parameter totals, and one-batch overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from k2model.config import count_parameters, preset_config
from k2model.layers import (
    RECOMPUTE_MODES,
    MultiHeadLatentAttention,
    apply_rope,
    attention,
    causal_max_logit_per_head,
    rope_tables,
)
from k2model.model import K2ForCausalLM, build_model, hf_expert_names, to_hf_state_dict
from k2model.moe import MoE, _padded_linear, grouped_linear, update_router_bias


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny(**overrides):
    return preset_config("tiny", **overrides)


# ---------------------------------------------------------------------- attention
def mla_reference(attn, x_BTD, cfg):
    """Materialise every head's full key and value from the latent, then explicit masked softmax."""
    B, T, D = x_BTD.shape
    H, nope, rope, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    cos, sin = rope_tables(cfg, T)
    q_all = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_BTD))) if cfg.q_lora_rank else attn.q_proj(x_BTD)
    kv_a = attn.kv_a_proj_with_mqa(x_BTD)
    latent, k_rope_shared = kv_a[..., : cfg.kv_lora_rank], kv_a[..., cfg.kv_lora_rank:]
    kv_all = attn.kv_b_proj(attn.kv_a_layernorm(latent))
    k_rope_shared = apply_rope(k_rope_shared, cos, sin)
    heads = []
    for h in range(H):
        q_h = q_all[..., h * (nope + rope):(h + 1) * (nope + rope)]
        q_h = torch.cat([q_h[..., :nope], apply_rope(q_h[..., nope:], cos, sin)], dim=-1)
        kv_h = kv_all[..., h * (nope + vd):(h + 1) * (nope + vd)]
        k_h = torch.cat([kv_h[..., :nope], k_rope_shared], dim=-1)
        v_h = kv_h[..., nope:]
        logits = q_h @ k_h.transpose(-1, -2) / math.sqrt(nope + rope)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        probs = logits.masked_fill(mask, float("-inf")).softmax(-1)
        heads.append(probs @ v_h)
    return attn.o_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_mla_matches_materialised_reference(q_lora_rank):
    cfg = tiny(q_lora_rank=q_lora_rank, init_std=0.05)
    model = build_model(cfg, seed=1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 24, cfg.hidden_size)
    cos, sin = rope_tables(cfg, 24)
    out, _ = attn(x, cos, sin)
    ref = mla_reference(attn, x, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_attention_keeps_o_of_t_state_for_the_backward():
    """MLA's values are narrower than its queries (the flash kernels refuse that): padded, the flash kernel
    runs, so the state kept per token does not grow with the sequence (no [T, T] probabilities), and the
    output equals unpadded attention."""
    cfg = tiny()
    assert cfg.v_head_dim < cfg.qk_head_dim
    attn = MultiHeadLatentAttention(cfg)
    cos, sin = rope_tables(cfg, 128)
    saved = []
    for T in (32, 64, 128):
        x = torch.randn(2, T, cfg.hidden_size, requires_grad=True)
        saved.append(_saved_bytes(lambda x=x, T=T: attn(x, cos[:T], sin[:T])))
    # Linear in T (the weights and rotary tables are a constant part): no T x T term.
    assert saved[2] - saved[1] == 2 * (saved[1] - saved[0]), saved
    q, k = torch.randn(2, 4, 32, 48), torch.randn(2, 4, 32, 48)
    v = torch.randn(2, 4, 32, 32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125)
    torch.testing.assert_close(attention(q, k, v, 0.125), expected, rtol=1e-5, atol=1e-6)


def test_recomputation_gives_the_same_gradients_and_statistics_for_less_kept_state():
    """none, selective and full recomputation: the same loss, gradients, max logits and expert loads, bit
    for bit (the recomputed forwards record nothing twice), with less state kept for the backward."""
    cfg = tiny()
    x, y = torch.randint(0, cfg.vocab_size, (2, 48)), torch.randint(0, cfg.vocab_size, (2, 48))
    results = {}
    for mode in RECOMPUTE_MODES:
        model = build_model(cfg, seed=2).train()
        model.set_recompute(mode)
        saved = _saved_bytes(lambda m=model, k=mode: results.setdefault(k, {}).update(loss=m(x, y).loss))
        results[mode]["loss"].backward()
        results[mode].update(saved=saved, grads={n: p.grad for n, p in model.named_parameters()},
                             max_logits=model.max_logits.clone(), load=model.expert_load().clone())
    base = results["none"]
    for mode in ("selective", "full"):
        r = results[mode]
        assert torch.equal(r["loss"], base["loss"]) and torch.equal(r["max_logits"], base["max_logits"]), mode
        assert torch.equal(r["load"], base["load"]), mode
        for name, grad in base["grads"].items():
            assert torch.equal(r["grads"][name], grad), (mode, name)
    assert results["full"]["saved"] < results["selective"]["saved"] < base["saved"], {
        m: r["saved"] for m, r in results.items()}
    with pytest.raises(ValueError, match="recompute='some'"):
        build_model(cfg).set_recompute("some")


def test_rope_is_a_rotation_of_interleaved_pairs():
    cfg = tiny()
    cos, sin = rope_tables(cfg, 8)
    x = torch.randn(8, cfg.qk_rope_head_dim)
    y = apply_rope(x, cos, sin)
    # Norm of each pair is kept; position 0 is the identity.
    torch.testing.assert_close(x.view(8, -1, 2).norm(dim=-1), y.view(8, -1, 2).norm(dim=-1))
    torch.testing.assert_close(x[0], y[0])
    # Relative-position property: <R(p) a, R(p+d) b> depends only on d.
    a, b = torch.randn(cfg.qk_rope_head_dim), torch.randn(cfg.qk_rope_head_dim)
    ra, rb = apply_rope(a.expand(8, -1), cos, sin), apply_rope(b.expand(8, -1), cos, sin)
    torch.testing.assert_close((ra[1] * rb[3]).sum(), (ra[4] * rb[6]).sum(), rtol=1e-5, atol=1e-5)


def test_recorded_max_logit_equals_true_causal_max():
    cfg = tiny(init_std=0.2, attn_block_size=5)  # blocks that do not divide T
    model = build_model(cfg, seed=3).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 23))
    model(ids)
    # Reference: full T x T logits per layer, masked to the causally visible positions.
    x = model.model.embed_tokens(ids)
    cos, sin = rope_tables(cfg, 23)
    expected = []
    with torch.no_grad():
        for layer in model.model.layers:
            q, k, _ = layer.self_attn.query_key_value(layer.input_layernorm(x), cos, sin)
            logits = (q @ k.transpose(-1, -2)) * layer.self_attn.scale
            mask = torch.triu(torch.ones(23, 23, dtype=torch.bool), diagonal=1)
            expected.append(logits.masked_fill(mask, float("-inf")).amax(dim=(0, 2, 3)))
            x, _ = layer(x, cos, sin, False)
    torch.testing.assert_close(model.max_logits, torch.stack(expected), rtol=1e-5, atol=1e-5)
    # Future positions never count: a huge logit planted above the diagonal is ignored.
    q = torch.zeros(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    q[0, 0, 0, 0], k[0, 0, 3, 0] = 100.0, 100.0
    assert causal_max_logit_per_head(q, k, 1.0, 2).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorder_is_fp32_under_autocast_in_both_dtypes(dtype):
    """Under bf16 autocast the recorder's products are not rounded to bf16: the result equals the fp32
    computation on the same (possibly bf16) q and k, bit for bit."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 3, 37, 16, generator=g) * 4).to(dtype)
    k = (torch.randn(2, 3, 37, 16, generator=g) * 4).to(dtype)
    expected = causal_max_logit_per_head(q.float(), k.float(), 0.25, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorded = causal_max_logit_per_head(q, k, 0.25, 8)
        assert (q.float() @ k.float().transpose(-1, -2)).dtype == torch.bfloat16  # autocast is on here
    assert recorded.dtype == torch.float32 and torch.equal(recorded, expected)


def test_max_logits_accumulate_over_micro_batches_and_reset():
    cfg = tiny(init_std=0.1)
    model = build_model(cfg, seed=0).train()
    a, b = torch.randint(0, cfg.vocab_size, (2, 2, 16))
    model(a)
    after_a = model.max_logits.clone()
    model.reset_max_logits()
    model(b)
    after_b = model.max_logits.clone()
    model.reset_max_logits()
    model(a)
    model(b)
    torch.testing.assert_close(model.max_logits, torch.maximum(after_a, after_b))
    model.reset_max_logits()
    assert torch.isneginf(model.max_logits).all()
    model.eval()
    model(a)
    assert torch.isneginf(model.max_logits).all(), "evaluation must not record"


# ---------------------------------------------------------------------- MoE
def moe_layer(cfg, seed=0) -> MoE:
    model = build_model(cfg, seed=seed)
    return model.model.layers[cfg.first_k_dense].mlp


def test_moe_matches_per_token_loop():
    cfg = tiny(init_std=0.05)
    moe = moe_layer(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("out_dim,in_dim", [(8, 4), (6, 5)])  # grouped kernel, and the padded fallback
def test_grouped_linear_matches_loop_including_empty_experts(out_dim, in_dim):
    torch.manual_seed(0)
    w = torch.randn(5, out_dim, in_dim, requires_grad=True)
    counts = torch.tensor([3, 0, 2, 0, 4])
    x = torch.randn(int(counts.sum()), in_dim, requires_grad=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    loop = torch.cat([x[s:s + c] @ w[e].T for e, (s, c) in enumerate(zip(starts, counts.tolist()))])
    for fn in (grouped_linear, _padded_linear):
        y = fn(x, w, counts)
        torch.testing.assert_close(y, loop)
        y.sum().backward()  # an expanded gradient, the case grouped_mm's backward needs made contiguous
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad, w.grad = None, None
        loop.sum().backward(retain_graph=True)
        torch.testing.assert_close(gx, x.grad)
        torch.testing.assert_close(gw, w.grad)
        x.grad, w.grad = None, None


class ExpertMatmuls:
    """Records the kernel and the dtypes of every expert matmul (``F.grouped_mm`` or the padded bmm)."""

    def __init__(self, monkeypatch):
        import k2model.moe as moe_module

        self.calls: list[tuple[str, torch.dtype, torch.dtype]] = []
        grouped, padded = F.grouped_mm, moe_module._padded_linear

        def grouped_mm(x, w, **kw):
            self.calls.append(("grouped_mm", x.dtype, w.dtype))
            return grouped(x, w, **kw)

        def padded_linear(x, w, counts):
            self.calls.append(("padded", x.dtype, w.dtype))
            return padded(x, w, counts)

        monkeypatch.setattr(F, "grouped_mm", grouped_mm)
        monkeypatch.setattr(moe_module, "_padded_linear", padded_linear)


def test_bf16_autocast_runs_every_expert_matmul_in_bf16_and_keeps_fp32_gradients(monkeypatch):
    """The GPU recipe (bf16 autocast over fp32 parameters), run on the CPU: all three expert matmuls of
    every MoE layer take bf16 rows and bf16 weights in the grouped kernel; the loss stays close to fp32
    without equalling it (autocast is on); every gradient is fp32."""
    model = build_model(preset_config("tiny"), seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids[:, :-1], ids[:, 1:]).loss
    matmuls = ExpertMatmuls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1], ids[:, 1:])
    num_moe = model.cfg.num_layers - model.cfg.first_k_dense
    assert matmuls.calls == [("grouped_mm", torch.bfloat16, torch.bfloat16)] * (3 * num_moe)
    out.loss.backward()
    torch.testing.assert_close(out.loss.float(), reference, rtol=1e-2, atol=0)
    assert out.loss.float() != reference
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # Without autocast, nothing is bf16.
    matmuls.calls.clear()
    model(ids[:, :-1], ids[:, 1:])
    assert {(x, w) for _, x, w in matmuls.calls} == {(torch.float32, torch.float32)}


def test_router_scores_are_fp32_under_bf16_autocast():
    """Routing runs with autocast off: the scores (and so the top-k choice and the gating weights) under
    bf16 autocast are exactly those of fp32, from bf16 activations too."""
    cfg = tiny(init_std=0.05)
    router = moe_layer(cfg).gate
    x = torch.randn(64, cfg.hidden_size)
    ids, weights, scores = router(x)
    for activations in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ids_ac, weights_ac, scores_ac = router(activations)
        assert scores_ac.dtype == weights_ac.dtype == torch.float32
        expected = router(activations.float()) if activations.dtype != torch.float32 else (ids, weights, scores)
        assert torch.equal(ids_ac, expected[0]) and torch.equal(scores_ac, expected[2])


def test_bias_changes_choice_but_not_gate_values():
    cfg = tiny(init_std=0.05)
    router = moe_layer(cfg).gate
    x = torch.randn(32, cfg.hidden_size)
    ids0, w0, scores = router(x)
    target = 5
    router.e_score_correction_bias[target] = 10.0  # force expert 5 into every token's top-k
    ids1, w1, scores1 = router(x)
    torch.testing.assert_close(scores, scores1)
    assert (ids1 == target).any(dim=1).all()
    assert not torch.equal(ids0, ids1)
    # Gate weights are the unbiased scores of the chosen experts, normalised, times the scaling factor.
    chosen = scores.gather(1, ids1)
    expected = chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(w1, expected)


def test_group_restriction_follows_deepseek_v3():
    cfg = tiny(num_experts=16, num_expert_groups=4, topk_groups=2, num_experts_per_tok=4)
    router = moe_layer(cfg).gate
    scores = torch.rand(64, 16)
    ids = router.select(scores)
    grouped = scores.view(64, 4, 4)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    best_groups = group_score.topk(2, dim=-1).indices
    for n in range(64):
        allowed = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in best_groups[n].tolist()])
        assert set(ids[n].tolist()) <= set(allowed.tolist())
        # Inside the kept groups, the choice is the plain top-k.
        expected = allowed[scores[n, allowed].topk(4).indices]
        assert set(ids[n].tolist()) == set(expected.tolist())
    # One group is no restriction at all.
    plain = moe_layer(tiny(num_experts=16, num_experts_per_tok=4)).gate
    torch.testing.assert_close(plain.select(scores), scores.topk(4, dim=-1).indices)


def test_expert_load_counts_and_bias_update():
    cfg = tiny()
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids)
    load = model.expert_load()
    assert load.shape == (cfg.num_moe_layers, cfg.num_experts)
    assert torch.all(load.sum(1) == 2 * 16 * cfg.num_experts_per_tok)
    update_router_bias(model.routers(), load, 0.01)
    for router, l in zip(model.routers(), load):
        expected = 0.01 * torch.sign(l.mean() - l)
        torch.testing.assert_close(router.e_score_correction_bias, expected)
    # The bias is a buffer: saved with the model, never a parameter.
    names = dict(model.named_parameters())
    assert not any("e_score_correction_bias" in n for n in names)
    assert any("e_score_correction_bias" in n for n in model.state_dict())


def test_sequence_balance_loss_is_alpha_at_uniform_routing():
    from k2model.moe import sequence_balance_loss

    B, T, E, K = 2, 8, 4, 2
    scores = torch.full((B, T, E), 0.5)
    # Each token picks 2 of 4 experts, all experts equally often.
    ids = torch.tensor([[0, 1], [2, 3]] * (T // 2)).expand(B, T, K)
    loss = sequence_balance_loss(scores, ids, alpha=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.1))


# ---------------------------------------------------------------------- parameter totals
def test_tiny_counts_equal_allocated_model():
    cfg = tiny()
    model = build_model(cfg)
    pc = count_parameters(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    # Active path counted from the allocated modules: everything but routed experts, plus k experts.
    active = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            active += p.numel() // p.shape[0] * cfg.num_experts_per_tok
        else:
            active += p.numel()
    assert pc.active == active


@pytest.mark.parametrize("preset", ["k2-1t", "deepseek-v3", "small", "medium"])
def test_large_presets_counts_equal_meta_allocation(preset):
    cfg = preset_config(preset)
    with torch.device("meta"):
        model = K2ForCausalLM(cfg)
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


def test_medium_is_the_fixed_gpu_benchmark_model():
    """The one-GPU benchmark model (benchmarks/gpu_check.sh): 2.61B total, 0.67B active."""
    cfg = preset_config("medium")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_ffn_size,
            cfg.dense_ffn_size, cfg.num_heads, cfg.max_seq_len) == (2048, 12, 32, 4, 1024, 8192, 16, 4096)
    pc = count_parameters(cfg)
    assert (pc.total, pc.active) == (2_605_974_528, 668_206_080)


def test_k2_totals_match_published_figures():
    pc = count_parameters(preset_config("k2-1t"))
    assert abs(pc.total / 1.04e12 - 1) < 0.02
    assert abs(pc.active / 32.6e9 - 1) < 0.02
    assert round(pc.total / 1e12, 3) == 1.026
    assert round(pc.active / 1e9, 2) == 32.86
    small = count_parameters(preset_config("small"))
    assert small.total <= 150e6


# ---------------------------------------------------------------------- training behaviour
def test_tiny_overfits_one_batch_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    cfg = tiny(init_std=0.02, seq_aux_loss_alpha=1e-4)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(60):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            first = out.lm_loss.item()
            missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not missing, f"no gradient reaches {missing}"
        opt.step()
    assert out.lm_loss.item() < first / 10, (first, out.lm_loss.item())


def test_init_is_deterministic_and_independent_of_construction():
    cfg = tiny()
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    c = build_model(cfg, seed=8)
    for (n, pa), pb, pc_ in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, pc_) or pa.ndim == 1, n


def _expected_init(cfg, seed: int, name: str, shape: torch.Size, first_expert: int = 0) -> torch.Tensor:
    """The recipe of ``init_weights`` written out on its own: ones for 1-D tensors, else N(0, init_std)
    drawn on the CPU from a generator seeded by sha256 of (seed, name, index), per global expert for
    stacked experts (index -1 otherwise)."""
    import hashlib

    def draw(index, sub_shape):
        digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.randn(sub_shape, generator=gen) * cfg.init_std

    if len(shape) == 1:
        return torch.ones(shape)
    if ".mlp.experts." in name:
        return torch.stack([draw(first_expert + j, shape[1:]) for j in range(shape[0])])
    return draw(-1, shape)


def test_meta_built_model_equals_the_init_recipe_and_holds_only_its_stage():
    cfg = tiny()
    whole = build_model(cfg, seed=5)
    for name, p in whole.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32
        assert torch.equal(p, _expected_init(cfg, 5, name, p.shape)), name
    assert torch.equal(whole.rope_cos, rope_tables(cfg, cfg.max_seq_len)[0])
    assert bool((whole.max_logits == float("-inf")).all())
    # A pipeline stage materialises its own layers only (nothing of the others exists, even on meta).
    stage = build_model(cfg, seed=5, stage_layers=range(2, 4))
    names = {n for n, _ in stage.named_parameters()}
    assert names and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head."))
                         for n in names)
    for name, p in stage.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[name]), name
    # bf16 parameters are the fp32 initial values rounded once.
    half = build_model(cfg, seed=5, param_dtype=torch.bfloat16)
    for (name, p), q in zip(half.named_parameters(), whole.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), name


def test_hf_names_split_stacked_experts():
    cfg = tiny()
    model = build_model(cfg)
    hf = dict(to_hf_state_dict(model))
    layer = cfg.first_k_dense
    for e in range(cfg.num_experts):
        w = hf[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"]
        assert w.shape == (cfg.expert_ffn_size, cfg.hidden_size)
        assert torch.equal(w, model.model.layers[layer].mlp.experts.up_proj[e])
    assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in hf
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in hf
    assert "lm_head.weight" in hf and "model.embed_tokens.weight" in hf
    assert hf_expert_names("model.layers.3.mlp.experts.down_proj", 2, 8) == [
        "model.layers.3.mlp.experts.8.down_proj.weight", "model.layers.3.mlp.experts.9.down_proj.weight"]
    with pytest.raises(ValueError):
        hf_expert_names("model.layers.3.mlp.gate.weight", 2)


def test_loss_is_cross_entropy_of_logits():
    cfg = tiny(seq_aux_loss_alpha=0.0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids[:, :-1], ids[:, 1:])
    expected = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
