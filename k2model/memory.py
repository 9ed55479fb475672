"""Per-rank memory of a training step, from the model config and the parallel layout alone.

For one rank of a layout (its pipeline stage's layers, its slice of the experts, its place in its replica
groups under ZeRO-1), ``rank_memory`` gives the bytes the rank keeps from step to step and bounds on the
largest temporaries the optimizer step allocates. It builds the rank's model on the meta device (no
memory; ``stage_params``) and asks the optimizer's own ``ShardPlan`` who owns what, so its figures are the
code's, not a model of it.

States (equal, byte for byte, to the unique storages of a real rank after a step; tests/k2model/
test_memory.py holds them to that):
- ``parameters``: every parameter the rank holds, in ``param_dtype``;
- ``gradients``: fp32 for every one of them (``p.grad``, or ``p.main_grad`` for parameters of another
  dtype), AdamW buckets of multi-rank replica groups padded to a multiple of the group size;
- ``optimizer_state``: the fp32 Muon momentum of the matrices (runs of experts) the rank owns, and the
  fp32 AdamW ``exp_avg`` and ``exp_avg_sq`` of its flat shards;
- ``master_weights``: an fp32 copy of everything the rank owns, when ``param_dtype`` is not fp32.
``buffers`` (rotary tables, router biases and loads, max logits) are reported apart.

Transients of the optimizer step (upper bounds; each is freed before the next begins):
- ``muon_step``: for the worst shape, one slice of fp32 Nesterov inputs (``MUON_SLICE_BYTES`` at most),
  its Newton-Schulz result, and Newton-Schulz's work buffers and fp32 copy of one sub-stack;
- ``adamw_step``: three fp32 temporaries of one chunk (``ADAMW_CHUNK_NUMEL``);
- ``grad_norm``: a float64 copy of one chunk of a gradient;
- ``publish``: one AdamW bucket in the parameter dtype (the all-gather's target; gloo stages it once
  more inside the collective, measured, so twice that on a gloo group).
The gradient reduction runs in place and allocates nothing. Activations are not counted here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from k2model.config import ModelConfig, OptimizerConfig
from k2model.dispatch import ExpertDispatcher
from k2model.distributed import ParallelLayout
from k2model.model import K2ForCausalLM
from k2model.moe import Router
from k2model.optim import (
    ADAMW_CHUNK_NUMEL,
    MUON_SLICE_BYTES,
    NS_DTYPES,
    is_local_expert,
    muon_slice_matrices,
    newton_schulz_flops,
    ns_chunk_bytes,
    ns_sub_stack_size,
    on_muon,
    replica_groups,
)
from k2model.zero import DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan

FP32 = 4


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer_state: int
    master_weights: int
    buffers: int
    transients: dict[str, int] = field(default_factory=dict)
    newton_schulz_flops: int = 0
    """Newton-Schulz FLOPs of one step of the matrices the rank owns."""
    offload_staging: int = 0
    """With the optimizer state in host memory (``train.offload_optimizer``), the most the step copies to
    the device at once: one parameter's owned momentum and master, or an AdamW chunk's moments and
    master. A temporary of the optimizer step, counted only under offload."""

    @property
    def states(self) -> int:
        """Parameters, gradients, optimizer state and master weights: what stays from step to step."""
        return self.parameters + self.gradients + self.optimizer_state + self.master_weights

    @property
    def largest_transient(self) -> int:
        return max(self.transients.values(), default=0)

    def to_dict(self) -> dict[str, int | dict[str, int]]:
        return {**asdict(self), "states": self.states, "largest_transient": self.largest_transient}


class _SliceOfExperts(ExpertDispatcher):
    """Which experts a rank holds, for a model built on the meta device: the shape of an expert-parallel
    dispatcher, without its process group (it never dispatches)."""

    def __init__(self, num_experts: int, ep: int, ep_rank: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep
        self.local_expert_offset = ep_rank * self.num_local_experts


def stage_params(cfg: ModelConfig, opt_cfg: OptimizerConfig, ep: int, stage_layers: range | None = None
                 ) -> tuple[list[ParamInfo], int]:
    """The parameters of one rank's stage, in the model's order, as the optimizer's plan sees them, and the
    bytes of its buffers; from a model of one dense and one MoE layer built on the meta device, whose
    layers stand for all the others of their kind (the same names but for the layer index), so even a
    61-layer model costs two layers' construction."""
    layers = stage_layers if stage_layers is not None else range(cfg.num_layers)
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
    template_cfg = cfg.replace(num_layers=min(cfg.num_layers, cfg.first_k_dense + 1))
    model = meta_model(template_cfg, ParallelLayout(ep, 0, ep, create_groups=False))
    routers = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Router)}
    template: dict[bool, list[tuple[str, torch.Tensor, bool]]] = {False: [], True: []}
    first_of_kind = {template_cfg.is_moe_layer(i): i for i in reversed(range(template_cfg.num_layers))}
    head, embedding = [], []
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            moe = template_cfg.is_moe_layer(int(index))
            if first_of_kind[moe] == int(index):
                template[moe].append((rest, p, name in routers))
        elif name.startswith("model.embed_tokens."):
            embedding.append((name, p, False))
        else:
            head.append((name, p, False))
    named = [] if layers.start > 0 else list(embedding)
    for i in layers:
        named += [(f"model.layers.{i}.{rest}", p, router) for rest, p, router in template[kinds[i]]]
    if layers.stop == cfg.num_layers:
        named += head
    infos = [ParamInfo(name, tuple(p.shape), on_muon(name, p.ndim, router, opt_cfg), is_local_expert(name))
             for name, p, router in named]
    num_moe = sum(kinds[i] for i in layers)
    buffers = FP32 * (cfg.num_layers * cfg.num_heads + cfg.max_seq_len * cfg.qk_rope_head_dim
                      + 2 * cfg.num_experts * num_moe)
    return infos, buffers


