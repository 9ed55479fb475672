"""Typed model configuration, named size presets, the Hugging Face config mapping and parameter counting.

The architecture is the DeepSeek-V3 family with Kimi K2's changes (shared/REFERENCE.md section 1):
multi-head latent attention, a sigmoid-scored MoE with one shared expert and auxiliary-loss-free
balancing, `first_k_dense` leading dense layers and optional expert groups (K2 uses none).

Parameter counting convention (``count_parameters``): *total* is every parameter the model allocates,
the token embedding and the untied output head included, router bias buffers excluded (they are not
trained by any optimizer). *Active* is what one token touches: embedding row lookups are counted as the
full embedding table (the usual convention in published MoE totals), plus the output head, every
attention block, the dense FFNs, the routers, the shared experts and ``num_experts_per_tok`` routed
experts per MoE layer. With these rules the ``k2-1t`` preset gives 1.026T total / 32.86B active, the
published (rounded) figures being 1.04T / 32.6B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCORE_FUNCS = ("sigmoid", "softmax")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what would be valid. The one
    error type of every config section (``k2pipe`` shows it without a traceback)."""


def field_checker(section: str, obj: Any) -> Callable[[bool, str, str], None]:
    """``need(condition, field, message)``: unless ``condition``, a ``ConfigError`` naming ``section.field``,
    the field's value and ``message`` (what would be valid). Each config section checks itself with it."""

    def need(condition: bool, name: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)!r}: {message}")

    return need


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling as written in DeepSeek-V3 family configs (``rope_scaling`` with type ``yarn``)."""

    factor: float = 1.0
    """Context extension factor (K2 release: 32)."""
    original_max_position_embeddings: int = 4096
    """Context length the model was pretrained at before the extension."""
    beta_fast: float = 32.0
    """High-frequency boundary of the interpolation ramp, in rotations."""
    beta_slow: float = 1.0
    """Low-frequency boundary of the interpolation ramp, in rotations."""
    mscale: float = 1.0
    """Attention temperature coefficient applied to cos/sin."""
    mscale_all_dim: float = 0.0
    """Coefficient whose squared mscale multiplies the softmax scale (0: none)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's math. Field names follow the model's concepts; the
    Hugging Face names are produced by ``to_hf_config`` and read by ``from_hf_config``."""

    preset: str | None = None
    """Name of the preset this config was built from, if any (informational)."""
    vocab_size: int = 4096
    """Token vocabulary; must equal the tokenizer's vocabulary size."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 4
    """Decoder blocks in total (dense plus MoE)."""
    first_k_dense: int = 1
    """Leading blocks whose FFN is dense rather than MoE (K2: 1, DeepSeek-V3: 3)."""
    dense_ffn_size: int = 384
    """Hidden size of the dense SwiGLU FFN (HF ``intermediate_size``)."""
    expert_ffn_size: int = 64
    """Hidden size of each routed and shared expert (HF ``moe_intermediate_size``)."""
    num_experts: int = 16
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Routed experts chosen per token (top-k)."""
    num_shared_experts: int = 1
    """Always-on experts per MoE layer, summed into one SwiGLU of width num_shared * expert_ffn_size."""
    num_expert_groups: int = 1
    """Expert groups for group-restricted routing; 1 means no grouping (K2)."""
    topk_groups: int = 1
    """Groups kept per token when num_expert_groups > 1."""
    routed_scaling_factor: float = 2.827
    """Multiplier on the normalised top-k gate weights (K2: 2.827, DeepSeek-V3: 2.5)."""
    score_func: str = "sigmoid"
    """Router scoring function: ``sigmoid`` (DeepSeek-V3, K2) or ``softmax``."""
    norm_topk_prob: bool = True
    """Normalise the chosen gate weights to sum to one before scaling."""
    num_heads: int = 4
    """Attention heads."""
    q_lora_rank: int | None = 64
    """Query down-projection rank; None means queries are one plain projection."""
    kv_lora_rank: int = 32
    """Rank of the shared key/value latent."""
    qk_nope_head_dim: int = 32
    """Per-head content (non-rotary) query/key dimension."""
    qk_rope_head_dim: int = 16
    """Per-head rotary query dimension, also the width of the one shared rotary key."""
    v_head_dim: int = 32
    """Per-head value dimension."""
    rope_theta: float = 50000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Optional YaRN scaling; None for plain RoPE."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables are built for."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Standard deviation of the normal weight init (DeepSeek-V3 ``initializer_range``)."""
    router_bias_update_rate: float = 1e-3
    """gamma of the auxiliary-loss-free bias update (REFERENCE.md section 2)."""
    seq_aux_loss_alpha: float = 1e-4
    """alpha of the sequence-wise balance loss; 0 disables it."""
    attn_block_size: int = 128
    """Query block length of the max-logit recorder (memory O(block x T) per head)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        need = field_checker("model", self)

        for name in (
            "vocab_size", "hidden_size", "num_layers", "dense_ffn_size", "expert_ffn_size", "num_experts",
            "num_experts_per_tok", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "max_seq_len", "num_expert_groups", "topk_groups", "attn_block_size",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(0 <= self.first_k_dense <= self.num_layers, "first_k_dense",
             f"must lie in [0, num_layers={self.num_layers}]")
        need(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"cannot exceed num_experts={self.num_experts}")
        need(self.num_experts % self.num_expert_groups == 0, "num_expert_groups",
             f"must divide num_experts={self.num_experts}")
        need(self.topk_groups <= self.num_expert_groups, "topk_groups",
             f"cannot exceed num_expert_groups={self.num_expert_groups}")
        if self.num_expert_groups > 1:
            per_group = self.num_experts // self.num_expert_groups
            need(per_group >= 2, "num_expert_groups",
                 "each group needs at least 2 experts (groups are scored by their top-2)")
            need(self.topk_groups * per_group >= self.num_experts_per_tok, "topk_groups",
                 f"the {self.topk_groups} kept groups hold fewer than num_experts_per_tok experts")
        need(self.score_func in SCORE_FUNCS, "score_func", f"must be one of {SCORE_FUNCS}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or null")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate", "must be >= 0")
        need(self.seq_aux_loss_alpha >= 0, "seq_aux_loss_alpha", "must be >= 0")
        if self.rope_scaling is not None and self.rope_scaling.factor < 1:
            raise ConfigError(f"model.rope_scaling.factor={self.rope_scaling.factor}: must be >= 1")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config field(s) {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face mapping
    def to_hf_config(self) -> dict[str, Any]:
        """The DeepSeek-V3 family ``config.json`` fields for this model."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            # The family's type, which stock transformers loads without remote code (the released K2 says
            # kimi_k2, which needs the model's own code).
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "first_k_dense_replace": self.first_k_dense,
            "moe_layer_freq": 1,
            "intermediate_size": self.dense_ffn_size,
            "moe_intermediate_size": self.expert_ffn_size,
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_shared_experts": self.num_shared_experts,
            "n_group": self.num_expert_groups,
            "topk_group": self.topk_groups,
            "topk_method": "noaux_tc",
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": self.score_func,
            "norm_topk_prob": self.norm_topk_prob,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rope_theta": self.rope_theta,
            "rope_interleave": True,  # k2model.layers rotates interleaved pairs; written, not left to a default
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "initializer_range": self.init_std,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "aux_loss_alpha": self.seq_aux_loss_alpha,
            "seq_aux": True,
            "num_nextn_predict_layers": 0,
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            hf["rope_scaling"] = {
                "type": "yarn", "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
                "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim,
            }
        return hf

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a DeepSeek-V3 family ``config.json``. Fields whose non-default values this model does
        not implement are rejected by name rather than ignored."""

        def get(key: str, default: Any = _MISSING) -> Any:
            if key in hf:
                return hf[key]
            if default is _MISSING:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return default

        # Fields the model does not implement unless they hold the value we do implement.
        unsupported = {
            "moe_layer_freq": 1,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "hidden_act": "silu",
            "num_nextn_predict_layers": 0,
            "ep_size": 1,
            "rope_interleave": True,  # k2model.layers rotates interleaved pairs
        }
        for key, supported in unsupported.items():
            if key in hf and hf[key] != supported:
                raise ConfigError(
                    f"{source}: field {key!r}={hf[key]!r} is not implemented (supported: {supported!r})")
        if "topk_method" in hf and hf["topk_method"] not in ("noaux_tc", "greedy"):
            raise ConfigError(f"{source}: field 'topk_method'={hf['topk_method']!r} is not implemented "
                             "(supported: 'noaux_tc', or 'greedy' with one group)")
        kv_heads = hf.get("num_key_value_heads", hf.get("num_attention_heads"))
        if kv_heads != hf.get("num_attention_heads"):
            raise ConfigError(f"{source}: num_key_value_heads={kv_heads!r} differs from num_attention_heads; "
                             "MLA has one latent per token, so the two must match")

        rope_scaling = None
        rs = hf.get("rope_scaling")
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not implemented (supported: 'yarn')")
            known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim"}
            extra = set(rs) - known
            if extra:
                raise ConfigError(f"{source}: rope_scaling field(s) {sorted(extra)} are not implemented")
            rope_scaling = RopeScaling(**{k: v for k, v in rs.items() if k not in ("type", "rope_type")})

        return cls(
            preset=None,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            first_k_dense=get("first_k_dense_replace", 0),
            dense_ffn_size=get("intermediate_size"),
            expert_ffn_size=get("moe_intermediate_size"),
            num_experts=get("n_routed_experts"),
            num_experts_per_tok=get("num_experts_per_tok"),
            num_shared_experts=get("n_shared_experts", 0) or 0,
            num_expert_groups=get("n_group", 1) or 1,
            topk_groups=get("topk_group", 1) or 1,
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            score_func=get("scoring_func", "sigmoid"),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            num_heads=get("num_attention_heads"),
            q_lora_rank=get("q_lora_rank", None),
            kv_lora_rank=get("kv_lora_rank"),
            qk_nope_head_dim=get("qk_nope_head_dim"),
            qk_rope_head_dim=get("qk_rope_head_dim"),
            v_head_dim=get("v_head_dim"),
            rope_theta=float(get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=get("max_position_embeddings", 4096),
            norm_eps=float(get("rms_norm_eps", 1e-6)),
            init_std=float(get("initializer_range", 0.006)),
            seq_aux_loss_alpha=float(get("aux_loss_alpha", 1e-4)) if get("seq_aux", True) else 0.0,
        )


class _Missing:
    pass


_MISSING = _Missing()


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train on a 2-core CPU; CI and the demo run it.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_layers=4, first_k_dense=1, dense_ffn_size=384,
        expert_ffn_size=64, num_experts=16, num_experts_per_tok=2, num_shared_experts=1,
        num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_seq_len=256, rope_theta=50000.0,
    ),
    # The largest model a CPU benchmark here can still step (<= ~150M total parameters);
    # the single-GPU benchmark model.
    "small": dict(
        vocab_size=32768, hidden_size=512, num_layers=8, first_k_dense=1, dense_ffn_size=1536,
        expert_ffn_size=256, num_experts=32, num_experts_per_tok=4, num_shared_experts=1,
        num_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, max_seq_len=1024, rope_theta=50000.0,
    ),
    # The one-GPU benchmark model of benchmarks/gpu_check.sh (about 2.61B total, 0.67B active): fixed,
    # so a figure measured on it means one thing; trained at sequence 4096.
    "medium": dict(
        vocab_size=32768, hidden_size=2048, num_layers=12, first_k_dense=1, dense_ffn_size=8192,
        expert_ffn_size=1024, num_experts=32, num_experts_per_tok=4, num_shared_experts=1,
        num_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, rope_theta=50000.0,
    ),
    # Exactly Kimi K2 (shared/REFERENCE.md section 1), pretraining form: plain RoPE at 4096 context.
    "k2-1t": dict(
        vocab_size=163840, hidden_size=7168, num_layers=61, first_k_dense=1, dense_ffn_size=18432,
        expert_ffn_size=2048, num_experts=384, num_experts_per_tok=8, num_shared_experts=1,
        num_expert_groups=1, topk_groups=1, routed_scaling_factor=2.827, score_func="sigmoid",
        num_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, rope_theta=50000.0,
    ),
    # DeepSeek-V3 for comparison (grouped routing, 3 dense layers, 128 heads).
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, num_layers=61, first_k_dense=3, dense_ffn_size=18432,
        expert_ffn_size=2048, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
        num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5, score_func="sigmoid",
        num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, rope_theta=10000.0,
    ),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with field overrides applied before validation."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r}: unknown preset; valid: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], "preset": name, **overrides})


# ---------------------------------------------------------------------- parameter counting
@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int
    embedding: int
    output_head: int
    attention_per_layer: int
    dense_ffn_per_layer: int
    expert: int
    router_per_layer: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Total and active-per-token parameters from the config alone; nothing is allocated.
    See the module docstring for the counting convention."""
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = (d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    o = h * cfg.v_head_dim * d
    attention = q + kv + o
    norms_per_layer = 2 * d
    dense_ffn = 3 * d * cfg.dense_ffn_size
    expert = 3 * d * cfg.expert_ffn_size
    router = cfg.num_experts * d
    shared = cfg.num_shared_experts * expert
    embedding = cfg.vocab_size * d
    head = cfg.vocab_size * d
    n_dense, n_moe = cfg.first_k_dense, cfg.num_moe_layers

    dense_layer = attention + norms_per_layer + dense_ffn
    moe_layer_total = attention + norms_per_layer + router + shared + cfg.num_experts * expert
    moe_layer_active = attention + norms_per_layer + router + shared + cfg.num_experts_per_tok * expert
    total = embedding + head + d + n_dense * dense_layer + n_moe * moe_layer_total
    active = embedding + head + d + n_dense * dense_layer + n_moe * moe_layer_active
    breakdown = {
        "embedding": embedding,
        "output_head": head,
        "attention": attention * cfg.num_layers,
        "norms": norms_per_layer * cfg.num_layers + d,
        "dense_ffn": dense_ffn * n_dense,
        "routers": router * n_moe,
        "shared_experts": shared * n_moe,
        "routed_experts": cfg.num_experts * expert * n_moe,
        "routed_experts_active": cfg.num_experts_per_tok * expert * n_moe,
    }
    return ParameterCount(
        total=total, active=active, embedding=embedding, output_head=head,
        attention_per_layer=attention, dense_ffn_per_layer=dense_ffn, expert=expert,
        router_per_layer=router, breakdown=breakdown,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per active matmul weight, the
    embedding lookup excluded, plus causal attention's score and value products."""
    pc = count_parameters(cfg)
    matmul_params = pc.active - pc.embedding
    # QK^T and AV over the causal half of the T x T square, per layer, forward 2 FLOPs per MAC.
    attn = 2 * cfg.num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6.0 * matmul_params + 3.0 * attn


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def describe(cfg: ModelConfig) -> str:
    pc = count_parameters(cfg)
    return (f"{cfg.preset or 'custom'}: {_human(pc.total)} total / {_human(pc.active)} active parameters, "
            f"{cfg.num_layers} layers ({cfg.first_k_dense} dense), {cfg.num_experts} experts "
            f"(top-{cfg.num_experts_per_tok}, {cfg.num_shared_experts} shared), d={cfg.hidden_size}")



# ---------------------------------------------------------------------- optimizer
OPTIMIZERS = ("muonclip", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    """MuonClip (shared/REFERENCE.md sections 3-4) or the AdamW baseline. The learning rate and its
    schedule are run settings (``train.lr``, ``train.schedule``); everything else about the update is here."""

    name: str = "muonclip"
    """``muonclip`` (Muon on hidden matrices + AdamW elsewhere + QK-Clip) or ``adamw`` for everything."""
    weight_decay: float = 0.1
    """Decoupled weight decay for both Muon and AdamW parameters (K2: 0.1)."""
    momentum: float = 0.95
    """Muon momentum mu."""
    nesterov: bool = True
    """Use the Nesterov form G + mu*M."""
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_dtype: str = "auto"
    """Dtype of the Newton-Schulz iteration: ``bfloat16`` (the published recipe), ``float32``, or ``auto``:
    bf16 where the hardware multiplies it natively (GPUs; CPUs with AMX, AVX512-BF16 or Arm BF16), fp32
    elsewhere, where bf16 products are emulated and far slower (``k2model.optim.resolve_ns_dtype``;
    measured: benchmarks/results/optimizer.md).
    The resolved dtype is saved with the optimizer state, so a resumed run keeps the one it started with."""
    rms_scale: float = 0.2
    """Update-RMS matching: update = rms_scale * sqrt(max(rows, cols)) * NS(M)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_exclude: tuple[str, ...] = ("embed_tokens", "lm_head")
    """Name substrings of >= 2-D parameters that stay on AdamW; 1-D parameters always do."""
    router_on_muon: bool = True
    """Train the router matrix (``mlp.gate.weight``) with Muon, as Moonlight did."""
    qk_clip: bool = True
    """Apply QK-Clip after each step (ignored by ``adamw`` unless ``qk_clip_with_adamw``)."""
    qk_clip_tau: float = 100.0
    """QK-Clip threshold tau on the per-head max pre-softmax logit (K2: 100)."""
    qk_clip_with_adamw: bool = False
    """Also clip under the AdamW baseline (for ablations)."""

    def __post_init__(self) -> None:
        need = field_checker("optimizer", self)

        need(self.name in OPTIMIZERS, "name", f"must be one of {OPTIMIZERS}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.momentum < 1, "momentum", "must lie in [0, 1)")
        need(isinstance(self.ns_steps, int) and self.ns_steps >= 1, "ns_steps", "must be a positive integer")
        need(self.ns_dtype in ("auto", "bfloat16", "float32"), "ns_dtype", "must be 'auto', 'bfloat16' or 'float32'")
        need(self.rms_scale > 0, "rms_scale", "must be > 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must lie in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must lie in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(self.qk_clip_tau > 0, "qk_clip_tau", "must be > 0")
        if isinstance(self.muon_exclude, list):
            object.__setattr__(self, "muon_exclude", tuple(self.muon_exclude))

    @property
    def uses_qk_clip(self) -> bool:
        return self.qk_clip and (self.name == "muonclip" or self.qk_clip_with_adamw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
