"""QK-Clip: the "Clip" of MuonClip (Kimi K2 report; shared/REFERENCE.md section 4).

Called once per optimizer step, AFTER the update (weight decay included; under ZeRO-1 between
``MuonClip.update()`` and ``publish()``), with the per-layer, per-head maximum pre-softmax logit S that the
step's training forwards recorded (``model.max_logits``):

- S is all-reduced with MAX over the data-parallel group, so every replica clips identically.
- Any non-finite S is rejected (ValueError naming layer and head): it means the logits overflowed, or no
  training forward recorded that layer since the last ``reset_max_logits``.
- For every head with S > tau: gamma = tau / S; the head's content query rows q^C (``q_b_proj``, or
  ``q_proj`` without a query LoRA) and content key rows k^C (``kv_b_proj``) are scaled by sqrt(gamma), its
  rotary query rows q^R by gamma. Every logit of the head, q^C.k^C + q^R.k^R, therefore scales by exactly
  gamma, and the recorded maximum becomes tau. The shared rotary key k^R (``kv_a_proj_with_mqa``) serves
  all heads and is never touched; value rows are never touched; heads at or under tau are untouched
  bit-for-bit (their rows are not written).
- Optimizer state is left alone: Muon's momentum keeps the un-clipped gradient history, as in K2 (the
  clip acts on the weights after the update, not on the update); the clip therefore reappears as long as
  the optimizer keeps pushing the logit up, and stops once it does not.

Row layouts are documented in k2model.layers. Scaling is done in fp32 and written back in the weight's
dtype. Tensor name suffixes: L layers, H heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from k2model.distributed import all_reduce_
from k2model.layers import MultiHeadLatentAttention


@dataclass
class QKClipStats:
    max_logit_per_head: torch.Tensor
    """[L, H] fp32: the (all-reduced) maximum logit each head reached in the step, before the clip."""
    max_logit_per_layer: torch.Tensor
    """[L] fp32: the maximum over the heads of each layer."""
    num_clipped_per_layer: torch.Tensor
    """[L] int64: heads clipped in each layer."""
    num_clipped: int
    """Heads clipped in the whole model."""
    max_logit: float
    """The largest logit of the step."""

    def to_metrics(self, prefix: str = "qk_clip/") -> dict[str, float]:
        """Flat scalars for a metrics logger."""
        metrics = {f"{prefix}max_logit": self.max_logit, f"{prefix}num_clipped": float(self.num_clipped)}
        per_layer = zip(self.max_logit_per_layer.tolist(), self.num_clipped_per_layer.tolist())
        for i, (s, n) in enumerate(per_layer):
            metrics[f"{prefix}layer{i}/max_logit"] = s
            metrics[f"{prefix}layer{i}/num_clipped"] = float(n)
        return metrics


def scale_weight_rows(weight: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor) -> None:
    """weight[rows] *= factors[:, None] in fp32, written back in the weight's dtype."""
    scaled = weight.index_select(0, rows).float() * factors[:, None]
    weight.index_copy_(0, rows, scaled.to(weight.dtype))


@torch.no_grad()
def qk_clip(model: nn.Module, max_logits: torch.Tensor, tau: float,
            process_group: dist.ProcessGroup | None = None,
            scale_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> QKClipStats:
    """Scale the query/key rows of every head whose max logit exceeds ``tau`` (see the module docstring).

    ``model``: anything with ``attention_layers()`` returning the MLA modules in layer order
    (``K2ForCausalLM``). ``max_logits``: [layers, heads], usually ``model.max_logits``; it is not modified.
    ``process_group``: reduce over this group; None means WORLD when torch.distributed is initialised.
    ``scale_rows(weight, rows, factors)``: how to scale rows of a weight; default in place on the weight.
    Under ZeRO-1 the trainer passes ``MuonClip.scale_rows_``, which scales the fp32 master on the rank that
    owns the weight before the optimizer publishes it (a clip of the low-precision copy alone would be
    undone by the next update of the master).
    """
    scale_rows = scale_rows or scale_weight_rows
    if tau <= 0:
        raise ValueError(f"optimizer.qk_clip_tau={tau!r}: must be > 0")
    attention: list[MultiHeadLatentAttention] = model.attention_layers()
    if max_logits.ndim != 2 or max_logits.shape[0] != len(attention):
        raise ValueError(f"max_logits has shape {tuple(max_logits.shape)}, "
                         f"expected [{len(attention)}, heads]")
    S_LH = all_reduce_(max_logits.detach().to(torch.float32, copy=True), dist.ReduceOp.MAX, process_group,
                       name="max logits")
    bad = (~torch.isfinite(S_LH)).nonzero()
    if len(bad):
        layer, head = (int(i) for i in bad[0])
        raise ValueError(
            f"QK-Clip: max logit of layer {layer} head {head} is {S_LH[layer, head].item()} "
            f"({len(bad)} non-finite entries): the attention logits overflowed, or no training forward "
            "recorded them since the last reset_max_logits() (model in eval mode?)")

    num_clipped_L = torch.zeros(len(attention), dtype=torch.int64)
    for layer, attn in enumerate(attention):
        cfg = attn.cfg
        S_H = S_LH[layer]
        if S_H.shape[0] != cfg.num_heads:
            raise ValueError(f"max_logits has {S_H.shape[0]} heads, layer {layer} has {cfg.num_heads}")
        heads = (S_H > tau).nonzero().flatten()
        num_clipped_L[layer] = len(heads)
        if not len(heads):
            continue
        gamma = tau / S_H[heads]
        sqrt_gamma = gamma.sqrt()
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        dev = S_H.device
        nope_idx, rope_idx = torch.arange(nope, device=dev), torch.arange(nope, nope + rope, device=dev)

        q_weight = (attn.q_proj if cfg.q_lora_rank is None else attn.q_b_proj).weight
        q_base = heads[:, None] * (nope + rope)
        q_rows = torch.cat([(q_base + nope_idx).flatten(), (q_base + rope_idx).flatten()])
        q_factors = torch.cat([sqrt_gamma.repeat_interleave(nope), gamma.repeat_interleave(rope)])
        scale_rows(q_weight, q_rows.to(q_weight.device), q_factors.to(q_weight.device))

        k_weight = attn.kv_b_proj.weight
        k_rows = (heads[:, None] * (nope + v) + nope_idx).flatten()
        scale_rows(k_weight, k_rows.to(k_weight.device),
                    sqrt_gamma.repeat_interleave(nope).to(k_weight.device))

    max_per_layer = S_LH.amax(dim=1)
    return QKClipStats(max_logit_per_head=S_LH, max_logit_per_layer=max_per_layer,
                       num_clipped_per_layer=num_clipped_L, num_clipped=int(num_clipped_L.sum()),
                       max_logit=float(max_per_layer.max()))
