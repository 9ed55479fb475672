"""Distributed state of a training run: the parallel layout, its process groups and the small collectives.

Everything that knows which rank holds what lives here: ``ParallelLayout`` (the rank arithmetic of data and
expert parallelism and the process groups for it) and every collective the project calls (gradient
buckets, the expert exchange, parameter broadcasts, and the control values of the trainer and the
checkpoint writer), each checked against what its backend takes and bounded by the group's timeout.
``k2model.parallel`` applies the layout to a model (its slice of the experts, gradient synchronisation,
the global gradient norm).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class ParallelLayout:
    """Which ranks hold which layers and experts, and the process groups for it.

    ``world_size = pp x dp``. Pipeline stage ``s`` (``pp`` of them) is the ``dp`` contiguous ranks
    ``[s * dp, (s + 1) * dp)``: they hold the same layers and read different data (rank ``r`` has
    data-parallel index ``r % dp``, which every stage's rank of that index shares). Inside a stage, as
    without a pipeline, expert-parallel groups of ``ep`` contiguous ranks hold each routed expert once
    (``ep`` divides ``dp``), and the ``dp / ep`` ranks of a stage with the same ep index hold the same
    experts. Ranks of one data-parallel index, one per stage, form its pipeline group (activations and
    their gradients pass between neighbours in it).

    With ``create_groups`` (the default) and more than one rank, the constructor calls
    ``dist.new_group`` for every group of every kind, in the same order on all ranks, so every rank must
    construct its layout at the same point; ``torch.distributed`` must already be initialised with this
    world size. ``create_groups=False`` gives the rank arithmetic alone. A group that is the whole world
    is ``dist.group.WORLD``; other groups of one rank are ``None`` (nothing to communicate), except
    ``dp_group`` and ``pp_group`` under a pipeline, which are real groups whatever their size, so that
    passing them never means the world."""

    def __init__(self, world_size: int, rank: int, ep: int = 1, pp: int = 1, *, timeout: timedelta | None = None,
                 create_groups: bool = True):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if pp < 1 or world_size % pp:
            raise ValueError(f"pipeline-parallel degree pp={pp} must be >= 1 and divide world_size={world_size}")
        dp = world_size // pp
        if ep < 1 or dp % ep:
            raise ValueError(f"expert-parallel degree ep={ep} must be >= 1 and divide the data-parallel "
                             f"degree {dp} (world_size={world_size} / pp={pp})")
        self.world_size = world_size
        self.rank = rank
        self.ep = ep
        self.pp = pp
        self.ep_group: dist.ProcessGroup | None = None
        """This rank's ep group (token exchange; sums of expert statistics)."""
        self.expert_replica_group: dist.ProcessGroup | None = None
        """The ranks of this stage holding the same experts as this one."""
        self.grad_group: dist.ProcessGroup | None = None
        """This stage's ranks, in a group of its own: gradient buckets reduced asynchronously during the
        backward never share a group (and so a sequence of collectives) with the dispatch all-to-alls."""
        self.expert_grad_group: dist.ProcessGroup | None = None
        """The expert replica ranks, in a group of its own (see ``grad_group``)."""
        self.dp_group: dist.ProcessGroup | None = None
        """This stage's ranks (the world without a pipeline): replicated statistics (QK-Clip's max logits,
        expert loads) and the optimizer's owners of replicated matrices."""
        self.pp_group: dist.ProcessGroup | None = None
        """The ranks of this data-parallel index, one per stage, in stage order (group rank = stage)."""
        self.has_groups = False
        if create_groups and world_size > 1:
            self._create_groups(timeout)

    # ------------------------------------------------------------------ rank arithmetic
    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many ranks of a stage read different data."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        """This rank's index among its stage's ranks: which rows of each global batch it reads."""
        return self.rank % self.dp_size

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // self.dp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def ep_rank(self) -> int:
        """This rank's index inside its ep group (which slice of the experts it holds)."""
        return self.dp_rank % self.ep

    @property
    def ep_group_index(self) -> int:
        """Which ep group of its stage this rank is in."""
        return self.dp_rank // self.ep

    @property
    def num_expert_replicas(self) -> int:
        """How many ranks of a stage hold each expert (the number of ep groups in a stage)."""
        return self.dp_size // self.ep

    def stage_ranks(self, stage: int | None = None) -> list[int]:
        s = self.stage if stage is None else stage
        return list(range(s * self.dp_size, (s + 1) * self.dp_size))

    def ep_group_ranks(self, index: int | None = None, stage: int | None = None) -> list[int]:
        g = self.ep_group_index if index is None else index
        first = (self.stage if stage is None else stage) * self.dp_size + g * self.ep
        return list(range(first, first + self.ep))

    def expert_replica_ranks(self, ep_rank: int | None = None, stage: int | None = None) -> list[int]:
        i = self.ep_rank if ep_rank is None else ep_rank
        first = (self.stage if stage is None else stage) * self.dp_size
        return list(range(first + i, first + self.dp_size, self.ep))

    def pp_group_ranks(self, dp_rank: int | None = None) -> list[int]:
        d = self.dp_rank if dp_rank is None else dp_rank
        return [s * self.dp_size + d for s in range(self.pp)]

    def check_num_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ValueError(f"expert-parallel degree ep={self.ep} must divide num_experts={num_experts}")

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        self.check_num_experts(num_experts)
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def __repr__(self) -> str:
        pp = f", pp={self.pp}" if self.pp > 1 else ""
        return f"ParallelLayout(world_size={self.world_size}, rank={self.rank}, ep={self.ep}{pp})"

    # ------------------------------------------------------------------ process groups
    def _create_groups(self, timeout: timedelta | None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout needs torch.distributed.init_process_group to be called first "
                               "(or create_groups=False)")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"layout says world_size={self.world_size}, rank={self.rank} but the "
                             f"process group has world_size={dist.get_world_size()}, rank={dist.get_rank()}")
        stages = range(self.pp)
        ep_groups = [self.ep_group_ranks(g, s) for s in stages for g in range(self.num_expert_replicas)]
        replicas = [self.expert_replica_ranks(i, s) for s in stages for i in range(self.ep)]
        self.ep_group = self._make_group(ep_groups, timeout)
        self.expert_replica_group = self._make_group(replicas, timeout)
        self.grad_group = self._make_group([self.stage_ranks(s) for s in stages], timeout, dedicated=True)
        if self.num_expert_replicas == self.dp_size:
            self.expert_grad_group = self.grad_group
        else:
            self.expert_grad_group = self._make_group(replicas, timeout, dedicated=True)
        if self.pp == 1:
            self.dp_group = dist.group.WORLD
        else:
            self.dp_group = self._make_group([self.stage_ranks(s) for s in stages], timeout, keep_single=True)
            self.pp_group = self._make_group([self.pp_group_ranks(d) for d in range(self.dp_size)], timeout,
                                             keep_single=True)
        self.has_groups = True

    def _make_group(self, all_ranks: list[list[int]], timeout: timedelta | None, dedicated: bool = False,
                    keep_single: bool = False) -> dist.ProcessGroup | None:
        """Every rank walks the same list (new_group is collective over the world) and keeps its own.
        Without ``dedicated``, a group of the whole world is ``dist.group.WORLD`` itself; without
        ``keep_single`` a group of one rank is None."""
        size = len(all_ranks[0])
        if size == 1 and not keep_single:
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


