"""Bytes a forward keeps for its backward (activations), per token, from the model config alone.

Counted from what k2model's own forward saves, tensor by tensor (tests/k2model/test_activations.py holds
the sums to saved-tensor hooks on real forwards, within 25%). Three dtype policies:

- ``fp32``: fp32 parameters, no autocast (a CPU run): matmul inputs and outputs in fp32 (a = 4 bytes),
  the residual stream fp32 (r = 4);
- ``bf16``: bf16 parameters (``train.param_dtype=bfloat16``): a = 2, r = 2;
- ``autocast``: fp32 parameters under bf16 autocast (a GPU run with fp32 parameters): a = 2, r = 4, and
  every linear casts its fp32 input (and its weight, once per forward) to bf16 and keeps the cast.

Per token of one decoder layer, with D the width, Dq/Dkv the query/key-value latent ranks, R the rotary
width, H heads of query/key width Q = nope + rope and value width V, F the dense FFN width, E experts,
K of them chosen, Fe the expert width and Fs the shared experts' width (recompute ``none``):

- each RMSNorm of width W keeps its fp32 input, its normalised fp32 output and one fp32 scale: 8W + 4
  (the kv norm's input is a view of the whole kv_a output under ``fp32``: 4(Dkv + R) for 4 Dkv);
- the linears keep their inputs: the attention norm's output a D (twice under autocast, once per
  projection that casts it), the query latent a Dq, the kv latent a Dkv, the attention output a H V;
- attention (the flash kernels; ``layers.attention``) keeps q, k, the padded v and the output, a H Q each,
  and a fp32 log-sum-exp per head: 4 a H Q + 4 H;
- a dense layer: its norm's output a D (twice under autocast) and SwiGLU's gate, up, activation and
  product: 4 a F;
- an MoE layer: the norm's output (fp32 for the router: 4 D; and a D, twice under autocast, for the shared
  expert under ``bf16``/``autocast``), the router's scores 4 E (8 E under ``bf16``), top-k ids, weights
  and sums 12 K + 9, the dispatch order and its inverse 16 K, the dispatched rows a K D, the experts'
  SwiGLU 4 a K Fe, the gating sum's fp32 copy of the expert outputs and weights 4 K D + 4 K, the shared
  expert's SwiGLU 4 a Fs;
- the head (last stage): the final norm 8 D + 4 and its output a D, the log-softmax 4 V (fp32) and the
  targets 8; the embedding (first stage): the token ids 8.

``selective`` keeps only each RMSNorm's input (r D for the residual norms, a Dq and a (Dkv + R) for the
latent ones) instead of its internals, two of SwiGLU's four (gate and up: 2 a F, 2 a K Fe, 2 a Fs) and the
expert outputs in their own dtype for the gating sum (a K D). ``full`` keeps each layer's input (r D)
and, while the backward recomputes one layer, that layer's ``none`` activations.

Under ``autocast`` every matmul weight of the stage (not the router, which runs in fp32, nor the norms or
the embedding) is also kept as a bf16 cast for each micro-batch in flight, except those cast inside a
recomputed piece: ``weight_cast_bytes``. At K2's scale that is gigabytes per micro-batch: bf16 parameters
(no casts) are the way there.
"""

from __future__ import annotations

from k2model.config import ModelConfig, count_parameters

POLICIES = ("fp32", "bf16", "autocast")


def policy_of(param_dtype: str, device_type: str) -> str:
    """The dtype policy a run has: bf16 parameters, or fp32 ones under autocast (a GPU) or not (a CPU)."""
    if param_dtype == "bfloat16":
        return "bf16"
    return "autocast" if device_type == "cuda" else "fp32"


