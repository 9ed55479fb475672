"""Building blocks: RMSNorm, rotary embeddings (plain and YaRN), SwiGLU, and multi-head latent attention.

Multi-head latent attention (MLA, DeepSeek-V2/V3; shared/REFERENCE.md section 1):
- queries: ``q_a_proj`` (D -> q_lora_rank), ``q_a_layernorm``, ``q_b_proj`` (q_lora_rank -> H * (nope + rope));
  or one ``q_proj`` when ``q_lora_rank`` is None.
- keys/values: ``kv_a_proj_with_mqa`` (D -> kv_lora_rank + rope) gives the latent and the ONE rotary key
  shared by all heads; ``kv_a_layernorm`` then ``kv_b_proj`` (kv_lora_rank -> H * (nope + v)) give the
  per-head content keys and values.
- score scale 1/sqrt(nope + rope) (times YaRN's mscale^2 when rope scaling is on).

Row layouts that QK-Clip scales (k2model.qk_clip):
- ``q_b_proj.weight`` (or ``q_proj.weight``) rows: head h owns rows ``[h*(nope+rope), (h+1)*(nope+rope))``,
  the first ``nope`` of them q^C, the last ``rope`` of them q^R.
- ``kv_b_proj.weight`` rows: head h owns rows ``[h*(nope+v), (h+1)*(nope+v))``, the first ``nope`` of them
  k^C, the last ``v`` of them the values.
- ``kv_a_proj_with_mqa.weight`` rows ``[kv_lora_rank, kv_lora_rank + rope)`` are the shared rotary key k^R.

Rotary convention: the rope dimensions are read as interleaved pairs (x[2i], x[2i+1]) rotated by
frequency i, the layout of the DeepSeek-V3 family's released weights, so exported weights need no
permutation.

Tensor name suffixes: B batch, T sequence, D model width, H heads, R rope dim, C latent rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from k2model.config import ModelConfig, RopeScaling

# ---------------------------------------------------------------------- recomputation
RECOMPUTE_MODES = ("none", "selective", "full")
"""What the backward recomputes instead of keeping (``K2ForCausalLM.set_recompute``): nothing; the cheap,
memory-heavy pieces (every RMSNorm, the SwiGLU activation with its down projection in the dense FFN, the
shared and the routed experts, and the MoE's fp32 gating sum); or each whole decoder layer from its input."""

_recomputing = 0


class _Recomputing:
    """Context of a checkpoint's recomputation in the backward: statistics are not recorded again."""

    def __enter__(self) -> None:
        global _recomputing
        _recomputing += 1

    def __exit__(self, *exc) -> None:
        global _recomputing
        _recomputing -= 1


def recomputing() -> bool:
    """Whether the code runs as a checkpoint's recomputation (the forward already recorded the step's max
    logits and expert loads; they must not be recorded twice)."""
    return _recomputing > 0


def checkpointed(fn, *args):
    """``fn(*args)``, keeping only ``args`` for the backward and running ``fn`` again there
    (``torch.utils.checkpoint``, non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _Recomputing()))


class RMSNorm(nn.Module):
    recompute = "none"

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpointed(self._normalise, x)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the small-variance directions.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense FFN and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    recompute = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpointed(self._activate_down, gate, up)
        return self._activate_down(gate, up)

    def _activate_down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(gate) * up)


# ---------------------------------------------------------------------- rotary embeddings
def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary pairs and the cos/sin magnitude (1 without YaRN)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None or scaling.factor == 1.0:
        return inv_freq.float(), 1.0
    # YaRN: keep high frequencies, interpolate low ones by `factor`, blend linearly in between.
    low = max(math.floor(_yarn_correction_dim(scaling.beta_fast, dim, theta,
                                              scaling.original_max_position_embeddings)), 0)
    high = min(math.ceil(_yarn_correction_dim(scaling.beta_slow, dim, theta,
                                              scaling.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    inv_freq = (inv_freq / scaling.factor) * (1 - extrapolate) + inv_freq * extrapolate
    # cos/sin magnitude; with mscale == mscale_all_dim it is 1 and the whole temperature lands in the
    # softmax scale (softmax_scale below).
    magnitude = _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return inv_freq.float(), magnitude


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        scale *= _yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def rope_tables(cfg: ModelConfig, seq_len: int, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [T, R/2] in fp32."""
    inv_freq, magnitude = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    positions = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    cos, sin = angles.cos() * magnitude, angles.sin() * magnitude
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: [..., T, R]; cos/sin: [T, R/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos_TR - odd * sin_TR, even * sin_TR + odd * cos_TR), dim=-1)
    return out.flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------- attention