# ---------------------------------------------------------------------- collectives
# Every torch.distributed collective of the project is called here, and only here (a test reads the
# source of every other module to hold that). Each checks its tensors against the device types the
# group's backend takes before it calls: NCCL refuses a CPU tensor, and a CPU run over gloo would
# never show such a call. Control values (flags, counts, statistics) are made on ``collective_device``.
# A collective that waits past the group's timeout (``train.collective_timeout_s``) raises a
# ``CollectiveError`` naming the call, not a hang.

class CollectiveError(RuntimeError):
    """A collective was called wrongly (a tensor on a device its backend refuses) or timed out."""


def backend_devices(group: dist.ProcessGroup | None = None) -> frozenset[str]:
    """The device types ``group``'s backend takes: ``gloo`` CPU, ``nccl`` CUDA, and for a backend given
    per device (``cuda:gloo``, ``cpu:gloo,cuda:nccl``) the devices it names."""
    return devices_of_backend(str(dist.get_backend(group)))


def devices_of_backend(backend: str) -> frozenset[str]:
    """``backend_devices`` for a backend string as ``torch.distributed`` names it."""
    backend = backend.lower()
    if ":" in backend:
        return frozenset(part.split(":", 1)[0].strip() for part in backend.split(","))
    return frozenset({"cuda"}) if backend == "nccl" else frozenset({"cpu"})


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small control tensor is made to go through ``group``'s backend (the GPU when it takes
    CUDA tensors, else the CPU)."""
    if "cuda" in backend_devices(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group`` (default: world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _check(call: str, name: str, group: dist.ProcessGroup | None, *tensors: torch.Tensor) -> None:
    accepted = backend_devices(group)
    for tensor in tensors:
        if tensor.device.type not in accepted:
            raise CollectiveError(
                f"{call}({name}): the tensor is on {tensor.device}, but the group's backend "
                f"({dist.get_backend(group)}) takes only {'/'.join(sorted(accepted))} tensors; make it on "
                "k2model.distributed.collective_device(group)")


def _timed(call: str, name: str, group: dist.ProcessGroup | None, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a timeout of the backend turned into an error that names the call."""
    try:
        return fn()
    except RuntimeError as e:
        text = str(e).lower()
        if "timed out" in text or "timeout" in text:
            raise CollectiveError(
                f"{call}({name}) over {dist.get_world_size(group)} ranks timed out "
                "(train.collective_timeout_s): a rank never reached this call, or died before it") from e
        raise


