"""The evaluate stage: validation loss and perplexity of the final checkpoint over the held-out split.

The model is rebuilt whole in one process from the checkpoint, whatever layout wrote it
(``pipelines.train.checkpointing.load_checkpoint_model``). Output: ``report.json`` (and the same report in
``_COMPLETE.json``) in ``<storage>/stages/evaluate/<fingerprint>/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines import storage
from pipelines.config import RunConfig
from pipelines.stages.cache import cached_stage
from pipelines.train.checkpointing import load_checkpoint_model


@dataclass(frozen=True)
class EvaluateOutputs:
    uri: str
    report: dict[str, Any]
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

    def build(out: str) -> tuple[EvaluateOutputs, dict[str, Any]]:
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
        return EvaluateOutputs(uri=out, report=report), {"report": report}

    out = storage.stage_dir(cfg.storage.root, "evaluate", fp)
    return cached_stage(out, build, lambda record: EvaluateOutputs(uri=out, report=record["report"], reused=True),
                        force=force)
