"""What every Ray Train worker runs: the trainer of this rank on the packed shards, with its callbacks.

``train_loop_per_worker`` builds the layout, the data of this rank (by data-parallel rank), the trainer,
the checkpoint writer and the callbacks (``pipelines.train.callbacks``), restores the run's latest
registered checkpoint (resharded when it was written in another layout) and fits. This module is the
only one under ``pipelines/train/`` that imports Ray: ``RayTrainRegistry`` registers checkpoints with Ray
Train, and the context gives the rank, the world and the run's storage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import timedelta
from typing import Any

import torch

from k2model.distributed import ParallelLayout
from pipelines.config import config_from_dict
from pipelines.console import quiet_worker_logging, say
from pipelines.data.loader import DeterministicSampler, ShardRef, TrainBatches, WindowReader, eval_batches
from pipelines.train import callbacks
from pipelines.train.trainer import Trainer, measure_matmul_flops, seed_everything, use_deterministic


class RayTrainRegistry:
    """``CheckpointRegistry`` on Ray Train: a complete checkpoint folder is reported in place
    (``NO_UPLOAD``: the ranks wrote it already); Ray Train keeps the last ``num_to_keep`` and resumes a
    restarted worker group from the latest."""

    def __init__(self, fs):
        self.fs = fs
        # The controller's poll period (Ray Train reads it from the same variable, default 2 s).
        self.max_settle_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))

    def register(self, folder: str, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint(path=folder, filesystem=self.fs),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(dict(metrics))

    def latest(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else checkpoint.path

    def settle(self, timeout_s: float) -> bool:
        """``ray.train.report`` returns once its result is queued on this worker; the controller takes it (and
        registers the checkpoint) at its next poll of the workers, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
        (2 s by default). A worker killed before that poll loses the registration, so this waits until the
        queue is empty. Ray Train has no public call for it: the worker's result queue is read through its
        internal train context, and where that is not there (another Ray) this says False."""
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            results = get_train_context().execution_context.result_queue
        except (ImportError, AttributeError, RuntimeError):
            return False
        if not hasattr(results, "unfinished_tasks"):  # a queue.Queue counts what is put and not yet taken
            return False
        until = time.monotonic() + timeout_s
        while results.unfinished_tasks:
            if time.monotonic() > until:
                return False
            time.sleep(0.02)
        return True


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point that Ray Train runs in every worker."""
    import ray.train

    quiet_worker_logging()
    cfg = config_from_dict(loop_config["config"])
    t = cfg.train
    torch.set_num_threads(t.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if t.min_workers is not None:  # an elastic group, started at this size: its layout for it
        cfg = dataclasses.replace(cfg, train=t.at_world(world))
        t = cfg.train
    device = torch.device("cpu")
    if torch.cuda.is_available() and loop_config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()  # the GPU Ray Train assigned this worker
    if device.type == "cuda":
        # Before anything is built: a layout this GPU cannot hold fails here, naming the smallest change,
        # not with an out-of-memory error somewhere in the first step.
        from pipelines.config import check_device_memory

        props = torch.cuda.get_device_properties(device)
        check_device_memory(cfg, props.total_memory, f"the GPU of rank {rank} ({props.name}, "
                            f"{props.total_memory / 1e9:.1f} GB)")
    use_deterministic(t.deterministic)
    seed_everything(t.seed)
    layout = ParallelLayout(world_size=world, rank=rank, ep=t.ep, pp=t.pp,
                            timeout=timedelta(seconds=t.collective_timeout_s))

    train_shards = [ShardRef(**s) for s in loop_config["train_shards"]]
    val_shards = [ShardRef(**s) for s in loop_config["val_shards"]]
    reader = WindowReader(train_shards, cfg.data.seq_len, cache_bytes=loop_config.get("cache_bytes", 64 << 20))
    sampler = DeterministicSampler(train_shards, t.seed, t.global_batch_size, layout.dp_size, layout.dp_rank,
                                   t.micro_batch_size, t.shuffle_shards)
    val = eval_batches(WindowReader(val_shards, cfg.data.seq_len), t.eval_batches, t.micro_batch_size,
                       layout.dp_size, layout.dp_rank, seed=t.seed) if val_shards else []
    trainer = Trainer(cfg, TrainBatches(sampler, reader), val, device, layout=layout)

    storage = ctx.get_storage()
    fs = storage.storage_filesystem
    writer = trainer.checkpoint_writer(fs, storage.experiment_fs_path, RayTrainRegistry(fs))
    callbacks.restore_latest(trainer, writer)
    if writer.earlier_start_wrote():  # a checkpoint restored, or any folder an earlier start left
        writer.use_fresh_folders()

    logger = system_metrics = None
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
    log_stats = None
    if logger is not None:
        from pipelines.artifacts import snapshot_files

        tau = cfg.optimizer.qk_clip_tau if cfg.optimizer.uses_qk_clip else None

        def log_stats(step: int, detail: dict[str, Any]) -> None:
            logger.log_files(lambda: snapshot_files(detail, tau))

    trainer.callbacks = callbacks.standard_callbacks(
        trainer, writer, peak_flops=peak_flops, log=logger.log if logger else None,
        flush=logger.flush if logger else None, log_stats=log_stats, preemption_notice=_preemption_notice(),
        announce_preemption=(lambda what, step: logger.set_tag(f"k2pipe.preemption_{what}_step", str(step)))
        if logger else None)
    try:
        trainer.fit()
    finally:
        if system_metrics is not None:
            system_metrics.finish()


def _preemption_notice():
    """Ray Train's preemption notice as ``PreemptionCheckpoint`` takes it (None: no notice; else the deadline
    in epoch seconds, ``inf`` when none was given), or None where this Ray has no notices."""
    import math

    import ray.train

    ask = getattr(ray.train, "get_preemption_info", None)
    if ask is None:
        return None

    def notice() -> float | None:
        info = ask()
        if info is None:
            return None
        return math.inf if info.deadline_ms is None else info.deadline_ms / 1000

    return notice


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
