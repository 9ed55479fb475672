"""The export stage: the final weights as a Hugging Face model folder that stock ``transformers`` loads.

Output, in ``<storage>/stages/export/<fingerprint>/``: ``model.safetensors`` (the released per-expert
layout, ``k2model.model.to_hf_state_dict``), ``config.json`` (DeepSeek-V3 architecture) and the run's
``tokenizer.json``; ``_COMPLETE.json`` lists them with their sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from k2model.config import ModelConfig
from k2model.model import K2ForCausalLM, to_hf_state_dict
from pipelines import storage
from pipelines.config import RunConfig
from pipelines.stages.cache import cached_stage
from pipelines.train.checkpointing import load_checkpoint_model


@dataclass(frozen=True)
class ExportOutputs:
    uri: str
    files: list[str]
    reused: bool = False


def hf_model_files(model: K2ForCausalLM, model_cfg: ModelConfig, source: str) -> dict[str, bytes]:
    """The Hugging Face folder's model files of ``model`` (on the CPU): ``model.safetensors`` in the released
    per-expert layout and ``config.json``; ``source`` goes into the safetensors metadata."""
    from safetensors.torch import save as safetensors_save

    tensors = {name: t.detach().contiguous().clone() for name, t in to_hf_state_dict(model)}
    return {
        "model.safetensors": safetensors_save(tensors, metadata={"format": "pt", "source": source}),
        "config.json": json.dumps(model_cfg.to_hf_config(), indent=2).encode(),
    }


def run_export(cfg: RunConfig, checkpoint_uri: str, tokenizer_json_uri: str, force: bool = False,
               checkpoint_version: Any = None) -> ExportOutputs:
    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "tokenizer": tokenizer_json_uri})

    def build(out: str) -> tuple[ExportOutputs, dict[str, Any]]:
        model = load_checkpoint_model(checkpoint_uri, cfg)
        files = {**hf_model_files(model, cfg.model, checkpoint_uri),
                 "tokenizer.json": storage.read_bytes(tokenizer_json_uri)}
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        checksums = {name: storage.sha256_bytes(data) for name, data in files.items()}
        record = {"files": sorted(files), "sha256": checksums, "checkpoint": checkpoint_uri}
        return ExportOutputs(uri=out, files=sorted(files)), record

    out = storage.stage_dir(cfg.storage.root, "export", fp)
    return cached_stage(out, build, lambda record: ExportOutputs(uri=out, files=record["files"], reused=True),
                        force=force)
