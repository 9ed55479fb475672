"""Tokenize-and-shard throughput and memory: the Ray Data shard stage with 1 and 2 tokenizer actors against
one plain process calling the same tokenizer's batch encoding on the same documents, and the stage's peak
memory on the corpus and on a 10x larger one (the same documents replicated).

    python -m benchmarks.tokenize [--quick] --out FILE.json

Corpus: the standard library's sources (the pipeline's default corpus) ingested once, a tokenizer trained
on them (4,096 tokens). Every configuration runs one tokenizer thread per process. Throughput is tokens
(``<bos>``/``<eos>`` included) over the wall time of the whole stage, actor start-up and shard writing
included. Memory is sampled every 50 ms over the process tree (the driver plus every Ray process it
started: GCS, raylet, workers) as resident memory minus shared memory, summed; Ray's object store lives in
shared memory and is reported apart (the largest shared resident size of any process).

Also reported: the start-up (until the first actor starts encoding: the executor and the actor processes),
the throughput after it (what a large corpus sees), and the actors' busy time (tokens per busy actor-second
is the encoding speed inside Ray, to set against the plain process).

Targets: 2 workers >= 1.6x one worker; one Ray Data worker >= 0.8x the plain process; peak memory on the
10x corpus <= 1.3x that on the corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from pipelines.tokenizer import one_thread_per_process

REPO = Path(__file__).resolve().parent.parent


def _status_fields(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssShmem:")):
                name, value, _unit = line.split()
                fields[name[:-1]] = int(value) * 1024
    return fields


class TreeMemory(common.PeakRSS):
    """``peak``: the largest sum over the process tree of resident memory minus shared memory;
    ``peak_shared``: the largest shared resident size of one process (Ray's object store)."""

    def __init__(self, pids=None, interval: float = 0.05):
        super().__init__(pids, interval)
        self.peak_shared = 0

    def _sample(self) -> int:
        import psutil

        if self.pids is not None:
            pids = list(self.pids())
        else:
            me = psutil.Process()
            pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
        private = shared = 0
        for pid in pids:
            try:
                fields = _status_fields(pid)
            except (OSError, ValueError):
                continue
            private += fields.get("VmRSS", 0) - fields.get("RssShmem", 0)
            shared = max(shared, fields.get("RssShmem", 0))
        self.peak_shared = max(self.peak_shared, shared)
        return private


def single_process(ingest_uri: str, tokenizer_uri: str) -> dict[str, float]:
    """The baseline, in its own process: read the documents and batch-encode them."""
    one_thread_per_process()
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.ingest import IngestOutput
    from pipelines.shard import ENCODE_BATCH_DOCS
    from pipelines.tokenizer import load_tokenizer

    ingest = IngestOutput.from_dict(storage.read_complete(ingest_uri), ingest_uri)
    tokenizer = load_tokenizer(tokenizer_uri)
    t0 = time.perf_counter()
    num_tokens = 0
    for split in ("train", "val"):
        for uri in ingest.files(split):
            texts = pq.read_table(uri, columns=["text"]).column(0).to_pylist()
            for i in range(0, len(texts), ENCODE_BATCH_DOCS):
                num_tokens += tokenizer.encode_documents(texts[i:i + ENCODE_BATCH_DOCS]).size
    return {"tokens": num_tokens, "seconds": time.perf_counter() - t0}


def run_single_process(ingest_uri: str, tokenizer_uri: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.tokenize", "--single-process", ingest_uri, tokenizer_uri]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    with TreeMemory(pids=lambda: [proc.pid]) as mem:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the single-process baseline failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_bytes": mem.peak}


def run_stage(data, ingest, tokenizer, root: str) -> dict[str, float]:
    from pipelines.shard import run_shard

    with TreeMemory() as mem:
        t0 = time.perf_counter()
        manifest = run_shard(data, ingest, tokenizer, root, force=True)
        seconds = time.perf_counter() - t0
    tokens = sum(s.num_tokens + s.dropped_tokens for s in manifest.splits.values())
    return {"tokens": tokens, "seconds": seconds, "startup_seconds": manifest.stats["startup_s"],
            "actor_busy_seconds": manifest.stats["actor_busy_s"],
            "peak_rss_bytes": mem.peak,
            "peak_object_store_bytes": mem.peak_shared,
            "shards": [s.sha256 for split in manifest.splits.values() for s in split.shards]}


def main(argv: list[str] | None = None) -> None:
    def hidden(p: argparse.ArgumentParser) -> None:  # the baseline's own process
        p.add_argument("--single-process", nargs=2, metavar=("INGEST", "TOKENIZER"), help=argparse.SUPPRESS)

    args = common.parse_args("Tokenize-and-shard throughput and memory", argv, extra=hidden)
    if args.single_process:
        print(json.dumps(single_process(*args.single_process)))
        return
    one_thread_per_process()
    work = tempfile.mkdtemp(prefix="k2-bench-tokenize-")
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: str) -> None:
    import ray
    import ray.data

    from pipelines.config import DataConfig
    from pipelines.ingest import run_ingest
    from pipelines.tokenizer import run_tokenizer

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = DataConfig(max_docs=150 if args.quick else None, vocab_size=4096, seq_len=256,
                      windows_per_shard=1024, tokenizer_sample_bytes=2_000_000 if args.quick else 6_000_000)
    ingest = run_ingest(data, work)
    tokenizer = run_tokenizer(data, ingest, work)
    corpus_bytes = sum(ingest.stats.bytes.values())
    print(f"corpus: {sum(ingest.stats.documents.values()):,} documents, {corpus_bytes / 1e6:.1f} MB "
          f"({ingest.corpus}); working folder {work}")
    with TreeMemory() as idle:
        time.sleep(1.0)

    single = run_single_process(ingest.uri, tokenizer.uri)
    one = run_stage(dataclasses.replace(data, num_workers=1), ingest, tokenizer, work)
    two = run_stage(dataclasses.replace(data, num_workers=2), ingest, tokenizer, work)
    assert one["shards"] == two["shards"], "1 and 2 workers wrote different shards"
    assert one["tokens"] == two["tokens"] == single["tokens"], "stage and baseline counted differently"
    big_ingest = dataclasses.replace(ingest, fingerprint=f"{ingest.fingerprint}-x10",
                                     parts={s: p * 10 for s, p in ingest.parts.items()})
    ten = run_stage(dataclasses.replace(data, num_workers=2), big_ingest, tokenizer, work)
    assert ten["tokens"] >= 10 * two["tokens"] - 10 * data.seq_len
    ray.shutdown()

    def rate(r: dict[str, float]) -> float:
        return r["tokens"] / r["seconds"]

    def steady(r: dict[str, float]) -> float:
        """Excluding the start-up (actor processes, executor) before the first encoded unit arrives."""
        return r["tokens"] / max(r["seconds"] - r["startup_seconds"], 1e-9)

    results: dict[str, Any] = {
        "quick": args.quick, "corpus_documents": sum(ingest.stats.documents.values()),
        "corpus_bytes": corpus_bytes, "tokens": single["tokens"], "tokens_10x": ten["tokens"],
        "tokens_per_s_single_process": rate(single), "tokens_per_s_1_worker": rate(one),
        "tokens_per_s_2_workers": rate(two), "tokens_per_s_2_workers_10x": rate(ten),
        "seconds_single_process": single["seconds"], "seconds_1_worker": one["seconds"],
        "seconds_2_workers": two["seconds"], "seconds_2_workers_10x": ten["seconds"],
        "startup_seconds_1_worker": one["startup_seconds"],
        "startup_seconds_2_workers": two["startup_seconds"],
        "tokens_per_s_after_startup_1_worker": steady(one),
        "tokens_per_s_after_startup_2_workers": steady(two),
        "tokens_per_s_after_startup_2_workers_10x": steady(ten),
        "tokens_per_actor_busy_s_1_worker": one["tokens"] / max(one["actor_busy_seconds"], 1e-9),
        "tokens_per_actor_busy_s_2_workers": two["tokens"] / max(two["actor_busy_seconds"], 1e-9),
        "peak_rss_bytes_single_process": single["peak_rss_bytes"],
        "peak_rss_bytes_1_worker": one["peak_rss_bytes"],
        "peak_rss_bytes_1x": two["peak_rss_bytes"], "peak_rss_bytes_10x": ten["peak_rss_bytes"],
        "peak_object_store_bytes_1_worker": one["peak_object_store_bytes"],
        "peak_object_store_bytes_1x": two["peak_object_store_bytes"],
        "peak_object_store_bytes_10x": ten["peak_object_store_bytes"],
        "idle_ray_rss_bytes": idle.peak, "load_average_1min": os.getloadavg()[0],
    }
    results["speedup_2_vs_1_worker"] = rate(two) / rate(one)
    results["ratio_1_worker_vs_single_process"] = rate(one) / rate(single)
    results["memory_ratio_10x_vs_1x"] = ten["peak_rss_bytes"] / two["peak_rss_bytes"]
    results["memory_ratio_10x_vs_1x_above_idle"] = (ten["peak_rss_bytes"] - idle.peak) / max(
        two["peak_rss_bytes"] - idle.peak, 1)
    results["targets"] = {
        "speedup_2_vs_1_worker>=1.6": results["speedup_2_vs_1_worker"] >= 1.6,
        "1_worker_vs_single_process>=0.8": results["ratio_1_worker_vs_single_process"] >= 0.8,
        "memory_10x_vs_1x<=1.3": results["memory_ratio_10x_vs_1x"] <= 1.3}

    rows = [
        {"config": "single process", "tokens": single["tokens"], "seconds": single["seconds"],
         "tokens/s": rate(single), "start-up s": 0.0, "tokens/s after start-up": rate(single),
         "peak RSS MB": single["peak_rss_bytes"] / 1e6, "object store MB": 0.0},
        *({"config": name, "tokens": r["tokens"], "seconds": r["seconds"], "tokens/s": rate(r),
           "start-up s": r["startup_seconds"], "tokens/s after start-up": steady(r),
           "peak RSS MB": r["peak_rss_bytes"] / 1e6, "object store MB": r["peak_object_store_bytes"] / 1e6}
          for name, r in (("ray data, 1 worker", one), ("ray data, 2 workers", two),
                          ("ray data, 2 workers, 10x corpus", ten))),
    ]
    print(common.table(rows, ["config", "tokens", "seconds", "tokens/s", "start-up s",
                              "tokens/s after start-up", "peak RSS MB", "object store MB"]))
    print(f"idle Ray tree: {idle.peak / 1e6:.0f} MB; 2 vs 1 worker {results['speedup_2_vs_1_worker']:.2f}x "
          f"(target 1.6); 1 worker vs single process {results['ratio_1_worker_vs_single_process']:.2f}x "
          f"(target 0.8); memory 10x vs 1x {results['memory_ratio_10x_vs_1x']:.2f}x (target 1.3); "
          f"load average {results['load_average_1min']:.1f}")
    common.write_json(args.out, results)


if __name__ == "__main__":
    main()
