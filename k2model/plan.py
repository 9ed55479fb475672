"""What a training run needs before anyone books GPUs (``k2pipe plan``): per-GPU memory, traffic, FLOPs and
an estimated step time for a parallel layout; a search over the layouts of a GPU count; and the smallest
change that makes a layout fit. Pure arithmetic from the config: nothing is allocated.

The stages are the run's own (``k2model.pipeline.stage_cut``). Memory of the most loaded rank of each
pipeline stage (``Plan.stages``; the plan reports the worst):
- states: ``k2model.memory`` (parameters, fp32 gradients, optimizer state and fp32 masters under ZeRO-1,
  buffers) for every data-parallel rank of the stage, the worst taken; with ``offload_optimizer`` the
  optimizer state and masters live in host memory (``host_bytes_per_node``: the GPUs of the most loaded
  node together);
- activations: ``k2model.activations`` per token times the micro-batch's tokens, for each micro-batch in
  flight: 1F1B keeps ``min(pp - s, m)`` of them on stage s (the first stage the most); plus, at the peak,
  the larger of the loss's logits (last stage) and, under full recomputation, one layer's activations
  while it is recomputed;
- the optimizer step's largest temporary (``RankMemory.transients``), which comes after the backward
  has freed the activations: peak = states + max(activations at their peak, optimizer temporary);
- a reserve for what no formula here counts (CUDA context, NCCL and cuBLAS buffers, allocator
  fragmentation): ``RESERVE_BYTES`` plus ``RESERVE_SHARE`` of the GPU's memory.
A layout fits when peak + reserve <= GPU memory; the headroom is the difference.

Traffic per GPU per step (bytes sent):
- expert all-to-all: per MoE layer of the stage and micro-batch, its tokens' K routed copies of width D
  in the activation dtype, sent out in the (ep - 1) / ep share that leaves the rank, four times (dispatch
  and combine, forward and backward; six under full recomputation, which repeats the forward);
- data-parallel: a ring reduce-scatter (or reduce to an owner) of the fp32 gradients and an all-gather
  (or broadcast) of the parameters over each replica group of R ranks: (R - 1) / R of those bytes each;
- pipeline: per micro-batch, the activation to the next stage and its gradient to the previous one.

Step time (an estimate under stated assumptions, ``Assumptions``): each stage's time on a micro-batch
(``k2model.pipeline.layer_times``: its FLOPs at ``mfu`` of the GPU's peak bf16 FLOP/s, its activation and
weight bytes at the HBM bandwidth; +1/3 under full recomputation), run through the 1F1B schedule (fill
and drain plus the slowest stage's steady state: (m - 1) max_s t_s + sum_s t_s with t_s a micro-batch's
forward and backward on stage s); the exposed part
of the all-to-all (``1 - a2a_overlap``) and of the data-parallel reduction (``1 - dp_overlap``) at the
intra-node (NVLink) or inter-node (network) bandwidth, whichever the group spans; Newton-Schulz FLOPs at
the same efficiency; with offload, the optimizer state to the GPU and back over PCIe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import torch

from k2model.activations import (
    EMBEDDING_BYTES_PER_TOKEN,
    head_bytes_per_token,
    layer_bytes_per_token,
    logits_transient_per_token,
    policy_of,
    weight_cast_bytes,
)
from k2model.config import ModelConfig, OptimizerConfig, count_parameters
from k2model.layers import RECOMPUTE_MODES
from k2model.memory import RankMemory, memory_by_rank, stage_params
from k2model.pipeline import (
    DeviceSpeed,
    bubble_fraction,
    layer_costs,
    layer_times,
    partition_layers,
    stage_cut,
)
from k2model.zero import ShardPlan

GB = 1e9
RESERVE_BYTES = 2 * GB
RESERVE_SHARE = 0.04
PARAM_DTYPES = ("float32", "bfloat16")


class PlanError(ValueError):
    """A layout that cannot run at all; the message names the option and a valid value."""


@dataclass(frozen=True)
class Hardware:
    """One GPU kind, per GPU unless said otherwise."""

    name: str
    memory_gb: float
    bf16_flops: float
    """Peak dense bf16 FLOP/s."""
    hbm_gbs: float
    """Device memory bandwidth, GB/s."""
    nvlink_gbs: float
    """Intra-node bandwidth, GB/s each way."""
    network_gbs: float
    """Inter-node bandwidth, GB/s (one NIC per GPU)."""
    pcie_gbs: float
    """Host <-> GPU bandwidth, GB/s (optimizer offload)."""
    gpus_per_node: int
    host_memory_gb: float
    """Host memory per node."""


HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM", 80, 989e12, 3350, 450, 50, 55, 8, 2000),
    "h200": Hardware("NVIDIA H200 SXM", 141, 989e12, 4800, 450, 50, 55, 8, 2000),
    "h800": Hardware("NVIDIA H800 SXM", 80, 989e12, 3350, 200, 50, 55, 8, 2000),
}
"""Defaults from the vendors' data sheets (dense bf16 peak; HBM bandwidth; NVLink 4 at 900 GB/s both ways,
400 on the H800; one 400 Gbit/s NIC per GPU, as K2's 8 x 400 Gbps RoCE per node) and K2's nodes (2 TB of host
memory). Override any of them on the command line."""


@dataclass(frozen=True)
class Assumptions:
    """What the step-time estimate assumes (the memory figures assume nothing)."""

    mfu: float = 0.35
    """Share of the peak FLOP/s the model's matmuls (and Newton-Schulz) achieve."""
    a2a_overlap: float = 0.8
    """Share of the expert all-to-all hidden behind computation (K2 overlaps it with warm-up micro-batches)."""
    dp_overlap: float = 0.5
    """Share of the data-parallel reduction hidden behind the backward."""


