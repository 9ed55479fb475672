"""The export stage: the final weights as a Hugging Face model folder that stock ``transformers`` loads with
``AutoModelForCausalLM`` and ``AutoTokenizer``, no remote code.

Output, in ``<storage>/stages/export/<fingerprint>/``:

- the weights in the released per-expert layout as safetensors, one ``model.safetensors`` or, past
  ``export.max_shard_bytes``, ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.
  They are streamed from the checkpoint's rank shards tensor by tensor (``pipelines.hf_folder``): the
  stage never builds the model, so it exports one that no single process could hold;
- ``config.json`` (``model_type: deepseek_v3``, the family stock ``transformers`` knows) with the
  tokenizer's special-token ids, and ``generation_config.json``;
- the run's ``tokenizer.json`` with a ``tokenizer_config.json`` for ``AutoTokenizer``;
- ``README.md``, a model card: the config, tokens trained, final losses, k2pipe version, run and commit;
- ``_COMPLETE.json``, last, listing every file with its size and sha256.

Settings the DeepSeek-V3 family cannot express are refused by name before anything is written
(``check_exportable``; the DAG checks them before any stage runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from k2model.config import ConfigError, ModelConfig
from k2model.model import K2ForCausalLM
from pipelines import storage
from pipelines.config import RunConfig
from pipelines.hf_folder import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointTensors,
    ModelTensors,
    TensorSource,
    model_card,
    write_safetensors,
)
from pipelines.stages.cache import cached_stage

HF_LATENT_NORM_EPS = 1e-6
"""The epsilon of ``transformers``' DeepSeek-V3 latent norms (``q_a_layernorm``, ``kv_a_layernorm``), fixed
whatever ``rms_norm_eps`` says."""


@dataclass(frozen=True)
class ExportOutputs:
    uri: str
    files: list[str]
    fingerprint: str = ""
    reused: bool = False


def check_exportable(model_cfg: ModelConfig, where: str = "model") -> None:
    """Refuse, naming the key, a model the DeepSeek-V3 family of ``transformers`` would compute differently:
    its router scores with a sigmoid whatever ``scoring_func`` says, and its latent norms use epsilon 1e-6
    whatever ``rms_norm_eps`` says."""
    if model_cfg.score_func != "sigmoid":
        raise ConfigError(f"{where}.score_func={model_cfg.score_func!r}: the export's format (transformers' "
                          "DeepSeek-V3) routes with sigmoid scores only; train with score_func=sigmoid to export")
    if model_cfg.norm_eps != HF_LATENT_NORM_EPS:
        raise ConfigError(f"{where}.norm_eps={model_cfg.norm_eps!r}: transformers' DeepSeek-V3 normalises the "
                          f"attention latents with epsilon {HF_LATENT_NORM_EPS} whatever rms_norm_eps says, so "
                          f"the export would compute another model; valid: {HF_LATENT_NORM_EPS}")


def hf_config_files(model_cfg: ModelConfig, special_ids: dict[str, int] | None = None) -> dict[str, bytes]:
    """``config.json`` and ``generation_config.json``; ``special_ids`` (``bos_token_id``, ``eos_token_id``,
    ``pad_token_id``) come from the run's tokenizer."""
    check_exportable(model_cfg)
    ids = dict(special_ids or {})
    return {
        "config.json": json.dumps({**model_cfg.to_hf_config(), **ids}, indent=2).encode(),
        "generation_config.json": json.dumps({**ids, "_from_model_config": False}, indent=2).encode(),
    }


def hf_tokenizer_files(tokenizer_json: bytes) -> tuple[dict[str, bytes], dict[str, int]]:
    """``tokenizer.json`` with the ``tokenizer_config.json`` that lets ``AutoTokenizer`` load it as is, and
    the special-token ids for ``hf_config_files``."""
    from pipelines.stages.tokenizer import BOS, EOS, PAD, TextTokenizer

    tok = TextTokenizer(tokenizer_json.decode("utf-8"), storage.sha256_bytes(tokenizer_json))
    # split_special_tokens: a literal "<|eos|>" in a text is text, as the pipeline encodes it.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2).encode()}, ids


def write_hf_folder(source: TensorSource | K2ForCausalLM, model_cfg: ModelConfig, folder: str, *,
                    files: dict[str, bytes] | None = None, special_ids: dict[str, int] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, origin: str = "k2pipe"
                    ) -> dict[str, dict[str, Any]]:
    """Write a Hugging Face model folder: the weights of ``source`` (a checkpoint's ``CheckpointTensors``,
    or a model in memory) streamed into safetensors shards, the config files and ``files`` (tokenizer,
    model card). ``origin`` goes into the safetensors metadata. Returns each file's ``{"bytes",
    "sha256"}``."""
    config_files = hf_config_files(model_cfg, special_ids)  # refuses what cannot be exported, before writing
    if isinstance(source, K2ForCausalLM):
        source = ModelTensors(source)
    written = write_safetensors(source, folder, max_shard_bytes=max_shard_bytes, metadata={"source": origin})
    for name, data in {**config_files, **(files or {})}.items():
        storage.write_bytes(storage.join(folder, name), data)
        written[name] = {"bytes": len(data), "sha256": storage.sha256_bytes(data)}
    return written


def run_export(cfg: RunConfig, checkpoint_uri: str, tokenizer_json_uri: str, force: bool = False,
               checkpoint_version: Any = None, facts: dict[str, Any] | None = None) -> ExportOutputs:
    """Export the checkpoint at ``checkpoint_uri``. ``facts`` are what the model card reports of the run
    (``pipelines.hf_folder.model_card``)."""
    check_exportable(cfg.model)
    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "tokenizer": tokenizer_json_uri, "max_shard_bytes": cfg.export.max_shard_bytes})

    def build(out: str) -> tuple[ExportOutputs, dict[str, Any]]:
        tokenizer_files, special_ids = hf_tokenizer_files(storage.read_bytes(tokenizer_json_uri))
        card = model_card(cfg, facts or {}).encode()
        with CheckpointTensors(checkpoint_uri, cfg.model.num_experts) as source:
            written = write_hf_folder(source, cfg.model, out, files={**tokenizer_files, "README.md": card},
                                      special_ids=special_ids, max_shard_bytes=cfg.export.max_shard_bytes,
                                      origin=checkpoint_uri)
        record = {"files": sorted(written), "written": written,
                  "sha256": {name: w["sha256"] for name, w in written.items()}, "checkpoint": checkpoint_uri,
                  "fingerprint": fp}
        return ExportOutputs(uri=out, files=sorted(written), fingerprint=fp), record

    out = storage.stage_dir(cfg.storage.root, "export", fp)
    return cached_stage(out, build,
                        lambda record: ExportOutputs(uri=out, files=record["files"], fingerprint=fp, reused=True),
                        force=force)
