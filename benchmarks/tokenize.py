"""Tokenize-and-shard throughput and memory: the Ray Data shard stage with 1 and 2 tokenizer actors against
one plain process calling the same tokenizer's batch encoding on the same documents, on the corpus and on a
10x larger one (the same documents replicated), and the stage's peak memory on both.

    python -m benchmarks.tokenize [--quick] --out FILE.json

Corpus: the standard library's sources (the pipeline's default corpus) ingested once, a tokenizer trained
on them (4,096 tokens). Every configuration runs one tokenizer thread per process. Throughput is tokens
(``<bos>``/``<eos>`` included) over the wall time of the whole stage, actor start-up and shard writing
included. Memory is sampled every 0.25 s over the process tree (the driver plus every Ray process it
started: GCS, raylet, workers) as resident memory minus shared memory, summed; Ray's object store lives in
shared memory and is reported apart (the largest shared resident size of any process).

Which corpus the throughput targets are read on: the 10x one (``tokens_per_s_*``). The stage starts its
tokenizer actors afresh each run, in new worker processes (Ray gives an actor a worker that has not run
tasks, and booting one imports Ray Data), a fixed cost that on the standard library alone is a large share
of one worker's whole run and says nothing about tokenizing throughput; a real pretraining corpus is
thousands of times larger still. The same three configurations on the corpus itself are reported too
(``*_1x``), with that start-up.

The configurations take turns over two rounds (one with ``--quick``) and each keeps its fastest: on a
shared machine the same work can take much longer from one minute to the next.

Also reported: the start-up (until the first actor starts encoding: the executor and the actor processes),
the throughput after it, and the actors' busy time (tokens per busy actor-second is the encoding speed
inside Ray, to set against the plain process).

Targets: 2 workers >= 1.6x one worker; one Ray Data worker >= 0.8x the plain process; peak memory on the
10x corpus <= 1.3x that on the corpus (2 workers each).

Results measured so far, with their dates and machines: benchmarks/results/tokenize.md.
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
from pipelines.stages.tokenizer import one_thread_per_process

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
    ``peak_shared``: the largest shared resident size of one process (Ray's object store).

    Sampled every 0.25 s, the process tree re-listed every second: the sampler runs in the driver at
    normal priority while Ray's workers run niced, so whatever CPU it uses is taken straight from the
    tokenizer actors; the rates were chosen by measurement (benchmarks/results/tokenize.md). Resident
    memory here moves over seconds, not milliseconds."""

    def __init__(self, pids=None, interval: float = 0.25, relist_s: float = 1.0):
        super().__init__(pids, interval)
        self.peak_shared = 0
        self.relist_s = relist_s
        self._pids: list[int] = []
        self._listed_at = float("-inf")

    def _tree(self) -> list[int]:
        import psutil

        if time.monotonic() - self._listed_at >= self.relist_s:
            if self.pids is not None:
                self._pids = list(self.pids())
            else:
                me = psutil.Process()
                self._pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
            self._listed_at = time.monotonic()
        return self._pids

    def _sample(self) -> int:
        private = shared = 0
        for pid in self._tree():
            try:
                fields = _status_fields(pid)
            except (OSError, ValueError):
                continue
            private += fields.get("VmRSS", 0) - fields.get("RssShmem", 0)
            shared = max(shared, fields.get("RssShmem", 0))
        self.peak_shared = max(self.peak_shared, shared)
        return private


def single_process(ingest_uri: str, tokenizer_uri: str, repeat: int = 1) -> dict[str, float]:
    """The baseline, in its own process: read the documents (each ingest part ``repeat`` times, as the
    replicated corpus lists them) and batch-encode them."""
    one_thread_per_process()
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.stages.ingest import IngestOutput
    from pipelines.stages.pack import ENCODE_BATCH_DOCS
    from pipelines.stages.tokenizer import load_tokenizer

    ingest = IngestOutput.from_dict(storage.read_complete(ingest_uri), ingest_uri)
    tokenizer = load_tokenizer(tokenizer_uri)
    t0 = time.perf_counter()
    num_tokens = 0
    for split in ("train", "val"):
        for uri in ingest.files(split) * repeat:
            texts = pq.read_table(uri, columns=["text"]).column(0).to_pylist()
            for i in range(0, len(texts), ENCODE_BATCH_DOCS):
                num_tokens += tokenizer.encode_documents(texts[i:i + ENCODE_BATCH_DOCS]).size
    return {"tokens": num_tokens, "seconds": time.perf_counter() - t0}


