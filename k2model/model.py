"""The Kimi K2 decoder (DeepSeek-V3 family with K2's changes), architecture only.

- Token embedding, then ``first_k_dense`` blocks with a dense SwiGLU FFN, then MoE blocks
  (k2model.moe), RMSNorm pre-norm everywhere, a final RMSNorm and an untied output head.
- Attention is multi-head latent attention with decoupled RoPE (k2model.layers).
- In training mode every forward records, per layer and head, the largest pre-softmax logit over
  causally visible positions into ``max_logits`` ([layers, heads], fp32), max-accumulated over the
  micro-batches of a step; QK-Clip (k2model.qk_clip) reads it after the step and calls
  ``reset_max_logits``. Likewise ``tokens_per_expert`` per MoE layer feeds the router-bias update.
- Parameter names follow the family's released checkpoints (``model.layers.{i}.self_attn.q_a_proj.weight``,
  ``...mlp.gate.e_score_correction_bias``, ``lm_head.weight``); routed experts are stacked per layer, and
  ``hf_expert_names`` / ``to_hf_state_dict`` map them to the per-expert names.
- Weight init is ``init_weights``: every tensor is drawn from a generator seeded by (seed, name) and,
  for stacked experts, by the global expert index, so the weights do not depend on the parallel layout,
  the device or module creation order. ``build_model`` builds on the meta device and materialises only
  the tensors the rank keeps.

Tensor name suffixes: B batch, T sequence, D width, V vocabulary, L layers, H heads, E experts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2model.config import ModelConfig
from k2model.dispatch import ExpertDispatcher
from k2model.layers import RECOMPUTE_MODES, MultiHeadLatentAttention, RMSNorm, SwiGLU, checkpointed, rope_tables
from k2model.moe import GroupedExperts, MoE, Router


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dispatcher: ExpertDispatcher | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg, dispatcher)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.dense_ffn_size)

    def forward(self, x_BTD, cos, sin, record_max_logit: bool):
        attn_out, max_logit_H = self.self_attn(self.input_layernorm(x_BTD), cos, sin, record_max_logit)
        x_BTD = x_BTD + attn_out
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD, max_logit_H


class K2Trunk(nn.Module):
    """``model.*`` in the released layout: embedding, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, dispatchers: list[ExpertDispatcher] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        moe_idx = 0
        layers = []
        for i in range(cfg.num_layers):
            dispatcher = None
            if cfg.is_moe_layer(i) and dispatchers is not None:
                dispatcher = dispatchers[moe_idx]
                moe_idx += 1
            layers.append(DecoderLayer(cfg, i, dispatcher))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class DroppedLayer(nn.Module):
    """Stands where a decoder layer of another pipeline stage would be: no parameters, so the layers this
    stage keeps have the names they have in the whole model."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.layer_idx} belongs to another pipeline stage")


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    """Cross-entropy plus the balance loss (what to backpropagate)."""
    lm_loss: torch.Tensor | None
    """Mean next-token cross-entropy alone."""
    aux_loss: torch.Tensor | None
    logits: torch.Tensor | None


class K2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatchers: list[ExpertDispatcher] | None = None):
        """``dispatchers``: one per MoE layer for expert parallelism (each decides how many experts this
        rank holds); None keeps every expert local."""
        super().__init__()
        if dispatchers is not None and len(dispatchers) != cfg.num_moe_layers:
            raise ValueError(f"need one dispatcher per MoE layer ({cfg.num_moe_layers}), got {len(dispatchers)}")
        self.cfg = cfg
        self.model = K2Trunk(cfg, dispatchers)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("max_logits", torch.full((cfg.num_layers, cfg.num_heads), float("-inf")),
                             persistent=False)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.record_max_logits: bool | None = None
        """Record max logits: None follows ``self.training``."""
        self.stage_layers = range(cfg.num_layers)
        """The decoder layers this model holds: all of them, or one pipeline stage's (``keep_stage``)."""
        self.recompute = "none"
        """What the backward recomputes (``set_recompute``)."""
        self.aux_loss_scale = 1.0
        """``stage_forward``'s factor on the balance loss it backpropagates (1 / micro-batches a step)."""
        self.stage_aux_loss = torch.zeros((), dtype=torch.float64)
        """Balance losses of ``stage_forward`` in training, summed (detached) until reset by the caller."""

    # ------------------------------------------------------------------ pipeline stages
    @property
    def is_whole(self) -> bool:
        """Whether this model holds every layer (no pipeline stage cut out of it)."""
        return self.stage_layers == range(self.cfg.num_layers)

    def keep_stage(self, layers: range) -> None:
        """Keep only the decoder layers ``layers`` (a pipeline stage), the embedding if they start at
        layer 0, the final norm and the head if they end at the last layer; the parameters kept keep their
        names."""
        if not (0 <= layers.start < layers.stop <= self.cfg.num_layers) or layers.step != 1:
            raise ValueError(f"a stage is a non-empty run of the {self.cfg.num_layers} layers, got {layers}")
        for i in range(self.cfg.num_layers):
            if i not in layers:
                self.model.layers[i] = DroppedLayer(i)
        if layers.start > 0:
            self.model.embed_tokens = None
        if layers.stop < self.cfg.num_layers:
            self.model.norm = None
            self.lm_head = None
        self.stage_layers = layers

    def stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline stage's forward: token ids [B, T] into the first stage, the residual stream
        [B, T, D] between stages, logits [B, T, V] out of the last. Its MoE layers' balance loss is
        backpropagated from here, scaled by ``aux_loss_scale`` (``attach_loss``): the pipeline
        backpropagates the language-model loss of the last stage only."""
        T = x.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if self.model.embed_tokens is not None:
            x = self.model.embed_tokens(x)
        x = self._layers(x, T)
        if self.lm_head is not None:
            x = self.lm_head(self.model.norm(x))
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux and torch.is_grad_enabled():
            aux_sum = torch.stack(aux).sum()
            self.stage_aux_loss = self.stage_aux_loss.to(aux_sum.device) + aux_sum.detach().double()
            x = attach_loss(x, aux_sum * self.aux_loss_scale)
        return x

    def set_recompute(self, mode: str) -> None:
        """What the backward recomputes (``k2model.layers.RECOMPUTE_MODES``): ``none``; ``selective``, the
        norms, SwiGLU activations with their down projections, and the MoE gating sum; ``full``, every
        decoder layer from its input. The gradients are the same."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={mode!r}: expected one of {list(RECOMPUTE_MODES)}")
        self.recompute = mode
        for module in self.modules():
            if isinstance(module, (RMSNorm, SwiGLU, GroupedExperts, MoE)):
                module.recompute = mode

    def _layers(self, x_BTD: torch.Tensor, T: int) -> torch.Tensor:
        record = self.training if self.record_max_logits is None else self.record_max_logits
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        whole_layers = self.recompute == "full" and torch.is_grad_enabled()
        for i in self.stage_layers:
            layer = self.model.layers[i]
            if whole_layers:
                x_BTD, max_logit_H = checkpointed(layer, x_BTD, cos, sin, record)
            else:
                x_BTD, max_logit_H = layer(x_BTD, cos, sin, record)
            if max_logit_H is not None:
                self.max_logits[i] = torch.maximum(self.max_logits[i], max_logit_H)
        return x_BTD

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> CausalLMOutput:
        B, T = input_ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if not self.is_whole:
            raise RuntimeError(f"this model is the pipeline stage of layers {self.stage_layers}: "
                               "call stage_forward")
        x_BTD = self._layers(self.model.embed_tokens(input_ids_BT), T)
        logits_BTV = self.lm_head(self.model.norm(x_BTD))
        if targets_BT is None:
            return CausalLMOutput(loss=None, lm_loss=None, aux_loss=None, logits=logits_BTV)
        lm_loss = lm_loss_of(logits_BTV, targets_BT)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = lm_loss + aux_loss if aux_loss is not None else lm_loss
        return CausalLMOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits_BTV)

    # ------------------------------------------------------------------ step statistics
    def owned_layers(self) -> list[DecoderLayer]:
        return [self.model.layers[i] for i in self.stage_layers]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.owned_layers() if isinstance(layer.mlp, MoE)]

    def routers(self) -> list[Router]:
        return [m.gate for m in self.moe_layers()]

    def attention_layers(self) -> list[MultiHeadLatentAttention]:
        return [layer.self_attn for layer in self.owned_layers()]

    def stage_max_logits(self) -> torch.Tensor:
        """``max_logits`` of this stage's layers, [stage layers, H] (a view; QK-Clip's input)."""
        return self.max_logits[self.stage_layers.start:self.stage_layers.stop]

    def reset_max_logits(self) -> None:
        self.max_logits.fill_(float("-inf"))

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last reset, [moe_layers, E] (this rank only)."""
        moe = self.moe_layers()
        if not moe:
            return torch.zeros(0, self.cfg.num_experts)
        return torch.stack([m.tokens_per_expert for m in moe])

    def reset_expert_load(self) -> None:
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Every buffer at its initial value (after ``to_empty``, which leaves them unset): the rotary
        tables, zero router biases and loads, no max logits recorded."""
        cos, sin = rope_tables(self.cfg, self.cfg.max_seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for router in self.routers():
            router.e_score_correction_bias.zero_()
        self.reset_max_logits()
        self.reset_expert_load()
        self.stage_aux_loss = torch.zeros((), dtype=torch.float64)


def lm_loss_of(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))


