"""The packed-shard format: the one contract between the data stages and training, with its writer and
its reader. The shard stage (``pipelines.stages.pack``) writes it; the loader (``pipelines.data.loader``),
evaluation and any outside reader read it.

A shard stage folder ``<storage.root>/stages/shard/<fingerprint>/`` holds::

    train/shard-00000.parquet ...   val/shard-00000.parquet ...   _COMPLETE.json (the manifest)

Each shard is a parquet file with ONE column ``input_ids: list<int32>`` (plain Arrow list, not null);
every row is a window of exactly ``window_len = seq_len + 1`` token ids in ``[0, vocab_size)``: inputs are
``row[:-1]``, targets ``row[1:]``. Rows are in corpus order; documents are ``<bos> ids <eos>`` packed back to
back, so a window may start mid-document and span several. Every shard holds ``windows_per_shard`` rows
except the last of a split. Parquet row groups hold 256 rows (the unit of a partial read).

``_COMPLETE.json`` is written last; a folder without it is partial and must not be read. Its fields::

    schema_version      1 (bumped on any change to this format)
    stage               "shard"
    fingerprint         16 hex: the folder name
    config_hash         sha256 of the data settings that shape the content (all data.* but num_workers and
                        row_group_docs)
    tokenizer_sha256    sha256 of the tokenizer.json the ids come from
    seq_len, window_len, vocab_size, bos_id, eos_id, pad_id, column ("input_ids"), dtype ("int32")
    splits: {"train"|"val": {num_documents, num_windows, num_tokens (= num_windows * window_len),
                             dropped_tokens (the final partial window), shards: [
                                 {path (relative to the folder), num_rows, sha256 (of the file), num_bytes}]}}
    skipped_inputs      [{uri, index (line/row or null), reason, detail}] (first 100; counts in ingest)
    inputs              {"ingest": stage URI, "tokenizer": stage URI}
    stats               {elapsed_s, tokens_per_s, startup_s (until the first actor starts encoding),
                         actor_busy_s (summed over actors), num_workers, num_units} (informational)

``encode_shard`` makes one shard's bytes. Read the manifest with ``read_manifest(uri)`` and rows with
``iter_windows``/``read_windows`` (only the shards and row groups that overlap the requested rows are
fetched), or directly with pyarrow.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.storage import DataError

SCHEMA_VERSION = 1
COLUMN = "input_ids"
SHARD_SCHEMA = pa.schema([pa.field(COLUMN, pa.list_(pa.int32()), nullable=False)])
ROWS_PER_ROW_GROUP = 256
"""Parquet row groups inside a shard: the granularity of a partial read."""


@dataclass(frozen=True)
class ShardFile:
    path: str
    """Relative to the stage folder, e.g. ``train/shard-00000.parquet``."""
    num_rows: int
    sha256: str
    """Of the file's bytes."""
    num_bytes: int


@dataclass(frozen=True)
class SplitShards:
    num_documents: int
    num_windows: int
    num_tokens: int
    """Tokens in the windows (num_windows * window_len)."""
    dropped_tokens: int
    """Tokens of the final partial window, not written."""
    shards: tuple[ShardFile, ...]


@dataclass(frozen=True)
class ShardManifest:
    uri: str
    """Stage folder; shard paths are relative to it. Not stored: it is wherever the manifest was read."""
    fingerprint: str
    config_hash: str
    tokenizer_sha256: str
    seq_len: int
    window_len: int
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    splits: dict[str, SplitShards]
    skipped_inputs: tuple[dict[str, Any], ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    column: str = COLUMN
    dtype: str = "int32"
    reused: bool = False

    def shard_uri(self, split: str, i: int) -> str:
        return storage.join(self.uri, self.splits[split].shards[i].path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("uri")
        d.pop("reused")
        d["stage"] = "shard"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str, reused: bool = False) -> ShardManifest:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{uri}: manifest schema_version={d.get('schema_version')}, this code reads "
                            f"{SCHEMA_VERSION}; rerun the data stages")
        names = {f.name for f in dataclasses.fields(cls)} - {"uri", "reused", "splits", "skipped_inputs"}
        splits = {s: SplitShards(**{**v, "shards": tuple(ShardFile(**x) for x in v["shards"])})
                  for s, v in d["splits"].items()}
        return cls(uri=uri, reused=reused, splits=splits, skipped_inputs=tuple(d.get("skipped_inputs", ())),
                   **{k: v for k, v in d.items() if k in names})