@dataclass(frozen=True)
class Layout:
    gpus: int
    pp: int = 1
    ep: int = 1
    micro_batch: int = 1
    recompute: str = "none"
    param_dtype: str = "float32"
    offload_optimizer: bool = False
    pp_layers: tuple[int, ...] | None = None

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    def set_lines(self) -> list[str]:
        """The ``--set`` lines that run this layout."""
        lines = [f"train.num_workers={self.gpus}", f"train.pp={self.pp}", f"train.ep={self.ep}",
                 f"train.micro_batch_size={self.micro_batch}", f"train.recompute={self.recompute}",
                 f"train.param_dtype={self.param_dtype}",
                 f"train.offload_optimizer={'true' if self.offload_optimizer else 'false'}"]
        if self.pp_layers is not None:
            lines.append(f"train.pp_layers=[{','.join(map(str, self.pp_layers))}]")
        return lines


@dataclass(frozen=True)
class Job:
    """What the layout runs: the model, the optimizer, the batch (``global_batch`` sequences of ``seq_len``)."""

    model: ModelConfig
    optimizer: OptimizerConfig
    seq_len: int
    global_batch: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


@dataclass
class StagePlan:
    stage: int
    layers: range
    rank: int
    """The stage's most loaded rank (by peak memory)."""
    states: RankMemory
    activations_per_micro_batch: int
    in_flight: int
    activations: int
    """At their peak: the micro-batches in flight, plus the logits or a recomputed layer."""
    peak: int
    host_bytes: int
    """Optimizer state and masters this rank keeps in host memory (offload)."""

    @property
    def gpu_states(self) -> int:
        s = self.states
        kept = s.parameters + s.gradients + s.buffers
        return kept if self.host_bytes else kept + s.optimizer_state + s.master_weights