class _AttachLoss(torch.autograd.Function):
    """Identity on ``x``; in the backward, ``loss`` gets gradient 1 (as if added to the loss being
    backpropagated) while ``x`` passes its gradient through."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        return grad_x, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_x.device)


def attach_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``x``, with ``loss`` riding on it: whatever backpropagates through ``x`` backpropagates ``loss``
    too, exactly as if it had been added to the final loss (a stage's balance loss in a pipeline)."""
    return _AttachLoss.apply(x, loss)


# ---------------------------------------------------------------------- init
def _seed_for(seed: int, name: str, index: int = -1) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: K2ForCausalLM, seed: int = 0) -> None:
    """Normal(0, init_std) for every matrix and embedding, ones for norms, zero router biases, and every
    buffer at its initial value. Each tensor is drawn on the CPU from a generator seeded by (seed, name)
    and copied into the parameter wherever it lives, in the parameter's dtype (fp32 values, rounded once);
    stacked expert tensors are drawn per *global* expert (offset by the rank's first local expert), one
    expert at a time. So the weights do not depend on the layout, the device or module creation order, and
    the CPU holds one tensor (one expert) of them at a time."""
    std = model.cfg.init_std
    offsets = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            offsets[f"{name}.experts."] = module.dispatcher.local_expert_offset
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if p.ndim == 1:
            p.fill_(1.0)  # RMSNorm weights are the only 1-D parameters
            continue
        prefix = name.rsplit(".", 1)[0] + "."
        if prefix in offsets:
            base = offsets[prefix]
            for j in range(p.shape[0]):
                gen = torch.Generator().manual_seed(_seed_for(seed, name, base + j))
                p[j].copy_(torch.randn(p.shape[1:], generator=gen) * std)
        else:
            gen = torch.Generator().manual_seed(_seed_for(seed, name))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.reset_buffers()