class Pending:
    """An asynchronous collective started here (``work`` None: nothing needed starting); ``wait()`` for it,
    a timeout naming the call."""

    def __init__(self, work: dist.Work | None, call: str, name: str, group: dist.ProcessGroup | None):
        self.work, self.call, self.name, self.group = work, call, name, group

    def wait(self) -> None:
        if self.work is not None:
            _timed(self.call, self.name, self.group, self.work.wait)


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                group: dist.ProcessGroup | None = None, *, name: str = "tensor") -> torch.Tensor:
    """``tensor`` reduced in place over ``group`` (default: world) and returned; unchanged without a
    distributed run. ``tensor`` must be on a device the group's backend takes."""
    if not is_distributed(group):
        return tensor
    _check("all_reduce", name, group, tensor)
    _timed("all_reduce", name, group, lambda: dist.all_reduce(tensor, op=op, group=group))
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: dist.ProcessGroup | None, *, name: str,
                     op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Pending:
    """Start an in-place all-reduce of ``tensor`` over ``group`` (None: the world); ``wait()`` the result."""
    if not is_distributed(group):
        return Pending(None, "all_reduce", name, group)
    _check("all_reduce", name, group, tensor)
    return Pending(dist.all_reduce(tensor, op=op, group=group, async_op=True), "all_reduce", name, group)


def broadcast_async(tensor: torch.Tensor, group_src: int, group: dist.ProcessGroup | None, *,
                    name: str) -> Pending:
    """Start a broadcast of ``tensor`` from rank ``group_src`` of ``group`` (None: the world)."""
    if not is_distributed(group):
        return Pending(None, "broadcast", name, group)
    _check("broadcast", name, group, tensor)
    src = dist.get_global_rank(group, group_src) if group is not None else group_src
    return Pending(dist.broadcast(tensor, src=src, group=group, async_op=True), "broadcast", name, group)


# torch 2.13 renamed the flat-tensor collectives (the old names warn that they are deprecated).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into_(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, *,
                     name: str) -> torch.Tensor:
    """Every rank's ``input`` of ``group`` concatenated in rank order into ``output`` (``input`` may be
    this rank's own part of ``output``: in place); without a distributed run, ``input`` copied."""
    if not is_distributed(group):
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return output
    _check("all_gather", name, group, output, input)
    _timed("all_gather", name, group, lambda: _ALL_GATHER(output, input, group=group))
    return output


def reduce_scatter_async(tensor: torch.Tensor, group: dist.ProcessGroup | None, *, name: str) -> Pending:
    """Start an in-place reduce-scatter (SUM) of ``tensor`` over ``group``: rank r's equal part of it
    becomes the sum of every rank's part r (the rest of ``tensor`` is left undefined)."""
    if not is_distributed(group):
        return Pending(None, "reduce_scatter", name, group)
    _check("reduce_scatter", name, group, tensor)
    size = dist.get_world_size(group)
    part = tensor.numel() // size
    if part * size != tensor.numel():
        raise CollectiveError(f"reduce_scatter({name}): {tensor.numel()} elements do not split into "
                              f"{size} equal parts")
    rank = dist.get_rank(group)
    own = tensor.view(-1)[rank * part:(rank + 1) * part]
    work = _REDUCE_SCATTER(own, tensor.view(-1), group=group, async_op=True)
    return Pending(work, "reduce_scatter", name, group)


