"""Ingest: turn a folder or ``s3://`` prefix of raw text into clean, deduplicated, split parquet documents.

Inputs (``data.corpus``; suffixes decide the format):

- ``.txt``: the whole file is one document.
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, text in ``data.text_field``; blank
  lines are ignored.
- ``.parquet``: one document per row, text in the column ``data.text_field`` (string or UTF-8 binary).
- ``data.corpus = None``: the Python standard library's own ``.py`` sources (every machine has them), each
  file one document; folders named ``site-packages``, ``dist-packages``, ``test``, ``tests``,
  ``idle_test`` and ``__pycache__`` are left out.

Other files are listed as skipped (``unsupported_type``); names starting with ``.`` or ``_`` are ignored.

How it runs: the driver lists the files (sorted by URI) and hands them to Ray Data read tasks
(``pipelines.stages.readers``), which parse, normalise (Unicode NFC, NUL characters removed) and hash
documents in parallel. The stream comes back to the driver in file order (``preserve_order``), where
one ordered consumer drops exact duplicates (first occurrence wins), assigns each document to train or
validation by its content hash, applies ``data.max_docs`` (the first N kept documents in (file, line/row)
order) and writes the parquet parts as batches arrive. Nothing holds the corpus in memory; the driver
keeps 16 bytes per distinct document for deduplication.

Bad input: a document larger than ``data.max_doc_bytes`` is caught from the file size (``.txt``) or the
raw line/value length (``.jsonl``/``.parquet``) before it is decoded or parsed. Invalid UTF-8, invalid
JSON, a missing or non-string text field, and unreadable files (truncated compressed streams, corrupt
parquet) are bad records: with ``data.on_bad_record=skip`` they are counted and listed, with ``fail`` the
first one (in file order) stops the stage with a ``DataError`` naming the file and line. Empty files are
always a counted skip. Storage errors (missing object, access denied, S3 failures after retries) always
stop the stage: a transient outage must not silently shrink the corpus.

Output (``<root>/stages/ingest/<fingerprint>/``)::

    train/part-00000.parquet   columns source (path relative to the corpus), index (line or row; 0 for
    val/part-00000.parquet     .txt), text; rows sorted by (source, index); row groups of at most
                               data.row_group_docs documents or ROW_GROUP_BYTES of text
    _COMPLETE.json             counts (IngestStats), the part files, skipped inputs with reasons
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.cluster import init_ray, ordered_execution
from pipelines.config import DataConfig
from pipelines.stages.cache import cached_stage
from pipelines.stages.readers import (
    BAD_RECORD,
    DROPPED,
    FATAL,
    INPUT_FORMATS,
    InputFile,
    input_format,
    read_files,
)
from pipelines.storage import DataError

logger = logging.getLogger(__name__)

INGEST_VERSION = 1
SPLITS = ("train", "val")
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
ROW_GROUP_BYTES = 1 << 20
"""Text bytes after which a row group is closed early."""
PART_BYTES = 256 << 20
"""Text bytes after which a new part file is started."""
MAX_LISTED_SKIPS = 100
"""Skipped inputs listed one by one in the manifest; all of them are counted by reason."""
OUTPUT_SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("text", pa.string())])


# ---------------------------------------------------------------------------------------------------------
# Outputs

@dataclass(frozen=True)
class PartFile:
    path: str
    """Relative to the stage folder, e.g. ``train/part-00000.parquet``."""
    num_rows: int
    num_row_groups: int
    num_bytes: int
    """UTF-8 bytes of text."""


@dataclass
class IngestStats:
    files_listed: int = 0
    files_read: int = 0
    records_read: int = 0
    """Records seen in the files read: documents, dropped documents and bad records."""
    bytes_read: int = 0
    """Raw (compressed) bytes of the files read."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents removed by the content filters, by reason (``empty``, ``too_short``)."""
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad records and skipped files, by reason."""
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    stopped_at_max_docs: bool = False
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class IngestOutput:
    uri: str
    """Stage folder."""
    fingerprint: str
    corpus: str
    """Absolute corpus URI (the stdlib folder when ``data.corpus`` is None)."""
    parts: dict[str, tuple[PartFile, ...]]
    stats: IngestStats
    skipped_inputs: tuple[dict[str, Any], ...]
    """Up to MAX_LISTED_SKIPS entries ``{uri, index, reason, detail}`` (index: line or row, or None)."""
    reused: bool = False

    def files(self, split: str) -> list[str]:
        """Absolute URIs of a split's part files, in document order."""
        return [storage.join(self.uri, p.path) for p in self.parts[split]]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("uri")
        d.pop("reused")
        d["stage"] = "ingest"
        d["version"] = INGEST_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str, reused: bool = False) -> IngestOutput:
        return cls(uri=uri, fingerprint=d["fingerprint"], corpus=d["corpus"],
                   parts={s: tuple(PartFile(**p) for p in d["parts"][s]) for s in SPLITS},
                   stats=IngestStats(**d["stats"]), skipped_inputs=tuple(d["skipped_inputs"]), reused=reused)


