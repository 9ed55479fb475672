"""Distributed state of a training run: the parallel layout, its process groups and the small collectives.

Everything that knows which rank holds what lives here: ``ParallelLayout`` (the rank arithmetic of data and
expert parallelism and the process groups for it) and the collectives the trainer and the checkpoint
writer use for control values (flags, counts, statistics), so that each is written once.
``k2model.parallel`` applies the layout to a model (its slice of the experts, gradient synchronisation,
the global gradient norm).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class ParallelLayout:
    """Which ranks hold which experts, and the process groups for it.

    With ``create_groups`` (the default) and more than one rank, the constructor calls
    ``dist.new_group`` for every ep group and then every expert replica group, in the same order on all
    ranks, so every rank must construct its layout at the same point; ``torch.distributed`` must already
    be initialised with this world size. ``create_groups=False`` gives the rank arithmetic alone.
    A group that is the whole world is ``dist.group.WORLD``; a group of one rank is ``None`` (nothing to
    communicate)."""

    def __init__(self, world_size: int, rank: int, ep: int = 1, *, timeout: timedelta | None = None,
                 create_groups: bool = True):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if ep < 1 or world_size % ep:
            raise ValueError(f"expert-parallel degree ep={ep} must be >= 1 and divide "
                             f"world_size={world_size}")
        self.world_size = world_size
        self.rank = rank
        self.ep = ep
        self.ep_group: dist.ProcessGroup | None = None
        """This rank's ep group (token exchange; sums of expert statistics)."""
        self.expert_replica_group: dist.ProcessGroup | None = None
        """The ranks holding the same experts as this one (expert gradient all-reduce)."""
        self.grad_group: dist.ProcessGroup | None = None
        """All ranks, in a group of its own: gradient buckets reduced asynchronously during the backward
        never share a group (and so a sequence of collectives) with the dispatch all-to-alls."""
        self.expert_grad_group: dist.ProcessGroup | None = None
        """The expert replica ranks, in a group of its own (see ``grad_group``)."""
        self.has_groups = False
        if create_groups and world_size > 1:
            self._create_groups(timeout)

    # ------------------------------------------------------------------ rank arithmetic
    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many ranks read different data (every rank, without a pipeline)."""
        return self.world_size

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: which rows of each global batch it reads."""
        return self.rank

    @property
    def ep_rank(self) -> int:
        """This rank's index inside its ep group (which slice of the experts it holds)."""
        return self.rank % self.ep

    @property
    def ep_group_index(self) -> int:
        return self.rank // self.ep

    @property
    def num_expert_replicas(self) -> int:
        """How many ranks hold each expert (the number of ep groups)."""
        return self.world_size // self.ep

    def ep_group_ranks(self, index: int | None = None) -> list[int]:
        g = self.ep_group_index if index is None else index
        return list(range(g * self.ep, (g + 1) * self.ep))

    def expert_replica_ranks(self, ep_rank: int | None = None) -> list[int]:
        i = self.ep_rank if ep_rank is None else ep_rank
        return list(range(i, self.world_size, self.ep))

    def check_num_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ValueError(f"expert-parallel degree ep={self.ep} must divide num_experts={num_experts}")

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        self.check_num_experts(num_experts)
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def __repr__(self) -> str:
        return f"ParallelLayout(world_size={self.world_size}, rank={self.rank}, ep={self.ep})"

    # ------------------------------------------------------------------ process groups
    def _create_groups(self, timeout: timedelta | None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout needs torch.distributed.init_process_group to be called first "
                               "(or create_groups=False)")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"layout says world_size={self.world_size}, rank={self.rank} but the "
                             f"process group has world_size={dist.get_world_size()}, rank={dist.get_rank()}")
        self.ep_group = self._make_group([self.ep_group_ranks(g) for g in range(self.num_expert_replicas)],
                                         timeout)
        self.expert_replica_group = self._make_group([self.expert_replica_ranks(i) for i in range(self.ep)],
                                                     timeout)
        self.grad_group = self._make_group([list(range(self.world_size))], timeout, dedicated=True)
        if self.num_expert_replicas == self.world_size:
            self.expert_grad_group = self.grad_group
        else:
            self.expert_grad_group = self._make_group([self.expert_replica_ranks(i) for i in range(self.ep)],
                                                      timeout, dedicated=True)
        self.has_groups = True

    def _make_group(self, all_ranks: list[list[int]], timeout: timedelta | None,
                    dedicated: bool = False) -> dist.ProcessGroup | None:
        """Every rank walks the same list (new_group is collective over the world) and keeps its own.
        Without ``dedicated``, a group of the whole world is ``dist.group.WORLD`` itself."""
        size = len(all_ranks[0])
        if size == 1:
            return None
        if size == self.world_size and not dedicated:
            return dist.group.WORLD
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                mine = group
        return mine

    def _need_groups(self) -> None:
        if self.world_size > 1 and not self.has_groups:
            raise RuntimeError(f"{self!r} was built with create_groups=False: it has no process groups")


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small tensor must live to go through ``group``'s backend (gloo: CPU, else the GPU)."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group`` (default: world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``tensor`` reduced in place over ``group`` (default: world) and returned; unchanged without a
    distributed run. The tensor travels on the group's collective device and comes back where it was."""
    if not is_distributed(group):
        return tensor
    device = collective_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    tensor.copy_(moved)
    return tensor


def agree(value: int, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None = None) -> int:
    """One integer control value reduced over every rank of ``group`` (MIN of flags: all agree)."""
    if not is_distributed(group):
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(flag, op=op, group=group)
    return int(flag.item())


def all_ranks_finite(flag: bool | torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """True only if every rank's ``flag`` is true: a ``bool`` or bool tensor is the flag itself (all
    elements), a floating tensor means "all its values are finite". Call it on every rank; ``group``
    defaults to the world."""
    if isinstance(flag, torch.Tensor):
        ok = bool(flag.all()) if flag.dtype == torch.bool else bool(torch.isfinite(flag).all())
    else:
        ok = bool(flag)
    return agree(int(ok), dist.ReduceOp.MIN, group) == 1