def reduce_async(tensor: torch.Tensor, group_dst: int, group: dist.ProcessGroup | None, *, name: str) -> Pending:
    """Start a sum of ``tensor`` over ``group`` into rank ``group_dst``'s ``tensor`` (in place; the other
    ranks' ``tensor`` is left undefined)."""
    if not is_distributed(group):
        return Pending(None, "reduce", name, group)
    _check("reduce", name, group, tensor)
    dst = dist.get_global_rank(group, group_dst) if group is not None else group_dst
    return Pending(dist.reduce(tensor, dst=dst, group=group, async_op=True), "reduce", name, group)


def all_to_all_single_(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, *,
                       name: str) -> torch.Tensor:
    """Equal splits of ``input`` to every rank of ``group``, received into ``output`` (not differentiable)."""
    _check("all_to_all_single", name, group, output, input)
    _timed("all_to_all_single", name, group, lambda: dist.all_to_all_single(output, input, group=group))
    return output


def all_to_all_autograd(input: torch.Tensor, output_splits: list[int], input_splits: list[int],
                        group: dist.ProcessGroup, *, name: str) -> torch.Tensor:
    """Uneven all-to-all of rows that gradients flow back through (the expert dispatch exchange)."""
    import torch.distributed._functional_collectives as funcol

    _check("all_to_all_single_autograd", name, group, input)
    return funcol.all_to_all_single_autograd(input, output_splits, input_splits, group)


def send_(tensor: torch.Tensor, group_dst: int, group: dist.ProcessGroup, *, name: str) -> None:
    """Send ``tensor`` to rank ``group_dst`` of ``group`` (blocking; the pipeline's validation pass)."""
    _check("send", name, group, tensor)
    dst = dist.get_global_rank(group, group_dst)
    _timed("send", name, group, lambda: dist.send(tensor, dst=dst, group=group))


def recv_(tensor: torch.Tensor, group_src: int, group: dist.ProcessGroup, *, name: str) -> torch.Tensor:
    """Receive into ``tensor`` from rank ``group_src`` of ``group`` (blocking)."""
    _check("recv", name, group, tensor)
    src = dist.get_global_rank(group, group_src)
    _timed("recv", name, group, lambda: dist.recv(tensor, src=src, group=group))
    return tensor


def barrier(group: dist.ProcessGroup | None = None, *, name: str = "barrier") -> None:
    """Every rank of ``group`` reaches this point (nothing without a distributed run)."""
    if is_distributed(group):
        _timed("barrier", name, group, lambda: dist.barrier(group=group))


def agree(value: int | torch.Tensor, op: dist.ReduceOp.RedOpType,
          group: dist.ProcessGroup | None = None, *, name: str = "agree") -> int:
    """One integer control value reduced over every rank of ``group`` (MIN of flags: all agree). A tensor
    ``value`` (0-d or one element) is reduced where the backend takes it, read once."""
    if isinstance(value, torch.Tensor):
        flag = value.detach().reshape(1).to(torch.int64)
    else:
        flag = torch.tensor([int(value)], dtype=torch.int64)
    if not is_distributed(group):
        return int(flag.item())
    if flag.device.type not in backend_devices(group):
        flag = flag.to(collective_device(group))
    all_reduce_(flag, op, group, name=name)
    return int(flag.item())


def all_ranks_finite(flag: bool | torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """True only if every rank's ``flag`` is true: a ``bool`` or bool tensor is the flag itself (all
    elements), a floating tensor means "all its values are finite". Call it on every rank; ``group``
    defaults to the world. A tensor flag is evaluated where it lives: one host read in all."""
    if isinstance(flag, torch.Tensor):
        ok = flag.all() if flag.dtype == torch.bool else torch.isfinite(flag).all()
    else:
        ok = bool(flag)
    return agree(ok, dist.ReduceOp.MIN, group, name="all_ranks_finite") == 1
