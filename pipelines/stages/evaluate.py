"""The evaluate stage: validation loss, perplexity and next-token accuracy of the final checkpoint over the
held-out split, and greedy samples from fixed prompts.

What is measured is said, never implied: the whole held-out split by default, or, with
``evaluate.max_tokens``, a seeded sample of windows drawn uniformly from all of it (never its first rows);
the report gives the windows and tokens measured and the split's total.

The model is built from the checkpoint, whatever layout wrote it, one tensor at a time
(``pipelines.train.checkpointing.load_checkpoint_model``) on the device the stage runs on: a GPU when the
task got one (the DAG asks for one when the cluster has any), so the CPU process never holds the whole
model there. Output: ``report.json`` and ``report.md`` (and the report in ``_COMPLETE.json``) in
``<storage>/stages/evaluate/<fingerprint>/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
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


def select_windows(total: int, seq_len: int, max_tokens: int, seed: int) -> np.ndarray:
    """Positions, in order, of the validation windows to measure among ``total``: all of them when
    ``max_tokens`` is 0 or covers the split; else ``max_tokens // seq_len`` windows (at least one) drawn
    uniformly without replacement with ``seed``."""
    want = total if max_tokens <= 0 else max(1, max_tokens // seq_len)
    if want >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=want, replace=False))


def device_for_evaluation() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def measure(model: torch.nn.Module, windows, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean next-token cross-entropy, accuracy (argmax equals the next token) and token count over
    ``windows`` (an iterable of arrays of ``seq_len + 1`` token ids), sums in float64."""
    loss_sum, correct, tokens = 0.0, 0, 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal loss_sum, correct, tokens, batch
        if not batch:
            return
        ids = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(inputs, targets)
        loss_sum += float(out.lm_loss.double()) * targets.numel()
        correct += int((out.logits.argmax(-1) == targets).sum())
        tokens += targets.numel()
        batch = []

    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    flush()
    if tokens == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "tokens": 0}
    return {"loss": loss_sum / tokens, "accuracy": correct / tokens, "tokens": tokens}


def greedy_samples(model, tokenizer, prompts: tuple[str, ...], new_tokens: int, device: torch.device
                   ) -> list[dict[str, str]]:
    """Each prompt (after ``<bos>``, as documents are packed) continued greedily for ``new_tokens`` tokens
    or until ``<eos>``."""
    from k2model.generate import greedy_decode

    out = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]], device=device)
        full = greedy_decode(model, ids, new_tokens, eos_id=tokenizer.eos_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_id in full:
            full = full[:full.index(tokenizer.eos_id)]
        out.append({"prompt": prompt, "completion": tokenizer.decode(full)})
    return out


def report_markdown(report: dict[str, Any]) -> str:
    what = ("the whole held-out split" if not report["sampled"]
            else f"a sample drawn with seed {report['seed']} from the held-out split")
    lines = [
        "# Evaluation", "",
        f"Checkpoint `{report['checkpoint']}` (step {report.get('step', 'n/a')}), on {report['device']}.", "",
        f"Measured over {report['val_windows']:,} of {report['split_windows']:,} windows ({what}), "
        f"{report['val_tokens']:,} tokens.", "",
        "| metric | value |", "|---|---|",
        f"| validation loss | {report['val_loss']:.4f} |",
        f"| perplexity | {report['val_perplexity']:.2f} |",
        f"| next-token accuracy | {report['val_accuracy']:.4f} |",
        "", "## Greedy samples", "",
    ]
    for s in report["samples"]:
        lines += [f"Prompt `{s['prompt']!r}`:", "", "```", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)


def run_evaluate(cfg: RunConfig, checkpoint_uri: str, shard_stage_uri: str, manifest: dict[str, Any],
                 tokenizer_uri: str, force: bool = False, checkpoint_version: Any = None,
                 step: int | None = None) -> EvaluateOutputs:
    from pipelines.data.loader import ShardRef, WindowReader
    from pipelines.stages.pretrain import as_manifest_dict, shard_refs
    from pipelines.stages.tokenizer import load_tokenizer

    manifest = as_manifest_dict(manifest)
    e = cfg.evaluate
    fp = storage.fingerprint({"checkpoint": checkpoint_uri, "version": checkpoint_version,
                              "data": manifest.get("config_hash"), "tokenizer": tokenizer_uri,
                              "evaluate": asdict(e)})

    def build(out: str) -> tuple[EvaluateOutputs, dict[str, Any]]:
        started = time.time()
        refs = [ShardRef(**r) for r in shard_refs(shard_stage_uri, manifest, "val")]
        total = sum(r.rows for r in refs)
        if total == 0:
            raise ValueError(f"{shard_stage_uri}: the validation split is empty; raise data.val_fraction")
        positions = select_windows(total, cfg.data.seq_len, e.max_tokens, e.seed)
        reader = WindowReader(refs, cfg.data.seq_len)
        offsets = np.cumsum([0] + [r.rows for r in refs])

        def windows():
            for pos in positions:
                shard = int(np.searchsorted(offsets, pos, side="right") - 1)
                yield reader.read(shard, int(pos - offsets[shard]))

        device = device_for_evaluation()
        model = load_checkpoint_model(checkpoint_uri, cfg, device=device)
        m = measure(model, windows(), e.batch_size, device)
        samples = greedy_samples(model, load_tokenizer(tokenizer_uri), e.prompts, e.sample_tokens, device)
        report = {"val_loss": m["loss"], "val_perplexity": math.exp(min(m["loss"], 50.0)),
                  "val_accuracy": m["accuracy"], "val_tokens": m["tokens"], "val_windows": len(positions),
                  "split_windows": total, "sampled": len(positions) < total, "seed": e.seed,
                  "samples": samples, "checkpoint": checkpoint_uri, "step": step, "device": str(device),
                  "seconds": time.time() - started}
        storage.write_json(storage.join(out, "report.json"), report)
        storage.write_bytes(storage.join(out, "report.md"), report_markdown(report).encode())
        return EvaluateOutputs(uri=out, report=report), {"report": report}

    out = storage.stage_dir(cfg.storage.root, "evaluate", fp)
    return cached_stage(out, build, lambda record: EvaluateOutputs(uri=out, report=record["report"], reused=True),
                        force=force)
