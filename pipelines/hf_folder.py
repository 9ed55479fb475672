"""A Hugging Face model folder written tensor by tensor: safetensors shards with an index, from a model in
memory or straight from a training checkpoint of any layout.

A K2-sized model does not fit in one process, so the export never builds it: ``CheckpointTensors`` reads
one tensor at a time from the checkpoint's rank shards (``pipelines.train.checkpoint_file``, ranged reads,
model bytes only), an expert stack one expert at a time, and ``write_safetensors`` streams each into its
output shard as it comes. What a process holds at once is one tensor of the released layout (the largest
is the embedding or the head), however large the model.

The safetensors format, written here without building a shard in memory: an 8-byte little-endian header
length, a JSON header (each tensor's dtype, shape and ``data_offsets`` within the data; ``__metadata__``
strings), padded with spaces to a multiple of 8 bytes, then the tensors' bytes back to back. A model
larger than ``max_shard_bytes`` goes to ``model-00001-of-0000N.safetensors`` files with a
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as ``transformers`` writes it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from k2model.model import K2ForCausalLM, hf_expert_names, is_stacked_expert, to_hf_state_dict
from pipelines import storage
from pipelines.train import checkpoint_file

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Shard size where none is configured: ``transformers``' own default for ``save_pretrained`` (5 GB)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the released layout, known before any of its bytes are read."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Tensors in the released layout: their specs first (``specs``), then each read on demand."""

    specs: list[TensorSpec]

    def read(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ModelTensors(TensorSource):
    """The tensors of a model in memory (``k2model.model.to_hf_state_dict``: views, nothing copied)."""

    def __init__(self, model: K2ForCausalLM):
        self._tensors = dict(to_hf_state_dict(model))
        self.specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in self._tensors.items()]

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().to("cpu")


class CheckpointTensors(TensorSource):
    """The model tensors of a training checkpoint (any ``(world_size, ep, pp)`` layout) in the released
    per-expert layout, read one tensor, or one expert of a stack, at a time. Optimizer state is never
    read. Use as a context manager (it holds the rank shards open)."""

    def __init__(self, checkpoint_uri: str, num_experts: int):
        from k2model.distributed import ParallelLayout
        from pipelines.train.checkpoint_file import ShardReader
        from pipelines.train.checkpointing import META_NAME, SHARD_NAME, _check_shards_present

        meta = storage.read_json(storage.join(checkpoint_uri, META_NAME))
        fs, folder = storage.resolve(checkpoint_uri)
        world = meta["world_size"]
        _check_shards_present(fs, folder, world)
        self.num_experts = num_experts
        self._readers = [ShardReader(fs, f"{folder}/{SHARD_NAME.format(rank=k)}") for k in range(world)]
        self._layouts = [ParallelLayout(world, k, meta["ep"], meta.get("pp", 1), create_groups=False)
                         for k in range(world)]
        self._where: dict[str, tuple[str, int | None]] = {}  # HF name -> (checkpoint key, expert or None)
        self.specs = []
        seen: set[str] = set()
        for reader in self._readers:
            for key, info in reader.tensors.items():
                if not key.startswith("model/") or key in seen:
                    continue
                seen.add(key)
                name, dtype, shape = key[len("model/"):], getattr(torch, info["dtype"]), tuple(info["shape"])
                if is_stacked_expert(name):
                    for expert, hf_name in enumerate(hf_expert_names(name, num_experts)):
                        self._where[hf_name] = (key, expert)
                        self.specs.append(TensorSpec(hf_name, dtype, shape[1:]))
                else:
                    self._where[name] = (key, None)
                    self.specs.append(TensorSpec(name, dtype, shape))

    def read(self, name: str) -> torch.Tensor:
        from pipelines.train.reshard import _expert_rows

        key, expert = self._where[name]
        if expert is None:
            return next(r for r in self._readers if key in r.tensors).tensor(key)
        return _expert_rows(self._readers, key, self._layouts, self.num_experts, range(expert, expert + 1),
                            prefer=0)[0]

    def origin(self, name: str) -> tuple[str, int | None]:
        """The model state name (``k2model``'s, stacked) that the released tensor ``name`` comes from, and
        its expert index in the stack (None: not an expert)."""
        key, expert = self._where[name]
        return key[len("model/"):], expert

    @property
    def tensor_bytes_read(self) -> int:
        return sum(r.tensor_bytes_read for r in self._readers)

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def __enter__(self) -> CheckpointTensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most ``max_shard_bytes`` of data each (a tensor larger than
    that gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be > 0")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors name")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _Hashing:
    """A write stream that also counts and hashes what passes through it."""

    def __init__(self, stream):
        self.stream, self.size, self.sha = stream, 0, hashlib.sha256()

    def write(self, data) -> None:
        self.stream.write(data)
        self.sha.update(data)
        self.size += memoryview(data).nbytes