@dataclass
class Plan:
    job: Job
    layout: Layout
    hardware: Hardware
    assumptions: Assumptions
    stages: list[StagePlan]
    reserve: int
    traffic: dict[str, float]
    flops: dict[str, float]
    bubble: float
    estimate: dict[str, float]
    host_bytes_per_node: int
    notes: list[str] = field(default_factory=list)
    smallest_change: dict | None = None

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def total(self) -> int:
        return self.worst.peak + self.reserve

    @property
    def memory(self) -> int:
        return int(self.hardware.memory_gb * GB)

    @property
    def fits(self) -> bool:
        host_ok = self.host_bytes_per_node <= self.hardware.host_memory_gb * GB
        return self.total <= self.memory and host_ok

    @property
    def headroom(self) -> int:
        return self.memory - self.total

    def why(self) -> str | None:
        """What makes the most loaded GPU too small, in a sentence (None when the layout fits)."""
        if self.fits:
            return None
        w, memory = self.worst, self.memory
        if self.total <= memory:
            return (f"the optimizer state offloaded by the most loaded node's GPUs needs "
                    f"{self.host_bytes_per_node / GB:,.0f} GB of host memory, more than its "
                    f"{self.hardware.host_memory_gb:g} GB")
        s = w.states
        weights = s.parameters + s.gradients
        if self.reserve >= memory:
            return (f"the reserve for what the formulas leave out (CUDA context, NCCL and cuBLAS buffers, "
                    f"fragmentation: {RESERVE_BYTES / GB:g} GB + {100 * RESERVE_SHARE:g}%) alone takes "
                    f"{self.reserve / GB:,.2f} GB of the {memory / GB:g} GB")
        if weights + self.reserve > memory:
            return (f"stage {w.stage}'s parameters and gradients alone take {weights / GB:,.1f} GB of the GPU's "
                    f"{memory / GB:g} GB ({s.parameters / GB:,.1f} GB of parameters in {self.layout.param_dtype}, "
                    f"{s.gradients / GB:,.1f} GB of fp32 gradients): spread the weights over more pipeline "
                    "stages (--pp) or expert-parallel ranks (--ep)")
        if w.gpu_states + self.reserve > memory:
            return (f"stage {w.stage}'s states take {w.gpu_states / GB:,.1f} GB (optimizer state "
                    f"{s.optimizer_state / GB:,.1f} GB, masters {s.master_weights / GB:,.1f} GB): more data "
                    "parallelism (ZeRO-1 shards them) or --offload-optimizer")
        return (f"stage {w.stage} keeps the activations of {w.in_flight} micro-batches in flight, "
                f"{w.activations / GB:,.1f} GB on top of {w.gpu_states / GB:,.1f} GB of states: recompute "
                "(--recompute), a smaller --micro-batch, or more stages")

    def per_gpu(self) -> dict[str, int]:
        """The worst stage's rank, by kind of bytes."""
        w = self.worst
        s = w.states
        return {"parameters": s.parameters, "gradients": s.gradients,
                "optimizer_state": 0 if w.host_bytes else s.optimizer_state,
                "master_weights": 0 if w.host_bytes else s.master_weights, "buffers": s.buffers,
                "activations": w.activations,
                "optimizer_transient": s.largest_transient + (s.offload_staging if w.host_bytes else 0),
                "reserve": self.reserve, "total": self.total}

    def to_dict(self) -> dict:
        """The ``--json`` form (keys documented in the README)."""
        return {
            "fits": self.fits, "layout": asdict(self.layout), "set": self.layout.set_lines(),
            "hardware": asdict(self.hardware), "assumptions": asdict(self.assumptions),
            "gpu_memory_bytes": self.memory, "per_gpu": self.per_gpu(), "headroom_bytes": self.headroom,
            "worst_stage": self.worst.stage, "host_bytes_per_node": self.host_bytes_per_node,
            "stages": [{"stage": s.stage, "layers": [s.layers.start, s.layers.stop], "rank": s.rank,
                        "states": s.states.to_dict(), "gpu_states": s.gpu_states,
                        "activations_per_micro_batch": s.activations_per_micro_batch, "in_flight": s.in_flight,
                        "activations": s.activations, "peak": s.peak, "host_bytes": s.host_bytes}
                       for s in self.stages],
            "traffic": self.traffic, "flops": self.flops, "bubble": self.bubble, "estimate": self.estimate,
            "notes": self.notes, "why": self.why(), "smallest_change": self.smallest_change,
        }


# ---------------------------------------------------------------------- validation
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid(values: list[int]) -> str:
    return ", ".join(map(str, values[:12])) + (" ..." if len(values) > 12 else "")


