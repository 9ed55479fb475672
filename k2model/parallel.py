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

- replicated parameter: dL/dp = (1/W) sum_r dL_r/dp, so all-reduce SUM over all ranks and divide by W;
- expert parameter: the backward all-to-all already returns to the holder the contributions of every
  rank of its ep group that routed tokens to it, so its local gradient is sum_{r in ep group} dL_r/dp;
  all-reduce SUM over the expert replica group (which covers the other ep groups) and divide by W, not
  by the number of replicas.

Per-step use by the trainer (after ``torch.distributed.init_process_group``)::

    layout = ParallelLayout(dist.get_world_size(), dist.get_rank(), ep)
    model = build_parallel_model(cfg, seed, layout)          # once
    optimizer = build_optimizer(model, opt_cfg, lr, rank_local=expert_param_names(model))  # k2model.optim
    for micro_batch in step:                                  # every rank runs as many micro-batches
        (model(x, y).loss / num_micro_batches).backward()
    sync_gradients(model, layout)                             # before clipping and the optimizer
    # (or GradientSync: arm() before the last backward, finish() here, to overlap the two)
    grad_norm = clip_grad_norm_(model, layout, max_norm)      # equal on every rank
    if all_ranks_finite(torch.isfinite(grad_norm) & torch.isfinite(loss)):
        optimizer.step()
    update_router_bias(model.routers(), sum_expert_load(model, layout), rate)   # k2model.moe
    model.reset_expert_load(); optimizer.zero_grad()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from k2model.config import ModelConfig
from k2model.dispatch import AllToAllDispatcher, ExpertDispatcher
from k2model.distributed import ParallelLayout, Pending, all_reduce_, all_reduce_async
from k2model.model import K2ForCausalLM, build_model
from k2model.moe import GroupedExperts

DEFAULT_BUCKET_NUMEL = 1 << 24
"""Elements per all-reduce buffer in ``sync_gradients`` (64 MiB in fp32)."""


# ---------------------------------------------------------------------- model
def build_parallel_model(cfg: ModelConfig, seed: int, layout: ParallelLayout,
                         device: torch.device | str | None = None, stage_layers: range | None = None
                         ) -> K2ForCausalLM:
    """The model with this rank's slice of the experts and an ``AllToAllDispatcher`` per MoE layer
    (ep > 1), initialised so that every tensor equals the matching slice of the single-process model
    built with the same seed. Replicated parameters come out identical on every rank. Under a pipeline
    (``layout.pp > 1``) ``stage_layers`` are the decoder layers of this rank's stage
    (``k2model.pipeline.partition_layers``): the rest is dropped."""
    layout.check_num_experts(cfg.num_experts)
    if (layout.pp > 1) != (stage_layers is not None):
        raise ValueError(f"{layout!r}: give stage_layers exactly when the layout has a pipeline")
    dispatchers: list[ExpertDispatcher] | None = None
    if layout.ep > 1:
        layout._need_groups()
        dispatchers = [AllToAllDispatcher(cfg.num_experts, layout.ep_group)
                       for _ in range(cfg.num_moe_layers)]
    model = build_model(cfg, seed, dispatchers, device)
    if stage_layers is not None:
        model.keep_stage(stage_layers)
    return model


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the rank-local parameters (the stacked routed experts), in ``named_parameters`` order;
    every other parameter is replicated on all ranks."""
    local = set()
    for module_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            local.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters())
    return [n for n, _ in model.named_parameters() if n in local]


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) trainable parameters, each in ``named_parameters`` order (the same on every
    rank, which is what keeps the bucketed collectives aligned)."""
    local = set(expert_param_names(model))
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (experts if name in local else replicated).append(p)
    return replicated, experts


# ---------------------------------------------------------------------- gradients
def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradients, with zeros for parameters that received none, so every rank reduces the same layout."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _param_buckets(params: list[nn.Parameter], group_of: dict[int, dist.ProcessGroup | None],
                   bucket_numel: int) -> list[tuple[list[nn.Parameter], dist.ProcessGroup | None]]:
    """Consecutive runs of ``params`` with the same reduction group, device and dtype, of about
    ``bucket_numel`` elements each: (parameters, group)."""
    buckets: list[tuple[list[nn.Parameter], dist.ProcessGroup | None]] = []
    key = None
    size = 0
    for p in params:
        group = group_of[id(p)]
        p_key = (id(group), p.device, p.dtype)
        if p_key != key or size + p.numel() > bucket_numel:
            buckets.append(([], group))
            key, size = p_key, 0
        buckets[-1][0].append(p)
        size += p.numel()
    return buckets


