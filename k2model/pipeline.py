"""Pipeline parallelism: the decoder cut into stages by layers, and the 1F1B schedule that runs them.

- ``layer_costs`` prices each piece of the model a stage can hold (the embedding, each decoder layer, the
  final norm with the head and its loss) in training FLOPs per token, with the arithmetic of
  ``k2model.config.flops_per_token``; ``layer_times`` in seconds per token on a device of given speed, its
  FLOPs and its bytes (the activation and weight arithmetic of ``k2pipe plan``); ``partition_layers`` cuts
  the layers into ``pp`` contiguous stages that minimise the most expensive stage (the embedding goes with
  the first, the head with the last), or takes the layer counts it is given; ``stage_cut`` is the cut a
  run trains, priced by ``layer_times`` at the device type's ``NOMINAL_SPEED``.
- ``PipelineRunner`` is one rank's stage: ``torch.distributed.pipelining``'s ``PipelineStage`` over the
  rank's pipeline group (``ParallelLayout.pp_group``) and its ``Schedule1F1B``, micro-batches as the
  trainer's. ``forward_backward`` has the trainer's ``forward_backward`` signature; ``evaluate`` runs
  forward-only micro-batches through the stages.
- The loss of a step: the last stage's language-model loss, plus every stage's balance loss, which
  ``K2ForCausalLM.stage_forward`` backpropagates itself (``attach_loss``), since the schedule
  backpropagates the last stage's loss only. The step's (loss, language-model loss) is summed over the
  pipeline group, so every rank returns the same pair.

The arithmetic equals the whole model's on one rank: each micro-batch's loss is divided by the number of
micro-batches before its backward, as ``accumulate_gradients`` does (the schedule's own gradient
scaling is off).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from k2model.config import ModelConfig, count_parameters
from k2model.distributed import ParallelLayout, all_reduce_, recv_, send_
from k2model.model import K2ForCausalLM, lm_loss_of


# ---------------------------------------------------------------------- stages
def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[float, list[float], float]:
    """Training FLOPs per token of (the embedding, each decoder layer, the final norm + head + loss):
    6 per active matmul weight, plus causal attention's score and value products (their sum over the
    pieces is ``flops_per_token``). The embedding is a lookup: 0."""
    pc = count_parameters(cfg)
    attn_scores = 3.0 * 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    attention = pc.attention_per_layer
    dense = 6.0 * (attention + pc.dense_ffn_per_layer) + attn_scores
    shared = cfg.num_shared_experts * pc.expert
    moe = 6.0 * (attention + pc.router_per_layer + shared + cfg.num_experts_per_tok * pc.expert) + attn_scores
    # Norm weights are parameters but not matmul weights: flops_per_token counts them, so do we.
    norms = 6.0 * 2 * cfg.hidden_size
    layers = [(moe if cfg.is_moe_layer(i) else dense) + norms for i in range(cfg.num_layers)]
    head = 6.0 * (pc.output_head + cfg.hidden_size)
    return 0.0, layers, head


@dataclass(frozen=True)
class DeviceSpeed:
    """What a device does in a second, for pricing pipeline stages: matmul FLOPs (achieved, not peak) and
    bytes of memory traffic."""

    flops: float
    bytes: float


NOMINAL_SPEED = {"cuda": DeviceSpeed(0.35 * 989e12, 3.35e12), "cpu": DeviceSpeed(1e11, 1e10)}
"""The speeds the trainer prices stages with, by device type: an H100 at 35% of its bf16 peak and its
HBM bandwidth; a CPU core's order of magnitude (100 GFLOP/s of fp32 matmul, 10 GB/s of memory traffic).
Fixed figures, not measured, so every run (and its resume) cuts the same stages, and ``k2pipe plan``
reports the cut the run will use. benchmarks/results/pipeline.md compares the cut with the FLOP-only one."""


def layer_times(cfg: ModelConfig, seq_len: int, micro_batch: int, speed: DeviceSpeed, policy: str = "fp32",
                local_experts: int | None = None) -> tuple[float, list[float], float]:
    """Seconds per token of (the embedding, each decoder layer, the final norm + head + loss) on a device of
    ``speed``: the piece's training FLOPs (``layer_costs``) at ``speed.flops``, plus its memory traffic at
    ``speed.bytes``: what its forward keeps for the backward (``k2model.activations``, written once and
    read once), its matmul weights read three times a micro-batch (forward, input and weight gradients;
    ``local_experts`` routed experts of a MoE layer, all by default), spread over the micro-batch's
    tokens; the embedding reads and scatters its rows' gradients. The head's one large matmul is FLOP-bound,
    an MoE layer's dispatch, gating and small per-expert matmuls move more bytes per FLOP."""
    from k2model.activations import EMBEDDING_BYTES_PER_TOKEN, head_bytes_per_token, layer_bytes_per_token

    pc = count_parameters(cfg)
    embed_flops, layer_flops, head_flops = layer_costs(cfg, seq_len)
    tokens = micro_batch * seq_len
    weight_bytes = 2 if policy == "bf16" else 4
    experts = cfg.num_experts if local_experts is None else local_experts

    def seconds(flops: float, moved: float) -> float:
        return flops / speed.flops + moved / speed.bytes

    layers = []
    for i, flops in enumerate(layer_flops):
        moe = cfg.is_moe_layer(i)
        weights = pc.attention_per_layer + (pc.router_per_layer + (cfg.num_shared_experts + experts) * pc.expert
                                            if moe else pc.dense_ffn_per_layer)
        moved = 2 * layer_bytes_per_token(cfg, moe, policy) + 3 * weights * weight_bytes / tokens
        layers.append(seconds(flops, moved))
    embed = seconds(embed_flops, EMBEDDING_BYTES_PER_TOKEN + 3 * cfg.hidden_size * weight_bytes)
    head = seconds(head_flops, 2 * head_bytes_per_token(cfg, policy) + 3 * pc.output_head * weight_bytes / tokens)
    return embed, layers, head