# ---------------------------------------------------------------------------------------------------------
# Listing

def default_corpus() -> str:
    return storage.normalize_uri(sysconfig.get_paths()["stdlib"])


def list_corpus(data: DataConfig) -> tuple[str, list[InputFile]]:
    """The corpus URI and its files in document order (supported or not; hidden names left out)."""
    if data.corpus is None:
        root = default_corpus()
        files = []
        for uri, size in storage.list_file_infos(root, (".py",)):
            source = storage.relative_to(uri, root)
            if STDLIB_EXCLUDED_DIRS.isdisjoint(source.split("/")[:-1]):
                files.append(InputFile(uri, storage.resolve(uri)[1], source, size, "text", None))
        return root, files
    root = storage.normalize_uri(data.corpus)
    files = []
    for uri, size in storage.list_file_infos(root):
        source = storage.relative_to(uri, root)
        if any(part.startswith((".", "_")) for part in source.split("/")):
            continue
        fmt, compression = input_format(source.rsplit("/", 1)[-1])
        files.append(InputFile(uri, storage.resolve(uri)[1], source, size, fmt, compression))
    return root, files


def ingest_fingerprint(data: DataConfig, corpus: str, files: list[InputFile]) -> str:
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f.source}\0{f.size}\n".encode())
    return storage.fingerprint({
        "stage": "ingest", "version": INGEST_VERSION, "corpus": corpus,
        "python": sysconfig.get_python_version() if data.corpus is None else None,
        "listing": listing.hexdigest(), "text_field": data.text_field, "on_bad_record": data.on_bad_record,
        "max_docs": data.max_docs, "min_doc_chars": data.min_doc_chars, "max_doc_bytes": data.max_doc_bytes,
        "val_fraction": data.val_fraction, "row_group_docs": data.row_group_docs,
    })


# ---------------------------------------------------------------------------------------------------------
# The ordered consumer on the driver: dedup, split, max_docs, parquet parts.

