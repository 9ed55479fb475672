"""Mixture-of-experts layer: sigmoid router with auxiliary-loss-free balancing, optional group-restricted
routing, a shared expert, and routed SwiGLU experts computed as grouped matmuls.

Routing (shared/REFERENCE.md sections 1-2):
- scores s = sigmoid(x W_gate^T) (or softmax), in fp32.
- choice: top-k of s + b, where b is ``e_score_correction_bias``, a buffer no optimizer touches; with
  groups, first keep the ``topk_groups`` groups whose top-2 biased scores sum highest.
- weights: the *unbiased* scores of the chosen experts, normalised over the k, times
  ``routed_scaling_factor``. The bias changes which experts are chosen, never how much they count.
- after each step the trainer calls ``update_router_bias`` with the load summed over every rank and
  micro-batch: b_i += rate * sign(mean_load - load_i).
- optional sequence-wise balance loss alpha * sum_i f_i P_i (DeepSeek-V3).

The routed experts of one layer are stored stacked, ``gate_proj``/``up_proj`` as ``[E_local, F, D]`` and
``down_proj`` as ``[E_local, D, F]``, and run as one grouped matmul per projection over rows sorted by
expert; ``k2model.model.hf_expert_names`` maps them to the per-expert names of released checkpoints.

Tensor name suffixes: N tokens, K top-k, D width, F expert width, E experts, M dispatched rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2model.config import ModelConfig
from k2model.dispatch import ExpertDispatcher, LocalDispatcher
from k2model.layers import SwiGLU, checkpointed, recomputing


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward rejects
    expanded gradients such as the one ``sum()`` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_supported(x: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    # The kernels need every row stride to be a multiple of 16 bytes.
    if any(dim * x.element_size() % 16 for dim in w_EOI.shape[1:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.device.type == "cuda" and x.dtype == torch.bfloat16


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x_MI`` (rows sorted by expert, ``tokens_per_expert_E[e]`` of them) times
    ``w_EOI[e]^T``, for all experts in one grouped kernel (no Python loop over experts)."""
    if x_MI.shape[0] == 0:
        # No rows on this rank: keep the graph connected to the input and the weights so every expert
        # parameter gets a (zero) gradient and the backward all-to-all runs on every rank.
        return x_MI.new_zeros(0, w_EOI.shape[1]) + 0 * (w_EOI.sum() + x_MI.sum())
    if w_EOI.dtype != x_MI.dtype and torch.is_autocast_enabled(x_MI.device.type):
        # What autocast does for a linear layer (grouped_mm may not be on its list): fp32 weights are
        # cast to the activations' dtype; gradients still reach the fp32 parameter.
        w_EOI = w_EOI.to(x_MI.dtype)
    if _grouped_mm_supported(x_MI, w_EOI):
        offsets = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x_MI, w_EOI.transpose(1, 2), offs=offsets))
    return _padded_linear(x_MI, w_EOI, tokens_per_expert_E)


def _padded_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Fallback where grouped_mm does not run: scatter rows into a [E, capacity, I] buffer, one bmm,
    gather back. Costs E * max_count rows of work."""
    E = w_EOI.shape[0]
    counts = tokens_per_expert_E.to(torch.long)
    capacity = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x_MI.device), counts)
    slot_of_row = torch.arange(x_MI.shape[0], device=x_MI.device) - starts[expert_of_row]
    flat_index = expert_of_row * capacity + slot_of_row
    padded = x_MI.new_zeros(E * capacity, x_MI.shape[1]).index_copy(0, flat_index, x_MI)
    out = torch.bmm(padded.view(E, capacity, -1), w_EOI.transpose(1, 2))
    return out.reshape(E * capacity, -1).index_select(0, flat_index)


class GroupedExperts(nn.Module):
    """The routed SwiGLU experts held by this rank, stacked."""

    def __init__(self, num_local_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_local_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num_local_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, dim, hidden))

    @property
    def num_local_experts(self) -> int:
        return self.gate_proj.shape[0]

    recompute = "none"

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        gate = grouped_linear(x_MD, self.gate_proj, tokens_per_expert_E)
        up = grouped_linear(x_MD, self.up_proj, tokens_per_expert_E)
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpointed(self._activate_down, gate, up, tokens_per_expert_E)
        return self._activate_down(gate, up, tokens_per_expert_E)

    def _activate_down(self, gate_MF: torch.Tensor, up_MF: torch.Tensor, tokens_per_expert_E: torch.Tensor
                       ) -> torch.Tensor:
        return grouped_linear(F.silu(gate_MF) * up_MF, self.down_proj, tokens_per_expert_E)

    def forward_reference(self, x_ND: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert applied to rows: the slow per-expert path, kept for tests."""
        h = F.silu(x_ND @ self.gate_proj[expert].T) * (x_ND @ self.up_proj[expert].T)
        return h @ self.down_proj[expert].T