def meta_model(cfg: ModelConfig, layout: ParallelLayout, stage_layers: range | None = None) -> K2ForCausalLM:
    """This rank's model on the meta device: its slice of the experts, its stage's layers (no memory)."""
    layout.check_num_experts(cfg.num_experts)
    dispatchers = ([_SliceOfExperts(cfg.num_experts, layout.ep, layout.ep_rank) for _ in range(cfg.num_moe_layers)]
                   if layout.ep > 1 else None)
    with torch.device("meta"):
        model = K2ForCausalLM(cfg, dispatchers)
    if stage_layers is not None:
        model.keep_stage(stage_layers)
    return model


def rank_memory(cfg: ModelConfig, opt_cfg: OptimizerConfig, layout: ParallelLayout, *,
                stage_layers: range | None = None, param_dtype: torch.dtype = torch.float32,
                ns_dtype: str = "bfloat16", device_type: str = "cuda", backend: str = "nccl",
                bucket_numel: int = DEFAULT_BUCKET_NUMEL, slice_bytes: int = MUON_SLICE_BYTES) -> RankMemory:
    """The memory of rank ``layout.rank`` (``layout`` may be built with ``create_groups=False``) training
    ``cfg`` with ``opt_cfg``. ``stage_layers``: its pipeline stage's decoder layers (required with
    ``layout.pp > 1``; ``k2model.pipeline.partition_layers``). ``ns_dtype``: the resolved Newton-Schulz dtype
    (``bfloat16`` or ``float32``); ``device_type``: where the step runs (it sets Newton-Schulz's sub-stack
    size); ``backend``: the collectives' (``nccl`` or ``gloo``)."""
    if (layout.pp > 1) != (stage_layers is not None):
        raise ValueError(f"{layout!r}: give stage_layers exactly when the layout has a pipeline")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype={ns_dtype!r}: expected one of {sorted(NS_DTYPES)} (resolved, not 'auto')")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r}: expected 'nccl' or 'gloo'")
    layout.check_num_experts(cfg.num_experts)
    infos, buffers = stage_params(cfg, opt_cfg, layout.ep, stage_layers)
    dp, dp_rank, replicas, replica_rank = replica_groups(layout)
    plan = ShardPlan(infos, dp=dp, dp_rank=dp_rank, replicas=replicas, replica_rank=replica_rank,
                     bucket_numel=bucket_numel, ns_steps=opt_cfg.ns_steps)
    return memory_by_rank(plan, buffers, param_dtype, NS_DTYPES[ns_dtype], torch.device(device_type), slice_bytes,
                          staged_gather=backend == "gloo", ns_steps=opt_cfg.ns_steps)[plan.dp_rank]


@dataclass
class _Owned:
    """What one rank owns, summed: the inputs of its optimizer state, masters and step temporaries."""

    muon: int = 0
    adamw: int = 0
    matrices: dict[tuple[int, int], int] = field(default_factory=dict)
    """Muon matrices by wide shape (rows <= cols)."""
    largest_adamw: int = 0
    largest_muon: int = 0
    largest: int = 0
    ns_flops: int = 0

    def add(self, info: ParamInfo, numel: int, ns_steps: int) -> None:
        if numel <= 0:
            return
        self.largest = max(self.largest, numel)
        if info.muon:
            self.muon += numel
            self.largest_muon = max(self.largest_muon, numel)
            rows, cols = info.shape[-2], info.shape[-1]
            key = (min(rows, cols), max(rows, cols))
            self.matrices[key] = self.matrices.get(key, 0) + numel // (rows * cols)
            self.ns_flops += numel // (rows * cols) * newton_schulz_flops(rows, cols, ns_steps)
        else:
            self.adamw += numel
            self.largest_adamw = max(self.largest_adamw, numel)