class _PartWriter:
    """Writes one split as parquet parts with row groups cut at fixed document/byte counts, so the file
    layout depends only on the document stream."""

    def __init__(self, stage_uri: str, split: str, row_group_docs: int):
        self.row_group_docs = row_group_docs
        self.stage_uri = stage_uri
        self.split = split
        self.parts: list[PartFile] = []
        self.pending: list[pa.Table] = []
        self.writer: pq.ParquetWriter | None = None
        self.stream: Any = None
        self.stream_path = ""
        self.part_rows = self.part_groups = self.part_bytes = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        sizes = np.cumsum(pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False))
        start = 0
        while start < table.num_rows:
            base = sizes[start - 1] if start else 0
            by_bytes = int(np.searchsorted(sizes, base + ROW_GROUP_BYTES, side="left")) + 1
            stop = min(start + self.row_group_docs, by_bytes, table.num_rows)
            complete = stop - start == self.row_group_docs or sizes[stop - 1] - base >= ROW_GROUP_BYTES
            if not complete and not final:
                break
            self._write_group(table.slice(start, stop - start), int(sizes[stop - 1] - base))
            start = stop
        if start < table.num_rows:
            self.pending = [table.slice(start)]

    def _write_group(self, group: pa.Table, num_bytes: int) -> None:
        if self.writer is None:
            path = f"{self.split}/part-{len(self.parts):05d}.parquet"
            fs, fs_path = storage.resolve(storage.join(self.stage_uri, path))
            if not storage.is_s3(self.stage_uri):
                fs.create_dir(os.path.dirname(fs_path), recursive=True)
            self.stream, self.stream_path = fs.open_output_stream(fs_path, compression=None), fs_path
            self.writer = pq.ParquetWriter(self.stream, OUTPUT_SCHEMA, compression="zstd")
            self.parts.append(PartFile(path, 0, 0, 0))
        self.writer.write_table(group, row_group_size=group.num_rows)
        self.part_rows += group.num_rows
        self.part_groups += 1
        self.part_bytes += num_bytes
        if self.part_bytes >= PART_BYTES:
            self._close_part()

    def _close_part(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        if not storage.is_s3(self.stage_uri):  # on disk before the stage's marker vouches for it
            storage.fsync_local(self.stream_path)
        self.parts[-1] = PartFile(self.parts[-1].path, self.part_rows, self.part_groups, self.part_bytes)
        self.writer = self.stream = None
        self.part_rows = self.part_groups = self.part_bytes = 0

    def close(self) -> tuple[PartFile, ...]:
        self._drain(final=True)
        self._close_part()
        return tuple(self.parts)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
            if self.stream is not None:
                self.stream.close()


class _Consumer:
    def __init__(self, data: DataConfig, corpus: str, files: list[InputFile], stage_uri: str,
                 stats: IngestStats):
        self.data = data
        self.corpus = corpus
        self.files = files
        self.stats = stats
        self.writers = {s: _PartWriter(stage_uri, s, data.row_group_docs) for s in SPLITS}
        self.seen: set[bytes] = set()
        self.val_threshold = int(data.val_fraction * 2**64)
        self.skipped_inputs: list[dict[str, Any]] = []
        self.kept = 0
        self.last_file_id = -1

    def skip(self, f: InputFile, index: int | None, reason: str, detail: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
        if len(self.skipped_inputs) < MAX_LISTED_SKIPS:
            self.skipped_inputs.append({"uri": f.uri, "index": index, "reason": reason, "detail": detail})

    def event(self, f: InputFile, index: int | None, reason: str, detail: str | None) -> None:
        """Count a dropped document or skipped input, or raise per data.on_bad_record. ``index`` is None
        for events about a whole file."""
        detail = detail or reason
        if index is not None:
            self.stats.records_read += 1
        if reason in DROPPED:
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
            return
        if index is None or f.format == "text":
            where = f.uri
        elif f.format == "parquet":
            where = f"{f.uri}: row {index}"
        else:
            where = f"{f.uri}: line {index + 1}"
        if reason == FATAL:
            raise DataError(f"{where}: storage error: {detail}")
        if reason in BAD_RECORD and self.data.on_bad_record == "fail":
            raise DataError(f"{where}: {reason.replace('_', ' ')}: {detail} (data.on_bad_record=fail; set "
                            "data.on_bad_record=skip to count and skip bad records)")
        self.skip(f, index, reason, detail)

    def consume(self, batch: pa.Table) -> bool:
        """Process one ordered batch; False once data.max_docs documents are kept."""
        file_ids = batch.column("file_id").to_pylist()
        indices = batch.column("index").to_pylist()
        events = batch.column("event").to_pylist()
        digests = batch.column("digest").to_pylist()
        num_bytes = batch.column("num_bytes").to_pylist()
        take: dict[str, list[int]] = {s: [] for s in SPLITS}
        more = True
        for i, event in enumerate(events):
            self.last_file_id = file_ids[i]
            f = self.files[self.last_file_id]
            if event is not None:
                self.event(f, indices[i], event, batch.column("detail")[i].as_py())
                continue
            self.stats.records_read += 1
            digest = digests[i]
            if digest in self.seen:
                self.stats.duplicates += 1
                continue
            self.seen.add(digest)
            split = "val" if int.from_bytes(digest[8:], "big") < self.val_threshold else "train"
            take[split].append(i)
            self.stats.documents[split] += 1
            self.stats.bytes[split] += num_bytes[i]
            self.kept += 1
            if self.data.max_docs is not None and self.kept >= self.data.max_docs:
                self.stats.stopped_at_max_docs = True
                more = False
                break
        for split, rows in take.items():
            if rows:
                picked = batch.take(pa.array(rows, pa.int64()))
                sources = pa.array([self.files[i].source for i in picked.column("file_id").to_pylist()],
                                   pa.string())
                self.writers[split].add(pa.table([sources, picked.column("index"), picked.column("text")],
                                                 schema=OUTPUT_SCHEMA))
        return more


def run_ingest(data: DataConfig, storage_root: str, force: bool = False) -> IngestOutput:
    """Read, clean, deduplicate and split the corpus; reuse a complete earlier run with the same inputs."""
    t0 = time.perf_counter()
    corpus, listed = list_corpus(data)
    fp = ingest_fingerprint(data, corpus, listed)

    def build(stage_uri: str) -> tuple[IngestOutput, dict[str, Any]]:
        if not any(f.format is not None for f in listed):
            raise DataError(f"corpus {corpus}: no input files (expected names ending in "
                            f"{sorted(INPUT_FORMATS)}" + (" or .py" if data.corpus is None else "") + ")")
        listing_s = time.perf_counter() - t0
        init_ray()  # before the clock restarts: stage timings leave out the cluster's start-up
        started = time.perf_counter() - listing_s
        stats = IngestStats(files_listed=len(listed))
        consumer = _Consumer(data, corpus, listed, stage_uri, stats)
        for f in listed:
            if f.format is None:
                consumer.skip(f, None, "unsupported_type", f"not one of {sorted(INPUT_FORMATS)}")
        try:
            _stream(data, listed, consumer)
            parts = {s: w.close() for s, w in consumer.writers.items()}
        except BaseException:
            for w in consumer.writers.values():
                w.abort()
            raise
        if consumer.kept == 0:
            raise DataError(f"corpus {corpus}: no documents left after reading {stats.files_read} files "
                            f"(dropped: {stats.dropped or 'none'}, duplicates: {stats.duplicates}, "
                            f"skipped: {stats.skipped or 'none'})")
        if stats.documents["train"] == 0:
            raise DataError(f"corpus {corpus}: all {consumer.kept} kept documents fell in the validation "
                            f"split (data.val_fraction={data.val_fraction}); add documents or lower val_fraction")
        stats.elapsed_s = round(time.perf_counter() - started, 3)
        out = IngestOutput(uri=stage_uri, fingerprint=fp, corpus=corpus, parts=parts, stats=stats,
                           skipped_inputs=tuple(consumer.skipped_inputs))
        return out, out.to_dict()

    stage_uri = storage.stage_dir(storage_root, "ingest", fp)
    return cached_stage(stage_uri, build, lambda record: IngestOutput.from_dict(record, stage_uri, reused=True),
                        force=force)


def _stream(data: DataConfig, listed: list[InputFile], consumer: _Consumer) -> None:
    """Run the read tasks and feed their ordered output to the consumer."""
    import ray.data

    items = [{"file_id": i, "file": dataclasses.asdict(f)}
             for i, f in enumerate(listed) if f.format is not None]
    total_bytes = sum(it["file"]["size"] for it in items)
    num_blocks = max(1, min(len(items), 256, max(8, math.ceil(total_bytes / (8 << 20)))))
    fs = storage.filesystem(listed[0].uri)
    with ordered_execution():
        ds = ray.data.from_items(items, override_num_blocks=num_blocks)
        ds = ds.map_batches(read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={
            "fs": fs, "text_field": data.text_field, "min_doc_chars": data.min_doc_chars,
            "max_doc_bytes": data.max_doc_bytes})
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4))
        try:
            for batch in batches:
                if batch.num_rows and not consumer.consume(batch):
                    break
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    stats = consumer.stats
    for it in items:
        if consumer.stats.stopped_at_max_docs and it["file_id"] > consumer.last_file_id:
            break
        stats.files_read += 1
        stats.bytes_read += it["file"]["size"]
