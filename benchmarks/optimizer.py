"""Optimizer cost on this machine, side by side in one run, for ``tiny`` and ``small``:

- optimizer step time of MuonClip (Muon + AdamW) against torch's AdamW on the same gradients;
- the share of a full training step (forward + backward + MuonClip step, batch 8 x 256) spent in
  Newton-Schulz, measured inside real steps, against a prediction: the Newton-Schulz FLOPs of every
  same-shape stack priced at this machine's measured bmm rate for exactly those shapes and the dtype
  the optimizer iterates in (``optimizer.ns_dtype=auto``: bf16 where this CPU multiplies bf16 natively,
  else fp32; both rates are reported, with ``--ns-dtype`` to force one);
- the FLOP ratio Newton-Schulz / training, counted, next to the rule of thumb steps * d / tokens
  (shared/REFERENCE.md section 3);
- batched Newton-Schulz of an expert stack against a per-matrix loop (tiny: 16 x [64, 128]; small:
  32 x [256, 512]), with both chains' GFLOP/s and the ceiling on the speedup that this machine allows:
  its matmul rate on a large square product (1024 x 1024) over the loop's rate. A per-matrix chain of
  tiny's expert shape leaves most of a wide CPU's throughput unused (call overhead, one small product at
  a time), so the ceiling is high where products are cheap (bf16 on AMX) and lower where they are not
  (fp32 on a small AVX2-only CPU);
- what the tiny speedup is made of, for reading it on another machine: the speedup on one thread (the
  per-call overhead the batched chain saves) and one thread's matmul rate on each CPU, pinned in turn,
  before and after the stacks. torch splits a batched product statically across its threads, so the
  batched chain runs at the pace of the slower CPU, while the loop, which a second thread barely speeds
  up, runs at about one CPU's pace: a rough model of the speedup is the one-thread speedup x threads x
  slowest / fastest CPU. On a shared cloud host the CPUs' speed moves from minute to minute (a vCPU whose
  hyperthread sibling is busy elsewhere runs slower), and the tiny speedup moves with it.

    python -m benchmarks.optimizer [--quick] --out bench-results/optimizer.json

Figures, printed and in the JSON: per preset ``step_seconds`` (forward + backward + MuonClip step),
``muonclip_step_seconds``, ``adamw_step_seconds`` and their ratio ``muon_over_adamw_step_time``;
``ns_share_measured`` and ``ns_share_predicted`` (Newton-Schulz seconds over the step) and
``ns_measured_over_predicted``; ``ns_flop_ratio_counted`` against ``ns_flop_ratio_rule_of_thumb``;
``matmul_rates``, the bmm GFLOP/s of each stack shape in bf16 and fp32. Per expert stack in
``batched_vs_loop``: the fastest call of each chain (``batched_s``, ``loop_s``), ``speedup`` (loop over
batched), both chains' GFLOP/s and ``speedup_ceiling`` (``ns_dtype_peak_gflops`` over the loop's rate);
for tiny also ``speedup_one_thread`` and ``speedup_modelled_from_cpus``, with ``per_cpu_gflops`` (one
thread's 256 x 256 matmul rate on each CPU, before and after the stacks).

Targets (``targets`` in the JSON): the measured Newton-Schulz share within 1.5x of the priced one,
either way, for both presets; tiny's batched chain at least 3x faster than the loop; small's no slower.

Results measured so far, with their dates and machines: benchmarks/results/optimizer.md.

Newton-Schulz FLOPs of one [m, n] matrix (m <= n) per iteration: X X^T 2 m^2 n, A A 2 m^3, B X 2 m^2 n.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

import k2model.optim as optim
from benchmarks.common import parse_args, table, time_it, write_json
from k2model.config import OptimizerConfig, flops_per_token, preset_config
from k2model.model import build_model
from k2model.testing import torch_threads

BATCH, SEQ = 8, 256


class NewtonSchulzTimer:
    """Wraps ``k2model.optim.newton_schulz`` (the optimizer calls it by module attribute) and sums the
    wall time spent inside it."""

    def __init__(self):
        self.seconds = 0.0
        self._original = optim.newton_schulz

    def __enter__(self):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = self._original(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        optim.newton_schulz = timed
        return self

    def __exit__(self, *exc):
        optim.newton_schulz = self._original


def ns_stacks(opt: optim.MuonClip) -> dict[tuple[int, int], int]:
    """(m, n) wide shape -> number of matrices the optimizer stacks into one Newton-Schulz batch."""
    stacks: dict[tuple[int, int], int] = {}
    for group in opt.param_groups:
        if group["kind"] != "muon":
            continue
        for p in group["params"]:
            k, rows, cols = optim._matrix_shape(p)
            key = (min(rows, cols), max(rows, cols))
            stacks[key] = stacks.get(key, 0) + k
    return stacks


def iteration_bmm_seconds(k: int, m: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Seconds of one Newton-Schulz iteration's three products (X X^T, A A, B X) on k stacked [m, n]
    matrices as plain bmm calls into preallocated outputs, each the fastest of ``repeats``."""
    X = torch.randn(k, m, n).to(dtype) * 0.05
    A = torch.randn(k, m, m).to(dtype) * 0.05
    out_mm, out_mn = torch.empty(k, m, m, dtype=dtype), torch.empty(k, m, n, dtype=dtype)
    return (time_it(lambda: torch.bmm(X, X.mT, out=out_mm), repeats, stat=min)
            + time_it(lambda: torch.bmm(A, A, out=out_mm), repeats, stat=min)
            + time_it(lambda: torch.bmm(A, X, out=out_mn), repeats, stat=min))