def run_single_process(ingest_uri: str, tokenizer_uri: str, repeat: int = 1) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.tokenize", "--single-process", ingest_uri, tokenizer_uri, str(repeat)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    with TreeMemory(pids=lambda: [proc.pid]) as mem:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the single-process baseline failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_bytes": mem.peak}


def run_stage(data, ingest, tokenizer, root: str) -> dict[str, float]:
    from pipelines.stages.pack import run_shard

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
        p.add_argument("--single-process", nargs=3, metavar=("INGEST", "TOKENIZER", "REPEAT"), help=argparse.SUPPRESS)

    args = common.parse_args("Tokenize-and-shard throughput and memory", argv, extra=hidden)
    if args.single_process:
        ingest_uri, tokenizer_uri, repeat = args.single_process
        print(json.dumps(single_process(ingest_uri, tokenizer_uri, int(repeat))))
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

    from pipelines.config import load_config
    from pipelines.dag import run_pipeline

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(None, {"data.max_docs": 150 if args.quick else None, "data.vocab_size": 4096,
                             "model.vocab_size": 4096, "data.seq_len": 256, "data.windows_per_shard": 1024,
                             "data.tokenizer_sample_bytes": 2_000_000 if args.quick else 6_000_000,
                             "storage.root": work, "tracking.enabled": False})
    data = cfg.data
    inputs = run_pipeline(cfg, until="tokenizer").stage_outputs  # the shard stage's inputs, as the DAG makes them
    ingest, tokenizer = inputs["ingest"], inputs["tokenizer"]
    corpus_bytes = sum(ingest.stats.bytes.values())
    print(f"corpus: {sum(ingest.stats.documents.values()):,} documents, {corpus_bytes / 1e6:.1f} MB "
          f"({ingest.corpus}); working folder {work}")
    with TreeMemory() as idle:
        time.sleep(1.0)

    big_ingest = dataclasses.replace(ingest, fingerprint=f"{ingest.fingerprint}-x10",
                                     parts={s: p * 10 for s, p in ingest.parts.items()})
    # The three configurations take turns, round after round; each keeps its fastest round and the
    # largest memory of any round: load from elsewhere on this shared machine then slows all of them
    # alike instead of whichever ran at the wrong moment.
    rounds = 1 if args.quick else 2
    tries: dict[str, list[dict[str, Any]]] = {}
    for label, corpus, repeat in (("1x", ingest, 1), ("10x", big_ingest, 10)):
        for _ in range(rounds):
            tries.setdefault(f"single_{label}", []).append(run_single_process(ingest.uri, tokenizer.uri, repeat))
            for name, workers in (("one", 1), ("two", 2)):
                tries.setdefault(f"{name}_{label}", []).append(
                    run_stage(dataclasses.replace(data, num_workers=workers), corpus, tokenizer, work))
    runs: dict[str, dict[str, Any]] = {}
    for name, results in tries.items():
        runs[name] = {**min(results, key=lambda r: r["seconds"]),
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
                      "seconds_all_rounds": [r["seconds"] for r in results]}
    for label in ("1x", "10x"):
        shards = {tuple(r["shards"]) for name in ("one", "two") for r in tries[f"{name}_{label}"]}
        assert len(shards) == 1, "1 and 2 workers (or two rounds) wrote different shards"
        counts = {r["tokens"] for name in ("single", "one", "two") for r in tries[f"{name}_{label}"]}
        assert len(counts) == 1, f"stage and baseline counted different tokens: {counts}"
    assert runs["two_10x"]["tokens"] >= 10 * runs["two_1x"]["tokens"] - 10 * data.seq_len
    ray.shutdown()

    def rate(r: dict[str, float]) -> float:
        return r["tokens"] / r["seconds"]

    def steady(r: dict[str, float]) -> float:
        """Excluding the start-up (actor processes, executor) before the first encoded unit arrives."""
        return r["tokens"] / max(r["seconds"] - r.get("startup_seconds", 0.0), 1e-9)

    single, one, two = runs["single_10x"], runs["one_10x"], runs["two_10x"]
    results: dict[str, Any] = {
        "quick": args.quick, "corpus_documents": sum(ingest.stats.documents.values()),
        "corpus_bytes": corpus_bytes, "tokens": runs["single_1x"]["tokens"], "tokens_10x": single["tokens"],
        "throughput_corpus": "10x",
        "tokens_per_s_single_process": rate(single), "tokens_per_s_1_worker": rate(one),
        "tokens_per_s_2_workers": rate(two),
        "peak_rss_bytes_1x": runs["two_1x"]["peak_rss_bytes"], "peak_rss_bytes_10x": two["peak_rss_bytes"],
        "idle_ray_rss_bytes": idle.peak, "load_average_1min": os.getloadavg()[0],
    }
    results["rounds"] = rounds
    for name, r in runs.items():
        results[f"seconds_{name}"] = r["seconds"]
        results[f"seconds_all_rounds_{name}"] = r["seconds_all_rounds"]
        results[f"tokens_per_s_{name}"] = rate(r)
        results[f"peak_rss_bytes_{name}"] = r["peak_rss_bytes"]
        if "startup_seconds" in r:
            results[f"startup_seconds_{name}"] = r["startup_seconds"]
            results[f"tokens_per_s_after_startup_{name}"] = steady(r)
            results[f"tokens_per_actor_busy_s_{name}"] = r["tokens"] / max(r["actor_busy_seconds"], 1e-9)
            results[f"peak_object_store_bytes_{name}"] = r["peak_object_store_bytes"]
    for label in ("1x", "10x"):
        s_, o_, t_ = (runs[f"{k}_{label}"] for k in ("single", "one", "two"))
        results[f"speedup_2_vs_1_worker_{label}"] = rate(t_) / rate(o_)
        results[f"ratio_1_worker_vs_single_process_{label}"] = rate(o_) / rate(s_)
        results[f"speedup_2_vs_1_worker_after_startup_{label}"] = steady(t_) / steady(o_)
    results["speedup_2_vs_1_worker"] = results["speedup_2_vs_1_worker_10x"]
    results["ratio_1_worker_vs_single_process"] = results["ratio_1_worker_vs_single_process_10x"]
    results["memory_ratio_10x_vs_1x"] = two["peak_rss_bytes"] / runs["two_1x"]["peak_rss_bytes"]
    results["memory_ratio_10x_vs_1x_above_idle"] = (two["peak_rss_bytes"] - idle.peak) / max(
        runs["two_1x"]["peak_rss_bytes"] - idle.peak, 1)
    results["targets"] = {
        "speedup_2_vs_1_worker>=1.6": results["speedup_2_vs_1_worker"] >= 1.6,
        "1_worker_vs_single_process>=0.8": results["ratio_1_worker_vs_single_process"] >= 0.8,
        "memory_10x_vs_1x<=1.3": results["memory_ratio_10x_vs_1x"] <= 1.3}

    names = {"single": "single process", "one": "ray data, 1 worker", "two": "ray data, 2 workers"}
    rows = [{"config": f"{names[name.split('_')[0]]}, {name.split('_')[1]} corpus", "tokens": r["tokens"],
             "seconds": r["seconds"], "tokens/s": rate(r), "start-up s": r.get("startup_seconds", 0.0),
             "tokens/s after start-up": steady(r), "peak RSS MB": r["peak_rss_bytes"] / 1e6,
             "object store MB": r.get("peak_object_store_bytes", 0) / 1e6} for name, r in runs.items()]
    print(common.table(rows, ["config", "tokens", "seconds", "tokens/s", "start-up s",
                              "tokens/s after start-up", "peak RSS MB", "object store MB"]))
    print(f"idle Ray tree: {idle.peak / 1e6:.0f} MB; load average {results['load_average_1min']:.1f}")
    for label in ("10x", "1x"):
        print(f"{label} corpus: 2 vs 1 worker {results[f'speedup_2_vs_1_worker_{label}']:.2f}x (target 1.6; "
              f"{results[f'speedup_2_vs_1_worker_after_startup_{label}']:.2f}x after start-up), 1 worker vs single "
              f"process {results[f'ratio_1_worker_vs_single_process_{label}']:.2f}x (target 0.8)")
    print(f"memory 10x vs 1x {results['memory_ratio_10x_vs_1x']:.2f}x (target 1.3)")
    common.write_json(args.out, results)


if __name__ == "__main__":
    main()
