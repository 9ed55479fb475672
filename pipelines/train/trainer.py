"""The per-worker training loop that Ray Train runs: expert-parallel MuonClip pretraining with exact resume.

One step (every rank in lockstep):
  micro-batches: forward, (loss / accumulation).backward()
  -> gradient sync, overlapped with the last backward (replicated params averaged; expert params summed
     over holders / world)
  -> global gradient norm; a non-finite loss or norm on ANY rank skips the step everywhere
  -> clip, set the scheduled learning rate, optimizer step (MuonClip or AdamW)
  -> QK-Clip on the step's max logits (MAX over ranks), router-bias update from the load summed over ranks
  -> callbacks: metrics (rank 0 -> MLflow), validation, checkpoints, fault injection.

The data order is a function of (seed, step) (pipelines.data.loader), so the checkpointed state is model,
optimizer, step, bad-step streak and RNG states. Checkpoints (pipelines.train.checkpointing) are written per
rank in the background and registered with Ray Train only once every rank's shard has landed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from k2model.config import flops_per_token
from pipelines.config import RunConfig, config_from_dict
from pipelines.train.checkpointing import say

# Keys of the config that change the math: a checkpoint written under other values is refused.
MATH_SECTIONS = ("model", "optimizer")
# The layout (train.num_workers, train.ep, train.micro_batch_size) is not here: it changes who computes
# what and the order of float sums, not the math, so a checkpoint resumes in another layout, resharded
# (pipelines.train.reshard).
MATH_KEYS = ("data.seq_len", "data.vocab_size", "train.global_batch_size", "train.seed", "train.lr",
             "train.schedule", "train.warmup_steps", "train.decay_fraction", "train.min_lr_ratio",
             "train.grad_clip", "train.steps", "train.shuffle_shards")


def math_signature(cfg: RunConfig) -> dict[str, Any]:
    """The config values a checkpoint must agree with, in their JSON form (tuples become lists)."""
    flat = cfg.flat()
    sig = {k: v for k, v in flat.items() if k.split(".")[0] in MATH_SECTIONS and k != "model.preset"
           or k in MATH_KEYS}
    return json.loads(json.dumps(sig, default=str))


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
    pass


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
    """State and step logic of one rank; ``run`` drives it with callbacks."""

    def __init__(self, cfg: RunConfig, batches, val_batches, device: torch.device | None = None):
        from k2model.optim import build_optimizer
        from k2model.parallel import GradientSync, ParallelLayout, build_parallel_model

        self.cfg = cfg
        self.device = device or torch.device("cpu")
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.layout = ParallelLayout(world_size=world, rank=rank, ep=cfg.train.ep)
        self.rank, self.world = rank, world
        self.model = build_parallel_model(cfg.model, cfg.train.seed, self.layout).to(self.device).train()
        from k2model.optim import is_local_expert

        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.train.lr,
                                         rank_local=is_local_expert if self.layout.ep > 1 else None)
        self.grad_sync = GradientSync(self.model, self.layout)
        self.batches = batches
        self.val_batches = val_batches
        self.step = 0
        self.run_history = [{"from_step": 0, "world_size": world, "ep": cfg.train.ep}]
        """One entry per start of this run, the first from scratch, each further one a resume from a
        checkpoint: the step it resumed at and the layout it ran in from there (a resharded resume shows
        another ``world_size`` or ``ep``)."""
        self.bad_streak = 0
        self.skipped_total = 0
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.autocast = self.device.type == "cuda"
        self._nan_steps: set[int] = set()
        self.recovered_from_divergence = False
        if cfg.train.nan_injection:
            rank_s, step_s, *count = cfg.train.nan_injection.split(":")
            if int(rank_s) == rank:
                first = int(step_s)
                self._nan_steps = set(range(first, first + (int(count[0]) if count else 1)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "run_history": self.run_history,
            "bad_streak": self.bad_streak,
            "skipped_total": self.skipped_total,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.run_history = [*map(dict, state.get("run_history", [])),
                            {"from_step": self.step, "world_size": self.world, "ep": self.cfg.train.ep}]
        self.bad_streak = int(state["bad_streak"])
        self.skipped_total = int(state.get("skipped_total", 0))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        from k2model.moe import update_router_bias
        from k2model.parallel import (
            all_ranks_finite,
            clip_grad_norm_,
            global_grad_norm,
            sum_expert_load,
        )
        from k2model.qk_clip import qk_clip
        from k2model.schedule import lr_at

        t0 = time.perf_counter()
        cfg, t = self.cfg, self.cfg.train
        self.model.reset_max_logits()
        self.model.reset_expert_load()
        for p in self.model.parameters():
            p.grad = None
        loss_sum = lm_sum = 0.0
        for micro in range(self.accum):
            inputs, targets = self.batches.batch(self.step, micro)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(inputs, targets)
            if self.step in self._nan_steps and micro == 0:
                self._nan_steps.discard(self.step)  # each injected step fires once per process
                out.loss = out.loss * float("nan")
            if micro == self.accum - 1:
                self.grad_sync.arm()  # gradient all-reduce overlaps the last backward
            (out.loss / self.accum).backward()
            loss_sum += out.loss.item()
            lm_sum += out.lm_loss.item()
        loss, lm_loss = loss_sum / self.accum, lm_sum / self.accum

        self.grad_sync.finish()
        if t.grad_clip > 0:
            grad_norm = clip_grad_norm_(self.model, self.layout, t.grad_clip)
        else:
            grad_norm = global_grad_norm(self.model, self.layout)
        finite = all_ranks_finite(math.isfinite(loss) and bool(torch.isfinite(grad_norm)))
        lr = lr_at(self.step, t.steps, t.lr, t.schedule, t.warmup_steps, t.decay_fraction, t.min_lr_ratio)
        extra: dict[str, float] = {}
        if not finite:
            self.bad_streak += 1
            self.skipped_total += 1
            for p in self.model.parameters():
                p.grad = None
            result = StepResult(self.step, loss, lm_loss, float(grad_norm), lr, True,
                                self.tokens_per_step, time.perf_counter() - t0)
            self.step += 1
            return result
        self.bad_streak = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

        load = sum_expert_load(self.model, self.layout)
        update_router_bias(self.model.routers(), load, cfg.model.router_bias_update_rate)
        if cfg.optimizer.uses_qk_clip:
            stats = qk_clip(self.model, self.model.max_logits, cfg.optimizer.qk_clip_tau)
            max_logits = stats.max_logit_per_head
            extra["qk_clip/heads_clipped"] = float(stats.num_clipped)
        else:
            max_logits = self.model.max_logits.clone()
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
        extra["attn/max_logit"] = float(max_logits.max())
        for i, v in enumerate(max_logits.amax(dim=1).tolist()):
            extra[f"attn/max_logit_layer{i}"] = v
        if load.numel():
            mean = load.float().mean(dim=1).clamp(min=1e-9)
            extra["moe/load_imbalance"] = float((load.float().max(dim=1).values / mean).max())
            biases = torch.stack([r.e_score_correction_bias for r in self.model.routers()])
            extra["moe/router_bias_range"] = float(biases.max() - biases.min())
        result = StepResult(self.step, loss, lm_loss, float(grad_norm), lr, False, self.tokens_per_step,
                            time.perf_counter() - t0, extra)
        self.step += 1
        return result

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for inputs, targets in self.val_batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(inputs.to(self.device), targets.to(self.device))
            total += torch.tensor([out.lm_loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
        self.model.train()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point that Ray Train runs in every worker."""
    import ray.train

    from pipelines.data.loader import DeterministicSampler, ShardRef, TrainBatches, WindowReader, eval_batches
    from pipelines.train import checkpointing

    cfg = config_from_dict(loop_config["config"])
    t = cfg.train
    torch.set_num_threads(t.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() and loop_config.get(
        "use_gpu") else torch.device("cpu")
    _seed_everything(t.seed)

    train_shards = [ShardRef(**s) for s in loop_config["train_shards"]]
    val_shards = [ShardRef(**s) for s in loop_config["val_shards"]]
    reader = WindowReader(train_shards, cfg.data.seq_len, cache_bytes=loop_config.get("cache_bytes", 64 << 20))
    sampler = DeterministicSampler(train_shards, t.seed, t.global_batch_size, world, rank, t.micro_batch_size,
                                   t.shuffle_shards)
    val = eval_batches(WindowReader(val_shards, cfg.data.seq_len), t.eval_batches, t.micro_batch_size,
                       world, rank) if val_shards else []
    trainer = Trainer(cfg, TrainBatches(sampler, reader), val, device)

    storage = ctx.get_storage()
    reshard = checkpointing.ReshardSpec(cfg.model.num_experts, trainer.optimizer.computes_here)
    ckpt = checkpointing.CheckpointWriter(storage.storage_filesystem, storage.experiment_fs_path, rank,
                                          signature=math_signature(cfg), world_size=world, ep=t.ep,
                                          reshard=reshard)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        state = checkpointing.load_rank_state(restored, rank, math_signature(cfg), world, t.ep, reshard)
        trainer.load_state_dict(state)
        if rank == 0:
            say(f"[k2pipe] resumed from {restored.path} at step {trainer.step}")
        if "resharded_from" in state:
            old = state["resharded_from"]
            say(f"[k2pipe] rank {rank}: resharded a checkpoint of {old['world_size']} workers (ep={old['ep']}) "
                f"into {world} workers (ep={t.ep}), reading {sum(old['bytes_read'])} bytes; from here the run "
                "equals an uninterrupted one to float rounding, not bit for bit")

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from pipelines.tracking import MetricLogger

        logger = MetricLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        system_metrics = _start_system_metrics(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        # Every start of the run, and the layout of each: the run's params keep the one it started in.
        logger.set_tag("k2pipe.run_history", json.dumps(trainer.run_history))
    if rank == 0 and trainer.optimizer.ns_dtype is not None:
        # optimizer.ns_dtype=auto resolves per hardware (and a resumed run keeps its checkpoint's dtype).
        say(f"[k2pipe] Newton-Schulz iterates in {trainer.optimizer.ns_dtype} "
            f"(optimizer.ns_dtype={cfg.optimizer.ns_dtype})")
        if logger is not None:
            logger.set_tag("k2pipe.ns_dtype", trainer.optimizer.ns_dtype)
    peak_flops = measure_matmul_flops(torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      device=device.type)
    fault = _parse_fault(t.fault_injection)

    window: list[StepResult] = []
    last_loss = float("nan")
    while trainer.step < t.steps:
        _maybe_inject_fault(fault, rank, trainer.step, storage)
        result = trainer.train_step()
        window.append(result)
        last_loss = result.loss
        if result.skipped:
            if rank == 0:
                say(f"[k2pipe] step {result.step}: non-finite loss or gradient norm; step skipped "
                    f"({trainer.bad_streak} in a row)")
            if trainer.bad_streak >= t.max_bad_steps:
                _recover_from_divergence(trainer, ckpt, result.step)
        step_done = trainer.step
        metrics: dict[str, float] = {}
        if step_done % t.log_every == 0 or step_done == t.steps:
            seconds = sum(r.seconds for r in window)
            tokens = sum(r.tokens for r in window)
            applied = [r for r in window if not r.skipped] or window
            metrics.update({
                # Means over the steps since the last log: single-step losses are noisy.
                "train/loss": sum(r.loss for r in applied) / len(applied),
                "train/lm_loss": sum(r.lm_loss for r in applied) / len(applied), "train/lr": result.lr,
                "train/grad_norm": result.grad_norm, "train/tokens_per_s": tokens / max(seconds, 1e-9),
                "train/mfu": tokens / max(seconds, 1e-9) * trainer.flops_per_token / (peak_flops * world),
                "train/skipped_steps": float(trainer.skipped_total), **result.extra,
            })
            window = []
        if (t.eval_every and step_done % t.eval_every == 0) or step_done == t.steps:
            if val:
                metrics["val/loss"] = trainer.evaluate()
        if logger is not None and metrics:
            logger.log(step_done, metrics)
        if rank == 0 and metrics and "train/loss" in metrics:
            say(f"[k2pipe] step {step_done}/{t.steps} loss {metrics['train/loss']:.4f} "
                f"lr {metrics['train/lr']:.2e} tok/s {metrics['train/tokens_per_s']:.0f}"
                + (f" val {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""))
        # Checkpoints: snapshot now, upload in the background, register once every rank's shard landed.
        ckpt.poll_and_register(final=False)
        if step_done == t.steps or (t.checkpoint_every and step_done % t.checkpoint_every == 0):
            ckpt.start(step_done, trainer.state_dict(), {"train/loss": last_loss, "step": step_done})
    ckpt.poll_and_register(final=True)
    if logger is not None:
        logger.flush()
        if system_metrics is not None:
            system_metrics.finish()


def _start_system_metrics(tracking_uri: str, run_id: str):
    """CPU, memory, disk and network of rank 0's node into the pretrain run (psutil); best effort."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True,
                                       tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # never let monitoring stop training
        say(f"[k2pipe] system metrics are off: {e}")
        return None


def _parse_fault(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


def _maybe_inject_fault(fault, rank: int, step: int, storage) -> None:
    """Crash ``rank`` once when it reaches ``step`` (tests only; off by default). A marker file in the run's
    storage makes it happen once across restarts."""
    if fault is None or fault != (rank, step):
        return
    marker = f"{storage.experiment_fs_path}/fault-injected-rank{rank}-step{step}"
    fs = storage.storage_filesystem
    import pyarrow.fs as pafs

    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    with fs.open_output_stream(marker) as f:
        f.write(b"1")
    say(f"[k2pipe] fault injection: rank {rank} exits at step {step}")
    os._exit(1)


def _recover_from_divergence(trainer: Trainer, ckpt, step: int) -> None:
    """After ``max_bad_steps`` non-finite steps in a row, restore the latest checkpoint once; if it
    happens again, stop with an error naming the step."""
    if trainer.recovered_from_divergence:
        raise NonFiniteError(
            f"training diverged again at step {step} after restoring the latest checkpoint: "
            f"{trainer.cfg.train.max_bad_steps} non-finite steps in a row")
    ckpt.poll_and_register(final=True)  # every rank is here: the skip decision was agreed by all
    state = ckpt.load_latest_registered()
    if state is None:
        raise NonFiniteError(f"training diverged at step {step} ({trainer.cfg.train.max_bad_steps} non-finite "
                             "steps in a row) and there is no checkpoint to restore")
    skipped = trainer.skipped_total
    trainer.load_state_dict(state)
    trainer.skipped_total = skipped  # the count of skipped steps survives the restore
    trainer.recovered_from_divergence = True
    say(f"[k2pipe] restored the checkpoint of step {trainer.step} after non-finite steps")
