"""Model config validation, presets and the Hugging Face config.json mapping."""

from __future__ import annotations

import pytest

from k2model.config import ModelConfig, OptimizerConfig, RopeScaling, count_parameters, preset_config

# Kimi K2's released config.json (the fields this model reads), as published.
K2_HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_shared_experts": 1, "n_routed_experts": 384, "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0, "attention_bias": False, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_k2_hf_config_reads_to_the_preset_architecture():
    cfg = ModelConfig.from_hf_config(K2_HF_CONFIG)
    preset = preset_config("k2-1t")
    same = ("vocab_size", "hidden_size", "num_layers", "first_k_dense", "dense_ffn_size", "expert_ffn_size",
            "num_experts", "num_experts_per_tok", "num_shared_experts", "num_expert_groups", "topk_groups",
            "routed_scaling_factor", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "rope_theta")
    for field in same:
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rope_scaling == RopeScaling(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                           beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert count_parameters(cfg).total == count_parameters(preset).total


def test_hf_round_trip():
    for name in ("tiny", "small", "k2-1t", "deepseek-v3"):
        cfg = preset_config(name)
        back = ModelConfig.from_hf_config(cfg.to_hf_config())
        assert back == cfg.replace(preset=None), name


@pytest.mark.parametrize("field,value", [
    ("moe_layer_freq", 2), ("tie_word_embeddings", True), ("attention_bias", True),
    ("hidden_act", "gelu"), ("num_nextn_predict_layers", 1), ("topk_method", "group_limited_greedy"),
    ("rope_interleave", False),
])
def test_unimplemented_hf_fields_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_config({**K2_HF_CONFIG, field: value})


def test_unknown_rope_scaling_is_rejected_by_name():
    with pytest.raises(ValueError, match="linear"):
        ModelConfig.from_hf_config({**K2_HF_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="attn_factor"):
        ModelConfig.from_hf_config({**K2_HF_CONFIG, "rope_scaling": {**K2_HF_CONFIG["rope_scaling"],
                                                                     "attn_factor": 1.0}})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config({k: v for k, v in K2_HF_CONFIG.items() if k != "hidden_size"})


def test_yarn_changes_softmax_scale_and_frequencies():
    import math

    from k2model.layers import rope_inv_freq, softmax_scale

    cfg = ModelConfig.from_hf_config(K2_HF_CONFIG).replace(
        hidden_size=64, num_layers=2, num_experts=4, num_experts_per_tok=2, vocab_size=32, dense_ffn_size=32,
        expert_ffn_size=16, num_heads=2, q_lora_rank=16, kv_lora_rank=16, max_seq_len=64)
    mscale = 0.1 * math.log(32.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(mscale**2 / math.sqrt(192))
    plain, _ = rope_inv_freq(64, 50000.0, None)
    scaled, magnitude = rope_inv_freq(64, 50000.0, cfg.rope_scaling)
    assert magnitude == pytest.approx(1.0)
    # Highest frequency kept, lowest divided by the factor.
    assert scaled[0] == pytest.approx(plain[0].item())
    assert scaled[-1] == pytest.approx(plain[-1].item() / 32.0)


@pytest.mark.parametrize("changes,field", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(num_expert_groups=3), "num_expert_groups"),
    (dict(num_expert_groups=4, topk_groups=5), "topk_groups"),
    (dict(first_k_dense=9), "first_k_dense"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(q_lora_rank=0), "q_lora_rank"),
])
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        preset_config("tiny", **changes)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="valid"):
        preset_config("huge")
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig.from_dict({"hiden_size": 3})


def test_optimizer_config_validation():
    with pytest.raises(ValueError, match="optimizer.name"):
        OptimizerConfig(name="sgd")
    with pytest.raises(ValueError, match="optimizer.momentum"):
        OptimizerConfig(momentum=1.5)
    assert OptimizerConfig().uses_qk_clip and not OptimizerConfig(name="adamw").uses_qk_clip
