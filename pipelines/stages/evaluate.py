"""The evaluate and export stages, and loading a whole model from a sharded training checkpoint.

- ``load_checkpoint_model``: rebuild the full single-process model from a checkpoint of any layout, read
  as a one-worker resume would read it (``pipelines.train.reshard``), the optimizer state left unread.
- ``run_evaluate``: validation loss and perplexity over the held-out split -> ``report.json``.
- ``run_export``: the final weights as safetensors in the released per-expert layout, with the Hugging
  Face ``config.json`` and the tokenizer.
Both write ``_COMPLETE.json`` last in ``<storage>/stages/<stage>/<fingerprint>/``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from k2model.model import build_model, to_hf_state_dict
from pipelines import storage
from pipelines.config import RunConfig
from pipelines.train.checkpointing import META_NAME, ReshardSpec, read_resharded


def load_checkpoint_model(checkpoint_uri: str, cfg: RunConfig) -> torch.nn.Module:
    """The whole model (one process, every expert) from a checkpoint of any layout: of the shards, only
    the model's bytes are read (``pipelines.train.reshard``), not the optimizer state."""
    meta = storage.read_json(storage.join(checkpoint_uri, META_NAME))
    fs, path = storage.resolve(checkpoint_uri)
    state = read_resharded(fs, path, meta, 0, 1, 1, ReshardSpec(cfg.model.num_experts, lambda name: False))
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


@dataclass(frozen=True)
class EvaluateOutputs:
    uri: str
    report: dict[str, Any]
    reused: bool = False


@dataclass(frozen=True)
class ExportOutputs:
    uri: str
    files: list[str]
    reused: bool = False


def _val_windows(shard_stage_uri: str, manifest: dict[str, Any], seq_len: int, max_windows: int):
    from pipelines.data.loader import ShardRef, WindowReader
    from pipelines.stages.pretrain import shard_refs

    refs = [ShardRef(**r) for r in shard_refs(shard_stage_uri, manifest, "val")]
    if not refs:
        return
    reader = WindowReader(refs, seq_len)
    count = 0
    for shard, ref in enumerate(refs):
        for row in range(ref.rows):
            if count >= max_windows:
                return
            yield reader.read(shard, row)
            count += 1


def run_evaluate(cfg: RunConfig, checkpoint_uri: str, shard_stage_uri: str, manifest: dict[str, Any],
                 force: bool = False, max_windows: int = 256, batch_size: int = 8,
                 checkpoint_version: Any = None) -> EvaluateOutputs:
    from pipelines.stages.pretrain import as_manifest_dict

    manifest = as_manifest_dict(manifest)
    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "data": manifest.get("config_hash"), "max_windows": max_windows})
    out = storage.stage_dir(cfg.storage.root, "evaluate", fp)
    if storage.prepare_stage_dir(out, force=force):  # a complete earlier run is reused
        return EvaluateOutputs(uri=out, report=storage.read_complete(out)["report"], reused=True)
    started = time.time()
    model = load_checkpoint_model(checkpoint_uri, cfg)
    total_loss, total_tokens = 0.0, 0
    batch: list = []

    def flush() -> None:
        nonlocal total_loss, total_tokens, batch
        if not batch:
            return
        ids = torch.from_numpy(np.stack(batch).astype(np.int64))
        with torch.no_grad():
            result = model(ids[:, :-1], ids[:, 1:])
        total_loss += result.lm_loss.item() * ids[:, 1:].numel()
        total_tokens += ids[:, 1:].numel()
        batch = []

    for window in _val_windows(shard_stage_uri, manifest, cfg.data.seq_len, max_windows):
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    flush()
    if total_tokens == 0:
        raise ValueError(f"{shard_stage_uri}: the validation split is empty; raise data.val_fraction")
    loss = total_loss / total_tokens
    report = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": total_tokens,
              "checkpoint": checkpoint_uri, "seconds": time.time() - started}
    storage.write_json(storage.join(out, "report.json"), report)
    storage.mark_complete(out, {"report": report})
    return EvaluateOutputs(uri=out, report=report)


def run_export(cfg: RunConfig, checkpoint_uri: str, tokenizer_json_uri: str, force: bool = False,
               checkpoint_version: Any = None) -> ExportOutputs:
    from safetensors.torch import save as safetensors_save

    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "tokenizer": tokenizer_json_uri})
    out = storage.stage_dir(cfg.storage.root, "export", fp)
    if storage.prepare_stage_dir(out, force=force):  # a complete earlier run is reused
        return ExportOutputs(uri=out, files=storage.read_complete(out)["files"], reused=True)
    model = load_checkpoint_model(checkpoint_uri, cfg)
    tensors = {name: t.detach().contiguous().clone() for name, t in to_hf_state_dict(model)}
    files = {
        "model.safetensors": safetensors_save(tensors, metadata={"format": "pt", "source": checkpoint_uri}),
        "config.json": json.dumps(cfg.model.to_hf_config(), indent=2).encode(),
        "tokenizer.json": storage.read_bytes(tokenizer_json_uri),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    checksums = {name: storage.sha256_bytes(data) for name, data in files.items()}
    storage.mark_complete(out, {"files": sorted(files), "sha256": checksums, "checkpoint": checkpoint_uri})
    return ExportOutputs(uri=out, files=sorted(files))
