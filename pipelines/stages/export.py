"""The export stage: the final weights as a Hugging Face model folder that stock ``transformers`` loads.

Output, in ``<storage>/stages/export/<fingerprint>/``: ``model.safetensors`` (the released per-expert
layout, ``k2model.model.to_hf_state_dict``), ``config.json`` (``model_type: deepseek_v3``, which stock
``transformers`` loads with ``AutoModelForCausalLM`` and no remote code) with the tokenizer's special-token
ids, ``generation_config.json``, and the run's ``tokenizer.json`` with a ``tokenizer_config.json`` for
``AutoTokenizer``; ``_COMPLETE.json`` lists them with their sha256.
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


def hf_model_files(model: K2ForCausalLM, model_cfg: ModelConfig, source: str,
                   special_ids: dict[str, int] | None = None) -> dict[str, bytes]:
    """The Hugging Face folder's model files of ``model`` (on the CPU): ``model.safetensors`` in the released
    per-expert layout, ``config.json`` and ``generation_config.json``; ``source`` goes into the
    safetensors metadata. ``special_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) come from
    the run's tokenizer."""
    from safetensors.torch import save as safetensors_save

    tensors = {name: t.detach().contiguous().clone() for name, t in to_hf_state_dict(model)}
    ids = dict(special_ids or {})
    return {
        "model.safetensors": safetensors_save(tensors, metadata={"format": "pt", "source": source}),
        "config.json": json.dumps({**model_cfg.to_hf_config(), **ids}, indent=2).encode(),
        "generation_config.json": json.dumps({**ids, "_from_model_config": False}, indent=2).encode(),
    }


def hf_tokenizer_files(tokenizer_json: bytes) -> tuple[dict[str, bytes], dict[str, int]]:
    """``tokenizer.json`` with the ``tokenizer_config.json`` that lets ``AutoTokenizer`` load it as is, and
    the special-token ids for ``hf_model_files``."""
    from pipelines.stages.tokenizer import BOS, EOS, PAD, TextTokenizer

    tok = TextTokenizer(tokenizer_json.decode("utf-8"), storage.sha256_bytes(tokenizer_json))
    # split_special_tokens: a literal "<|eos|>" in a text is text, as the pipeline encodes it.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2).encode()}, ids


def run_export(cfg: RunConfig, checkpoint_uri: str, tokenizer_json_uri: str, force: bool = False,
               checkpoint_version: Any = None) -> ExportOutputs:
    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "tokenizer": tokenizer_json_uri})

    def build(out: str) -> tuple[ExportOutputs, dict[str, Any]]:
        model = load_checkpoint_model(checkpoint_uri, cfg)
        tokenizer_files, special_ids = hf_tokenizer_files(storage.read_bytes(tokenizer_json_uri))
        files = {**hf_model_files(model, cfg.model, checkpoint_uri, special_ids), **tokenizer_files}
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        checksums = {name: storage.sha256_bytes(data) for name, data in files.items()}
        record = {"files": sorted(files), "sha256": checksums, "checkpoint": checkpoint_uri}
        return ExportOutputs(uri=out, files=sorted(files)), record

    out = storage.stage_dir(cfg.storage.root, "export", fp)
    return cached_stage(out, build, lambda record: ExportOutputs(uri=out, files=record["files"], reused=True),
                        force=force)
