"""Data + expert parallelism, applied to the model from outside (the torchtitan ``parallelize`` idea).

Layout of W ranks with expert-parallel degree ``ep`` (ep divides W and the number of routed experts):

- every rank reads different data; every parameter except the routed experts is replicated on all W
  ranks (their data-parallel group is the whole world);
- **ep group** g = ranks ``[g * ep, (g + 1) * ep)``: together they hold each routed expert exactly once
  (ep index i holds experts ``[i * E / ep, (i + 1) * E / ep)`` of every MoE layer) and exchange tokens
  with ``AllToAllDispatcher``;
- **expert replica group** i = ranks ``{i, i + ep, i + 2 ep, ...}``: the ``W / ep`` ranks that hold the
  same experts (the data-parallel group of those experts).

Under a pipeline (``ParallelLayout.pp > 1``, k2model.pipeline) all of this holds inside each stage, with
its ``dp = W / pp`` ranks in place of the world: a stage's replicated parameters are averaged over its own
ranks, its experts summed over its own replica groups and divided by ``dp``; the gradient norm adds the
stages' squares over the pipeline group.

Gradient rule. Each rank backpropagates the mean loss of its own tokens, and the global loss is the mean
over ranks, L = (1/W) sum_r L_r (equal to the mean over all tokens when every rank has as many):

- replicated parameter: dL/dp = (1/W) sum_r dL_r/dp, so sum over all ranks and divide by W;
- expert parameter: the backward all-to-all already returns to the holder the contributions of every
  rank of its ep group that routed tokens to it, so its local gradient is sum_{r in ep group} dL_r/dp;
  sum over the expert replica group (which covers the other ep groups) and divide by W, not by the
  number of replicas.
Under ZeRO-1 (``k2model.zero``) each sum lands only on the rank that updates the element (reduce to a
Muon matrix's owner, reduce-scatter of AdamW buckets): ``GradientSync``.

Per-step use by the trainer (after ``torch.distributed.init_process_group``)::

    layout = ParallelLayout(dist.get_world_size(), dist.get_rank(), ep)
    model = build_parallel_model(cfg, seed, layout)                 # once
    optimizer = build_optimizer(model, opt_cfg, lr, layout=layout)  # k2model.optim, ZeRO-1 over the layout
    sync = GradientSync(model, layout, optimizer.plan)              # once
    sync.prepare()                                                  # every step: zeroed gradients
    for micro_batch in step:                                        # every rank runs as many micro-batches
        (model(x, y).loss / num_micro_batches).backward()           # (sync.arm() before the last, to overlap)
    sync.finish()                                                   # the owned gradients, averaged
    grad_norm = clip_grad_norm_(optimizer, max_norm)                # equal on every rank
    if all_ranks_finite(torch.isfinite(grad_norm) & torch.isfinite(loss)):
        optimizer.update(); qk_clip(..., scale_rows=optimizer.scale_rows_); optimizer.publish()
    update_router_bias(model.routers(), sum_expert_load(model, layout), rate)   # k2model.moe
    model.reset_expert_load()
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from k2model.config import ModelConfig
from k2model.dispatch import AllToAllDispatcher, ExpertDispatcher
from k2model.distributed import (
    ParallelLayout,
    Pending,
    all_reduce_,
    reduce_async,
    reduce_scatter_async,
)
from k2model.model import K2ForCausalLM, build_model
from k2model.moe import GroupedExperts
from k2model.optim import ADAMW_CHUNK_NUMEL, MuonClip
from k2model.zero import ShardPlan


# ---------------------------------------------------------------------- model
def build_parallel_model(cfg: ModelConfig, seed: int, layout: ParallelLayout,
                         device: torch.device | str | None = None, stage_layers: range | None = None, *,
                         param_dtype: torch.dtype = torch.float32) -> K2ForCausalLM:
    """The model with this rank's slice of the experts and an ``AllToAllDispatcher`` per MoE layer
    (ep > 1), initialised so that every tensor equals the matching slice of the single-process model
    built with the same seed (rounded to ``param_dtype``). Replicated parameters come out identical on
    every rank. Under a pipeline (``layout.pp > 1``) ``stage_layers`` are the decoder layers of this
    rank's stage (``k2model.pipeline.partition_layers``); the others are never materialised."""
    layout.check_num_experts(cfg.num_experts)
    if (layout.pp > 1) != (stage_layers is not None):
        raise ValueError(f"{layout!r}: give stage_layers exactly when the layout has a pipeline")
    dispatchers: list[ExpertDispatcher] | None = None
    if layout.ep > 1:
        layout._need_groups()
        dispatchers = [AllToAllDispatcher(cfg.num_experts, layout.ep_group)
                       for _ in range(cfg.num_moe_layers)]
    return build_model(cfg, seed, dispatchers, device, stage_layers=stage_layers, param_dtype=param_dtype)


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the rank-local parameters (the stacked routed experts), in ``named_parameters`` order;
    every other parameter is replicated on all ranks."""
    local = set()
    for module_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            local.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters())
    return [n for n, _ in model.named_parameters() if n in local]


# ---------------------------------------------------------------------- gradients
class GradientSync:
    """Each rank's gradients of its local mean loss turned into the global mean loss's gradients (see the
    module docstring) for exactly the part of each parameter the rank updates (``ShardPlan.owned``, the
    optimizer's plan): the ZeRO-1 reduction.

    Gradient storage (fp32, allocated once, reused by every step):
    - an AdamW parameter of a replica group of more than one rank is a view of its bucket's flat buffer
      (padded to the group size): the bucket is reduce-scattered in place, and rank r's shard of it holds
      the averaged gradient of the elements it owns;
    - a Muon parameter (or a run of experts) is reduced in place to its owner;
    - a parameter whose replica group is this rank alone is only divided (by the data-parallel size).
    For fp32 parameters ``p.grad`` is that storage (autograd accumulates into it; Muon parameters get
    theirs from autograd); a parameter of another dtype (``train.param_dtype=bfloat16``) keeps it as
    ``p.main_grad``, and a hook adds each micro-batch's gradient into it in fp32 and drops the low-precision
    one. Nothing is copied into or out of a staging buffer, and single-rank groups issue no collective.

    Overlap (the DDP idea): after ``arm()``, a hook on each parameter counts the gradients of the last
    backward; each reduction (``ShardPlan.units``) starts as soon as its gradients are final and every
    reduction before it has started, so all ranks issue the same collectives in the same order, on the
    layout's gradient groups (never the group of the expert all-to-alls). ``finish()`` starts what is left,
    waits and divides; without ``arm()`` it does it all. Call ``prepare()`` before each step's first
    backward (it zeroes the storage; it is called once on construction).
    """

    def __init__(self, model: nn.Module, layout: ParallelLayout, plan: ShardPlan, overlap: bool = True):
        layout._need_groups()
        self.layout, self.plan = layout, plan
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(self.params) != set(plan.params):
            raise ValueError("the plan's parameters are not the model's trainable ones")
        device = next(iter(self.params.values())).device
        self.buffers = [torch.zeros(b.padded_numel, dtype=torch.float32, device=device) for b in plan.buckets]
        """One flat fp32 gradient buffer per AdamW bucket of the plan."""
        self._views: dict[str, torch.Tensor] = {}
        for bucket, buffer in zip(plan.buckets, self.buffers):
            for name, offset in zip(bucket.names, bucket.offsets):
                p = self.params[name]
                self._views[name] = buffer[offset:offset + p.numel()].view_as(p)
        for name, p in self.params.items():
            if p.dtype != torch.float32:
                p.main_grad = self._views.get(name)
                if p.main_grad is None:
                    p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        self._units_of: dict[str, list[int]] = {}
        for i, unit in enumerate(plan.units):
            for name in unit.names:
                self._units_of.setdefault(name, []).append(i)
        self._local = [n for n, info in plan.params.items() if plan.group_size(info.expert) == 1]
        self._hooks = []
        if (overlap and plan.units) or any(p.dtype != torch.float32 for p in self.params.values()):
            self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, name))
                           for name, p in self.params.items()]
        self._overlap = overlap
        self._armed = False
        self.last_num_overlapped = 0
        """How many reductions the last ``finish()`` found already started during the backward."""
        self.prepare()

    def _reset(self) -> None:
        self._missing = [len(unit.names) for unit in self.plan.units]
        self._next = 0
        self._pending: list[tuple[int, Pending]] = []

    @torch.no_grad()
    def prepare(self) -> None:
        """Zeroed gradient storage for a new step."""
        for buffer in self.buffers:
            buffer.zero_()
        for name, p in self.params.items():
            if p.dtype == torch.float32:
                p.grad = self._views.get(name)
            else:
                p.grad = None
                if name not in self._views:
                    p.main_grad.zero_()
        self._armed = False
        self._reset()

    def arm(self) -> None:
        """Call before the last backward of the step: reduce gradients as soon as they are final."""
        self._reset()
        self._armed = self._overlap and bool(self.plan.units)

    def _grad(self, name: str) -> torch.Tensor:
        p = self.params[name]
        if p.dtype != torch.float32:
            return p.main_grad
        if p.grad is None:  # no gradient reached it (an expert stack without tokens): a zero one
            p.grad = torch.zeros_like(p)
        return p.grad

    @torch.no_grad()
    def _on_grad(self, name: str, p: torch.Tensor) -> None:
        if p.dtype != torch.float32:
            p.main_grad.add_(p.grad)  # fp32 accumulation of the micro-batches' gradients
            p.grad = None
        if not self._armed:
            return
        for i in self._units_of.get(name, ()):
            self._missing[i] -= 1
        while self._next < len(self.plan.units) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        unit = self.plan.units[i]
        group = self.layout.expert_grad_group if unit.expert else self.layout.grad_group
        if unit.bucket is not None:
            work = reduce_scatter_async(self.buffers[unit.bucket], group, name=f"gradient bucket {unit.bucket}")
        else:
            grad = self._grad(unit.names[0])
            if unit.rows is not None:
                grad = grad[unit.rows.start:unit.rows.stop]
            work = reduce_async(grad, unit.owner, group, name=f"gradient of {unit.names[0]}")
        self._pending.append((i, work))
        self._next = i + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Complete the step's gradient reduction (see the class docstring); disarms."""
        self._armed = False
        self.last_num_overlapped = self._next
        for name in self.params:
            self._grad(name)  # every parameter has a gradient to reduce, zeros if none reached it
        while self._next < len(self.plan.units):
            self._launch(self._next)
        dp = self.layout.dp_size
        for i, work in self._pending:
            work.wait()
            unit = self.plan.units[i]
            rank = self.plan.group_rank(unit.expert)
            if unit.bucket is not None:
                shard = self.plan.buckets[unit.bucket].shard_numel
                self.buffers[unit.bucket][rank * shard:(rank + 1) * shard].div_(dp)
            elif unit.owner == rank:
                grad = self._grad(unit.names[0])
                (grad if unit.rows is None else grad[unit.rows.start:unit.rows.stop]).div_(dp)
        if dp > 1:
            for name in self._local:
                self._grad(name).div_(dp)
        self._reset()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def global_grad_norm(optimizer: MuonClip) -> torch.Tensor:
    """L2 norm of the whole model's gradient after ``GradientSync.finish``: every element is counted by
    the one rank that owns it (``MuonClip.owned_grads``), the squares summed over the world. The squares
    are summed in float64: in fp32 a sum of millions of squares is off by about 1e-5 relative, by an
    amount that depends on how the elements are split over ranks, and so would the clip. An fp32 scalar,
    the same on every rank, so all ranks clip and skip alike."""
    # On the gradients' own device: no host round trip per parameter.
    device = next(p for group in optimizer.param_groups for p in group["params"]).device
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for _, g in optimizer.owned_grads():
        for piece in g.split(ADAMW_CHUNK_NUMEL):  # a float64 copy of one chunk at most
            total_sq += torch.linalg.vector_norm(piece, dtype=torch.float64).square()
    all_reduce_(total_sq, name="gradient squares")
    return total_sq.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(optimizer: MuonClip, max_norm: float) -> torch.Tensor:
    """Scale the gradient this rank owns by min(1, max_norm / (global norm + 1e-6)), as
    ``torch.nn.utils.clip_grad_norm_`` does, and return the global norm (before clipping). With a
    non-finite norm the gradients become non-finite too: skip the step (``all_ranks_finite``)."""
    norm = global_grad_norm(optimizer)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for _, g in optimizer.owned_grads():
        g.mul_(coef.to(g.device))
    return norm


# ---------------------------------------------------------------------- step statistics
@torch.no_grad()
def sum_expert_load(model: K2ForCausalLM, layout: ParallelLayout) -> torch.Tensor:
    """Tokens routed to each expert of this stage's MoE layers summed over the stage's ranks,
    [moe_layers, E] fp64 (exact counts): the input of ``update_router_bias``, identical on the stage's
    ranks so the biases stay identical."""
    layout._need_groups()
    return all_reduce_(model.expert_load().to(torch.float64), group=layout.dp_group, name="expert load")
