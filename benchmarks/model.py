"""Model throughput on this machine: forward+backward tokens/s of ``tiny`` and ``small``, the cost of
max-logit recording (with vs without, one run) and its peak memory, and the grouped expert computation
against the per-expert loop.

    python -m benchmarks.model [--quick] --out bench-results/model.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import parse_args, table, time_it, write_json
from k2model.config import flops_per_token, preset_config
from k2model.layers import causal_max_logit_per_head
from k2model.model import build_model
from k2model.moe import GroupedExperts


def step_times(model, ids, repeats: int) -> tuple[float, float]:
    """Median fwd+bwd seconds with and without max-logit recording, the two interleaved step by step so
    the shared machine's drift hits both alike."""
    import statistics
    import time

    def step(record: bool) -> float:
        model.record_max_logits = record
        t0 = time.perf_counter()
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        elapsed = time.perf_counter() - t0
        for p in model.parameters():
            p.grad = None
        model.reset_max_logits()
        return elapsed

    step(True), step(False)  # warm-up
    with_rec, without = [], []
    for _ in range(repeats):
        with_rec.append(step(True))
        without.append(step(False))
    return statistics.median(with_rec), statistics.median(without)


def recorder_peak_memory(cfg, batch: int, seq: int) -> dict[str, int]:
    """Bytes of the largest fp32 temporary the recorder allocates, computed from the shapes it uses (a query
    block against either the keys before it or its own diagonal square), against the full T x T logits a
    naive recorder would build. Computed, not sampled: the CPU allocator exposes no peak counter."""
    block = min(cfg.attn_block_size, seq)
    per_block = batch * cfg.num_heads * block * max(block, seq - block) * 4
    full = batch * cfg.num_heads * seq * seq * 4
    return {"recorder_block_bytes": per_block, "full_logits_bytes": full}


def expert_loop(x, w, counts):
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        outs.append(x[start:start + c] @ w[e].T)
        start += c
    return torch.cat(outs)


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 20
    results: dict = {"tokens_per_s": {}, "step_seconds": {}, "model_tflops": {}}
    rows = []
    presets = [("tiny", 8, 256), ("small", 8, 256)]
    for name, batch, seq in presets:
        cfg = preset_config(name)
        model = build_model(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        reps = (6 if args.quick else 20) if name == "tiny" else (2 if args.quick else 5)
        with_rec, without = step_times(model, ids, reps)
        tokens = batch * seq
        results["tokens_per_s"][name] = tokens / with_rec
        results["step_seconds"][name] = with_rec
        results["model_tflops"][name] = tokens * flops_per_token(cfg, seq) / with_rec / 1e12
        overhead = with_rec / without - 1
        results.setdefault("max_logit_overhead_by_preset", {})[name] = overhead
        if name == "tiny":
            results["max_logit_overhead"] = overhead
            results.update(recorder_peak_memory(cfg, batch, seq))
        rows.append({"preset": name, "batch": f"{batch}x{seq}", "step_s": with_rec, "tokens_per_s": tokens / with_rec,
                     "no_record_s": without, "record_overhead": overhead})
    print(table(rows, ["preset", "batch", "step_s", "tokens_per_s", "no_record_s", "record_overhead"]))

    # Time of the recorder alone on tiny's attention shapes (its memory is computed above).
    cfg = preset_config("tiny")
    q = torch.randn(8, cfg.num_heads, 256, cfg.qk_head_dim)
    k = torch.randn(8, cfg.num_heads, 256, cfg.qk_head_dim)
    t_block = time_it(lambda: causal_max_logit_per_head(q, k, 1.0, cfg.attn_block_size), repeats)
    results["recorder_seconds_tiny"] = t_block
    print(f"max-logit recorder alone (tiny, 8x256): {t_block * 1e3:.2f} ms; largest temporary (computed) "
          f"{results['recorder_block_bytes'] / 2**20:.1f} MiB vs full T x T logits "
          f"{results['full_logits_bytes'] / 2**20:.1f} MiB")

    # Grouped experts against the per-expert loop (forward + backward of one projection chain).
    erows = []
    results["grouped_vs_loop"] = {}
    for name, tokens in (("tiny", 8 * 256), ("small", 8 * 256)):
        cfg = preset_config(name)
        experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
        rows_total = tokens * cfg.num_experts_per_tok
        counts = torch.bincount(torch.randint(0, cfg.num_experts, (rows_total,)), minlength=cfg.num_experts)
        x = torch.randn(rows_total, cfg.hidden_size, requires_grad=True)

        def grouped(experts=experts, x=x, counts=counts):
            y = experts(x, counts)
            y.sum().backward()

        def loop(experts=experts, x=x, counts=counts):
            h = F.silu(expert_loop(x, experts.gate_proj, counts)) * expert_loop(x, experts.up_proj, counts)
            expert_loop(h, experts.down_proj, counts).sum().backward()

        tg = time_it(grouped, repeats)
        tl = time_it(loop, repeats)
        results["grouped_vs_loop"][name] = {"grouped_s": tg, "loop_s": tl, "speedup": tl / tg}
        erows.append({"experts": f"{name} ({cfg.num_experts}x[{cfg.expert_ffn_size},{cfg.hidden_size}])",
                      "grouped_s": tg, "loop_s": tl, "speedup": tl / tg})
    print(table(erows, ["experts", "grouped_s", "loop_s", "speedup"]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
