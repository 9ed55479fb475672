"""Training-loop throughput on this machine: tokens/s and model FLOPs utilisation of ``tiny`` and ``small``
with 1 worker (two threads) and 2 workers (one thread each; ep=1 and ep=2), against the machine's fp32
matmul throughput measured in the same run; and how long a checkpoint stalls the loop (the state
snapshot; the upload runs in the background) against the step time. Each layout reports its fastest of
several interleaved rounds.

The loop is the trainer's own (``pipelines.train_loop.Trainer``: MuonClip, gradient sync, QK-Clip,
router-bias update) on synthetic token batches, in processes joined by gloo, without Ray's scheduling
around it.

    python -m benchmarks.train [--quick] --out bench-results/train.json
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import parse_args, table, write_json
from pipelines.checkpointing import snapshot
from pipelines.config import load_config
from pipelines.train_loop import Trainer, measure_matmul_flops


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
        trainer.train_step()  # warm-up
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if world > 1:
            dist.barrier()
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


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    peak = measure_matmul_flops(torch.float32, size=1024)
    print(f"measured fp32 matmul throughput (2 threads, 1024^2): {peak / 1e9:.1f} GFLOP/s")
    seq = 256
    layouts = [(1, 1), (2, 1), (2, 2)]
    presets = [("tiny", 4 if args.quick else 10), ("small", 2 if args.quick else 4)]
    rounds = 2 if args.quick else 3
    results: dict = {"matmul_flops_per_s": peak, "rounds": rounds, "mfu": {}, "tokens_per_s": {}, "step_s": {},
                     "step_s_all_rounds": {}}
    # Layouts take turns, round after round, and each keeps its fastest round: load from elsewhere on
    # a shared machine then slows every layout alike instead of whichever ran at the wrong moment.
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for preset, steps in presets:
            for workers, ep in layouts:
                key = f"{preset}/w{workers}-ep{ep}"
                runs.setdefault(key, []).append(run_layout(preset, workers, ep, steps, seq, micro=4, global_batch=8))
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
    for preset, _ in presets:
        base = results["tokens_per_s"][f"{preset}/w1-ep1"]
        for workers, ep in layouts[1:]:
            results.setdefault("two_workers_over_one", {})[f"{preset}/w{workers}-ep{ep}"] = (
                results["tokens_per_s"][f"{preset}/w{workers}-ep{ep}"] / base)
    print(f"checkpoint stall / step (small, 1 worker): {results['checkpoint_stall_over_step']:.3f}")
    print("2 workers / 1 worker tokens/s:", {k: round(v, 3) for k, v in results["two_workers_over_one"].items()})
    write_json(args.out, results)


if __name__ == "__main__":
    main()
