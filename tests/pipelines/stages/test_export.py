"""The export's Hugging Face folder, as a user loads it: stock transformers' ``AutoModelForCausalLM`` and
``AutoTokenizer``, no remote code, on a ``tiny`` trained for a few steps (so the router biases and every
weight have moved off their initial values). The logits agree with k2model's on the same tokens within
1e-4 of max |logit| for a K2-style model, with grouped routing, and with YaRN; ``generate()`` with greedy
decoding gives k2model's own greedy tokens; the tokenizer encodes as the pipeline's does. No Ray."""

from __future__ import annotations

import json

import pytest
import torch

from k2model.config import RopeScaling
from k2model.generate import greedy_decode
from pipelines.config import load_config
from pipelines.stages.export import hf_tokenizer_files, write_hf_folder
from pipelines.stages.tokenizer import TextTokenizer, train_bpe
from pipelines.train.trainer import Trainer

SEQ, VOCAB = 32, 512
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
         "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"] * 40


class Batches:
    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(step * 10 + micro)
        base = torch.randint(0, VOCAB, (4, 1), generator=gen)
        ids = (base + torch.arange(SEQ + 1) * (1 + base % 3)) % VOCAB
        return ids[:, :-1], ids[:, 1:]


@pytest.fixture(scope="module")
def tokenizer_json():
    tokenizer, _ = train_bpe(TEXTS, VOCAB)
    return tokenizer.to_str().encode()


def _trained(*overrides: str):
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}",
                             f"data.seq_len={SEQ}", "model.max_seq_len=128", "train.micro_batch_size=4",
                             "train.global_batch_size=4", "train.steps=6", "train.warmup_steps=1",
                             "tracking.enabled=false", *overrides])
    torch.manual_seed(0)
    trainer = Trainer(cfg, Batches(), [])
    for _ in range(cfg.train.steps):
        trainer.step()
    return cfg, trainer.model.eval()


def _export(tmp_path, cfg, model, tokenizer_json):
    tokenizer_files, ids = hf_tokenizer_files(tokenizer_json)
    write_hf_folder(model, cfg.model, str(tmp_path), files=tokenizer_files, special_ids=ids, origin="test")
    return ids


@pytest.mark.parametrize("variant,overrides", [
    ("k2", ()),
    ("grouped routing", ("model.num_expert_groups=4", "model.topk_groups=2")),
    ("yarn", ("model.rope_scaling={factor: 4.0, original_max_position_embeddings: 32}",)),
])
def test_stock_transformers_loads_the_export_and_computes_the_same_logits(tmp_path, tokenizer_json, variant,
                                                                          overrides):
    from transformers import AutoModelForCausalLM

    cfg, model = _trained(*overrides)
    if variant == "yarn":
        assert cfg.model.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=32)
    assert any(float(r.e_score_correction_bias.abs().max()) > 0 for r in model.routers()), "biases moved"
    ids = _export(tmp_path, cfg, model, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_interleave"] is True
    assert {k: config[k] for k in ids} == ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(3, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))  # past 32: YaRN's range
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(input_ids=tokens).logits
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(ours.abs().max()), variant
    prompt = tokens[:1, :8]
    generated = hf.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, greedy_decode(model, prompt, 5)), variant


def test_auto_tokenizer_encodes_as_the_pipeline_does(tmp_path, tokenizer_json):
    from transformers import AutoTokenizer

    _export(tmp_path, *_trained(), tokenizer_json)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = TextTokenizer(tokenizer_json.decode(), "test")
    text = "def add(a, b):\n    return a + b  # <|eos|> stays text\n"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