class Router(nn.Module):
    """The ``gate`` of the DeepSeek-V3 family: expert scores and the selection bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # Chooses experts, never weights them; changed only by update_router_bias; kept in fp32.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        """fp32 scores, under autocast too (which would run the linear in bf16): a bf16 logit moves the
        top-k choice and the gating weights (DeepSeek-V3 gates in fp32; the cost is one small matmul)."""
        with torch.autocast(x_ND.device.type, enabled=False):
            logits = F.linear(x_ND.float(), self.weight.float())
        return logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids from the biased scores, with group restriction when configured."""
        cfg = self.cfg
        biased = scores_NE.detach() + self.e_score_correction_bias
        if cfg.num_expert_groups > 1:
            N = biased.shape[0]
            grouped = biased.view(N, cfg.num_expert_groups, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            kept_groups = group_scores.topk(cfg.topk_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, -1)
        return biased.topk(cfg.num_experts_per_tok, dim=-1).indices

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores_NE = self.scores(x_ND)
        topk_ids_NK = self.select(scores_NE)
        weights_NK = scores_NE.gather(1, topk_ids_NK)
        if self.cfg.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return topk_ids_NK, weights_NK * self.cfg.routed_scaling_factor, scores_NE


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences:
    f_i = E/(K T) * (tokens of the sequence routed to i), P_i = mean over the sequence of the
    normalised scores s_i / sum_j s_j."""
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    counts_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, topk_ids_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device))
    f_BE = counts_BE * (E / (K * T))
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return alpha * (f_BE * p_BE).sum(-1).mean()


def _gating_sum(y_NKD: torch.Tensor, weights_NK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_k weight_k * y_k in fp32 (an fp32 copy of every expert output is kept for its backward, which
    selective recomputation avoids), returned in ``dtype``."""
    return (y_NKD.float() * weights_NK.unsqueeze(-1)).sum(1).to(dtype)


class MoE(nn.Module):
    """shared_experts(x) + sum_k weight_k * expert_k(x)."""

    recompute = "none"

    def __init__(self, cfg: ModelConfig, dispatcher: ExpertDispatcher | None = None):
        super().__init__()
        self.cfg = cfg
        self.dispatcher = dispatcher or LocalDispatcher(cfg.num_experts)
        self.gate = Router(cfg)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, cfg.hidden_size, cfg.expert_ffn_size)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.expert_ffn_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        # Tokens routed to each (global) expert since the last reset; the trainer sums it over ranks.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def set_dispatcher(self, dispatcher: ExpertDispatcher) -> None:
        if dispatcher.num_local_experts != self.experts.num_local_experts:
            raise ValueError(f"dispatcher serves {dispatcher.num_local_experts} local experts, the layer holds "
                             f"{self.experts.num_local_experts}")
        self.dispatcher = dispatcher

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        topk_ids_NK, weights_NK, scores_NE = self.gate(x_ND)
        if not recomputing():  # a checkpoint's recomputation in the backward routes the same tokens again
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(topk_ids_NK.reshape(-1), minlength=self.cfg.num_experts)
        if self.training and self.cfg.seq_aux_loss_alpha > 0:
            self.aux_loss = sequence_balance_loss(scores_NE.view(B, T, -1), topk_ids_NK.view(B, T, -1),
                                                  self.cfg.seq_aux_loss_alpha)
        else:
            self.aux_loss = None

        x_experts_ND = x_ND
        if torch.is_autocast_enabled(x_ND.device.type):
            # The experts run in autocast's dtype: cast once, before the exchange, so the all-to-all payload,
            # the rows scattered to experts and all three grouped matmuls are bf16 (grouped_linear casts the
            # fp32 weights, whose gradients stay fp32).
            x_experts_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        x_MD, tokens_per_local_expert, handle = self.dispatcher.dispatch(x_experts_ND, topk_ids_NK)
        y_MD = self.experts(x_MD, tokens_per_local_expert)
        y_NKD = self.dispatcher.combine(y_MD, handle)
        if self.recompute == "selective" and torch.is_grad_enabled():
            out_ND = checkpointed(_gating_sum, y_NKD, weights_NK, x_ND.dtype)
        else:
            out_ND = _gating_sum(y_NKD, weights_NK, x_ND.dtype)
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        return out_ND.view(B, T, D)

    def forward_reference(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Per-token loop over the chosen experts (all experts local): the slow reference for tests."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        topk_ids_NK, weights_NK, _ = self.gate(x_ND)
        rows = []
        for n in range(x_ND.shape[0]):
            acc = torch.zeros(D, dtype=x_ND.dtype)
            for k in range(topk_ids_NK.shape[1]):
                e = int(topk_ids_NK[n, k])
                acc = acc + weights_NK[n, k].to(x_ND.dtype) * self.experts.forward_reference(x_ND[n:n + 1], e)[0]
            if self.shared_experts is not None:
                acc = acc + self.shared_experts(x_ND[n:n + 1])[0]
            rows.append(acc)
        return torch.stack(rows).view(B, T, D)


@torch.no_grad()
def update_router_bias(routers: list[Router], tokens_per_expert_LE: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower that
    of over-loaded ones by ``rate``. ``tokens_per_expert_LE`` must be the load summed over every rank and
    micro-batch of the step, so every replica's biases stay identical."""
    if len(routers) != tokens_per_expert_LE.shape[0]:
        raise ValueError(f"{len(routers)} routers but load for {tokens_per_expert_LE.shape[0]} layers")
    for router, load_E in zip(routers, tokens_per_expert_LE):
        load_E = load_E.to(router.e_score_correction_bias.device, torch.float32)
        router.e_score_correction_bias += rate * torch.sign(load_E.mean() - load_E)