def stage_cut(cfg: ModelConfig, pp: int, seq_len: int, counts: Sequence[int] | None, micro_batch: int,
              param_dtype: str, device_type: str, ep: int = 1) -> list[range]:
    """The stages a run of ``pp`` stages trains (the trainer's and ``k2pipe plan``'s one cut): ``counts`` if
    given, else balanced by ``layer_times`` at the device type's ``NOMINAL_SPEED``."""
    from k2model.activations import policy_of

    if pp == 1 and counts is None:
        return [range(cfg.num_layers)]
    costs = layer_times(cfg, seq_len, micro_batch, NOMINAL_SPEED["cuda" if device_type == "cuda" else "cpu"],
                        policy_of(param_dtype, device_type), cfg.num_experts // ep)
    return partition_layers(cfg, pp, seq_len, counts, costs=costs)


def partition_layers(cfg: ModelConfig, pp: int, seq_len: int, counts: Sequence[int] | None = None, *,
                     costs: tuple[float, Sequence[float], float] | None = None) -> list[range]:
    """The decoder layers of each of ``pp`` stages: ``counts`` layers each if given, else the contiguous cut
    whose most expensive stage is cheapest, ties going to the cut with earlier stages larger. ``costs``:
    (the embedding, each layer, the head) in any unit, the embedding on the first stage and the head on the
    last: ``layer_times`` (what the trainer and ``k2pipe plan`` use), or by default ``layer_costs``
    (training FLOPs)."""
    n = cfg.num_layers
    if counts is not None:
        counts = list(counts)
        if len(counts) != pp or any(c < 1 for c in counts) or sum(counts) != n:
            raise ValueError(f"train.pp_layers={counts}: need {pp} counts (train.pp), each >= 1, summing to "
                             f"model.num_layers={n}")
    else:
        if n < pp:
            raise ValueError(f"train.pp={pp} stages need at least {pp} layers; model.num_layers={n}")
        embed, layers, head = costs if costs is not None else layer_costs(cfg, seq_len)
        counts = _balanced_counts([embed + layers[0], *layers[1:-1], layers[-1] + head] if n > 1
                                  else [embed + layers[0] + head], pp)
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def _balanced_counts(costs: list[float], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty runs minimising the largest run's sum
    (dynamic programming over prefixes; ties keep the earliest-found, which favours longer early runs)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest maximum over splits of the first i costs into k runs; cut[k][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-9 * abs(value):
                    best[k][i], cut[k][i] = value, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


# ---------------------------------------------------------------------- the schedule's timing
def one_f_one_b_order(pp: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The order in which ``Schedule1F1B`` runs stage ``stage``'s work on ``m`` micro-batches: ``pp - stage``
    warm-up forwards (at most ``m``), then one backward and one forward in turn while forwards remain, then
    the remaining backwards. Items are ``("F", i)`` and ``("B", i)``."""
    warmup = min(m, pp - stage)
    order = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while b < m:
        order.append(("B", b))
        b += 1
        if f < m:
            order.append(("F", f))
            f += 1
    return order


def simulate_1f1b(pp: int, m: int, forward_s: Sequence[float] | float, backward_s: Sequence[float] | float
                  ) -> dict[str, float | list[float]]:
    """When each stage's work of one 1F1B step starts and ends, from the schedule's order
    (``one_f_one_b_order``) and each stage's forward and backward time per micro-batch (one figure for
    all, or one per stage): a forward waits for the previous stage's forward of its micro-batch, a
    backward for the next stage's backward (the last stage's, for its own forward), transfers free.
    Returns the step's ``makespan``, each stage's ``busy`` time and ``bubble`` (the idle share of the step
    on the busiest stage; with equal stages it is (pp - 1) / (m + pp - 1))."""
    fwd = [float(forward_s)] * pp if isinstance(forward_s, (int, float)) else [float(x) for x in forward_s]
    bwd = [float(backward_s)] * pp if isinstance(backward_s, (int, float)) else [float(x) for x in backward_s]
    if len(fwd) != pp or len(bwd) != pp:
        raise ValueError(f"need {pp} per-stage times")
    orders = [one_f_one_b_order(pp, s, m) for s in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    position = [0] * pp
    while any(position[s] < len(orders[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                kind, i = orders[s][position[s]]
                need = ("F", s - 1, i) if kind == "F" and s > 0 else (
                    ("B", s + 1, i) if kind == "B" and s < pp - 1 else (("F", s, i) if kind == "B" else None))
                if need is not None and need not in done:
                    break
                start = max(clock[s], done[need] if need is not None else 0.0)
                clock[s] = start + (fwd[s] if kind == "F" else bwd[s])
                done[(kind, s, i)] = clock[s]
                position[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("1F1B order deadlocked (a bug in one_f_one_b_order)")
    makespan = max(clock)
    busy = [m * (fwd[s] + bwd[s]) for s in range(pp)]
    return {"makespan": makespan, "busy": busy, "bubble": 1.0 - max(busy) / makespan}


def bubble_fraction(pp: int, m: int) -> float:
    """The idle share of a 1F1B step with ``pp`` equal stages and ``m`` micro-batches (``simulate_1f1b``)."""
    return float(simulate_1f1b(pp, m, 1.0, 2.0)["bubble"])


# ---------------------------------------------------------------------- the schedule
class _StageModule(torch.nn.Module):
    """What ``PipelineStage`` runs: one stage of the model, ``K2ForCausalLM.stage_forward``."""

    def __init__(self, model: K2ForCausalLM):
        super().__init__()
        self.stage = model
        self.poison_next = False
        """Test hook: the next forward's output becomes NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage.stage_forward(x)
        if self.poison_next:
            self.poison_next = False
            out = out * float("nan")
        return out


class PipelineRunner:
    """This rank's pipeline stage and its 1F1B schedule (see the module docstring). Build it on every rank
    at the same point, after the model has been cut to its stage (``K2ForCausalLM.keep_stage``)."""

    def __init__(self, model: K2ForCausalLM, layout: ParallelLayout, num_micro_batches: int, micro_batch_size: int,
                 seq_len: int, device: torch.device, autocast: bool = False):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        if layout.pp < 2:
            raise ValueError("PipelineRunner needs a layout with pp >= 2")
        if num_micro_batches < layout.pp:
            raise ValueError(f"1F1B needs at least as many micro-batches a step as stages: {num_micro_batches} "
                             f"< pp={layout.pp}")
        layout._need_groups()
        self.model, self.layout, self.num = model, layout, num_micro_batches
        self.device, self.autocast = device, autocast
        # The tensors between stages, given up front (the schedule's static mode): inferring them would run
        # the stage on meta tensors, expert exchange and statistics included.
        cfg, B, T = model.cfg, micro_batch_size, seq_len
        residual = self._residual_dtype()
        meta = torch.device("meta")
        inputs = (torch.empty(B, T, dtype=torch.int64, device=meta) if layout.is_first_stage
                  else torch.empty(B, T, cfg.hidden_size, dtype=residual, device=meta, requires_grad=True))
        outputs = (torch.empty(B, T, cfg.vocab_size, dtype=torch.bfloat16 if autocast else residual, device=meta,
                               requires_grad=True) if layout.is_last_stage
                   else torch.empty(B, T, cfg.hidden_size, dtype=residual, device=meta, requires_grad=True))
        self._module = _StageModule(model)
        self._stage = PipelineStage(self._module, layout.stage, layout.pp, device, input_args=inputs,
                                    output_args=outputs, group=layout.pp_group)
        self._schedule = Schedule1F1B(self._stage, num_micro_batches, loss_fn=self._loss, scale_grads=False)

    def poison_next_step(self) -> None:
        """Test hook (``train.nan_injection``): this rank's output of the next step's first micro-batch
        becomes NaN, so the loss or the gradients turn non-finite wherever the rank's stage is."""
        self._module.poison_next = True

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss_of(logits, targets) / self.num

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forward and backward over every micro-batch; returns the step's mean loss and mean
        language-model loss (float64 device scalars, the same on every rank)."""
        first, last = self.layout.is_first_stage, self.layout.is_last_stage
        # The first stage takes the tokens, the last the targets; a middle stage reads no data at all.
        batches = list(micro_batches) if first or last else []
        if (first or last) and len(batches) != self.num:
            raise ValueError(f"the schedule was built for {self.num} micro-batches, got {len(batches)}")
        self.model.aux_loss_scale = 1.0 / self.num
        self.model.stage_aux_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        losses: list[torch.Tensor] = []
        # return_outputs=False: the last stage would otherwise keep every micro-batch's logits ([B, T, V]
        # each) to concatenate them after the step, which every rank then waits for (benchmarks/pipeline.py).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if first:
                inputs = torch.cat([b[0] for b in batches]).to(self.device)
                self._schedule.step(inputs, return_outputs=False)
            elif last:
                targets = torch.cat([b[1] for b in batches]).to(self.device)
                self._schedule.step(target=targets, losses=losses, return_outputs=False)
            else:
                self._schedule.step(return_outputs=False)
        # [language-model loss, balance loss], each a mean over the micro-batches, summed over the stages.
        lm = (torch.stack(losses).detach().double().sum() if losses
              else torch.zeros((), dtype=torch.float64, device=self.device))
        parts = torch.stack([lm.to(self.device), self.model.stage_aux_loss / self.num])
        all_reduce_(parts, group=self.layout.pp_group, name="pipeline losses")
        return parts.sum(), parts[0]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward-only, one micro-batch at a time through the stages: [sum of loss x tokens, tokens] over
        ``batches`` (float64; the last stage's, zeros elsewhere)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        layout, group = self.layout, self.layout.pp_group
        cfg = self.model.cfg
        for inputs, targets in batches:
            B, T = inputs.shape
            if layout.is_first_stage:
                x = inputs.to(self.device)
            else:
                x = torch.empty(B, T, cfg.hidden_size, dtype=self._residual_dtype(), device=self.device)
                recv_(x, layout.stage - 1, group, name="validation activations")
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model.stage_forward(x)
            if layout.is_last_stage:
                total[0] += lm_loss_of(out, targets.to(self.device)).double() * targets.numel()
                total[1] += targets.numel()
            else:
                send_(out.contiguous(), layout.stage + 1, group, name="validation activations")
        return total

    def _residual_dtype(self) -> torch.dtype:
        """The residual stream between stages keeps the parameters' dtype (under autocast too: each layer
        adds its bf16 output to it)."""
        return next(self.model.parameters()).dtype