@torch.no_grad()
def causal_max_logit_per_head(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, scale: float,
                              block_size: int) -> torch.Tensor:
    """The largest pre-softmax logit per head over causally visible (query, key) pairs of the batch,
    in fp32. Queries are taken in blocks so the extra memory is O(B * H * block * T), never T x T.

    Under autocast too: the products are fp32 of the q and k attention used (bf16 under autocast), never
    rounded to bf16, since QK-Clip compares them with its threshold. On CUDA, bf16 inputs run on TF32
    tensor cores, exact for bf16 values (8 significant bits fit TF32's 11), accumulating in fp32."""
    with torch.autocast(q_BHTd.device.type, enabled=False), \
            _tf32_matmul(q_BHTd.is_cuda and q_BHTd.dtype == k_BHTd.dtype == torch.bfloat16):
        return _causal_max_logit(q_BHTd.float(), k_BHTd.float(), scale, block_size)


@contextlib.contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or saved
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _causal_max_logit(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    T = q.shape[2]
    result_H = torch.full((q.shape[1],), float("-inf"), device=q.device)
    future = torch.triu(torch.ones(block_size, block_size, dtype=torch.bool, device=q.device), diagonal=1)
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        q_block = q[:, :, start:end]
        # Keys before the block are visible to all of its queries: no mask. Keys after the block's last
        # query are visible to none: never computed. Only the diagonal square needs the causal mask.
        if start > 0:
            past = torch.matmul(q_block, k[:, :, :start].transpose(-1, -2))
            result_H = torch.maximum(result_H, past.amax(dim=(0, 2, 3)))
        diagonal = torch.matmul(q_block, k[:, :, start:end].transpose(-1, -2))
        diagonal.masked_fill_(future[: end - start, : end - start], float("-inf"))
        result_H = torch.maximum(result_H, diagonal.amax(dim=(0, 2, 3)))
    return result_H * scale


def attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTv: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention through ``scaled_dot_product_attention``. MLA's values are narrower than its
    queries and keys (``v_head_dim`` < ``qk_nope + qk_rope``), which the flash kernels (CUDA's and the CPU
    one) refuse, so torch would fall back to the math kernel and keep every [T, T] probability matrix for
    the backward. The values are zero-padded to the query width instead, and the output cut back: the same
    result (the padding's output columns are zero), with the flash kernels' O(T) saved state (q, k, v, the
    output and the log-sum-exp per row)."""
    width = v_BHTv.shape[-1]
    if width != q_BHTd.shape[-1]:
        v_BHTv = F.pad(v_BHTv, (0, q_BHTd.shape[-1] - width))
    out = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTv, is_causal=True, scale=scale)
    return out[..., :width]


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with decoupled RoPE. See the module docstring for the projection and row layouts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.scale = softmax_scale(cfg)

    def query_key_value(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q [B,H,T,nope+rope], k [B,H,T,nope+rope] and v [B,H,T,v], RoPE applied."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, nope, rope = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTd = q.view(B, T, H, nope + rope).transpose(1, 2)
        q_nope, q_rope = q_BHTd.split([nope, rope], dim=-1)

        latent_and_rope = self.kv_a_proj_with_mqa(x_BTD)
        latent_BTC, k_rope_BTR = latent_and_rope.split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent_BTC)).view(B, T, H, nope + cfg.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([nope, cfg.v_head_dim], dim=-1)

        q_rope = apply_rope(q_rope, cos, sin)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), cos, sin)
        q_BHTd = torch.cat([q_nope, q_rope], dim=-1)
        k_BHTd = torch.cat([k_nope, k_rope_B1TR.expand(B, H, T, rope)], dim=-1)
        return q_BHTd, k_BHTd, v

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                record_max_logit: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x_BTD.shape
        q, k, v = self.query_key_value(x_BTD, cos, sin)
        max_logit_H = None
        if record_max_logit and not recomputing():
            max_logit_H = causal_max_logit_per_head(q.detach(), k.detach(), self.scale, self.cfg.attn_block_size)
        out_BHTd = attention(q, k, v, self.scale)
        out = out_BHTd.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), max_logit_H