class GradientSync:
    """``sync_gradients``, optionally overlapped with the last backward of a step (the DDP idea).

    Gradients are bucketed in reverse parameter order (the order in which the backward produces them).
    After ``arm()``, a hook on each parameter counts the gradients that have been accumulated; when a
    bucket is complete and every bucket before it has been launched, it is flattened (fp32) and its
    all-reduce starts asynchronously, so communication runs while the backward goes on. ``finish()``
    launches what is left (a parameter that got no gradient in the armed backward, e.g. an expert stack
    that received no tokens, has its bucket launched there, with zeros for a missing gradient), waits,
    divides by the data-parallel size (the stage's ranks) and copies the results back.

    Buckets are launched strictly in order, so every rank issues the same collectives in the same order
    whatever the timing; they use the layout's own gradient groups, never the group that carries the
    expert all-to-alls inside the backward. Each element's sum is the same as in the blocking version,
    so the result does not depend on ``overlap``. Without ``arm()`` nothing runs in the backward and
    ``finish()`` does it all (that is ``sync_gradients``).
    """

    def __init__(self, model: nn.Module, layout: ParallelLayout, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap: bool = True):
        layout._need_groups()
        self.layout = layout
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[tuple[list[nn.Parameter], dist.ProcessGroup | None]] = []
        self._hooks = []
        if layout.dp_size > 1:
            experts = {id(p) for p in _split_params(model)[1]}
            group_of = {id(p): layout.expert_grad_group if id(p) in experts else layout.grad_group
                        for p in self.params}
            self.buckets = _param_buckets(self.params[::-1], group_of, bucket_numel)
            if overlap:
                self._bucket_of = {id(p): i for i, (params, _) in enumerate(self.buckets) for p in params}
                self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._armed = False
        self.last_num_overlapped = 0
        """How many buckets the last ``finish()`` found already launched during the backward."""
        self._reset()

    def _reset(self) -> None:
        self._missing = [len(params) for params, _ in self.buckets]
        self._next = 0
        self._pending: list[tuple[int, torch.Tensor, Pending | None]] = []

    def arm(self) -> None:
        """Call before the last backward of the step: reduce gradients as soon as they are final."""
        self._reset()
        self._armed = bool(self._hooks)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        self._missing[i] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        params, group = self.buckets[i]
        reduce_dtype = torch.promote_types(params[0].dtype, torch.float32)
        flat = torch.cat([p.grad.reshape(-1).to(reduce_dtype) for p in params])
        work = all_reduce_async(flat, group, name=f"gradient bucket {i}") if group else None
        self._pending.append((i, flat, work))
        self._next = i + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Complete the step's gradient synchronisation (see the class docstring); disarms."""
        self._armed = False
        self.last_num_overlapped = self._next
        _grads(self.params)
        while self._next < len(self.buckets):
            self._launch(self._next)
        for i, flat, work in self._pending:
            if work is not None:
                work.wait()
            flat.div_(self.layout.dp_size)
            offset = 0
            for p in self.buckets[i][0]:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self._reset()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def sync_gradients(model: nn.Module, layout: ParallelLayout,
                   bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """Turn each rank's gradient of its local mean loss into the gradient of the global mean loss (see
    the module docstring): replicated parameters averaged over all ranks, expert parameters summed over
    their replica group and divided by the data-parallel size. Call once per step, after the last backward
    (the trainer uses ``GradientSync`` to overlap this with the backward)."""
    GradientSync(model, layout, bucket_numel, overlap=False).finish()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += torch.linalg.vector_norm(g, dtype=torch.float32).square().to(device)
    return total


@torch.no_grad()
def global_grad_norm(model: nn.Module, layout: ParallelLayout) -> torch.Tensor:
    """L2 norm of the whole model's gradient after ``sync_gradients``: each replicated parameter counted
    once, each expert counted once (squares summed over the ep group), each pipeline stage once (summed
    over the pipeline group). An fp32 scalar, the same on every rank (identical inputs and the same
    reductions), so all ranks clip and skip alike."""
    layout._need_groups()
    replicated, experts = _split_params(model)
    # On the gradients' own device: no host round trip per parameter.
    device = next((p.grad.device for p in model.parameters() if p.grad is not None), torch.device("cpu"))
    expert_sq = _sum_of_squares([p.grad for p in experts if p.grad is not None], device)
    if layout.ep_group is not None:
        all_reduce_(expert_sq, group=layout.ep_group, name="expert gradient squares")
    replicated_sq = _sum_of_squares([p.grad for p in replicated if p.grad is not None], device)
    total_sq = replicated_sq + expert_sq
    if layout.pp > 1:
        all_reduce_(total_sq, group=layout.pp_group, name="stage gradient squares")
    return total_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, layout: ParallelLayout, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm) and return the global norm (pre-clip).
    With a non-finite norm the gradients become non-finite too: skip the step (``all_ranks_finite``)."""
    norm = global_grad_norm(model, layout)
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(params[0].device))
    return norm


# ---------------------------------------------------------------------- step statistics
@torch.no_grad()
def sum_expert_load(model: K2ForCausalLM, layout: ParallelLayout) -> torch.Tensor:
    """Tokens routed to each expert of this stage's MoE layers summed over the stage's ranks,
    [moe_layers, E] fp64 (exact counts): the input of ``update_router_bias``, identical on the stage's
    ranks so the biases stay identical."""
    layout._need_groups()
    return all_reduce_(model.expert_load().to(torch.float64), group=layout.dp_group, name="expert load")