def write_safetensors(source: TensorSource, folder: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Write ``source``'s tensors into ``folder`` as safetensors shards (plus the index when there are
    several), one tensor in memory at a time. Returns each written file's ``{"bytes", "sha256"}``.
    ``on_tensor(name, nbytes)`` is called after each tensor is written."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(source.specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    written: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    for file_name, specs in zip(names, shards):
        with storage.open_output(storage.join(folder, file_name)) as stream:
            out = _Hashing(stream)
            out.write(_header(specs, metadata))
            for spec in specs:
                t = source.read(spec.name)
                if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                    raise ValueError(f"{spec.name}: read {t.dtype} {tuple(t.shape)}, expected {spec.dtype} "
                                     f"{spec.shape}")
                out.write(checkpoint_file._raw(t))
                del t
                weight_map[spec.name] = file_name
                if on_tensor is not None:
                    on_tensor(spec.name, spec.nbytes)
        written[file_name] = {"bytes": out.size, "sha256": out.sha.hexdigest()}
    if len(shards) > 1:
        index = json.dumps({"metadata": {"total_size": sum(s.nbytes for s in source.specs)},
                            "weight_map": weight_map}, indent=2).encode()
        storage.write_bytes(storage.join(folder, INDEX_FILE), index)
        written[INDEX_FILE] = {"bytes": len(index), "sha256": storage.sha256_bytes(index)}
    return written


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Read back every tensor of a folder written by ``write_safetensors`` (with the stock ``safetensors``
    reader, shard by shard)."""
    from safetensors.torch import load as load_safetensors

    index_uri = storage.join(folder, INDEX_FILE)
    files = (sorted(set(storage.read_json(index_uri)["weight_map"].values())) if storage.exists(index_uri)
             else [SINGLE_FILE])
    for file_name in files:
        yield from load_safetensors(storage.read_bytes(storage.join(folder, file_name))).items()


def k2pipe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("k2pipe")
    except PackageNotFoundError:
        return "unknown"


def model_card(cfg: Any, facts: dict[str, Any]) -> str:
    """The export's ``README.md``: what the model is, how it was trained and how to load it. ``cfg`` is the
    run config; ``facts``: ``run_name``, ``mlflow_run_id``, ``git_commit``, ``step``, ``tokens_trained``,
    ``train_loss``, ``val_loss``, ``val_tokens`` (any may be None)."""
    from k2model.config import count_parameters

    m, t = cfg.model, cfg.train
    pc = count_parameters(m)

    def fmt(value: Any, spec: str = "") -> str:
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("preset", m.preset or "custom"),
        ("parameters, total / active per token", f"{pc.total:,} / {pc.active:,}"),
        ("layers (leading dense)", f"{m.num_layers} ({m.first_k_dense})"),
        ("hidden size", f"{m.hidden_size}"),
        ("attention", f"MLA, {m.num_heads} heads, kv latent {m.kv_lora_rank}, q latent {m.q_lora_rank}"),
        ("routed experts (active per token), shared", f"{m.num_experts} ({m.num_experts_per_tok}), "
                                                       f"{m.num_shared_experts}"),
        ("router", f"{m.score_func}, {m.num_expert_groups} group(s), scaling {m.routed_scaling_factor}"),
        ("vocabulary, context", f"{m.vocab_size}, {m.max_seq_len}"),
        ("optimizer", f"{cfg.optimizer.name}" + (f", QK-Clip tau {cfg.optimizer.qk_clip_tau}"
                                                  if cfg.optimizer.uses_qk_clip else "")),
        ("steps, tokens trained", f"{fmt(facts.get('step'))}, {fmt(facts.get('tokens_trained'), ',')}"),
        ("sequence length, global batch", f"{cfg.data.seq_len}, {t.global_batch_size}"),
        ("final training loss", fmt(facts.get("train_loss"), ".4f")),
        ("final validation loss (tokens)", f"{fmt(facts.get('val_loss'), '.4f')} "
                                           f"({fmt(facts.get('val_tokens'), ',')})"),
        ("k2pipe version, commit", f"{k2pipe_version()}, {facts.get('git_commit') or 'n/a'}"),
        ("run, MLflow run id", f"{facts.get('run_name') or 'n/a'}, {facts.get('mlflow_run_id') or 'n/a'}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
tags: [k2pipe, mixture-of-experts, deepseek_v3]
---

# {facts.get('run_name') or 'k2pipe model'}

A Kimi-K2-style mixture-of-experts language model pretrained with k2pipe (MuonClip: Muon with QK-Clip).
The folder is in the DeepSeek-V3 family's format, which stock `transformers` loads without remote code:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```

| | |
|---|---|
{table}
"""
