"""ZeRO-1 for MuonClip: which rank of a replica group updates which part of each parameter, and the
gradient reduction that hands every rank exactly the gradients it updates, already averaged.

A parameter of a pipeline stage is held by a **replica group** of ranks that hold identical copies:
- a replicated parameter by the stage's ``dp`` data-parallel ranks (``ParallelLayout.grad_group``);
- a routed-expert stack by the ``dp / ep`` ranks that hold the same experts (``expert_grad_group``;
  with ``ep = 1`` that is the stage's ranks again).
Its gradient is summed over the replica group and divided by ``dp`` (``k2model.parallel`` derives that
rule), and exactly one rank of the group updates each element (its **owner**); the optimizer then sends
the updated values to the group (``k2model.optim``). So the optimizer state and the fp32 master weights of
a replica group are split over its ranks instead of repeated on each (ZeRO stage 1; the full gradient
buffers stay on every rank, as K2's fp32 gradient-accumulation buffers did).

Owners (``ShardPlan``):
- **Muon matrices keep whole-matrix owners**: Newton-Schulz needs the whole matrix. A replicated matrix
  has one owner, by ``assign_owners`` (largest Newton-Schulz cost first onto the least-loaded rank). An
  expert stack ``[E_local, rows, cols]`` is E_local matrices: it is cut into one contiguous run of experts
  per replica (as even as the count allows; the i-th stack gives run c to replica ``(c + i) % R``, so
  the longer runs rotate), and each replica orthogonalises its run only.
- **AdamW parameters are flat shards**: the group's AdamW parameters, taken in reverse order (the order
  the backward produces their gradients), fill buckets of at most ``bucket_numel`` elements (a larger
  parameter is a bucket of its own, so a 1.17B-element embedding is split over the whole group); each
  bucket is padded to a multiple of R and cut into R equal contiguous shards, and replica r owns shard r of
  every bucket. A rank's part of one parameter is therefore one contiguous flat range.
- In a group of one rank (``dp = 1``, or ``dp = ep`` for the experts) the rank owns all of it.

What a rank owns of a parameter is always one contiguous flat range of its local tensor, ``owned(name)``:
the optimizer keeps state for that range only, the gradient norm sums the squares of that range only,
and clipping scales that range only.

Reductions (``units``, in launch order): a Muon parameter (or expert run) is reduced to its owner with
``reduce``; an AdamW bucket is reduce-scattered into its shards, in place. Units are ordered by when the
backward finishes their last gradient (reverse parameter order), so the gradient sync can launch each as
soon as it is complete, in the same order on every rank. Groups of one rank have no units.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_BUCKET_NUMEL = 1 << 24
"""Elements per AdamW bucket (64 MiB of fp32 gradients): the reduce-scatter's unit and the largest
all-gather buffer the optimizer step allocates."""


@dataclass(frozen=True)
class ParamInfo:
    """What the plan needs to know of one local parameter."""

    name: str
    shape: tuple[int, ...]
    muon: bool
    """Updated by Muon (else AdamW)."""
    expert: bool
    """A routed-expert stack (its replica group is the expert replica group)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrices(self) -> int:
        """Matrices of a Muon parameter ``[..., rows, cols]``: 1 for a plain matrix, the leading dims' product
        for a stack (an expert stack ``[E_local, rows, cols]`` holds E_local)."""
        return self.numel // (self.shape[-2] * self.shape[-1])


