"""The evaluate stage against a slow reference: each validation window run alone through the checkpoint's
model, the next-token cross-entropy and argmax hits summed in float64 over exactly the windows the report
says it measured. The whole split by default; with ``evaluate.max_tokens`` a seeded sample from all of it
(not its first rows), the same for the same seed. Greedy samples equal a plain argmax loop. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipelines import storage
from pipelines.stages.evaluate import run_evaluate, select_windows
from pipelines.stages.tokenizer import TextTokenizer, train_bpe
from pipelines.train.checkpointing import load_checkpoint_model
from tests.pipelines.stages.test_export_stream import SEQ, VOCAB, _config, train_and_save

VAL_ROWS = (23, 17)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    train_and_save(0, 1, str(checkpoint))
    tokenizer, _ = train_bpe(["def add(a, b):\n    return a + b\n", "import os\nprint(os.sep)\n"] * 40, VOCAB)
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    gen = np.random.default_rng(0)
    shards = []
    for i, rows in enumerate(VAL_ROWS):
        data = gen.integers(3, VOCAB, size=(rows, SEQ + 1)).tolist()
        pq.write_table(pa.table({"input_ids": pa.array(data, type=pa.list_(pa.int32()))}),
                       root / f"val-{i}.parquet", row_group_size=8)
        shards.append({"path": f"val-{i}.parquet", "num_rows": rows})
    manifest = {"config_hash": "test", "splits": {"val": {"shards": shards}}}
    return root, str(checkpoint), manifest


def _windows(root, manifest) -> np.ndarray:
    return np.concatenate([np.array(pq.read_table(root / s["path"])["input_ids"].to_pylist())
                           for s in manifest["splits"]["val"]["shards"]])


def _reference(model, windows: np.ndarray) -> tuple[float, float]:
    loss, hits, tokens = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(w.astype(np.int64))[None]
            logits = model(ids[:, :-1]).logits[0].double()
            loss += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            hits += int((logits.argmax(-1) == ids[0, 1:]).sum())
            tokens += SEQ
    return loss / tokens, hits / tokens


def _run(root, checkpoint, manifest, *overrides):
    cfg = _config(1, f"storage.root={root / 'storage'}", "evaluate.batch_size=5", "evaluate.sample_tokens=6",
                  *overrides)
    return cfg, run_evaluate(cfg, checkpoint, str(root), manifest, str(root / "tokenizer.json"), step=3)


def test_the_whole_held_out_split_equals_the_window_by_window_reference(setup):
    root, checkpoint, manifest = setup
    cfg, out = _run(root, checkpoint, manifest)
    report = out.report
    total = sum(VAL_ROWS)
    assert (report["val_windows"], report["split_windows"], report["sampled"]) == (total, total, False)
    assert report["val_tokens"] == total * SEQ
    loss, accuracy = _reference(load_checkpoint_model(checkpoint, cfg), _windows(root, manifest))
    assert report["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert report["val_perplexity"] == pytest.approx(np.exp(loss), rel=1e-6)
    assert report["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    text = storage.read_bytes(storage.join(out.uri, "report.md")).decode()
    assert "the whole held-out split" in text and f"{total * SEQ:,} tokens" in text
    assert json.loads(storage.read_bytes(storage.join(out.uri, "report.json"))) == report


def test_a_token_budget_measures_a_seeded_sample_of_the_whole_split_not_a_prefix(setup):
    root, checkpoint, manifest = setup
    total = sum(VAL_ROWS)
    cfg, out = _run(root, checkpoint, manifest, f"evaluate.max_tokens={10 * SEQ + 3}", "evaluate.seed=7")
    report = out.report
    assert (report["val_windows"], report["val_tokens"], report["sampled"]) == (10, 10 * SEQ, True)
    chosen = select_windows(total, SEQ, 10 * SEQ + 3, 7)
    assert len(set(chosen.tolist())) == 10 and list(chosen) != list(range(10)) and chosen.max() >= VAL_ROWS[0]
    assert list(select_windows(total, SEQ, 10 * SEQ, 8)) != list(chosen)
    loss, accuracy = _reference(load_checkpoint_model(checkpoint, cfg), _windows(root, manifest)[chosen])
    assert report["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert report["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    _, again = _run(root, checkpoint, manifest, f"evaluate.max_tokens={10 * SEQ + 3}", "evaluate.seed=7")
    assert again.reused and again.report == report
    assert list(select_windows(total, SEQ, 0, 7)) == list(range(total))
    assert list(select_windows(total, SEQ, 10**9, 7)) == list(range(total))


def test_greedy_samples_are_the_argmax_continuations_of_the_prompts(setup):
    root, checkpoint, manifest = setup
    cfg, out = _run(root, checkpoint, manifest)
    tokenizer = TextTokenizer((root / "tokenizer.json").read_text(), "test")
    model = load_checkpoint_model(checkpoint, cfg)
    assert [s["prompt"] for s in out.report["samples"]] == list(cfg.evaluate.prompts)
    for sample in out.report["samples"]:
        ids = [tokenizer.bos_id, *tokenizer.encode(sample["prompt"])]
        new = []
        with torch.no_grad():
            for _ in range(cfg.evaluate.sample_tokens):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_id:
                    break
                new.append(nxt)
        assert sample["completion"] == tokenizer.decode(new)
