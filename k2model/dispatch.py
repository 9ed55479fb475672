"""Expert dispatch: how the (token, expert) pairs chosen by the router reach the experts and come back.

The MoE layer's math never changes with the parallel layout; it talks to one small interface:

- ``dispatch(x_ND, topk_ids_NK)`` returns the token rows this rank's experts must process, sorted by
  local expert, the number of rows per local expert, and a handle;
- ``combine(y_MD, handle)`` returns, for every (token, k) slot of the caller, the expert's output, as
  ``[N, K, D]``.

``LocalDispatcher`` keeps everything in-process (all experts local). ``AllToAllDispatcher`` is the
expert-parallel implementation: the experts are split evenly over the ranks of a process group that is
injected from outside (the only collective in model code), and rows travel with ``all_to_all_single``
(uneven splits) forward and back, with autograd through both exchanges.

Tensor name suffixes: N tokens, K top-k, D width, M rows sent to local experts, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchHandle:
    order_NK: torch.Tensor
    """Permutation that sorted the flat (token, k) slots by destination expert."""
    num_tokens: int
    top_k: int
    # Expert-parallel bookkeeping (unused by the local dispatcher).
    send_counts: list[int] | None = None
    recv_counts: list[int] | None = None
    recv_order: torch.Tensor | None = None


class ExpertDispatcher:
    """Interface; see the module docstring."""

    num_experts: int
    num_local_experts: int
    local_expert_offset: int

    def dispatch(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        raise NotImplementedError

    def combine(self, y_MD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        raise NotImplementedError


def sort_by_expert(topk_ids_NK: torch.Tensor) -> torch.Tensor:
    """Stable order of the flat (token, k) slots by expert id: ties keep token order."""
    return torch.argsort(topk_ids_NK.reshape(-1), stable=True)


class LocalDispatcher(ExpertDispatcher):
    """All experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.local_expert_offset = 0

    def dispatch(self, x_ND, topk_ids_NK):
        N, K = topk_ids_NK.shape
        order = sort_by_expert(topk_ids_NK)
        x_MD = x_ND.index_select(0, order // K)
        tokens_per_expert = torch.bincount(topk_ids_NK.reshape(-1), minlength=self.num_experts)
        return x_MD, tokens_per_expert, DispatchHandle(order_NK=order, num_tokens=N, top_k=K)

    def combine(self, y_MD, handle):
        # Undo the sort: slot order[i] received row i.
        inverse = torch.empty_like(handle.order_NK)
        inverse[handle.order_NK] = torch.arange(handle.order_NK.numel(), device=inverse.device)
        return y_MD.index_select(0, inverse).view(handle.num_tokens, handle.top_k, -1)