def check_layout(job: Job, layout: Layout, gpus_per_node: int) -> None:
    """Refuse a layout that cannot run, naming the option (the ``k2pipe plan`` flag, with the config key)
    and the values that would be valid."""
    cfg = job.model
    if layout.gpus < 1:
        raise PlanError(f"--gpus {layout.gpus}: expected at least 1")
    if gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node {gpus_per_node}: expected at least 1")
    if layout.gpus > gpus_per_node and layout.gpus % gpus_per_node:
        raise PlanError(f"--gpus {layout.gpus} is not a whole number of nodes of --gpus-per-node "
                        f"{gpus_per_node}: use a multiple of {gpus_per_node}")
    stages_ok = [d for d in _divisors(layout.gpus) if d <= cfg.num_layers]
    if layout.pp not in stages_ok:
        raise PlanError(f"--pp (train.pp) {layout.pp} must divide --gpus {layout.gpus} and be at most the "
                        f"model's {cfg.num_layers} layers; valid: {_valid(stages_ok)}")
    dp = layout.dp
    eps = [d for d in _divisors(dp) if cfg.num_experts % d == 0]
    if layout.ep not in eps:
        raise PlanError(f"--ep (train.ep) {layout.ep} must divide the data-parallel degree --gpus / --pp = {dp} "
                        f"and the {cfg.num_experts} experts; valid: {_valid(eps)}")
    if layout.recompute not in RECOMPUTE_MODES:
        raise PlanError(f"--recompute {layout.recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if layout.param_dtype not in PARAM_DTYPES:
        raise PlanError(f"--param-dtype {layout.param_dtype!r}: expected one of {', '.join(PARAM_DTYPES)}")
    per_step = layout.micro_batch * dp
    micros = [b for b in _divisors(job.global_batch) if (job.global_batch // dp) % b == 0] \
        if job.global_batch % dp == 0 else []
    if layout.micro_batch < 1 or job.global_batch % per_step:
        raise PlanError(f"--micro-batch (train.micro_batch_size) {layout.micro_batch} times the data-parallel "
                        f"degree {dp} must divide train.global_batch_size={job.global_batch}; valid micro-batches: "
                        f"{_valid(micros) or f'none (make the global batch a multiple of {dp})'}")
    m = job.global_batch // per_step
    if m < layout.pp:
        raise PlanError(f"{m} micro-batches a step per GPU are fewer than the --pp {layout.pp} stages 1F1B needs: "
                        f"lower --micro-batch, or raise train.global_batch_size to at least {layout.pp * per_step}")
    try:
        partition_layers(cfg, layout.pp, job.seq_len, layout.pp_layers)
    except ValueError as e:
        raise PlanError(str(e)) from None


def plan_stages(job: Job, layout: Layout, device_type: str = "cuda") -> list[range]:
    """The stages the run will train (``k2model.pipeline.stage_cut``: the trainer's own cut)."""
    return stage_cut(job.model, layout.pp, job.seq_len, layout.pp_layers, layout.micro_batch, layout.param_dtype,
                     device_type, layout.ep)


# ---------------------------------------------------------------------- one layout
@lru_cache(maxsize=256)
def _stage_states(job: Job, pp: int, ep: int, dp: int, layers: range, param_dtype: str, ns_steps: int
                  ) -> tuple[RankMemory, ...]:
    """The memory of every data-parallel rank of one stage (``k2model.memory.memory_by_rank``)."""
    infos, buffers = stage_params(job.model, job.optimizer, ep, layers if pp > 1 else None)
    plan = ShardPlan(infos, dp=dp, dp_rank=0, replicas=dp // ep, replica_rank=0, ns_steps=ns_steps)
    return tuple(memory_by_rank(plan, buffers, getattr(torch, param_dtype), torch.bfloat16, torch.device("cuda"),
                                ns_steps=ns_steps))


@lru_cache(maxsize=1024)
def _stage_numel(job: Job, ep: int, layers: range, pp: int) -> int:
    return sum(i.numel for i in stage_params(job.model, job.optimizer, ep, layers if pp > 1 else None)[0])


def _spans_nodes(first: int, size: int, gpus_per_node: int) -> bool:
    return first // gpus_per_node != (first + size - 1) // gpus_per_node


def plan_layout(job: Job, layout: Layout, hardware: Hardware, assumptions: Assumptions | None = None, *,
                device_type: str = "cuda", with_change: bool = True) -> Plan:
    """The plan of ``layout`` for ``job`` on ``hardware`` (see the module docstring)."""
    assumptions = assumptions or Assumptions()
    G = hardware.gpus_per_node
    check_layout(job, layout, G)
    cfg, pp, dp, ep = job.model, layout.pp, layout.dp, layout.ep
    stages = plan_stages(job, layout, device_type)
    policy = policy_of(layout.param_dtype, device_type)
    tokens_mb = layout.micro_batch * job.seq_len
    m = job.global_batch // (layout.micro_batch * dp)
    local_experts = cfg.num_experts // ep
    embed_cost, layer_cost, head_cost = layer_costs(cfg, job.seq_len)
    speed = DeviceSpeed(hardware.bf16_flops * assumptions.mfu, hardware.hbm_gbs * GB)
    embed_s, layer_s, head_s = layer_times(cfg, job.seq_len, layout.micro_batch, speed, policy, local_experts)

    plans = []
    host_per_stage = []
    for s, layers in enumerate(stages):
        first, last = s == 0, s == pp - 1
        per_token = sum(layer_bytes_per_token(cfg, cfg.is_moe_layer(i), policy, layout.recompute) for i in layers)
        per_token += (EMBEDDING_BYTES_PER_TOKEN if first else 0.0)
        per_token += head_bytes_per_token(cfg, policy, layout.recompute) if last else 0.0
        per_mb = int(per_token * tokens_mb) + weight_cast_bytes(cfg, layers, local_experts, policy, last,
                                                                 layout.recompute)
        in_flight = min(pp - s, m)
        extra = 0
        if layout.recompute == "full":
            kinds = {cfg.is_moe_layer(i) for i in layers}
            extra = int(max(layer_bytes_per_token(cfg, k, policy) for k in kinds) * tokens_mb)
            if policy == "autocast":
                extra += max(weight_cast_bytes(cfg, range(i, i + 1), local_experts, policy, False) for i in layers)
        if last:
            extra = max(extra, int(logits_transient_per_token(cfg, policy) * tokens_mb))
        activations = in_flight * per_mb + extra
        worst = None
        for dp_rank, states in enumerate(_stage_states(job, pp, ep, dp, layers, layout.param_dtype,
                                                       job.optimizer.ns_steps)):
            host = states.optimizer_state + states.master_weights if layout.offload_optimizer else 0
            kept = states.parameters + states.gradients + states.buffers + (0 if host else states.optimizer_state
                                                                             + states.master_weights)
            step_transient = states.largest_transient + (states.offload_staging if host else 0)
            peak = kept + max(activations, step_transient)
            if worst is None or peak > worst.peak:
                worst = StagePlan(s, layers, s * dp + dp_rank, states, per_mb, in_flight, activations, peak, host)
        plans.append(worst)
        host_per_stage.append(worst.host_bytes)

    # Host memory of the most loaded node (offload): its GPUs' ranks, each stage's worst rank standing in.
    host_per_node = 0
    if layout.offload_optimizer:
        for node in range(max(1, layout.gpus // G)):
            ranks = range(node * G, min((node + 1) * G, layout.gpus))
            host_per_node = max(host_per_node, sum(host_per_stage[r // dp] for r in ranks))

    # Traffic per GPU per step, FLOPs, time.
    a = 4 if policy == "fp32" else 2
    p_bytes = 2 if layout.param_dtype == "bfloat16" else 4
    a2a_legs = 6 if layout.recompute == "full" else 4
    replicas = dp // ep
    pc = count_parameters(cfg)
    a2a_bytes, dp_bytes, a2a_s, dp_s, stage_s, model_flops_gpu, ns_flops = [], [], [], [], [], [], []
    for s, layers in enumerate(stages):
        n_moe = sum(cfg.is_moe_layer(i) for i in layers)
        a2a_bytes.append(n_moe * m * tokens_mb * cfg.num_experts_per_tok * cfg.hidden_size * a * (ep - 1) / ep
                         * a2a_legs)
        expert_numel = n_moe * local_experts * pc.expert
        replicated = _stage_numel(job, ep, layers, pp) - expert_numel
        dp_bytes.append(((dp - 1) / dp * replicated + (replicas - 1) / replicas * expert_numel) * (4 + p_bytes))
        a2a_bw = hardware.network_gbs if _spans_nodes(s * dp, ep, G) else hardware.nvlink_gbs
        dp_bw = hardware.network_gbs if _spans_nodes(s * dp, dp, G) else hardware.nvlink_gbs
        a2a_s.append(a2a_bytes[-1] / (a2a_bw * GB))
        dp_s.append(dp_bytes[-1] / (dp_bw * GB))
        cost = (sum(layer_cost[i] for i in layers) + (embed_cost if s == 0 else 0.0)
                + (head_cost if s == pp - 1 else 0.0))
        recompute = 4 / 3 if layout.recompute == "full" else 1.0
        model_flops_gpu.append(job.tokens_per_step * cost * recompute / dp)
        seconds = (sum(layer_s[i] for i in layers) + (embed_s if s == 0 else 0.0)
                   + (head_s if s == pp - 1 else 0.0))
        stage_s.append(tokens_mb * seconds * recompute)  # a micro-batch's forward and backward on this stage
        ns_flops.append(max(r.newton_schulz_flops for r in _stage_states(job, pp, ep, dp, layers,
                                                                         layout.param_dtype, job.optimizer.ns_steps)))
    pipe_s = (m - 1) * max(stage_s) + sum(stage_s)
    exposed_a2a = max(a2a_s) * (1 - assumptions.a2a_overlap)
    exposed_dp = max(dp_s) * (1 - assumptions.dp_overlap)
    ns_s = max(ns_flops) / (hardware.bf16_flops * assumptions.mfu)
    offload_s = 2 * max(host_per_stage) / (hardware.pcie_gbs * GB) if layout.offload_optimizer else 0.0
    step_s = pipe_s + exposed_a2a + exposed_dp + ns_s + offload_s
    total_model_flops = job.tokens_per_step * (embed_cost + sum(layer_cost) + head_cost)
    busiest = max(range(pp), key=lambda s: model_flops_gpu[s])
    traffic = {"all_to_all_bytes": max(a2a_bytes), "data_parallel_bytes": max(dp_bytes),
               "pipeline_bytes": float(m * tokens_mb * cfg.hidden_size * p_bytes * 2 if pp > 1 else 0)}
    flops = {"model_per_gpu": model_flops_gpu[busiest], "newton_schulz_per_gpu": max(ns_flops),
             "model_per_step": total_model_flops,
             "newton_schulz_share": max(ns_flops) / (max(ns_flops) + model_flops_gpu[busiest])}
    estimate = {"step_s": step_s, "pipeline_s": pipe_s, "all_to_all_exposed_s": exposed_a2a,
                "data_parallel_exposed_s": exposed_dp, "newton_schulz_s": ns_s, "offload_s": offload_s,
                "tokens_per_s": job.tokens_per_step / step_s,
                "mfu": total_model_flops / (step_s * layout.gpus * hardware.bf16_flops)}
    notes = _notes(cfg, layout, G, policy)
    reserve = int(RESERVE_BYTES + RESERVE_SHARE * hardware.memory_gb * GB)
    plan = Plan(job, layout, hardware, assumptions, plans, reserve, traffic, flops,
                bubble_fraction(pp, m) if pp > 1 and m <= 4096 else (pp - 1) / (m + pp - 1), estimate,
                host_per_node, notes)
    if with_change and not plan.fits:
        plan.smallest_change = smallest_change(job, layout, hardware, assumptions, device_type=device_type)
    return plan


def _notes(cfg: ModelConfig, layout: Layout, G: int, policy: str) -> list[str]:
    notes = []
    if layout.ep > 1 and layout.ep > G:
        notes.append(f"each expert-parallel group of {layout.ep} GPUs spans {math.ceil(layout.ep / G)} nodes: "
                     "its all-to-all runs over the network (K2's 16-way groups spanned 2 nodes of 8)")
    if layout.pp > 1 and layout.dp < G:
        notes.append(f"pipeline stages of {layout.dp} GPUs share nodes: activations pass over NVLink where "
                     "neighbouring stages share a node")
    if policy == "autocast":
        notes.append("fp32 parameters under autocast keep a bf16 cast of every matmul weight per micro-batch in "
                     "flight; train.param_dtype=bfloat16 removes them")
    return notes


# ---------------------------------------------------------------------- the smallest change
def smallest_change(job: Job, layout: Layout, hardware: Hardware, assumptions: Assumptions | None = None, *,
                    device_type: str = "cuda", max_gpus_factor: int = 64) -> dict | None:
    """The cheapest change that makes ``layout`` fit. Changes, cheapest first: a smaller micro-batch,
    selective recomputation, offloading the optimizer state, full recomputation, bf16 parameters (a math
    change), 2x or 4x the pipeline stages or the expert parallelism; first one of them alone, then two
    together, then more GPUs (the fewest doublings, up to ``max_gpus_factor``), alone or with one of them.
    Returns {"change", "layout", "set", "total_bytes", "headroom_bytes"} or None."""
    singles: list[tuple[str, dict]] = []
    micro = layout.micro_batch // 2
    while micro >= 1:
        singles.append((f"micro-batches of {micro} (--micro-batch {micro})", {"micro_batch": micro}))
        micro //= 2
    if layout.recompute == "none":
        singles.append(("selective recomputation (--recompute selective)", {"recompute": "selective"}))
    if not layout.offload_optimizer:
        singles.append(("the optimizer state in host memory (--offload-optimizer)", {"offload_optimizer": True}))
    if layout.recompute != "full":
        singles.append(("whole layers recomputed (--recompute full)", {"recompute": "full"}))
    if layout.param_dtype == "float32":
        singles.append(("bf16 parameters with fp32 masters (--param-dtype bfloat16; a math change)",
                        {"param_dtype": "bfloat16"}))
    for factor in (2, 4):
        singles.append((f"{factor}x the pipeline stages (--pp {layout.pp * factor})",
                        {"pp": layout.pp * factor, "pp_layers": None}))
    for factor in (2, 4):
        singles.append((f"{factor}x the expert parallelism (--ep {layout.ep * factor})", {"ep": layout.ep * factor}))
    combos: list[tuple[str, dict]] = list(singles)
    for i, (first, a) in enumerate(singles):
        for second, b in singles[i + 1:]:
            if not set(a) & set(b):
                combos.append((f"{first} and {second}", {**a, **b}))
    factor = 2
    while factor <= max_gpus_factor:
        more = (f"{factor}x the GPUs (--gpus {layout.gpus * factor})", {"gpus": layout.gpus * factor})
        combos.append(more)
        combos += [(f"{more[0]} and {desc}", {**more[1], **change}) for desc, change in singles if "gpus" not in change]
        factor *= 2
    for description, change in combos:
        candidate = replace(layout, **change)
        try:
            plan = plan_layout(job, candidate, hardware, assumptions, device_type=device_type, with_change=False)
        except PlanError:
            continue
        if plan.fits:
            return {"change": description, "layout": asdict(candidate), "set": candidate.set_lines(),
                    "total_bytes": plan.total, "headroom_bytes": plan.headroom}
    return None


# ---------------------------------------------------------------------- search
def search_layouts(job: Job, gpus: int, hardware: Hardware, assumptions: Assumptions | None = None, *,
                   param_dtype: str = "float32", device_type: str = "cuda",
                   micro_batches: tuple[int, ...] = (1, 2, 4, 8), recompute: tuple[str, ...] | None = None,
                   offload: tuple[bool, ...] | None = None) -> list[Plan]:
    """Every valid layout of ``gpus`` GPUs (pipeline stages, expert parallelism, micro-batch, recomputation,
    offload; the parameter dtype is the config's, a math choice), planned; those that fit first, fastest
    first by the estimate, then the rest by how little they overshoot."""
    cfg = job.model
    plans = []
    for pp in [d for d in _divisors(gpus) if d <= cfg.num_layers]:
        dp = gpus // pp
        for ep in [d for d in _divisors(dp) if cfg.num_experts % d == 0]:
            for micro in micro_batches:
                for mode in recompute or RECOMPUTE_MODES:
                    for offloaded in offload or (False, True):
                        layout = Layout(gpus, pp, ep, micro, mode, param_dtype, offloaded)
                        try:
                            plans.append(plan_layout(job, layout, hardware, assumptions, device_type=device_type,
                                                     with_change=False))
                        except PlanError:
                            continue
    return sorted(plans, key=lambda p: (not p.fits, p.estimate["step_s"] if p.fits else p.total))
