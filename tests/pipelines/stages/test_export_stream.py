"""The export streamed from a training checkpoint, as it runs for a model no process can hold: a ``tiny``
trained 3 steps on 2 gloo ranks with ep=2 (each rank holds half of every expert stack), its checkpoint
exported tensor by tensor into safetensors shards of at most ``export.max_shard_bytes``.

Checked against the ranks' own tensors (each rank's released-layout view of its model, returned by the
rank): every exported tensor equal, bit for bit; the shards under the size limit with an index as
transformers writes it; the bytes the export holds at once (every Python allocation, traced) under one
shard's size though the model is several shards; stock transformers loading the sharded folder with the
same logits as k2model; the stage on S3 with its model card; and the settings the format cannot express
refused by name before anything runs. No Ray."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import torch

from k2model.config import ConfigError
from k2model.model import to_hf_state_dict
from k2model.testing import run_workers
from pipelines import storage
from pipelines.config import load_config
from pipelines.hf_folder import INDEX_FILE, CheckpointTensors, iter_safetensors, plan_shards
from pipelines.stages.export import check_exportable, run_export, write_hf_folder
from pipelines.stages.tokenizer import train_bpe
from pipelines.train import checkpoint_file, checkpointing
from pipelines.train.checkpointing import load_checkpoint_model
from pipelines.train.trainer import Trainer, math_signature

SEQ, VOCAB, GLOBAL_BATCH, STEPS = 16, 512, 8, 3
MAX_SHARD = 1_500_000
"""Bytes of tensor data a shard: ``tiny`` at this vocabulary is 7.0 MB (5 shards), its largest tensor 262 KB."""


def _config(world: int, *extra: str):
    return load_config(None, [
        f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=64",
        f"train.num_workers={world}", f"train.ep={world}", f"train.micro_batch_size={GLOBAL_BATCH // (2 * world)}",
        f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={STEPS}", "train.warmup_steps=1",
        "train.threads_per_worker=1", "tracking.enabled=false", "optimizer.ns_dtype=float32",
        f"export.max_shard_bytes={MAX_SHARD}", *extra])


class GlobalBatches:
    def __init__(self, cfg, world: int, rank: int):
        self.micro, self.world, self.rank = cfg.train.micro_batch_size, world, rank

    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(1000 + step)
        base = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
        ids = (base + torch.arange(SEQ + 1) * (1 + base % 3)) % VOCAB
        start = (micro * self.world + self.rank) * self.micro
        rows = ids[start:start + self.micro]
        return rows[:, :-1], rows[:, 1:]


def train_and_save(rank: int, world: int, folder: str) -> dict[str, torch.Tensor]:
    cfg = _config(world)
    trainer = Trainer(cfg, GlobalBatches(cfg, world, rank), [])
    for _ in range(STEPS):
        trainer.step()
    with open(os.path.join(folder, checkpointing.SHARD_NAME.format(rank=rank)), "wb") as f:
        f.write(checkpoint_file.encode(checkpointing.snapshot(trainer.state_dict())))
    if rank == 0:
        meta = {"step": trainer.global_step, "world_size": world, "ep": world, "signature": math_signature(cfg)}
        with open(os.path.join(folder, checkpointing.META_NAME), "w") as f:
            json.dump(meta, f)
    return {name: t.detach().clone() for name, t in to_hf_state_dict(trainer.model)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    per_rank = run_workers(train_and_save, 2, str(folder))
    reference = {**per_rank[1], **per_rank[0]}
    for name in set(per_rank[0]) & set(per_rank[1]):  # replicated: the same on both ranks
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name
    assert len(reference) > len(per_rank[0]), "each rank holds half of the experts"
    return str(folder), reference


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tokenizer, _ = train_bpe(["def add(a, b):\n    return a + b\n", "import os\nprint(os.sep)\n"] * 40, VOCAB)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    return str(path)


def test_the_streamed_export_is_the_ranks_tensors_in_shards_holding_under_one_shard(tmp_path, checkpoint):
    folder, reference = checkpoint
    cfg = _config(1)
    out = str(tmp_path / "export")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with CheckpointTensors(folder, cfg.model.num_experts) as source:
            written = write_hf_folder(source, cfg.model, out, max_shard_bytes=MAX_SHARD)
            tensor_bytes_read = source.tensor_bytes_read
            specs = source.specs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    total = sum(s.nbytes for s in specs)
    largest = max(s.nbytes for s in specs)
    assert total > 4 * MAX_SHARD, "the model is several shards"
    assert largest <= peak < MAX_SHARD, (largest, peak)
    assert tensor_bytes_read == total, "each model tensor read once, no optimizer state"

    shards = [n for n in written if n.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) == len(plan_shards(specs, MAX_SHARD)) >= 5
    index = json.loads((tmp_path / "export" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(reference)
    for name in shards:
        tensors = [s for s in specs if index["weight_map"][s.name] == name]
        assert sum(s.nbytes for s in tensors) <= MAX_SHARD or len(tensors) == 1
        assert written[name]["bytes"] == os.path.getsize(tmp_path / "export" / name)
        assert written[name]["sha256"] == storage.sha256_bytes((tmp_path / "export" / name).read_bytes())

    exported = dict(iter_safetensors(out))  # the stock safetensors reader
    assert set(exported) == set(reference)
    for name, t in reference.items():
        assert torch.equal(exported[name], t), name


def test_transformers_loads_the_sharded_export_and_the_model_reader_assembles_the_experts(tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM

    folder, reference = checkpoint
    cfg = _config(1)
    model = load_checkpoint_model(folder, cfg)
    ours = dict(to_hf_state_dict(model))
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[n], t) for n, t in reference.items())

    with CheckpointTensors(folder, cfg.model.num_experts) as source:
        write_hf_folder(source, cfg.model, str(tmp_path), max_shard_bytes=MAX_SHARD)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(tokens).logits, hf(input_ids=tokens).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_the_export_stage_writes_to_s3_with_a_model_card_and_is_reused(s3_bucket, checkpoint, tokenizer_json):
    folder, reference = checkpoint
    cfg = _config(1, f"storage.root=s3://{s3_bucket}/k2", "name=card-run")
    facts = {"run_name": "card-run", "mlflow_run_id": "abc123", "git_commit": "0123abcd", "step": STEPS,
             "tokens_trained": STEPS * GLOBAL_BATCH * SEQ, "train_loss": 5.4321, "val_loss": 5.6789,
             "val_tokens": 4096}
    out = run_export(cfg, folder, tokenizer_json, facts=facts)
    assert not out.reused and out.uri.startswith(f"s3://{s3_bucket}/k2/stages/export/")
    record = storage.read_complete(out.uri)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            INDEX_FILE} <= set(record["files"])
    for name in record["files"]:
        assert storage.sha256_bytes(storage.read_bytes(storage.join(out.uri, name))) == record["sha256"][name]
    exported = dict(iter_safetensors(out.uri))
    assert all(torch.equal(exported[n], t) for n, t in reference.items())
    card = storage.read_bytes(storage.join(out.uri, "README.md")).decode()
    for text in ("card-run", "abc123", "0123abcd", f"{STEPS * GLOBAL_BATCH * SEQ:,}", "5.4321", "5.6789",
                 "AutoModelForCausalLM", f"{cfg.model.num_experts} ({cfg.model.num_experts_per_tok})"):
        assert text in card, text
    again = run_export(cfg, folder, tokenizer_json, facts=facts)
    assert again.reused and again.uri == out.uri and again.fingerprint == out.fingerprint


@pytest.mark.parametrize("override,named", [("model.score_func=softmax", "model.score_func='softmax'"),
                                            ("model.norm_eps=1e-5", "model.norm_eps=1e-05")])
def test_settings_the_format_cannot_express_are_refused_before_anything_runs(tmp_path, override, named):
    import ray

    from pipelines.dag import run_pipeline

    cfg = load_config(None, [override, f"storage.root={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="valid|sigmoid") as info:
        check_exportable(cfg.model)
    assert str(info.value).startswith(named)
    with pytest.raises(ConfigError) as info:
        run_pipeline(cfg)
    assert str(info.value).startswith(named)
    assert not ray.is_initialized() and not os.listdir(tmp_path), "refused before Ray or storage"
