"""Tokenize, pack and shard: the train and validation documents become fixed-length token windows in
parquet shards, the only contract between data and training (format in ``pipelines/data/packed.py``).

How it runs, streaming and deterministic:

1. Work units are the row groups of the ingest parts, listed in document order (train, then val).
2. Ray Data hands the units to a pool of tokenizer actors (``data.num_workers``, one tokenizer thread
   each); an actor reads its row group and batch-encodes it into ``<bos> ids <eos>`` per document.
3. With ``preserve_order`` the encoded units reach the driver in unit order whatever the number of actors
   or which one finished first. One packer per split concatenates them and cuts windows of
   ``seq_len + 1`` tokens (no padding; windows span document boundaries; the final partial window is
   dropped and counted), and writes each shard as soon as it holds ``data.windows_per_shard`` windows, while
   later units are still being tokenized. The driver holds at most one shard plus the units in flight.

The shard bytes are a function of the documents, the tokenizer and (seq_len, windows_per_shard) only: the
same inputs give byte-identical shards (and sha256 checksums) with 1 or N workers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.cluster import init_ray, ordered_execution
from pipelines.config import DataConfig
from pipelines.data.packed import SCHEMA_VERSION, ShardFile, ShardManifest, SplitShards, encode_shard
from pipelines.stages.cache import cached_stage
from pipelines.stages.ingest import SPLITS, IngestOutput
from pipelines.stages.tokenizer import TokenizerOutput, one_thread_per_process
from pipelines.storage import DataError

logger = logging.getLogger(__name__)

ENCODE_BATCH_DOCS = 64
"""Documents per ``encode_batch`` call inside an actor (bounds the tokenizer's temporary objects)."""
_UNIT_SCHEMA = pa.schema([("unit", pa.int64()), ("split", pa.string()), ("num_docs", pa.int64()),
                          ("tokens", pa.list_(pa.int32())), ("started_at", pa.float64()),
                          ("busy_s", pa.float64())])


def content_hash(data: DataConfig) -> str:
    """Hash of every data setting that can change the shards' content (not the worker count or the ingest
    row groups)."""
    fields = dataclasses.asdict(data)
    fields.pop("num_workers")
    fields.pop("row_group_docs")
    return storage.fingerprint(fields, length=64)


class TokenizeUnits:
    """Ray Data actor: reads ingest row groups and encodes their documents (one tokenizer thread)."""

    def __init__(self, tokenizer_json: str, tokenizer_sha256: str, fs: Any):
        one_thread_per_process()
        from pipelines.stages.tokenizer import TextTokenizer

        self.tokenizer = TextTokenizer(tokenizer_json, tokenizer_sha256)
        self.fs = fs

    def __call__(self, batch: pa.Table) -> pa.Table:
        units, splits, counts, streams, started, busy = [], [], [], [], [], []
        for unit in batch.to_pylist():
            started.append(time.time())
            with self.fs.open_input_file(unit["path"]) as handle:
                texts = pq.ParquetFile(handle).read_row_group(unit["row_group"], columns=["text"])
            texts = texts.column(0).to_pylist()
            pieces = [self.tokenizer.encode_documents(texts[i:i + ENCODE_BATCH_DOCS])
                      for i in range(0, len(texts), ENCODE_BATCH_DOCS)]
            tokens = np.concatenate(pieces) if pieces else np.empty(0, np.int32)
            units.append(unit["unit"])
            splits.append(unit["split"])
            counts.append(len(texts))
            streams.append(pa.ListArray.from_arrays(pa.array([0, len(tokens)], pa.int32()), pa.array(tokens)))
            busy.append(time.time() - started[-1])
        return pa.table([pa.array(units, pa.int64()), pa.array(splits, pa.string()),
                         pa.array(counts, pa.int64()), pa.concat_arrays(streams),
                         pa.array(started, pa.float64()), pa.array(busy, pa.float64())], schema=_UNIT_SCHEMA)


class _Packer:
    """Cuts one split's ordered token stream into windows and writes full shards as they fill."""

    def __init__(self, stage_uri: str, split: str, window_len: int, windows_per_shard: int):
        self.stage_uri = stage_uri
        self.split = split
        self.window_len = window_len
        self.windows_per_shard = windows_per_shard
        self.carry = np.empty(0, np.int32)
        self.pending: list[np.ndarray] = []
        self.num_pending = 0
        self.shards: list[ShardFile] = []
        self.num_documents = self.num_windows = 0

    def add(self, tokens: np.ndarray, num_documents: int) -> None:
        self.num_documents += num_documents
        stream = np.concatenate([self.carry, tokens]) if self.carry.size else tokens
        n = stream.size // self.window_len
        if n:
            self.pending.append(stream[:n * self.window_len].reshape(n, self.window_len))
            self.num_pending += n
        self.carry = stream[n * self.window_len:].copy()
        while self.num_pending >= self.windows_per_shard:
            self._write(self.windows_per_shard)

    def _write(self, num_rows: int) -> None:
        stacked = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rest = stacked[num_rows:]
        self.pending = [rest] if len(rest) else []
        self.num_pending = len(rest)
        data = encode_shard(stacked[:num_rows])
        path = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        storage.write_bytes(storage.join(self.stage_uri, path), data)
        self.shards.append(ShardFile(path, num_rows, storage.sha256_bytes(data), len(data)))
        self.num_windows += num_rows

    def finish(self) -> SplitShards:
        if self.num_pending:
            self._write(self.num_pending)
        return SplitShards(num_documents=self.num_documents, num_windows=self.num_windows,
                           num_tokens=self.num_windows * self.window_len, dropped_tokens=int(self.carry.size),
                           shards=tuple(self.shards))


def shard_fingerprint(data: DataConfig, ingest: IngestOutput, tokenizer: TokenizerOutput) -> str:
    return storage.fingerprint({"stage": "shard", "version": SCHEMA_VERSION, "ingest": ingest.fingerprint,
                                "tokenizer": tokenizer.sha256, "seq_len": data.seq_len,
                                "windows_per_shard": data.windows_per_shard})


def _actor_cpus(num_workers: int) -> float:
    """Each actor's CPU reservation: one, or less so the pool always fits next to the driver's tasks."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return min(1.0, max(total - 1.0, 0.5) / num_workers)


def run_shard(data: DataConfig, ingest: IngestOutput, tokenizer: TokenizerOutput, storage_root: str,
              force: bool = False) -> ShardManifest:
    """Tokenize and pack both splits into shards; reuse a complete earlier run with the same inputs."""
    import ray
    import ray.data

    if tokenizer.vocab_size != data.vocab_size:
        raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but data.vocab_size="
                        f"{data.vocab_size}")
    fp = shard_fingerprint(data, ingest, tokenizer)
    stage_uri = storage.stage_dir(storage_root, "shard", fp)

    def build(stage_uri: str) -> tuple[ShardManifest, dict[str, Any]]:
        init_ray()  # stage timings leave out the cluster's start-up
        t0, wall_t0 = time.perf_counter(), time.time()

        units = []
        for split in SPLITS:
            for part, uri in zip(ingest.parts[split], ingest.files(split)):
                path = storage.resolve(uri)[1]
                for row_group in range(part.num_row_groups):
                    units.append({"unit": len(units), "split": split, "path": path, "row_group": row_group})
        window_len = data.seq_len + 1
        packers = {s: _Packer(stage_uri, s, window_len, data.windows_per_shard) for s in SPLITS}
        tokenizer_json = storage.read_bytes(tokenizer.path).decode("utf-8")
        with ordered_execution():
            ds = ray.data.from_items(units, override_num_blocks=len(units))
            ds = ds.map_batches(
                TokenizeUnits, batch_size=1, batch_format="pyarrow",
                fn_constructor_kwargs={"tokenizer_json": tokenizer_json, "tokenizer_sha256": tokenizer.sha256,
                                       "fs": storage.filesystem(ingest.uri)},
                compute=ray.data.ActorPoolStrategy(size=data.num_workers),
                num_cpus=_actor_cpus(data.num_workers))
            expected = 0
            first_start, busy_s = float("inf"), 0.0
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
                first_start = min(first_start, pc.min(block.column("started_at")).as_py())
                busy_s += pc.sum(block.column("busy_s")).as_py()
                tokens = block.column("tokens")
                for i, (unit, split, num_docs) in enumerate(zip(block.column("unit").to_pylist(),
                                                                block.column("split").to_pylist(),
                                                                block.column("num_docs").to_pylist())):
                    assert unit == expected, f"unit {unit} arrived out of order (expected {expected})"
                    expected += 1
                    packers[split].add(tokens[i].values.to_numpy(), num_docs)
        assert expected == len(units), f"{len(units) - expected} units never came back"
        splits = {s: p.finish() for s, p in packers.items()}
        if splits["train"].num_windows == 0:
            raise DataError(f"corpus {ingest.corpus}: the train split has only "
                            f"{splits['train'].dropped_tokens} tokens, "
                            f"fewer than one window of data.seq_len + 1 = {window_len}; add documents or lower "
                            "data.seq_len")
        elapsed = time.perf_counter() - t0
        num_tokens = sum(s.num_tokens + s.dropped_tokens for s in splits.values())
        manifest = ShardManifest(
            uri=stage_uri, fingerprint=fp, config_hash=content_hash(data), tokenizer_sha256=tokenizer.sha256,
            seq_len=data.seq_len, window_len=window_len, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, splits=splits, skipped_inputs=ingest.skipped_inputs,
            inputs={"ingest": ingest.uri, "tokenizer": tokenizer.uri},
            stats={"elapsed_s": round(elapsed, 3), "tokens_per_s": round(num_tokens / max(elapsed, 1e-9), 1),
                   "startup_s": round(max(first_start - wall_t0, 0.0), 3) if units else 0.0,
                   "actor_busy_s": round(busy_s, 3),
                   "num_workers": data.num_workers, "num_units": len(units)})
        return manifest, manifest.to_dict()

    return cached_stage(stage_uri, build,
                        lambda record: ShardManifest.from_dict(record, stage_uri, reused=True), force=force)
