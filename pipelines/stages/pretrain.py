"""The pretrain stage: Ray Train's TorchTrainer runs ``train_loop_per_worker`` on the packed shards.

Inputs: the run config, the shard stage's manifest, the MLflow run id to log into. Output: the final
checkpoint (a folder of per-rank shards) and the last metrics. The Ray Train run is named
``<run-name>-pretrain-<fingerprint>`` and stored under ``<storage>/runs/<run-name>/``, so running the same
run name and config again resumes from its latest checkpoint, and a changed config never resumes an
incompatible one. Everything that can be checked is checked before a worker starts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pipelines import storage
from pipelines.config import RunConfig
from pipelines.console import train_log_level
from pipelines.retrying_fs import retrying
from pipelines.stages.cache import cached_stage
from pipelines.train.trainer import DETERMINISTIC_ENV, math_signature


@dataclass(frozen=True)
class PretrainOutputs:
    run_dir: str
    """URI of the Ray Train run folder."""
    checkpoint_uri: str
    """URI of the final checkpoint folder."""
    step: int
    metrics: dict[str, Any]
    fingerprint: str
    completed_at: float = 0.0
    """When the run finished (downstream fingerprints include it, so a retrained model is re-evaluated)."""
    reused: bool = False


def as_manifest_dict(manifest: Any) -> dict[str, Any]:
    """The shard stage's manifest (``pipelines.data.packed.ShardManifest`` or its JSON form) as a plain dict."""
    return dataclasses.asdict(manifest) if dataclasses.is_dataclass(manifest) else dict(manifest)


def pretrain_fingerprint(cfg: RunConfig, manifest: dict[str, Any]) -> str:
    return storage.fingerprint({"math": math_signature(cfg), "data": manifest.get("config_hash"),
                                "tokenizer": manifest.get("tokenizer_sha256")})