def read_manifest(shard_stage_uri: str) -> ShardManifest:
    """The manifest of a complete shard stage; ``DataError`` when the folder is missing or partial."""
    uri = storage.normalize_uri(shard_stage_uri)
    payload = storage.read_complete(uri)
    if payload is None:
        raise DataError(f"{uri}: no {storage.COMPLETE_MARKER}; the shard stage never finished there "
                        "(rerun the data stages)")
    return ShardManifest.from_dict(payload, uri)


def encode_shard(windows: np.ndarray) -> bytes:
    """One shard's parquet bytes for an int32 array of shape (num_windows, window_len)."""
    num_windows, window_len = windows.shape
    offsets = pa.array(np.arange(0, (num_windows + 1) * window_len, window_len, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(windows.reshape(-1), type=pa.int32()))
    sink = io.BytesIO()
    pq.write_table(pa.table([column], schema=SHARD_SCHEMA), sink, row_group_size=ROWS_PER_ROW_GROUP,
                   compression="zstd", use_dictionary=False)
    return sink.getvalue()


def _as_windows(column: pa.ChunkedArray, window_len: int, uri: str) -> np.ndarray:
    lists = column.combine_chunks()
    values = lists.flatten().to_numpy()
    if values.size != len(lists) * window_len:
        raise DataError(f"{uri}: rows are not all {window_len} tokens long; not a shard of this manifest")
    return values.reshape(len(lists), window_len)


def iter_windows(manifest: ShardManifest, split: str, start: int = 0, stop: int | None = None,
                 verify: bool = False) -> Iterator[np.ndarray]:
    """Windows ``[start, stop)`` of a split, in order, as int32 arrays of shape (rows, window_len), one per
    parquet row group touched. Reads only the shards and row groups that overlap the range; ``verify``
    checks each touched shard's sha256 first (it then reads the whole shard)."""
    if split not in manifest.splits:
        raise DataError(f"{manifest.uri}: no split {split!r}; splits: {sorted(manifest.splits)}")
    shards = manifest.splits[split].shards
    total = manifest.splits[split].num_windows
    stop = total if stop is None else min(stop, total)
    if not 0 <= start <= total:
        raise ValueError(f"start={start} is outside the split's {total} windows")
    ends = np.cumsum([s.num_rows for s in shards]).tolist()
    i = bisect.bisect_right(ends, start)
    while start < stop and i < len(shards):
        shard_start = ends[i] - shards[i].num_rows
        uri = manifest.shard_uri(split, i)
        fs, path = storage.resolve(uri)
        if verify:
            data = storage.read_bytes(uri)
            if storage.sha256_bytes(data) != shards[i].sha256:
                raise DataError(f"{uri}: sha256 differs from the manifest; the shard is corrupt")
            source = pq.ParquetFile(io.BytesIO(data))
        else:
            source = pq.ParquetFile(fs.open_input_file(path))
        group_start = shard_start
        for g in range(source.metadata.num_row_groups):
            group_rows = source.metadata.row_group(g).num_rows
            group_stop = group_start + group_rows
            if group_stop > start and group_start < stop:
                table = source.read_row_group(g, columns=[manifest.column])
                lo, hi = max(start, group_start) - group_start, min(stop, group_stop) - group_start
                yield _as_windows(table.column(0).slice(lo, hi - lo), manifest.window_len, uri)
                start = group_start + hi
            group_start = group_stop
            if start >= stop:
                break
        i += 1


def read_windows(manifest: ShardManifest, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Windows ``[start, stop)`` of a split as one int32 array of shape (rows, window_len)."""
    parts = list(iter_windows(manifest, split, start, stop))
    if not parts:
        return np.empty((0, manifest.window_len), np.int32)
    return np.concatenate(parts)
