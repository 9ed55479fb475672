"""Training-loop throughput on this machine: tokens/s and model FLOPs utilisation of ``tiny`` and ``small``
with 1 worker (two threads) and 2 workers (one thread each; ep=1 and ep=2), against the machine's fp32
matmul throughput measured in the same run; and how long a checkpoint stalls the loop (the state
snapshot; the upload runs in the background) against the step time. Each layout reports its fastest of
several interleaved rounds. ``small`` runs an 8,192-token global batch (and, on 1 worker, also the
2,048-token batch, ``small/w1-ep1-b8``); ``tiny`` 2,048 tokens (see ``main`` for why).

The loop is the trainer's own (``pipelines.train.trainer.Trainer``: MuonClip, gradient sync, QK-Clip,
router-bias update) on synthetic token batches, in processes joined by gloo, without Ray's scheduling
around it.

    python -m benchmarks.train [--quick] --out bench-results/train.json

With ``--device cuda`` (or ``--device cpu`` as a dry run) it measures instead one process on that device:
``small`` (``--preset``) in bf16 autocast on a GPU, tokens/s and MFU against the device's measured matmul
throughput in the same run (bf16 on a GPU, fp32 on a CPU) and, with ``--nominal-tflops``, against the
device's nominal peak; where a step's time goes (forward with the max-logit recording apart, backward,
gradient sync, clipping, optimizer step and its Newton-Schulz, QK-Clip, router-bias update; each timed
between device synchronisations in a second pass); the Newton-Schulz share of the step against its share
in the FLOP model (at this batch and at 1M tokens a step); the recording's share; peak memory.
Newton-Schulz runs in the dtype ``optimizer.ns_dtype=auto`` picks for the device (bf16 on a GPU), written
to the JSON:

    python -m benchmarks.train --device cuda --out bench-results/train-gpu.json

Targets of the CPU run (``targets`` in the JSON): ``small`` on 1 worker at an MFU of at least 25%; each
2-worker layout (``tiny`` and ``small``) at least 0.8x the tokens/s of 1 worker; a checkpoint stall of at
most 2 ``small`` steps (1 worker, 8,192-token batch).

Results measured so far, with their dates and machines: benchmarks/results/train.md.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import parse_args, table, write_json
from k2model.distributed import barrier
from k2model.optim import resolve_ns_dtype
from pipelines.config import load_config
from pipelines.train.checkpointing import snapshot
from pipelines.train.trainer import Trainer, measure_matmul_flops


class SyntheticBatches:
    def __init__(self, vocab: int, micro_batch: int, seq: int, rank: int):
        self.vocab, self.micro_batch, self.seq, self.rank = vocab, micro_batch, seq, rank

    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(step * 1000 + micro * 10 + self.rank)
        ids = torch.randint(0, self.vocab, (self.micro_batch, self.seq + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]


def _config(preset: str, workers: int, ep: int, micro: int, global_batch: int, seq: int, threads: int):
    vocab = {"tiny": 4096, "small": 32768}[preset]
    return load_config(None, [
        f"model.preset={preset}", f"data.vocab_size={vocab}", f"data.seq_len={seq}", f"train.num_workers={workers}",
        f"train.ep={ep}", f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}",
        "train.steps=1000", "train.warmup_steps=1", f"train.threads_per_worker={threads}", "tracking.enabled=false"])


def _worker(rank: int, world: int, port: int, cfg_args: tuple, steps: int, queue) -> None:
    cfg = _config(*cfg_args)
    torch.set_num_threads(cfg.train.threads_per_worker)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = Trainer(cfg, SyntheticBatches(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len,
                                                rank), [])
        trainer.step()  # warm-up
        if world > 1:
            barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        if world > 1:
            barrier()
        step_s = (time.perf_counter() - t0) / steps
        t1 = time.perf_counter()
        snapshot(trainer.state_dict())
        stall = time.perf_counter() - t1
        queue.put((rank, step_s, stall))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_layout(preset: str, workers: int, ep: int, steps: int, seq: int, micro: int, global_batch: int) -> dict:
    threads = 2 // workers
    cfg_args = (preset, workers, ep, micro, global_batch, seq, threads)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, workers, port, cfg_args, steps, queue)) for r in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    step_s = max(r[1] for r in results)
    stall = max(r[2] for r in results)
    cfg = _config(*cfg_args)
    from k2model.config import flops_per_token

    tokens = global_batch * seq
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "checkpoint_stall_s": stall,
            "model_flops_per_s": tokens * flops_per_token(cfg.model, seq) / step_s}


def _device_args(p) -> None:
    p.add_argument("--device", default=None, help="measure one process on this device (cuda, cpu) instead")
    p.add_argument("--preset", default="small", help="with --device: the model preset")
    p.add_argument("--seq", type=int, default=None, help="with --device: sequence length (cuda 1024, cpu 256)")
    p.add_argument("--micro", type=int, default=None, help="with --device: micro-batch (cuda 16, cpu 4)")
    p.add_argument("--global-batch", type=int, default=None, help="with --device: global batch (cuda 64, cpu 8)")
    p.add_argument("--steps", type=int, default=None, help="with --device: timed steps (cuda 20, cpu 3)")
    p.add_argument("--nominal-tflops", type=float, default=None,
                   help="with --device: the device's dense bf16 peak for a second MFU (H100/H200: 989)")


def device_breakdown(preset: str, device: torch.device, steps: int, seq: int, micro: int,
                     global_batch: int, nominal_flops: float | None = None) -> dict:
    """One process on ``device``: throughput, MFU and a per-phase breakdown of the trainer's step."""
    import k2model.layers
    import k2model.moe
    import k2model.optim
    import k2model.parallel
    import k2model.qk_clip
    from k2model.config import flops_per_token

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = measure_matmul_flops(dtype, size=8192 if cuda else 1024, device=device.type)
    cfg = _config(preset, 1, 1, micro, global_batch, seq, torch.get_num_threads())
    trainer = Trainer(cfg, SyntheticBatches(cfg.model.vocab_size, micro, seq, 0), [], device=device)
    for _ in range(2):  # warm-up: optimizer state, kernels, allocator
        trainer.step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    sync()
    step_s = (time.perf_counter() - t0) / steps

    # Second pass: each phase between synchronisations. The trainer looks these functions up at call
    # time (module attributes), so wrapping the attributes times the real step.
    phases: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    patches = [(k2model.optim, "newton_schulz"), (k2model.parallel, "clip_grad_norm_"),
               (k2model.qk_clip, "qk_clip"), (k2model.moe, "update_router_bias"),
               (k2model.layers, "causal_max_logit_per_head")]
    originals = [getattr(m, n) for m, n in patches]
    for (module, name), fn in zip(patches, originals):
        setattr(module, name, timed(name, fn))
    trainer.optimizer.update = timed("optimizer_step", trainer.optimizer.update)
    trainer.optimizer.publish = timed("parameter_publish", trainer.optimizer.publish)
    trainer.grad_sync.finish = timed("gradient_sync", trainer.grad_sync.finish)
    model_forward = trainer.model.forward
    trainer.model.forward = timed("forward", model_forward)
    # The trainer's own accumulation loop runs; ``Tensor.backward`` calls ``torch.autograd.backward``.
    autograd_backward = torch.autograd.backward
    torch.autograd.backward = timed("backward", autograd_backward)
    try:
        sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        sync()
        timed_step_s = (time.perf_counter() - t1) / steps
    finally:
        for (module, name), fn in zip(patches, originals):
            setattr(module, name, fn)
        trainer.model.forward = model_forward
        torch.autograd.backward = autograd_backward
    breakdown = {name: seconds / steps for name, seconds in phases.items()}
    breakdown["optimizer_step_without_newton_schulz"] = (breakdown.get("optimizer_step", 0.0)
                                                         - breakdown.get("newton_schulz", 0.0))
    breakdown["forward_without_recording"] = (breakdown.get("forward", 0.0)
                                              - breakdown.get("causal_max_logit_per_head", 0.0))
    inner = ("newton_schulz", "optimizer_step_without_newton_schulz", "causal_max_logit_per_head",
             "forward_without_recording")
    breakdown["rest"] = timed_step_s - sum(v for k, v in breakdown.items() if k not in inner)
    tokens = global_batch * seq
    model_flops_step = tokens * flops_per_token(cfg.model, seq)
    ns_flops = trainer.optimizer.last_step_stats.get("ns_flops", 0)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
              "preset": preset, "dtype": "bfloat16 autocast" if cuda else "float32", "seq_len": seq,
              "micro_batch": micro, "global_batch": global_batch, "steps": steps,
              "matmul_flops_per_s": peak, "step_s": step_s, "tokens_per_s": tokens / step_s,
              "mfu": tokens * flops_per_token(cfg.model, seq) / step_s / peak,
              "timed_step_s": timed_step_s, "breakdown_s": breakdown, "ns_dtype": trainer.optimizer.ns_dtype,
              "ns_share": breakdown.get("newton_schulz", 0.0) / timed_step_s,
              # The FLOP model's share of Newton-Schulz: at this batch, and at 1M tokens a step.
              "ns_flop_share": ns_flops / (ns_flops + model_flops_step),
              "ns_flop_share_at_1m_tokens": ns_flops / (ns_flops + (1 << 20) * flops_per_token(cfg.model, seq)),
              "recording_share": breakdown.get("causal_max_logit_per_head", 0.0) / timed_step_s}
    result["ns_share_over_flop_share"] = result["ns_share"] / max(result["ns_flop_share"], 1e-12)
    if nominal_flops:
        result["nominal_flops_per_s"] = nominal_flops
        result["mfu_nominal"] = model_flops_step / step_s / nominal_flops
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, extra=_device_args)
    if args.device:
        device = torch.device(args.device)
        cuda = device.type == "cuda"
        r = device_breakdown(args.preset, device, args.steps or (20 if cuda else 3),
                             args.seq or (1024 if cuda else 256), args.micro or (16 if cuda else 4),
                             args.global_batch or (64 if cuda else 8),
                             nominal_flops=args.nominal_tflops * 1e12 if args.nominal_tflops else None)
        print(f"{r['preset']} on {r['device_name']}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%} of the "
              f"measured {r['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s; Newton-Schulz share {r['ns_share']:.1%}")
        print(table([{"phase": k, "seconds": v, "share": v / r["timed_step_s"]} for k, v in r["breakdown_s"].items()],
                    ["phase", "seconds", "share"]))
        write_json(args.out, r)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    peak = measure_matmul_flops(torch.float32, size=1024)
    print(f"measured fp32 matmul throughput (2 threads, 1024^2): {peak / 1e9:.1f} GFLOP/s; Newton-Schulz in "
          f"{resolve_ns_dtype('auto', 'cpu')} (optimizer.ns_dtype=auto)")
    seq = 256
    layouts = [(1, 1), (2, 1), (2, 2)]
    # (preset, timed steps, global batch in sequences of 256, layouts). small's target layouts run a
    # 32-sequence (8,192-token) batch, 8 micro-batches of 4 on one worker: Newton-Schulz costs the same per
    # step whatever the batch (steps * d / tokens of the training FLOPs, shared/REFERENCE.md section 3), so
    # at 2,048 tokens it takes a large share of a small step on an fp32-only CPU (measured:
    # benchmarks/results/train.md), a share no real pretraining batch comes near (by that rule, under 0.1%
    # at K2's 67M tokens). The 2,048-token step is measured too, on 1 worker.
    runs_spec = [("tiny", 4 if args.quick else 10, 8, layouts), ("small", 1 if args.quick else 2, 32, layouts),
                 ("small", 2 if args.quick else 4, 8, [(1, 1)])]
    rounds = 2 if args.quick else 3
    results: dict = {"matmul_flops_per_s": peak, "rounds": rounds, "mfu": {}, "tokens_per_s": {}, "step_s": {},
                     "step_s_all_rounds": {}, "global_batch_tokens": {}, "ns_dtype": resolve_ns_dtype("auto", "cpu")}
    # Layouts take turns, round after round, and each keeps its fastest round: load from elsewhere on
    # a shared machine then slows every layout alike instead of whichever ran at the wrong moment.
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for preset, steps, global_batch, preset_layouts in runs_spec:
            for workers, ep in preset_layouts:
                key = f"{preset}/w{workers}-ep{ep}" + ("" if global_batch != 8 or preset == "tiny" else "-b8")
                results["global_batch_tokens"][key] = global_batch * seq
                runs.setdefault(key, []).append(run_layout(preset, workers, ep, steps, seq, micro=4,
                                                           global_batch=global_batch))
    rows = []
    for key, tries in runs.items():
        r = min(tries, key=lambda t: t["step_s"])
        mfu = r["model_flops_per_s"] / peak
        results["mfu"][key] = mfu
        results["tokens_per_s"][key] = r["tokens_per_s"]
        results["step_s"][key] = r["step_s"]
        results["step_s_all_rounds"][key] = [t["step_s"] for t in tries]
        results.setdefault("checkpoint_stall_s", {})[key] = min(t["checkpoint_stall_s"] for t in tries)
        rows.append({"layout": key, "step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"], "mfu": mfu,
                     "ckpt_stall_s": results["checkpoint_stall_s"][key]})
    print(table(rows, ["layout", "step_s", "tokens_per_s", "mfu", "ckpt_stall_s"]))
    small_1 = results["step_s"]["small/w1-ep1"]
    results["checkpoint_stall_over_step"] = results["checkpoint_stall_s"]["small/w1-ep1"] / small_1
    for preset in ("tiny", "small"):
        base = results["tokens_per_s"][f"{preset}/w1-ep1"]
        for workers, ep in layouts[1:]:
            results.setdefault("two_workers_over_one", {})[f"{preset}/w{workers}-ep{ep}"] = (
                results["tokens_per_s"][f"{preset}/w{workers}-ep{ep}"] / base)
    # The stall is the same state snapshot at either batch; against the shorter 2,048-token step too.
    results["checkpoint_stall_over_step_b8"] = (results["checkpoint_stall_s"]["small/w1-ep1-b8"]
                                                / results["step_s"]["small/w1-ep1-b8"])
    print(f"checkpoint stall / step (small, 1 worker): {results['checkpoint_stall_over_step']:.3f} "
          f"(against the 2,048-token step: {results['checkpoint_stall_over_step_b8']:.3f})")
    print("2 workers / 1 worker tokens/s:", {k: round(v, 3) for k, v in results["two_workers_over_one"].items()})
    results["targets"] = {
        "small_w1_mfu_at_least_25%": results["mfu"]["small/w1-ep1"] >= 0.25,
        "two_workers_at_least_0.8x": {k: v >= 0.8 for k, v in results["two_workers_over_one"].items()},
        "checkpoint_stall_at_most_2_steps": results["checkpoint_stall_over_step"] <= 2.0,
    }
    print("targets:", results["targets"])
    write_json(args.out, results)


if __name__ == "__main__":
    main()