def shard_refs(shard_stage_uri: str, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's shards of one split as ``{"uri", "rows"}`` records for the workers."""
    info = manifest["splits"].get(split)
    if not info:
        return []
    return [{"uri": storage.join(shard_stage_uri, s["path"]), "rows": int(s["num_rows"])} for s in info["shards"]]


def validate_against_data(cfg: RunConfig, manifest: dict[str, Any], where: str) -> None:
    """The model and run must fit the data: vocabulary, sequence length, enough windows for a batch."""
    if manifest.get("vocab_size") is not None and manifest["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {manifest['vocab_size']} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size >= the tokenizer's vocabulary")
    if manifest.get("seq_len") != cfg.data.seq_len:
        raise ValueError(f"{where}: shards hold windows of seq_len={manifest.get('seq_len')} but data.seq_len="
                         f"{cfg.data.seq_len}; re-run the shard stage or set data.seq_len to match")
    windows = manifest["splits"]["train"]["num_windows"]
    if windows < cfg.train.global_batch_size:
        raise ValueError(f"{where}: the training split has {windows} windows, fewer than one global batch "
                         f"(train.global_batch_size={cfg.train.global_batch_size}); use more data or a smaller "
                         "batch")


def ray_train_run_name(cfg: RunConfig, fingerprint: str) -> str:
    return f"{cfg.run_name}-pretrain-{fingerprint}"


def run_pretrain(cfg: RunConfig, shard_stage_uri: str, manifest: dict[str, Any], mlflow_run_id: str | None = None,
                 tracking_uri: str | None = None, use_gpu: bool | None = None) -> PretrainOutputs:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    manifest = as_manifest_dict(manifest)
    validate_against_data(cfg, manifest, shard_stage_uri)
    fp = pretrain_fingerprint(cfg, manifest)
    run_root = storage.run_dir(cfg.storage.root, cfg.run_name)
    fs, run_root_path = storage.resolve(run_root)
    fs.create_dir(run_root_path, recursive=True)
    # Ray Train's own run state and our checkpoints ride out short storage outages.
    fs = retrying(fs, retry_seconds=60.0)
    name = ray_train_run_name(cfg, fp)
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **t.worker_resource_map}
    if use_gpu:
        resources["GPU"] = 1
    _check_worker_resources(t)
    loop_config = {
        "config": dataclasses.asdict(cfg),
        "train_shards": shard_refs(shard_stage_uri, manifest, "train"),
        "val_shards": shard_refs(shard_stage_uri, manifest, "val"),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "use_gpu": use_gpu,
    }
    trainer = TorchTrainer(
        _entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(t.collective_timeout_s)),
        # An elastic group gives Ray Train its range: it sizes the group to what the cluster holds.
        scaling_config=ScalingConfig(num_workers=t.num_workers if t.min_workers is None else t.worker_counts,
                                     use_gpu=use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_check_s),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run_root_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
            # Set before the worker starts CUDA or NCCL, which read them once.
            worker_runtime_env={"env_vars": dict(DETERMINISTIC_ENV)} if t.deterministic else None,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"pretraining run {name} finished without a registered checkpoint")
    run_dir = storage.join(run_root, name)
    final = storage.join(run_dir, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    check_final_checkpoint(checkpoint.filesystem, checkpoint.path, t.steps, final)
    metrics = dict(result.metrics or {})
    return PretrainOutputs(run_dir=run_dir, checkpoint_uri=final, step=t.steps, metrics=metrics, fingerprint=fp)


def check_final_checkpoint(fs, path: str, steps: int, where: str) -> None:
    """The run's last registered checkpoint is of its last step, or a RuntimeError: a stage that ended on an
    older one must not be marked complete with the last steps lost."""
    from pipelines.train.checkpointing import read_meta

    step = read_meta(fs, path).get("step")
    if step != steps:
        raise RuntimeError(f"pretraining ended with checkpoint {where} of step {step}, not of the last step "
                           f"(train.steps={steps}); the stage is not marked complete. Run it again to resume "
                           "from that checkpoint.")


def _check_worker_resources(t) -> None:
    """Say, before Ray Train waits for them, when the cluster lacks the custom resources the workers ask for
    (an autoscaling cluster may still add them, so this warns rather than refuses)."""
    import ray

    from pipelines.console import say

    have = ray.cluster_resources()
    fewest = t.worker_counts[0]
    for name, amount in t.worker_resource_map.items():
        if have.get(name, 0.0) < amount * fewest:
            say(f"[k2pipe] train.worker_resources asks {amount:g} {name} for each of {fewest} workers; "
                f"the cluster has {have.get(name, 0.0):g} now: training waits until nodes with it join")


def _entry(loop_config: dict[str, Any]) -> None:
    from pipelines.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_config)


def run_pretrain_stage(cfg: RunConfig, shard_stage_uri: str, manifest: dict[str, Any], force: bool = False,
                       mlflow_run_id: str | None = None, tracking_uri: str | None = None) -> PretrainOutputs:
    """The DAG's pretrain stage: reuse a finished run (``_COMPLETE.json`` in its folder), otherwise run or
    resume it from its latest checkpoint; ``force`` deletes the run's folder and trains from scratch."""
    manifest = as_manifest_dict(manifest)
    validate_against_data(cfg, manifest, shard_stage_uri)
    fp = pretrain_fingerprint(cfg, manifest)
    run_dir = storage.join(storage.run_dir(cfg.storage.root, cfg.run_name), ray_train_run_name(cfg, fp))

    def build(_run_dir: str) -> tuple[PretrainOutputs, dict[str, Any]]:
        out = run_pretrain(cfg, shard_stage_uri, manifest, mlflow_run_id=mlflow_run_id,
                           tracking_uri=tracking_uri)
        out = dataclasses.replace(out, completed_at=time.time())
        record = dataclasses.asdict(out)
        record.pop("reused")
        record["metrics"] = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float, str))}
        return out, record

    # Resumable: an unfinished run's folder holds the checkpoints a rerun resumes from.
    return cached_stage(run_dir, build, lambda record: PretrainOutputs(**{**record, "reused": True}),
                        force=force, resumable=True)
