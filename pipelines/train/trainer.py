"""The trainer of one rank: its state, ``Trainer.step()``, and ``Trainer.fit()`` driving callbacks.

``Trainer.step()`` (every rank in lockstep):
  1. ``forward_backward(trainer, micro_batches)``: pluggable; the default, ``accumulate_gradients``, runs
     forward and ``(loss / accumulation).backward()`` per micro-batch; under a pipeline (``train.pp``)
     ``pipeline_forward_backward`` runs the stage's 1F1B schedule (``k2model.pipeline``);
  2. gradient reduction over the stage's ranks (ZeRO-1, ``k2model.parallel.GradientSync``): each rank
     receives the averaged gradients of the part it updates, overlapped with the last backward when not
     pipelined;
  3. the global gradient norm; a non-finite loss or norm on ANY rank skips the step everywhere;
  4. clipping, the scheduled learning rate, the owned part of the optimizer step (MuonClip or AdamW);
  5. QK-Clip on the step's max logits (MAX over ranks), applied to the owned masters; the optimizer
     publishes the parameters; the router-bias update from the load summed over ranks.

``Trainer.fit()`` runs steps until ``train.steps`` and calls each callback's ``on_fit_start``,
``pre_step``, ``post_step`` and ``on_fit_end`` (``pipelines.train.callbacks``: metrics, validation,
checkpoints, divergence recovery, fault injection). The trainer and its callbacks import no Ray: metrics go
to a sink and checkpoints to a registry (``pipelines.train.checkpointing.CheckpointRegistry``) that the Ray
Train worker entry (``pipelines.train.worker``) or a plain ``torch.distributed`` launcher provides.

The data order is a function of (seed, step, data-parallel rank) (``pipelines.data.loader``), so the
checkpointed state is model, optimizer, step, bad-step streak and RNG states.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from k2model import moe, parallel, qk_clip, schedule
from k2model.config import flops_per_token
from k2model.distributed import ParallelLayout, all_ranks_finite, all_reduce_
from k2model.pipeline import PipelineRunner, stage_cut
from pipelines.config import RunConfig
from pipelines.train.checkpointing import CheckpointRegistry, CheckpointWriter, ReshardSpec

# Keys of the config that change the math: a checkpoint written under other values is refused.
MATH_SECTIONS = ("model", "optimizer")
# The layout (train.num_workers, train.ep, train.micro_batch_size) is not here: it changes who computes
# what and the order of float sums, not the math, so a checkpoint resumes in another layout, resharded
# (pipelines.train.reshard).
MATH_KEYS = ("data.seq_len", "data.vocab_size", "train.global_batch_size", "train.seed", "train.lr",
             "train.param_dtype", "train.schedule", "train.warmup_steps", "train.decay_fraction",
             "train.min_lr_ratio", "train.grad_clip", "train.steps", "train.shuffle_shards")


def math_signature(cfg: RunConfig) -> dict[str, Any]:
    """The config values a checkpoint must agree with, in their JSON form (tuples become lists)."""
    flat = cfg.flat()
    sig = {k: v for k, v in flat.items() if k.split(".")[0] in MATH_SECTIONS and k != "model.preset"
           or k in MATH_KEYS}
    return json.loads(json.dumps(sig, default=str))


def logged_metric_names(cfg: RunConfig) -> list[str]:
    """Every metric series a pretraining run logs (besides MLflow's ``system/`` metrics): the step's
    figures, per layer the max logit and, under QK-Clip, the share of heads clipped, and the validation's.
    The per-head and per-expert figures are snapshots (``Trainer.detail``), not series, so the count grows
    with the layers only."""
    m, o = cfg.model, cfg.optimizer
    names = ["train/loss", "train/lm_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
             "train/skipped_steps", "train/seconds_total", "attn/max_logit",
             *(f"attn/max_logit_layer{i}" for i in range(m.num_layers))]
    if o.uses_qk_clip:
        names += ["qk_clip/heads_clipped", "qk_clip/heads_clipped_total",
                  *(f"qk_clip/clipped_share_layer{i}" for i in range(m.num_layers))]
    if m.num_moe_layers:
        names += ["moe/load_imbalance", "moe/router_bias_range"]
    return names + ["val/loss", "val/tokens"]


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """Training diverged and could not be recovered (see ``pipelines.train.callbacks.DivergenceRecovery``)."""


class Callback:
    """Work around the step, by hook; every hook runs on every rank, so a callback that communicates does
    so in lockstep. ``trainer.metrics`` collects what the step's callbacks measured, for a sink to log."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before the first step (after any restore)."""

    def pre_step(self, trainer: Trainer) -> None:
        """Before ``trainer.step()``; ``trainer.global_step`` is the step about to run."""

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        """After ``trainer.step()``; ``trainer.global_step`` counts the steps done."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Once, after the last step."""


Batch = tuple[torch.Tensor, torch.Tensor]
ForwardBackward = Callable[["Trainer", Iterable[Batch]], tuple[torch.Tensor | float, torch.Tensor | float]]
"""Runs a step's forward and backward passes; returns (mean loss, mean language-model loss)."""


def accumulate_gradients(trainer: Trainer, micro_batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``forward_backward``: every micro-batch forward, then ``(loss / n).backward()``, the
    gradient all-reduce armed before the last backward so it overlaps it. Returns the mean loss and mean
    language-model loss over the micro-batches: float64 scalars summed on the device, so the loop never
    waits for the device (the step reads them once)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    lm_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    num = trainer.accum
    for micro, (inputs, targets) in enumerate(micro_batches):
        inputs, targets = inputs.to(trainer.device), targets.to(trainer.device)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            out = trainer.model(inputs, targets)
        if micro == 0 and trainer.poison_loss:
            trainer.poison_loss = False  # test hook (``pipelines.train.callbacks.NaNInjection``)
            out.loss = out.loss * float("nan")
        if micro == num - 1:
            trainer.grad_sync.arm()  # gradient all-reduce overlaps the last backward
        (out.loss / num).backward()
        loss_sum += out.loss.detach().double()
        lm_sum += out.lm_loss.detach().double()
    return loss_sum / num, lm_sum / num


def pipeline_forward_backward(trainer: Trainer, micro_batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``forward_backward`` of a pipeline layout: the 1F1B schedule of ``trainer.pipeline``
    (``k2model.pipeline.PipelineRunner``); the loss pair comes back on every rank."""
    if trainer.poison_loss:
        trainer.poison_loss = False  # test hook: this rank's first micro-batch output
        trainer.pipeline.poison_next_step()
    return trainer.pipeline.forward_backward(micro_batches)


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, device: str = "cpu") -> float:
    """This machine's dense matmul throughput (FLOP/s) for a square problem: the MFU denominator."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


class Trainer:
    """State and step logic of one rank (see the module docstring).

    ``batches.batch(step, micro)`` gives this rank's micro-batch ``micro`` of step ``step`` (indexed by
    the data-parallel rank, so every rank of a data-parallel index reads the same rows); ``val_batches``
    is this rank's fixed validation set. ``layout`` defaults to one built from ``torch.distributed``'s
    world (every rank must then build its trainer at the same point: the layout creates process groups).
    """

    def __init__(self, cfg: RunConfig, batches, val_batches, device: torch.device | None = None, *,
                 layout: ParallelLayout | None = None, forward_backward: ForwardBackward | None = None):
        from k2model.optim import build_optimizer

        self.cfg = cfg
        self.device = device or torch.device("cpu")
        if layout is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            layout = ParallelLayout(world_size=world, rank=rank, ep=cfg.train.ep, pp=cfg.train.pp)
        if (layout.ep, layout.pp) != (cfg.train.ep, cfg.train.pp):
            raise ValueError(f"{layout!r} differs from train.ep={cfg.train.ep}, train.pp={cfg.train.pp}")
        self.layout = layout
        self.rank, self.world = layout.rank, layout.world_size
        self.stages = (stage_cut(cfg.model, layout.pp, cfg.data.seq_len, cfg.train.pp_layers,
                                 cfg.train.micro_batch_size, cfg.train.param_dtype, self.device.type, layout.ep)
                       if layout.pp > 1 else None)
        """The decoder layers of each pipeline stage (None without a pipeline)."""
        self.model = parallel.build_parallel_model(
            cfg.model, cfg.train.seed, layout, self.device,
            stage_layers=self.stages[layout.stage] if self.stages else None,
            param_dtype=getattr(torch, cfg.train.param_dtype)).train()
        self.model.set_recompute(cfg.train.recompute)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.train.lr, layout=layout,
                                         offload=cfg.train.offload_optimizer)
        self.grad_sync = parallel.GradientSync(self.model, layout, self.optimizer.plan)
        self.batches = batches
        self.val_batches = val_batches
        self.val_tokens = 0
        """Tokens the last ``evaluate`` measured, all ranks together."""
        self.callbacks: list[Callback] = []
        """Run by ``fit()`` in this order (``pipelines.train.callbacks.standard_callbacks`` builds a run's)."""
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp_size)
        self.autocast = self.device.type == "cuda"
        self.pipeline = (PipelineRunner(self.model, layout, self.accum, cfg.train.micro_batch_size, cfg.data.seq_len,
                                        self.device, self.autocast) if layout.pp > 1 else None)
        """This rank's pipeline stage and schedule (None without a pipeline)."""
        self.forward_backward = forward_backward or (pipeline_forward_backward if self.pipeline
                                                     else accumulate_gradients)
        self.global_step = 0
        """Steps done (the next step's index)."""
        self.run_history = [{"from_step": 0, "world_size": self.world, "ep": cfg.train.ep, "pp": cfg.train.pp}]
        """One entry per start of this run, the first from scratch, each further one a resume from a
        checkpoint: the step it resumed at and the layout it ran in from there (a resharded resume shows
        another ``world_size`` or ``ep``)."""
        self.bad_streak = 0
        self.skipped_total = 0
        self.clipped_total = 0
        """Heads QK-Clip rescaled, summed over every step of the run (resumes included)."""
        self.train_seconds = 0.0
        """Seconds spent in steps over the whole run (resumes included; restarts and checkpoint waits not)."""
        self.detail: dict[str, Any] | None = None
        """The last snapshot of the whole model's per-head max logits ``[layers, heads]`` and per-expert
        loads ``[MoE layers, experts]`` (every ``train.stats_every`` steps and at the last), with its step."""
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.poison_loss = False
        """Set by a test callback: the next step's first micro-batch loss becomes NaN."""
        self.metrics: dict[str, float] = {}
        """What this step's callbacks measured (cleared before each step; a sink callback logs it)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.global_step,
            "run_history": self.run_history,
            "bad_streak": self.bad_streak,
            "skipped_total": self.skipped_total,
            "clipped_total": self.clipped_total,
            "train_seconds": self.train_seconds,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["step"])
        self.run_history = [*map(dict, state.get("run_history", [])),
                            {"from_step": self.global_step, "world_size": self.world, "ep": self.cfg.train.ep,
                             "pp": self.cfg.train.pp}]
        self.bad_streak = int(state["bad_streak"])
        self.skipped_total = int(state.get("skipped_total", 0))
        self.clipped_total = int(state.get("clipped_total", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def checkpoint_writer(self, fs: Any, experiment_path: str, registry: CheckpointRegistry) -> CheckpointWriter:
        """The writer of this rank's checkpoints into ``experiment_path``: this run's math signature and
        layout, and how to reshard a checkpoint of another layout into it."""
        names = frozenset(self.model.state_dict()) if self.layout.pp > 1 else None
        return CheckpointWriter(fs, experiment_path, self.rank, signature=math_signature(self.cfg),
                                world_size=self.world, ep=self.layout.ep, pp=self.layout.pp, registry=registry,
                                reshard=ReshardSpec(self.cfg.model.num_experts, self.optimizer.global_span, names))

    # ------------------------------------------------------------------ one step
    def micro_batches(self, step: int) -> Iterator[Batch]:
        """This rank's micro-batches of ``step``, read as they are needed."""
        for micro in range(self.accum):
            yield self.batches.batch(step, micro)

    def step(self) -> StepResult:
        """One optimizer step (see the module docstring); ``global_step`` advances by one, skipped or not."""
        t0 = time.perf_counter()
        t = self.cfg.train
        self.model.reset_max_logits()
        self.model.reset_expert_load()
        self.grad_sync.prepare()
        loss_t, lm_loss_t = (torch.as_tensor(v, dtype=torch.float64, device=self.device)
                             for v in self.forward_backward(self, self.micro_batches(self.global_step)))

        self.grad_sync.finish()
        if t.grad_clip > 0:
            grad_norm = parallel.clip_grad_norm_(self.optimizer, t.grad_clip)
        else:
            grad_norm = parallel.global_grad_norm(self.optimizer)
        # Every rank's verdict on its loss and the global norm (the step's first host read), then the
        # logged values, read together once everything is computed.
        finite = all_ranks_finite(torch.isfinite(loss_t) & torch.isfinite(grad_norm))
        loss, lm_loss, norm = torch.stack([loss_t, lm_loss_t, grad_norm.double()]).tolist()
        lr = schedule.lr_at(self.global_step, t.steps, t.lr, t.schedule, t.warmup_steps, t.decay_fraction,
                            t.min_lr_ratio)
        if not finite:
            self.bad_streak += 1
            self.skipped_total += 1
            result = StepResult(self.global_step, loss, lm_loss, norm, lr, True,
                                self.tokens_per_step, time.perf_counter() - t0)
            self.train_seconds += result.seconds
            self.global_step += 1
            return result
        self.bad_streak = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.update()
        extra = self._post_step()
        result = StepResult(self.global_step, loss, lm_loss, norm, lr, False, self.tokens_per_step,
                            time.perf_counter() - t0, extra)
        self.train_seconds += result.seconds
        self.global_step += 1
        return result

    def _post_step(self) -> dict[str, float]:
        """QK-Clip on the updated weights (the owned masters, before the optimizer publishes them), the
        publication of the parameters, and the router-bias update; returns their statistics."""
        cfg, layout = self.cfg, self.layout
        extra: dict[str, float] = {}
        # Each stage clips and updates its own layers over its own ranks; the logged figures are the whole
        # model's (the layers of the other stages are -inf or 0 here, and the pipeline group fills them in).
        stage = self.model.stage_layers
        max_logits = torch.full_like(self.model.max_logits, float("-inf"))
        clipped = torch.zeros(1, dtype=torch.float64, device=max_logits.device)
        if cfg.optimizer.uses_qk_clip:
            stats = qk_clip.qk_clip(self.model, self.model.stage_max_logits(), cfg.optimizer.qk_clip_tau,
                                    process_group=layout.dp_group, scale_rows=self.optimizer.scale_rows_)
            max_logits[stage.start:stage.stop] = stats.max_logit_per_head.to(max_logits.device)
            clipped += stats.num_clipped
        else:
            max_logits[stage.start:stage.stop] = all_reduce_(self.model.stage_max_logits().clone(),
                                                             dist.ReduceOp.MAX, layout.dp_group, name="max logits")
        self.optimizer.publish()
        load = parallel.sum_expert_load(self.model, layout)
        moe.update_router_bias(self.model.routers(), load, cfg.model.router_bias_update_rate)
        # [load imbalance, bias max, -bias min] of this stage's MoE layers (-inf without any).
        moe_stats = torch.full((3,), float("-inf"), device=max_logits.device)
        if load.numel():
            mean = load.float().mean(dim=1).clamp(min=1e-9)
            biases = torch.stack([r.e_score_correction_bias for r in self.model.routers()])
            imbalance = (load.float().max(dim=1).values / mean).max().to(biases.device)
            moe_stats = torch.stack([imbalance, biases.max(), -biases.min()]).float().to(moe_stats.device)
        if layout.pp > 1:
            all_reduce_(max_logits, dist.ReduceOp.MAX, layout.pp_group, name="max logits of every stage")
            all_reduce_(moe_stats, dist.ReduceOp.MAX, layout.pp_group, name="MoE statistics of every stage")
            all_reduce_(clipped, group=layout.pp_group, name="heads clipped in every stage")
        # Metrics grow with the layers, not the heads or experts: per layer the max logit and the share
        # of heads clipped; the per-head and per-expert figures go to snapshots (``detail``).
        extra["attn/max_logit"] = float(max_logits.max())
        for i, v in enumerate(max_logits.amax(dim=1).tolist()):
            extra[f"attn/max_logit_layer{i}"] = v
        if cfg.optimizer.uses_qk_clip:
            self.clipped_total += int(clipped)
            extra["qk_clip/heads_clipped"] = float(clipped)
            extra["qk_clip/heads_clipped_total"] = float(self.clipped_total)
            shares = (max_logits > cfg.optimizer.qk_clip_tau).double().mean(dim=1).tolist()
            for i, v in enumerate(shares):
                extra[f"qk_clip/clipped_share_layer{i}"] = v
        done, t = self.global_step + 1, cfg.train
        if done == t.steps or (t.stats_every and done % t.stats_every == 0):
            self.detail = {"step": done, "max_logits": max_logits.float().cpu(),
                           "expert_load": self._whole_expert_load(load).cpu(),
                           "first_moe_layer": cfg.model.first_k_dense}
        if cfg.model.num_moe_layers:
            extra["moe/load_imbalance"] = float(moe_stats[0])
            extra["moe/router_bias_range"] = float(moe_stats[1] + moe_stats[2])  # max - min, in fp32
        return extra

    def _whole_expert_load(self, load: torch.Tensor) -> torch.Tensor:
        """``[MoE layers, experts]`` tokens routed to each expert over the whole model, from this stage's
        rows ``load`` (summed over the stage's ranks already), put together over the pipeline group."""
        m = self.cfg.model
        whole = torch.zeros(m.num_moe_layers, m.num_experts, dtype=torch.float64, device=self.device)
        stage = self.model.stage_layers
        first = max(stage.start, m.first_k_dense) - m.first_k_dense
        if load.numel():
            whole[first:first + load.shape[0]] = load.to(whole)
        if self.layout.pp > 1:
            all_reduce_(whole, group=self.layout.pp_group, name="expert loads of every stage")
        return whole

    def fit(self) -> None:
        """Steps until ``train.steps``, with the callbacks' hooks around each."""
        for callback in self.callbacks:
            callback.on_fit_start(self)
        while self.global_step < self.cfg.train.steps:
            self.metrics = {}
            for callback in self.callbacks:
                callback.pre_step(self)
            result = self.step()
            for callback in self.callbacks:
                callback.post_step(self, result)
        for callback in self.callbacks:
            callback.on_fit_end(self)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        if self.pipeline is not None:  # through the stages; the last one's ranks hold the sums
            total = self.pipeline.evaluate(self.val_batches)
        else:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss x tokens, tokens]
            for inputs, targets in self.val_batches:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    out = self.model(inputs.to(self.device), targets.to(self.device))
                total[0] += out.lm_loss.detach().double() * targets.numel()
                total[1] += targets.numel()
        self.model.train()
        all_reduce_(total, name="validation loss")
        self.val_tokens = int(total[1])
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}
"""What ``train.deterministic`` sets in a worker's environment before CUDA or NCCL start (cuBLAS picks
its workspace, NCCL its algorithm, once per process)."""


def use_deterministic(enabled: bool) -> None:
    """``train.deterministic``: deterministic kernels only (an error names any op without one)."""
    if enabled:
        for key, value in DETERMINISTIC_ENV.items():
            os.environ.setdefault(key, value)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's RNGs from one seed (before the trainer is built)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
