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
import torch.distributed as dist

from k2model.distributed import all_to_all_autograd, all_to_all_single_


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
    received_MD: torch.Tensor | None = None
    """The rows as received, before the local sort (autograd anchor when this rank received none)."""


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


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[order[i]] = i``: gathering with it undoes a gather with ``order``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class LocalDispatcher(ExpertDispatcher):
    """All experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.local_expert_offset = 0

    def dispatch(self, x_ND, topk_ids_NK):
        N, K = topk_ids_NK.shape
        order = sort_by_expert(topk_ids_NK)
        x_MD = _rows_in_slot_order(x_ND, order, K)
        tokens_per_expert = torch.bincount(topk_ids_NK.reshape(-1), minlength=self.num_experts)
        return x_MD, tokens_per_expert, DispatchHandle(order_NK=order, num_tokens=N, top_k=K)

    def combine(self, y_MD, handle):
        return _unsort_slots(y_MD, handle)


def _rows_in_slot_order(x_ND: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """Row i is the token of flat (token, k) slot ``order[i]``."""
    return x_ND.index_select(0, order // top_k)


def _unsort_slots(y_MD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Undo the slot sort: slot ``order[i]`` gets row i; returns ``[N, K, D]``."""
    return y_MD.index_select(0, invert_permutation(handle.order_NK)).view(
        handle.num_tokens, handle.top_k, y_MD.shape[-1])


class _AnchorGrad(torch.autograd.Function):
    """Identity on ``y`` whose backward also hands a zero gradient to ``anchor``.

    Every rank of the group must run the backward of the dispatch all-to-all. A rank that received no
    rows gets expert outputs that do not depend on the received (empty) rows, so autograd would never
    reach that exchange there and the other ranks would wait for it forever; this link keeps it in the
    graph. It is only applied to empty tensors, so it costs nothing."""

    @staticmethod
    def forward(ctx, y, anchor):
        ctx.anchor_shape = anchor.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.anchor_shape)


class AllToAllDispatcher(ExpertDispatcher):
    """Expert parallelism: the experts are split evenly over the ranks of ``ep_group``; group rank r
    holds global experts ``[r * E / ep, (r + 1) * E / ep)``.

    ``dispatch``:
    1. sort the caller's (token, k) slots by global expert, so the rows bound for each rank form one
       block, grouped inside it by that rank's local experts;
    2. exchange the per-expert row counts (one small ``all_to_all_single``): each rank learns how many
       rows every source sends to each of its local experts, which is also the local expert of every row
       it will receive (rows arrive source-major, expert-minor), so expert ids need not travel;
    3. exchange the rows with uneven splits (differentiable ``all_to_all_single``);
    4. stable-sort the received rows by local expert (rows of one expert keep source-rank order).

    ``combine`` undoes 4, 3 (splits swapped) and 1. Gradients flow through both exchanges, so the
    backward pass runs two all-to-alls per layer in reverse order; every rank of the group must call
    ``dispatch``/``combine`` (and backward) the same number of times, with any number of tokens
    including none.
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs torch.distributed to be initialised first")
        group = ep_group if ep_group is not None else dist.group.WORLD
        ep_size = dist.get_world_size(group)
        ep_rank = dist.get_rank(group)
        if ep_rank < 0:
            raise ValueError(f"global rank {dist.get_rank()} is not a member of the expert-parallel group")
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size "
                             f"{ep_size}")
        self.ep_group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.local_expert_offset = ep_rank * self.num_local_experts

    def dispatch(self, x_ND, topk_ids_NK):
        N, K = topk_ids_NK.shape
        E_local = self.num_local_experts
        order = sort_by_expert(topk_ids_NK)
        send_MD = _rows_in_slot_order(x_ND, order, K)

        send_per_expert_E = torch.bincount(topk_ids_NK.reshape(-1), minlength=self.num_experts)
        recv_per_expert = torch.empty_like(send_per_expert_E)
        all_to_all_single_(recv_per_expert, send_per_expert_E, self.ep_group, name="rows per expert")
        recv_per_source_expert = recv_per_expert.view(self.ep_size, E_local)  # [source rank, local expert]
        send_counts = send_per_expert_E.view(self.ep_size, E_local).sum(1).tolist()
        recv_counts = recv_per_source_expert.sum(1).tolist()

        received_MD = all_to_all_autograd(send_MD, recv_counts, send_counts, self.ep_group, name="dispatch")
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(E_local, device=recv_per_expert.device).repeat(self.ep_size),
            recv_per_source_expert.reshape(-1))
        recv_order = torch.argsort(local_expert_of_row, stable=True)
        x_MD = received_MD.index_select(0, recv_order)
        handle = DispatchHandle(order_NK=order, num_tokens=N, top_k=K, send_counts=send_counts,
                                recv_counts=recv_counts, recv_order=recv_order, received_MD=received_MD)
        return x_MD, recv_per_source_expert.sum(0), handle

    def combine(self, y_MD, handle):
        if y_MD.shape[0] == 0 and handle.received_MD is not None and handle.received_MD.requires_grad:
            y_MD = _AnchorGrad.apply(y_MD, handle.received_MD)
        received_order_MD = y_MD.index_select(0, invert_permutation(handle.recv_order))
        returned_MD = all_to_all_autograd(received_order_MD, handle.send_counts, handle.recv_counts,
                                          self.ep_group, name="combine")
        return _unsort_slots(returned_MD, handle)

    def __deepcopy__(self, memo):
        # Holds only its layout and a process group (which cannot be copied): a copied model shares it.
        return self
