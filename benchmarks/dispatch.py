"""MoE layer forward+backward time: every expert on every rank (``LocalDispatcher``, pure data parallel)
against experts split over 2 gloo ranks (``AllToAllDispatcher``, ep=2), for the MoE shapes of the
``tiny`` and ``small`` presets.

Both layouts run in the same 2 processes on the same tokens per rank, so they share the machine alike;
a step is as slow as its slowest rank, so the figure per layout is the median over iterations of the
slowest rank's time. ``exchange`` is the all-to-all path alone (dispatch + combine, forward and
backward, with the experts replaced by a cheap elementwise op): the price of the token exchange.

    python -m benchmarks.dispatch [--quick] --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from k2model.config import preset_config
from k2model.dispatch import AllToAllDispatcher, LocalDispatcher
from k2model.distributed import barrier
from k2model.moe import MoE
from k2model.testing import run_workers

WORLD = 2
PRESETS = ("tiny", "small")


def _layer(preset: str, dispatcher) -> MoE:
    cfg = preset_config(preset).replace(seq_aux_loss_alpha=0.0)
    moe = MoE(cfg, dispatcher)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        offset = dispatcher.local_expert_offset
        for name, p in moe.named_parameters():
            if name.startswith("experts."):  # the global experts this rank holds, as in init_weights
                full = torch.randn((cfg.num_experts, *p.shape[1:]), generator=gen)
                p.copy_(full[offset:offset + p.shape[0]] * cfg.init_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.init_std)
    return moe


def _time_ms(fns: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function; the functions take turns within every iteration, so a
    change in machine load mid-run hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            barrier()
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times[name].append(elapsed)
    return times


def _bench_preset(preset: str, rank: int, tokens_per_rank: int, warmup: int, iters: int) -> dict:
    cfg = preset_config(preset)
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(1, tokens_per_rank, cfg.hidden_size, generator=gen)
    grad = torch.randn_like(x)
    a2a = AllToAllDispatcher(cfg.num_experts, dist.group.WORLD)
    local_moe, ep_moe = _layer(preset, LocalDispatcher(cfg.num_experts)), _layer(preset, a2a)
    topk = ep_moe.gate(x.view(-1, cfg.hidden_size))[0]

    def fwd_bwd(moe: MoE) -> None:
        moe(x.clone().requires_grad_(True)).backward(grad)
        moe.zero_grad(set_to_none=True)

    def exchange() -> None:
        x_MD, _, handle = a2a.dispatch(x.view(-1, cfg.hidden_size).clone().requires_grad_(True), topk)
        a2a.combine(x_MD * 2.0, handle).sum().backward()

    times = _time_ms({"local_ms": lambda: fwd_bwd(local_moe), "all_to_all_ms": lambda: fwd_bwd(ep_moe),
                      "exchange_ms": exchange}, warmup, iters)
    return {
        "preset": preset, "tokens_per_rank": tokens_per_rank, "hidden_size": cfg.hidden_size,
        "expert_ffn_size": cfg.expert_ffn_size, "num_experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok, **times,
        "rows_received": _rows_received(a2a, topk, cfg.hidden_size),
    }


def _bench_worker(rank: int, world_size: int, tokens_per_rank: int, warmup: int, iters: int) -> list[dict]:
    return [_bench_preset(preset, rank, tokens_per_rank, warmup, iters) for preset in PRESETS]


def _rows_received(dispatcher: AllToAllDispatcher, topk: torch.Tensor, hidden: int) -> int:
    with torch.no_grad():
        x_MD, _, _ = dispatcher.dispatch(torch.zeros(topk.shape[0], hidden), topk)
    return x_MD.shape[0]


def _summarise(per_rank: list[list[dict]]) -> list[dict]:
    """Per preset: the median over iterations of the slowest rank's time."""
    out = []
    for rows in zip(*per_rank):
        row = {k: v for k, v in rows[0].items() if not k.endswith("_ms") and k != "rows_received"}
        for key in ("local_ms", "all_to_all_ms", "exchange_ms"):
            slowest = [max(times) for times in zip(*(r[key] for r in rows))]
            row[key] = round(statistics.median(slowest), 3)
        row["rows_received_per_rank"] = [r["rows_received"] for r in rows]
        row["all_to_all_over_local"] = round(row["all_to_all_ms"] / row["local_ms"], 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and iterations (a smoke run)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    tokens, warmup, iters = (256, 1, 3) if args.quick else (1024, 2, 10)
    started = time.time()
    results = _summarise(run_workers(_bench_worker, WORLD, tokens, warmup, iters, timeout_s=1800,
                                     collective_timeout_s=300))
    report = {
        "benchmark": "dispatch", "quick": args.quick, "world_size": WORLD, "ep": WORLD,
        "backend": "gloo", "warmup": warmup, "iters": iters, "results": results,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2), "threads_per_rank": 1},
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'preset':<6} {'tokens/rank':>11} {'local ms':>9} {'a2a ms':>9} {'exchange ms':>11} {'a2a/local':>9}")
    for r in results:
        print(f"{r['preset']:<6} {r['tokens_per_rank']:>11} {r['local_ms']:>9.2f} {r['all_to_all_ms']:>9.2f} "
              f"{r['exchange_ms']:>11.2f} {r['all_to_all_over_local']:>9.2f}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