@dataclass(frozen=True)
class Bucket:
    """AdamW parameters of one replica group, reduce-scattered together."""

    expert: bool
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    """Element offset of each parameter in the bucket."""
    numel: int
    num_shards: int

    @property
    def shard_numel(self) -> int:
        return -(-self.numel // self.num_shards)

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.num_shards


@dataclass(frozen=True)
class Unit:
    """One reduction of the gradient sync."""

    expert: bool
    """Over the expert replica group (else the stage's data-parallel group)."""
    names: tuple[str, ...]
    """The parameters whose gradients it reduces: it may run once all of them are final."""
    bucket: int | None = None
    """An AdamW bucket, reduce-scattered (its index in ``ShardPlan.buckets``)."""
    rows: range | None = None
    """A Muon parameter reduced to ``owner``: its leading rows (an expert run), or None for all of it."""
    owner: int | None = None


class ShardPlan:
    """Who owns what of each parameter of one rank (see the module docstring): a pure function of the
    parameters, the group sizes and this rank's place in them, so every rank derives the same plan and
    ``k2model.memory`` computes exactly what a rank holds.

    ``dp``/``dp_rank``: the stage's data-parallel size and this rank's index among those ranks;
    ``replicas``/``replica_rank``: the expert replica group's size and this rank's index in it.
    """

    def __init__(self, params: Sequence[ParamInfo], *, dp: int, dp_rank: int, replicas: int, replica_rank: int,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, ns_steps: int = 5):
        from k2model.optim import assign_owners, newton_schulz_flops

        if not 0 <= dp_rank < dp or not 0 <= replica_rank < replicas or dp % replicas:
            raise ValueError(f"bad group sizes: dp={dp}, dp_rank={dp_rank}, replicas={replicas}, "
                             f"replica_rank={replica_rank}")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel}: must be >= 1")
        self.params = {p.name: p for p in params}
        if len(self.params) != len(params):
            raise ValueError("parameter names must be unique")
        self.dp, self.dp_rank = dp, dp_rank
        self.replicas, self.replica_rank = replicas, replica_rank
        self.bucket_numel = bucket_numel

        # Muon: whole-matrix owners.
        costs = {p.name: newton_schulz_flops(p.shape[-2], p.shape[-1], ns_steps)
                 for p in params if p.muon and not p.expert and dp > 1}
        self.muon_owner: dict[str, int] = assign_owners(costs, dp)
        """Owner (index in the data-parallel group) of each replicated Muon matrix, when dp > 1."""
        self.expert_runs: dict[str, list[tuple[range, int]]] = {}
        """Runs of experts of each Muon expert stack and their owners (index in the replica group), when
        the stack has replicas."""
        if replicas > 1:
            stacks = [p for p in params if p.muon and p.expert]
            for i, p in enumerate(stacks):
                self.expert_runs[p.name] = [(run, (c + i) % replicas)
                                            for c, run in enumerate(_even_runs(p.matrices, replicas))]

        # AdamW: flat shards of buckets, per replica group of more than one rank.
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[str, tuple[int, int]] = {}
        """Bucket index and element offset of each sharded AdamW parameter."""
        for expert, size in ((False, dp), (True, replicas)):
            if size == 1:
                continue
            names, offsets, filled = [], [], 0
            for p in reversed(params):
                if p.muon or p.expert != expert:
                    continue
                if names and filled + p.numel > bucket_numel:
                    self._close_bucket(expert, names, offsets, filled, size)
                    names, offsets, filled = [], [], 0
                names.append(p.name)
                offsets.append(filled)
                filled += p.numel
            if names:
                self._close_bucket(expert, names, offsets, filled, size)

        self.units: list[Unit] = self._ordered_units(params)

    def _close_bucket(self, expert: bool, names: list[str], offsets: list[int], numel: int, size: int) -> None:
        index = len(self.buckets)
        self.buckets.append(Bucket(expert, tuple(names), tuple(offsets), numel, size))
        for name, offset in zip(names, offsets):
            self.bucket_of[name] = (index, offset)

    def _ordered_units(self, params: Sequence[ParamInfo]) -> list[Unit]:
        position = {p.name: i for i, p in enumerate(reversed(params))}
        units: list[tuple[int, int, Unit]] = []
        for p in params:
            if p.name in self.muon_owner:
                units.append((position[p.name], len(units), Unit(False, (p.name,), owner=self.muon_owner[p.name])))
            for run, owner in self.expert_runs.get(p.name, ()):
                units.append((position[p.name], len(units), Unit(True, (p.name,), rows=run, owner=owner)))
        for index, bucket in enumerate(self.buckets):
            units.append((max(position[n] for n in bucket.names), len(units),
                          Unit(bucket.expert, bucket.names, bucket=index)))
        return [unit for *_, unit in sorted(units, key=lambda u: u[:2])]

    # ------------------------------------------------------------------ queries
    def as_rank(self, dp_rank: int, replica_rank: int) -> ShardPlan:
        """The same plan seen from another rank of the same groups (owners and buckets are shared, only
        ``owned`` changes): every rank's share without building the plan again."""
        if not 0 <= dp_rank < self.dp or not 0 <= replica_rank < self.replicas:
            raise ValueError(f"rank ({dp_rank}, {replica_rank}) outside dp={self.dp}, replicas={self.replicas}")
        other = copy.copy(self)
        other.dp_rank, other.replica_rank = dp_rank, replica_rank
        return other

    def group_size(self, expert: bool) -> int:
        return self.replicas if expert else self.dp

    def group_rank(self, expert: bool) -> int:
        return self.replica_rank if expert else self.dp_rank

    def owned(self, name: str) -> tuple[int, int] | None:
        """The flat element range of the local parameter ``name`` that this rank updates (None: none)."""
        p = self.params[name]
        rank = self.group_rank(p.expert)
        if name in self.muon_owner:
            return (0, p.numel) if self.muon_owner[name] == rank else None
        if name in self.expert_runs:
            per_matrix = p.numel // p.matrices
            for run, owner in self.expert_runs[name]:
                if owner == rank:
                    return (run.start * per_matrix, run.stop * per_matrix) if len(run) else None
            return None
        if name in self.bucket_of:
            index, offset = self.bucket_of[name]
            shard = self.buckets[index].shard_numel
            lo, hi = max(offset, rank * shard), min(offset + p.numel, (rank + 1) * shard)
            return (lo - offset, hi - offset) if lo < hi else None
        return (0, p.numel)

    def owned_rows(self, name: str) -> range | None:
        """The matrices of Muon parameter ``name`` this rank orthogonalises: a range over the leading dim of a
        stack (``range(1)`` for a plain matrix); None when it owns none."""
        p = self.params[name]
        span = self.owned(name)
        if span is None:
            return None
        per_matrix = p.numel // p.matrices
        return range(span[0] // per_matrix, span[1] // per_matrix)

    def owned_numel(self, names: Iterable[str] | None = None) -> int:
        """Elements this rank owns over ``names`` (default: every parameter)."""
        total = 0
        for name in self.params if names is None else names:
            span = self.owned(name)
            if span is not None:
                total += span[1] - span[0]
        return total


def _even_runs(count: int, parts: int) -> list[range]:
    """``count`` items cut into ``parts`` contiguous runs whose lengths differ by at most one (the longer
    first; some runs are empty when ``count < parts``)."""
    base, extra = divmod(count, parts)
    runs, start = [], 0
    for c in range(parts):
        stop = start + base + (c < extra)
        runs.append(range(start, stop))
        start = stop
    return runs