def build_model(cfg: ModelConfig, seed: int = 0, dispatchers: list[ExpertDispatcher] | None = None,
                device: torch.device | str | None = None, *, stage_layers: range | None = None,
                param_dtype: torch.dtype = torch.float32) -> K2ForCausalLM:
    """The model, initialised by ``init_weights``, on ``device`` (default CPU) with parameters in
    ``param_dtype``. It is built on the meta device first, cut to ``stage_layers`` (a pipeline stage,
    ``K2ForCausalLM.keep_stage``) when given, and only then materialised, tensor by tensor: no process
    ever holds a parameter its rank does not keep, nor the whole model in fp32 on its way to a device."""
    with torch.device("meta"):
        model = K2ForCausalLM(cfg, dispatchers)
    if stage_layers is not None:
        model.keep_stage(stage_layers)
    for p in model.parameters():
        if p.dtype != param_dtype:
            p.data = p.data.to(param_dtype)  # still on the meta device: costs nothing
    model.to_empty(device=torch.device("cpu") if device is None else device)
    init_weights(model, seed)
    return model


# ---------------------------------------------------------------------- released-checkpoint names
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def hf_expert_names(stacked_name: str, num_local_experts: int, local_expert_offset: int = 0) -> list[str]:
    """Names of the per-expert tensors that one stacked tensor holds, in stack order.

    ``model.layers.3.mlp.experts.up_proj`` with 4 local experts starting at global expert 8 gives
    ``model.layers.3.mlp.experts.8.up_proj.weight`` ... ``...experts.11.up_proj.weight``."""
    prefix, proj = stacked_name.rsplit(".", 1)
    if proj not in EXPERT_PROJECTIONS or not prefix.endswith(".experts"):
        raise ValueError(f"{stacked_name!r} is not a stacked expert tensor name")
    return [f"{prefix}.{local_expert_offset + j}.{proj}.weight" for j in range(num_local_experts)]


def is_stacked_expert(name: str) -> bool:
    prefix, _, proj = name.rpartition(".")
    return proj in EXPERT_PROJECTIONS and prefix.endswith(".experts")


def to_hf_state_dict(model: K2ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the released per-expert layout for this rank's parameters and the
    router-bias buffers; stacked experts are split into views, nothing is copied."""
    offsets = {f"{n}.experts": m.dispatcher.local_expert_offset
               for n, m in model.named_modules() if isinstance(m, MoE)}
    for name, tensor in model.state_dict().items():
        if is_stacked_expert(name):
            prefix = name.rsplit(".", 1)[0]
            names = hf_expert_names(name, tensor.shape[0], offsets[prefix])
            yield from zip(names, tensor.unbind(0))
        else:
            yield name, tensor