def _sizes(policy: str) -> tuple[int, int, int]:
    """(a, r, casts): bytes of matmul activations, of the residual stream, and how many bf16 copies of an
    fp32 input each extra linear consuming it adds (1 under autocast, else 0)."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {list(POLICIES)}")
    return {"fp32": (4, 4, 0), "bf16": (2, 2, 0), "autocast": (2, 4, 1)}[policy]


def layer_bytes_per_token(cfg: ModelConfig, moe: bool, policy: str, recompute: str = "none") -> float:
    """Bytes a decoder layer keeps per token (see the module docstring); ``full`` recomputation: the layer's
    input only (its ``none`` bytes are held during its own recomputation: ``recompute_transient``)."""
    a, r, extra = _sizes(policy)
    if recompute == "full":
        return float(r * cfg.hidden_size)
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute={recompute!r}: expected none, selective or full")
    selective = recompute == "selective"
    D, R, H = cfg.hidden_size, cfg.qk_rope_head_dim, cfg.num_heads
    Q, V, Dkv = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def norm(width: int, input_bytes: float, internals: float) -> float:
        return input_bytes if selective else internals

    # Attention block.
    total = norm(D, r * D, 8 * D + 4)
    query_consumers = 1 if cfg.q_lora_rank is not None else 2  # kv_a, and q_a or q_proj
    total += a * D * (1 + extra * query_consumers)
    if cfg.q_lora_rank is not None:
        Dq = cfg.q_lora_rank
        total += norm(Dq, a * Dq, 8 * Dq + 4) + a * Dq
    kv_input = 4 * (Dkv + R) if policy == "fp32" else 4 * Dkv
    total += norm(Dkv, a * (Dkv + R), kv_input + 4 + 4 * Dkv) + a * Dkv
    total += 4 * a * H * Q + 4 * H + a * H * V
    # Feed-forward block.
    total += norm(D, r * D, 8 * D + 4)
    swiglu = 2 if selective else 4
    if not moe:
        return total + a * D * (1 + extra) + swiglu * a * cfg.dense_ffn_size
    K, E = cfg.num_experts_per_tok, cfg.num_experts
    if policy == "fp32":
        total += 4 * D  # one tensor serves the router, the shared expert and the dispatch
    else:
        total += 4 * D + a * D * (1 + extra) * (1 if cfg.num_shared_experts else 0)
    total += 4 * E * (2 if policy == "bf16" else 1) + 12 * K + 9
    total += 16 * K + a * K * D + swiglu * a * K * cfg.expert_ffn_size
    total += (a * K * D if selective else 4 * K * D) + 4 * K
    total += swiglu * a * cfg.expert_ffn_size * cfg.num_shared_experts
    return float(total)


def head_bytes_per_token(cfg: ModelConfig, policy: str, recompute: str = "none") -> float:
    """The last stage's final norm, the head's input and the loss (fp32 log-softmax over the vocabulary)."""
    a, r, _ = _sizes(policy)
    D = cfg.hidden_size
    norm = r * D if recompute == "selective" else 8 * D + 4
    return float(norm + a * D + 4 * cfg.vocab_size + 8)


EMBEDDING_BYTES_PER_TOKEN = 8.0
"""The first stage's token ids (int64), kept by the embedding lookup."""


def logits_transient_per_token(cfg: ModelConfig, policy: str) -> float:
    """What the loss holds briefly beyond the kept log-softmax: the logits and their fp32 copy (forward),
    or the fp32 gradient and its cast (backward)."""
    a, _, _ = _sizes(policy)
    return float((a + 4) * cfg.vocab_size)


def weight_cast_bytes(cfg: ModelConfig, layers: range, local_experts: int, policy: str, last_stage: bool,
                      recompute: str = "none") -> int:
    """Bytes of the bf16 casts of the stage's matmul weights that one micro-batch's forward keeps under
    autocast (0 under the other policies). A cast made inside a recomputed piece is not kept: under
    ``selective`` the SwiGLU down projections' (a third of each FFN's weights), under ``full`` every
    layer's; the head's always."""
    if policy != "autocast":
        return 0
    pc = count_parameters(cfg)
    ffn_share = {"none": 1.0, "selective": 2 / 3}.get(recompute, 0.0)
    total = 0.0
    for i in layers if recompute != "full" else ():
        total += pc.attention_per_layer
        if cfg.is_moe_layer(i):
            total += (cfg.num_shared_experts + local_experts) * pc.expert * ffn_share
        else:
            total += pc.dense_ffn_per_layer * ffn_share
    if last_stage:
        total += pc.output_head
    return int(2 * total)