def priced_ns_seconds(m: int, n: int, k: int, steps: int, dtype: torch.dtype, repeats: int
                      ) -> tuple[float, float]:
    """(seconds, GFLOP/s) of ``steps`` Newton-Schulz iterations on k stacked [m, n] matrices predicted
    from bmm timings of the iteration's products at these shapes, on sub-stacks of the size
    ``newton_schulz`` iterates on this CPU (``optim.ns_sub_stack_size``); the normalisation and the scaled
    additions are not priced."""
    per_chunk = optim.ns_sub_stack_size(k, m, n, dtype, optim.ns_chunk_bytes("cpu"))
    counts = {per_chunk: k // per_chunk}
    if k % per_chunk:
        counts[k % per_chunk] = 1
    seconds = sum(count * steps * iteration_bmm_seconds(size, m, n, dtype, repeats)
                  for size, count in counts.items())
    return seconds, k * optim.newton_schulz_flops(m, n, steps) / seconds / 1e9


def measure_preset(name: str, repeats: int, rate_repeats: int, ns_dtype: str = "auto") -> dict:
    cfg = preset_config(name)
    opt_cfg = OptimizerConfig(ns_dtype=ns_dtype)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    muonclip = optim.build_optimizer(model, opt_cfg, lr=1e-3)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    samples: dict[str, list[float]] = {"fwd_bwd": [], "muonclip": [], "ns": [], "adamw": []}
    for i in range(repeats + 1):  # the first round initialises optimizer state and warms caches
        t0 = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        t1 = time.perf_counter()
        with NewtonSchulzTimer() as ns:
            muonclip.step()
        t2 = time.perf_counter()
        adamw.step()  # the same gradients; both optimizers move the same weights (timing only)
        t3 = time.perf_counter()
        muonclip.zero_grad()
        model.reset_max_logits()
        model.reset_expert_load()
        if i:
            for key, value in (("fwd_bwd", t1 - t0), ("muonclip", t2 - t1), ("ns", ns.seconds),
                               ("adamw", t3 - t2)):
                samples[key].append(value)
    med = {k: statistics.median(v) for k, v in samples.items()}
    step_seconds = med["fwd_bwd"] + med["muonclip"]
    # Measured and priced Newton-Schulz times are both the fastest of their repeats, so that load from
    # elsewhere on a shared machine does not land on one side of the ratio only.
    ns_seconds = min(samples["ns"])

    stacks = ns_stacks(muonclip)
    steps = opt_cfg.ns_steps
    priced_bf16 = priced_fp32 = 0.0
    rates = []
    for (m, n), k in sorted(stacks.items(), key=lambda kv: -kv[1] * optim.newton_schulz_flops(*kv[0])):
        s16, r16 = priced_ns_seconds(m, n, k, steps, torch.bfloat16, rate_repeats)
        s32, r32 = priced_ns_seconds(m, n, k, steps, torch.float32, rate_repeats)
        priced_bf16 += s16
        priced_fp32 += s32
        rates.append({"shape": f"{k}x[{m},{n}]", "bf16_gflops": r16, "fp32_gflops": r32})
    priced = {"bfloat16": priced_bf16, "float32": priced_fp32}[muonclip.ns_dtype]
    ns_flops = sum(k * optim.newton_schulz_flops(m, n, steps) for (m, n), k in stacks.items())
    train_flops = flops_per_token(cfg, SEQ) * BATCH * SEQ
    return {
        "ns_dtype": muonclip.ns_dtype,
        "step_seconds": step_seconds,
        "fwd_bwd_seconds": med["fwd_bwd"],
        "muonclip_step_seconds": med["muonclip"],
        "adamw_step_seconds": med["adamw"],
        "muon_over_adamw_step_time": med["muonclip"] / med["adamw"],
        "ns_seconds_measured": ns_seconds,
        "ns_seconds_priced_bf16": priced_bf16,
        "ns_seconds_priced_fp32": priced_fp32,
        "ns_share_measured": ns_seconds / step_seconds,
        "ns_share_predicted": priced / step_seconds,
        "ns_measured_over_predicted": ns_seconds / priced,
        "ns_flops": ns_flops,
        "train_flops": train_flops,
        "ns_flop_ratio_counted": ns_flops / train_flops,
        "ns_flop_ratio_rule_of_thumb": steps * cfg.hidden_size / (BATCH * SEQ),
        "matmul_rates": rates,
    }


def batched_vs_loop(num: int, m: int, n: int, repeats: int, dtype: torch.dtype) -> dict:
    """One batched chain against a per-matrix loop, calls alternating; each keeps its fastest call, so
    drifting load from elsewhere on the machine reaches both sides alike."""
    G = torch.randn(num, m, n)
    calls = {"batched_s": lambda: optim.newton_schulz(G, dtype=dtype),
             "loop_s": lambda: [optim.newton_schulz(g, dtype=dtype) for g in G]}
    best = {name: time_it(fn, 1, stat=min) for name, fn in calls.items()}  # includes one warm-up call each
    for _ in range(repeats - 1):
        for name, fn in calls.items():
            best[name] = min(best[name], time_it(fn, 1, warmup=0, stat=min))
    flops = num * optim.newton_schulz_flops(m, n)
    return {**best, "speedup": best["loop_s"] / best["batched_s"],
            "batched_gflops": flops / best["batched_s"] / 1e9, "loop_gflops": flops / best["loop_s"] / 1e9}


def per_cpu_gflops(dtype: torch.dtype, rounds: int, size: int = 256) -> dict[int, float]:
    """One thread's matmul rate on each CPU this process may use, the calling thread pinned to each in
    turn (rounds alternate over the CPUs; fastest kept). On a shared cloud host a vCPU whose hyperthread
    sibling is busy runs far slower than the other, and a batched chain, which torch splits statically
    across its threads, then runs at the pace of the slowest one. Empty where pinning is unavailable."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    A = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    best = {cpu: float("inf") for cpu in cpus}
    with torch_threads(1):
        try:
            for _ in range(rounds):
                for cpu in cpus:
                    os.sched_setaffinity(0, {cpu})
                    best[cpu] = min(best[cpu], time_it(lambda: torch.mm(A, A, out=out), 5, stat=min))
        finally:
            os.sched_setaffinity(0, cpus)
    return {cpu: 2 * size**3 / t / 1e9 for cpu, t in best.items()}


def peak_gflops(dtype: torch.dtype, repeats: int, size: int = 1024) -> float:
    """This machine's matmul rate on a large square product (fastest of ``repeats``): what a batched
    chain could reach at best, so peak / per-matrix loop rate bounds the batched speedup."""
    A = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    return 2 * size**3 / time_it(lambda: torch.mm(A, A, out=out), repeats, stat=min) / 1e9


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, lambda p: p.add_argument(
        "--ns-dtype", default="auto", choices=["auto", *optim.NS_DTYPES], help="Newton-Schulz dtype (default auto)"))
    torch.set_num_threads(2)
    repeats = 3 if args.quick else 6
    rate_repeats = 5 if args.quick else 10
    per_preset = {name: measure_preset(name, repeats, rate_repeats, args.ns_dtype) for name in ("tiny", "small")}
    ns_dtype = optim.NS_DTYPES[optim.resolve_ns_dtype(args.ns_dtype, "cpu")]
    threads = torch.get_num_threads()
    cpu_rates = per_cpu_gflops(ns_dtype, 3 if args.quick else 6)
    batched = {
        "tiny_16x[64,128]": batched_vs_loop(16, 64, 128, 20 if args.quick else 50, ns_dtype),
        "small_32x[256,512]": batched_vs_loop(32, 256, 512, 5 if args.quick else 10, ns_dtype),
    }
    with torch_threads(1):
        tiny_one_thread = batched_vs_loop(16, 64, 128, 20 if args.quick else 50, ns_dtype)
    cpu_rates_after = per_cpu_gflops(ns_dtype, 3 if args.quick else 6)

    rows = [{"preset": name, "NS dtype": r["ns_dtype"], "step s": r["step_seconds"],
             "muonclip s": r["muonclip_step_seconds"],
             "adamw s": r["adamw_step_seconds"], "muon/adamw": r["muon_over_adamw_step_time"],
             "NS share": r["ns_share_measured"], "NS share priced": r["ns_share_predicted"],
             "meas/priced": r["ns_measured_over_predicted"], "NS/train FLOPs": r["ns_flop_ratio_counted"],
             "5d/tokens": r["ns_flop_ratio_rule_of_thumb"]} for name, r in per_preset.items()]
    print(table(rows, list(rows[0])))
    rate_rows = [{"preset": name, **rate} for name, r in per_preset.items() for rate in r["matmul_rates"]]
    print(table(rate_rows, ["preset", "shape", "bf16_gflops", "fp32_gflops"]))
    peak = peak_gflops(ns_dtype, rate_repeats)
    for v in batched.values():
        v["speedup_ceiling"] = peak / v["loop_gflops"]
    brows = [{"stack": k, **v} for k, v in batched.items()]
    print(f"{ns_dtype} matmul peak (1024^2, 2 threads): {peak:.1f} GFLOP/s")
    print(table(brows, ["stack", "batched_s", "loop_s", "speedup", "batched_gflops", "loop_gflops",
                        "speedup_ceiling"]))
    # What the tiny speedup can be on this host: the per-call overhead a batched chain saves (its speedup
    # on one thread) times the threads it can add, at the pace of the slowest CPU against the fastest
    # (the loop gains little from a second thread, so it runs at about one CPU's pace).
    spread = min(cpu_rates.values()) / max(cpu_rates.values()) if cpu_rates else 1.0
    spread_after = min(cpu_rates_after.values()) / max(cpu_rates_after.values()) if cpu_rates_after else 1.0
    tiny = batched["tiny_16x[64,128]"]
    tiny.update({
        "speedup_one_thread": tiny_one_thread["speedup"], "one_thread": tiny_one_thread,
        "speedup_modelled_from_cpus": tiny_one_thread["speedup"] * threads * min(spread, spread_after),
    })
    print(f"per-CPU 1-thread {ns_dtype} matmul GFLOP/s (256^2), before / after the stacks: "
          + ", ".join(f"cpu{c} {cpu_rates[c]:.1f} / {cpu_rates_after.get(c, float('nan')):.1f}"
                      for c in cpu_rates))
    print(f"tiny speedup on 1 thread {tiny['speedup_one_thread']:.2f}; x {threads} threads x slowest/fastest "
          f"CPU {min(spread, spread_after):.2f} = {tiny['speedup_modelled_from_cpus']:.2f} modelled, "
          f"{tiny['speedup']:.2f} measured")

    targets = {
        "ns_share_within_1.5x_of_priced": {
            name: 1 / 1.5 <= r["ns_measured_over_predicted"] <= 1.5 for name, r in per_preset.items()},
        "batched_3x_faster_tiny": batched["tiny_16x[64,128]"]["speedup"] >= 3.0,
        "batched_no_slower_small": batched["small_32x[256,512]"]["speedup"] >= 1.0,
    }
    print("targets:", targets)
    write_json(args.out, {
        "batch": [BATCH, SEQ],
        "quick": args.quick,
        "muon_over_adamw_step_time": {n: r["muon_over_adamw_step_time"] for n, r in per_preset.items()},
        "ns_share_measured": {n: r["ns_share_measured"] for n, r in per_preset.items()},
        "ns_share_predicted": {n: r["ns_share_predicted"] for n, r in per_preset.items()},
        "batched_speedup": {k: v["speedup"] for k, v in batched.items()},
        "ns_dtype_peak_gflops": peak,
        "threads": threads,
        "per_cpu_gflops": {"before_stacks": cpu_rates, "after_stacks": cpu_rates_after},
        "presets": per_preset,
        "batched_vs_loop": batched,
        "targets": targets,
    })


if __name__ == "__main__":
    main()
