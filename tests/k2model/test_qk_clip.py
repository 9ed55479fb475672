"""QK-Clip (k2model.qk_clip) on fixed weights and a fixed batch: clipped heads land exactly on tau, every
other row of every weight is untouched bit-for-bit, non-finite maxima are rejected."""

from __future__ import annotations

import pytest
import torch

from k2model.config import preset_config
from k2model.layers import causal_max_logit_per_head
from k2model.model import build_model
from k2model.qk_clip import qk_clip


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def scaled_model(q_lora_rank):
    """tiny with larger weights, so logits of a few units spread over heads and layers."""
    model = build_model(preset_config("tiny", init_std=0.05, q_lora_rank=q_lora_rank), seed=0)
    with torch.no_grad():
        for attn in model.attention_layers():
            (attn.q_proj if q_lora_rank is None else attn.q_b_proj).weight.mul_(3)
            attn.kv_b_proj.weight.mul_(3)
    return model.train()


def batch(cfg):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)


def capture_attention_inputs(model, tokens):
    """Forward once in training mode; returns each attention layer's (x, cos, sin) inputs."""
    inputs = []
    hooks = [attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[:3]))
             for attn in model.attention_layers()]
    model.reset_max_logits()
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return inputs


def max_logits_on(model, inputs):
    """Per-layer, per-head max logit of each attention layer on its recorded input."""
    rows = []
    with torch.no_grad():
        for attn, (x, cos, sin) in zip(model.attention_layers(), inputs):
            q, k, _ = attn.query_key_value(x, cos, sin)
            rows.append(causal_max_logit_per_head(q, k, attn.scale, attn.cfg.attn_block_size))
    return torch.stack(rows)


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_clipped_heads_land_on_tau_and_nothing_else_moves(q_lora_rank):
    model = scaled_model(q_lora_rank)
    cfg = model.cfg
    tokens = batch(cfg)
    inputs = capture_attention_inputs(model, tokens)
    before = model.max_logits.clone()
    torch.testing.assert_close(max_logits_on(model, inputs), before)  # the recorder measured these
    tau = float(before.flatten().median())
    clipped = before > tau
    assert 0 < clipped.sum() < clipped.numel() and (clipped.any(1) & (~clipped).any(1)).any()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    stats = qk_clip(model, model.max_logits, tau)

    assert stats.num_clipped == int(clipped.sum())
    assert stats.num_clipped_per_layer.tolist() == clipped.sum(1).tolist()
    assert torch.equal(stats.max_logit_per_layer, before.amax(1)) and stats.max_logit == before.max().item()
    assert torch.equal(model.max_logits, before)  # the input is not modified

    # Each layer on the same batch (its own recorded input): clipped heads at tau, the others bitwise.
    after = max_logits_on(model, inputs)
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-4, atol=0)
    assert torch.equal(after[~clipped], before[~clipped])
    # Layer 0 sees the embedding, which the clip cannot change: a whole-model forward agrees.
    model.reset_max_logits()
    with torch.no_grad():
        model(tokens)
    torch.testing.assert_close(model.max_logits[0], after[0], rtol=1e-6, atol=0)

    nope, rope, v, H = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_heads
    q_name = "q_proj" if q_lora_rank is None else "q_b_proj"
    touched = {f"self_attn.{q_name}.weight", "self_attn.kv_b_proj.weight"}
    for name, p in model.named_parameters():
        if not any(name.endswith(t) for t in touched):
            assert torch.equal(p, weights[name]), name  # shared rotary key, values' latent, o_proj, ...
            continue
        layer = int(name.split(".")[2])
        old = weights[name]
        gamma = (tau / before[layer]).clamp(max=1.0)
        for h in range(H):
            if name.endswith(q_name + ".weight"):
                rows = old[h * (nope + rope):(h + 1) * (nope + rope)]
                new = p[h * (nope + rope):(h + 1) * (nope + rope)]
                expected = torch.cat([rows[:nope] * gamma[h].sqrt(), rows[nope:] * gamma[h]])
            else:
                rows = old[h * (nope + v):(h + 1) * (nope + v)]
                new = p[h * (nope + v):(h + 1) * (nope + v)]
                expected = torch.cat([rows[:nope] * gamma[h].sqrt(), rows[nope:]])
                assert torch.equal(new[nope:], rows[nope:])  # value rows, bitwise
            if clipped[layer, h]:
                torch.testing.assert_close(new, expected, rtol=1e-6, atol=0)
            else:
                assert torch.equal(new, rows), (name, h)


def test_heads_under_tau_leave_the_model_bitwise_unchanged():
    model = scaled_model(64)
    capture_attention_inputs(model, batch(model.cfg))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    stats = qk_clip(model, model.max_logits, tau=float(model.max_logits.max()))  # equal is not above
    assert stats.num_clipped == 0
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_max_logits_are_rejected_by_layer_and_head(bad):
    model = scaled_model(64)
    capture_attention_inputs(model, batch(model.cfg))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    max_logits = model.max_logits.clone()
    max_logits[2, 1] = bad
    with pytest.raises(ValueError, match="layer 2 head 1"):
        qk_clip(model, max_logits, tau=0.5)
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n  # rejected before anything is scaled
    with pytest.raises(ValueError, match="shape"):
        qk_clip(model, max_logits[:2], tau=0.5)