def owned_by_rank(plan: ShardPlan, ns_steps: int = 5) -> list[_Owned]:
    """What every rank of ``plan``'s groups owns, indexed by data-parallel rank (the expert replica index of
    rank r being r // ep): one pass over the plan's owners, runs and buckets, not one plan per rank."""
    dp, replicas = plan.dp, plan.replicas
    ep = dp // replicas
    owned = [_Owned() for _ in range(dp)]
    whole = _Owned()  # what every rank owns entirely (replica groups of one rank)
    for name, info in plan.params.items():
        if name in plan.muon_owner:
            owned[plan.muon_owner[name]].add(info, info.numel, ns_steps)
        elif name in plan.expert_runs:
            per_matrix = info.numel // info.matrices
            for run, owner in plan.expert_runs[name]:
                for r in range(owner * ep, (owner + 1) * ep):
                    owned[r].add(info, len(run) * per_matrix, ns_steps)
        elif name not in plan.bucket_of:
            whole.add(info, info.numel, ns_steps)
    for bucket in plan.buckets:
        shard = bucket.shard_numel
        for name, offset in zip(bucket.names, bucket.offsets):
            info = plan.params[name]
            for g in range(offset // shard, (offset + info.numel - 1) // shard + 1):
                numel = min(offset + info.numel, (g + 1) * shard) - max(offset, g * shard)
                for r in range(g * ep, (g + 1) * ep) if bucket.expert else (g,):
                    owned[r].add(info, numel, ns_steps)
    for o in owned:
        o.muon += whole.muon
        o.adamw += whole.adamw
        for key, count in whole.matrices.items():
            o.matrices[key] = o.matrices.get(key, 0) + count
        o.largest_adamw = max(o.largest_adamw, whole.largest_adamw)
        o.largest_muon = max(o.largest_muon, whole.largest_muon)
        o.largest = max(o.largest, whole.largest)
        o.ns_flops += whole.ns_flops
    return owned


def memory_by_rank(plan: ShardPlan, buffers: int, param_dtype: torch.dtype, ns_dtype: torch.dtype,
                   device: torch.device, slice_bytes: int = MUON_SLICE_BYTES, staged_gather: bool = False,
                   ns_steps: int = 5) -> list[RankMemory]:
    """``rank_memory`` of every rank of ``plan``'s groups, indexed by data-parallel rank."""
    param_bytes = torch.empty((), dtype=param_dtype).element_size()
    infos = plan.params
    numel = sum(info.numel for info in infos.values())
    bucketed = set(plan.bucket_of)
    gradients = FP32 * (sum(b.padded_numel for b in plan.buckets)
                        + sum(info.numel for name, info in infos.items() if name not in bucketed))
    publish = max((b.padded_numel for b in plan.buckets), default=0) * param_bytes * (1 + staged_gather)
    ns_item = ns_dtype.itemsize
    out = []
    for owned in owned_by_rank(plan, ns_steps):
        muon_step = 0
        for (m, n), count in owned.matrices.items():
            per_slice = min(count, muon_slice_matrices(count, m, n, ns_dtype, slice_bytes, device))
            chunk = ns_sub_stack_size(per_slice, m, n, ns_dtype, ns_chunk_bytes(device))
            stack = per_slice * m * n * (FP32 + ns_item)  # Nesterov inputs and the result
            work = chunk * (m * n * (ns_item + FP32) + 2 * m * m * ns_item)  # iterate, Gram buffers, fp32 copy
            muon_step = max(muon_step, stack + work)
        transients = {"muon_step": muon_step, "adamw_step": 3 * FP32 * min(owned.largest_adamw, ADAMW_CHUNK_NUMEL),
                      "grad_norm": 8 * min(owned.largest, ADAMW_CHUNK_NUMEL), "publish": publish}
        master = FP32 * (owned.muon + owned.adamw) if param_dtype != torch.float32 else 0
        copies = 2 if param_dtype != torch.float32 else 1  # the state, and the master where there is one
        staging = FP32 * max(copies * owned.largest_muon, (copies + 1) * min(owned.largest_adamw, ADAMW_CHUNK_NUMEL))
        out.append(RankMemory(parameters=numel * param_bytes, gradients=gradients,
                              optimizer_state=FP32 * (owned.muon + 2 * owned.adamw), master_weights=master,
                              buffers=buffers, transients=transients, newton_schulz_flops=owned.ns_flops,
                              offload_staging=staging))
    return out


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """``fn()`` and the most bytes it had allocated at once beyond what was allocated when it began: from
    the caching allocator's statistics on a CUDA device, from the profiler's record of every allocation and
    free on a CPU (the allocator's own events, not process memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # An op's own allocations and frees are on its event, net ("self": its children's are theirs): a net
    # allocation is counted from the op's start, a net free (a child's temporary the op released) at its
    # end. Frees outside any op (a tensor released by Python) are "[memory]" events. In time order, the
    # running sum is what fn holds. Inside a ``record_function`` range (``Optimizer.step`` opens one) frees
    # are folded into the range's event instead, which loses their time: refused.
    changes = []
    for event in prof.events():
        change = event.self_cpu_memory_usage
        if event.name == "[memory]":
            changes.append((event.time_range.start, event.cpu_memory_usage))
        elif change > 0:
            changes.append((event.time_range.start, change))
        elif change < 0 and "::" in event.name:  # an operator (aten::, c10d::)
            changes.append((event.time_range.end, change))
        elif change < -1024:
            raise ValueError(f"measure_peak_bytes: {event.name!r} is a profiler range that frees memory inside "
                             "it, so the times of its frees are lost; measure what it calls instead")
    live = peak = 0
    for _, change in sorted(changes):
        live += change
        peak = max(peak, live)
    return result, peak
