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

How it runs: the driver lists the files (sorted by URI) and hands them to Ray Data read tasks, which parse,
normalise (Unicode NFC, NUL characters removed) and hash documents in parallel. The stream comes back to
the driver in file order (``preserve_order``), where one ordered consumer drops exact duplicates (first
occurrence wins), assigns each document to train or validation by its content hash, applies
``data.max_docs`` (the first N kept documents in (file, line/row) order) and writes the parquet parts as
batches arrive. Nothing holds the corpus in memory; the driver keeps 16 bytes per distinct document for
deduplication.

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
                               ROW_GROUP_DOCS documents or ROW_GROUP_BYTES of text
    _COMPLETE.json             counts (IngestStats), the part files, skipped inputs with reasons
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import DataConfig
from pipelines.storage import DataError

logger = logging.getLogger(__name__)

INGEST_VERSION = 1
SPLITS = ("train", "val")
INPUT_FORMATS = {  # suffix -> (format, compression of the raw stream)
    ".txt": ("text", None),
    ".jsonl": ("jsonl", None),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".parquet": ("parquet", None),
}
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
ROW_GROUP_DOCS = 1024
"""Documents per parquet row group of the output (also the unit of work of the shard stage)."""
ROW_GROUP_BYTES = 1 << 20
"""Text bytes after which a row group is closed early."""
PART_BYTES = 256 << 20
"""Text bytes after which a new part file is started."""
MAX_LISTED_SKIPS = 100
"""Skipped inputs listed one by one in the manifest; all of them are counted by reason."""
READ_CHUNK_BYTES = 1 << 20
OUTPUT_SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("text", pa.string())])

# Reasons a record or file is skipped. Bad records follow data.on_bad_record; the others never fail.
BAD_RECORD = ("too_large", "invalid_utf8", "invalid_json", "not_an_object", "missing_field", "not_a_string",
              "unreadable")
ALWAYS_SKIPPED = ("empty_file", "unsupported_type")
DROPPED = ("empty", "too_short")  # documents removed by the content filters
FATAL = "storage_error"

_EVENT_SCHEMA = pa.schema([
    ("file_id", pa.int32()), ("index", pa.int64()), ("text", pa.string()), ("digest", pa.binary()),
    ("num_bytes", pa.int64()), ("event", pa.string()), ("detail", pa.string()),
])


# ---------------------------------------------------------------------------------------------------------
# Shared by the data stages: Ray start-up, ordered execution, config checks, command lines.

def ensure_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local one, unless Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


@contextlib.contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data keeps block order for datasets built and consumed inside this block."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved


def stage_cli(description: str, argv: list[str] | None = None) -> tuple[Any, bool]:
    """``--config NAME|FILE --set key=value ... [--force]`` to ``(RunConfig, force)``; a bad config ends
    the program with its message, not a traceback."""
    from pipelines.config import load_config

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="bundled run config name (e.g. ci) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.max_docs=200 (repeatable)")
    parser.add_argument("--force", action="store_true", help="recompute even when a complete output exists")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides), args.force
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def exit_on_data_error(fn: Any) -> Any:
    """Decorator for the stages' ``main``: a ``DataError`` ends the program with its message (exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


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

@dataclass(frozen=True)
class _InputFile:
    uri: str
    path: str
    """Path on the filesystem that serves the corpus (``bucket/key`` on S3)."""
    source: str
    """Path relative to the corpus root (written to the output's ``source`` column)."""
    size: int
    format: str | None
    """``text``, ``jsonl``, ``parquet``, or None for an unsupported file."""
    compression: str | None


def _input_format(name: str) -> tuple[str | None, str | None]:
    for suffix, fmt in INPUT_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None, None


def default_corpus() -> str:
    return storage.normalize_uri(sysconfig.get_paths()["stdlib"])


def list_corpus(data: DataConfig) -> tuple[str, list[_InputFile]]:
    """The corpus URI and its files in document order (supported or not; hidden names left out)."""
    if data.corpus is None:
        root = default_corpus()
        files = []
        for uri, size in storage.list_file_infos(root, (".py",)):
            source = storage.relative_to(uri, root)
            if STDLIB_EXCLUDED_DIRS.isdisjoint(source.split("/")[:-1]):
                files.append(_InputFile(uri, storage.resolve(uri)[1], source, size, "text", None))
        return root, files
    root = storage.normalize_uri(data.corpus)
    files = []
    for uri, size in storage.list_file_infos(root):
        source = storage.relative_to(uri, root)
        if any(part.startswith((".", "_")) for part in source.split("/")):
            continue
        fmt, compression = _input_format(source.rsplit("/", 1)[-1])
        files.append(_InputFile(uri, storage.resolve(uri)[1], source, size, fmt, compression))
    return root, files


def ingest_fingerprint(data: DataConfig, corpus: str, files: list[_InputFile]) -> str:
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f.source}\0{f.size}\n".encode())
    return storage.fingerprint({
        "stage": "ingest", "version": INGEST_VERSION, "corpus": corpus,
        "python": sysconfig.get_python_version() if data.corpus is None else None,
        "listing": listing.hexdigest(), "text_field": data.text_field, "on_bad_record": data.on_bad_record,
        "max_docs": data.max_docs, "min_doc_chars": data.min_doc_chars, "max_doc_bytes": data.max_doc_bytes,
        "val_fraction": data.val_fraction,
    })


# ---------------------------------------------------------------------------------------------------------
# Read tasks (run in Ray workers): parse, normalise, filter and hash; emit documents and events in order.

def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, ConnectionError, TimeoutError)) or \
        "AWS Error" in str(exc)


class _Rows:
    """Column buffers for the read tasks' output tables."""

    def __init__(self, file_id: int):
        self.file_id = file_id
        self.columns: dict[str, list[Any]] = {name: [] for name in _EVENT_SCHEMA.names}
        self.text_bytes = 0

    def add(self, index: int | None, text: str | None = None, digest: bytes | None = None, num_bytes: int = 0,
            event: str | None = None, detail: str | None = None) -> None:
        for name, value in (("file_id", self.file_id), ("index", index), ("text", text), ("digest", digest),
                            ("num_bytes", num_bytes), ("event", event), ("detail", detail)):
            self.columns[name].append(value)
        self.text_bytes += num_bytes if text is not None else 0

    def __len__(self) -> int:
        return len(self.columns["file_id"])

    def full(self) -> bool:
        return len(self) >= 1024 or self.text_bytes >= (4 << 20)

    def flush(self) -> pa.Table:
        table = pa.table(self.columns, schema=_EVENT_SCHEMA)
        self.columns = {name: [] for name in _EVENT_SCHEMA.names}
        self.text_bytes = 0
        return table


class _FileReader:
    """Reads one file and appends its documents and events to ``rows``."""

    def __init__(self, fs: Any, text_field: str, min_doc_chars: int, max_doc_bytes: int):
        self.fs = fs
        self.text_field = text_field
        self.min_doc_chars = min_doc_chars
        self.max_doc_bytes = max_doc_bytes

    def document(self, rows: _Rows, index: int, text: str) -> None:
        """Normalise one document and emit it, or the reason it is dropped."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON escapes
            rows.add(index, event="invalid_utf8", detail=f"unpaired surrogate at character {e.start}")
            return
        text = unicodedata.normalize("NFC", text)
        if "\x00" in text:
            text = text.replace("\x00", "")
        if not text.strip():
            rows.add(index, event="empty")
            return
        if len(text) < self.min_doc_chars:
            rows.add(index, event="too_short", detail=f"{len(text)} characters")
            return
        data = text.encode("utf-8")
        rows.add(index, text=text, digest=hashlib.blake2b(data, digest_size=16).digest(), num_bytes=len(data))

    def too_large(self, rows: _Rows, index: int | None, size: int, what: str) -> None:
        rows.add(index, num_bytes=size, event="too_large",
                 detail=f"{what} of {size} bytes exceeds data.max_doc_bytes={self.max_doc_bytes}")

    def read(self, f: _InputFile, rows: _Rows) -> Iterator[pa.Table]:
        if f.size == 0:
            rows.add(None, event="empty_file", detail="0 bytes")
            return
        reader = {"text": self._read_text, "jsonl": self._read_jsonl, "parquet": self._read_parquet}[f.format]
        num_records = 0
        try:
            for _ in reader(f, rows):
                num_records += 1
                if rows.full():
                    yield rows.flush()
        except Exception as e:  # noqa: BLE001 - every failure becomes an event the driver judges
            where = f" after {num_records} records" if num_records else ""
            reason = FATAL if _is_storage_error(e) else "unreadable"
            rows.add(None, event=reason, detail=f"{_describe(e)}{where}")
            return
        if num_records == 0 and f.format != "text":
            rows.add(None, event="empty_file", detail="no records")

    def _read_text(self, f: _InputFile, rows: _Rows) -> Iterator[None]:
        if f.size > self.max_doc_bytes:
            self.too_large(rows, 0, f.size, "file")
            yield
            return
        with self.fs.open_input_stream(f.path, compression=None) as stream:
            raw = stream.read(self.max_doc_bytes + 1)
        if len(raw) > self.max_doc_bytes:  # the file grew since it was listed
            self.too_large(rows, 0, len(raw), "file")
        else:
            try:
                self.document(rows, 0, raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                rows.add(0, num_bytes=len(raw), event="invalid_utf8",
                         detail=f"invalid UTF-8 at byte {e.start}")
        yield

    def _lines(self, stream: Any) -> Iterator[tuple[int, bytes | None, int]]:
        """``(line index, bytes or None when longer than max_doc_bytes, length)``. Holds at most
        max_doc_bytes plus one chunk in memory whatever the line lengths: the bytes of an oversized line are
        counted and dropped as they stream past."""
        limit = self.max_doc_bytes
        pending = bytearray()  # the start of a line continued in the next chunk
        overflow = -1  # length so far of a line already known to be too large; -1 otherwise
        index = 0
        while chunk := stream.read(READ_CHUNK_BYTES):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                if overflow >= 0:
                    yield index, None, overflow + end - start
                elif pending:
                    pending += chunk[start:end]
                    size = len(pending)
                    yield index, (bytes(pending) if size <= limit else None), size
                else:
                    size = end - start
                    yield index, (chunk[start:end] if size <= limit else None), size
                pending = bytearray()
                overflow = -1
                index += 1
                start = end + 1
            rest = len(chunk) - start
            if overflow >= 0:
                overflow += rest
            elif len(pending) + rest > limit:
                overflow = len(pending) + rest
                pending = bytearray()
            else:
                pending += chunk[start:]
        if overflow >= 0:
            yield index, None, overflow
        elif pending:
            yield index, bytes(pending), len(pending)

    def _read_jsonl(self, f: _InputFile, rows: _Rows) -> Iterator[None]:
        with self.fs.open_input_stream(f.path, compression=f.compression) as stream:
            for index, line, size in self._lines(stream):
                if line is None:
                    self.too_large(rows, index, size, "line")
                    yield
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    rows.add(index, num_bytes=size, event="invalid_utf8",
                             detail=f"invalid UTF-8 at byte {e.start}")
                except ValueError as e:
                    rows.add(index, num_bytes=size, event="invalid_json", detail=str(e)[:200])
                else:
                    self._record(rows, index, record, size)
                yield

    def _record(self, rows: _Rows, index: int, record: Any, size: int) -> None:
        if not isinstance(record, dict):
            rows.add(index, num_bytes=size, event="not_an_object",
                     detail=f"expected a JSON object, got {type(record).__name__}")
            return
        text = record.get(self.text_field)
        if text is None:
            keys = sorted(record)[:10]
            rows.add(index, num_bytes=size, event="missing_field",
                     detail=f"no field {self.text_field!r} (data.text_field); fields: {keys}")
        elif not isinstance(text, str):
            rows.add(index, num_bytes=size, event="not_a_string",
                     detail=f"field {self.text_field!r} is a {type(text).__name__}")
        else:
            self.document(rows, index, text)

    def _read_parquet(self, f: _InputFile, rows: _Rows) -> Iterator[None]:
        with self.fs.open_input_file(f.path) as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            if self.text_field not in schema.names:
                rows.add(None, event="missing_field",
                         detail=f"no column {self.text_field!r} (data.text_field); "
                                f"columns: {schema.names[:20]}")
                yield
                return
            column_type = schema.field(self.text_field).type
            if pa.types.is_dictionary(column_type):  # e.g. pandas categoricals
                column_type = column_type.value_type
            is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
            if not (is_binary or pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                rows.add(None, event="not_a_string",
                         detail=f"column {self.text_field!r} has type {column_type}")
                yield
                return
            index = 0
            for batch in parquet.iter_batches(batch_size=256, columns=[self.text_field], use_threads=False):
                values = batch.column(0)
                if pa.types.is_dictionary(values.type):
                    values = values.dictionary_decode()
                sizes = pc.binary_length(values).to_numpy(zero_copy_only=False)
                fits = pc.less_equal(pc.binary_length(values), self.max_doc_bytes)
                no_value = pa.scalar(None, values.type)
                small = pc.if_else(pc.fill_null(fits, False), values, no_value).to_pylist()
                for i, value in enumerate(small):
                    if value is not None:
                        if is_binary:
                            try:
                                value = value.decode("utf-8")
                            except UnicodeDecodeError as e:
                                rows.add(index, num_bytes=len(value), event="invalid_utf8",
                                         detail=f"invalid UTF-8 at byte {e.start}")
                                index += 1
                                yield
                                continue
                        self.document(rows, index, value)
                    elif values[i].is_valid:
                        self.too_large(rows, index, int(sizes[i]), "value")
                    else:
                        rows.add(index, event="missing_field", detail=f"{self.text_field!r} is null")
                    index += 1
                    yield


def _read_files(batch: pa.Table, *, fs: Any, text_field: str, min_doc_chars: int,
                max_doc_bytes: int) -> Iterator[pa.Table]:
    """Ray Data map_batches function: one row per file in, documents and events out, in order."""
    reader = _FileReader(fs, text_field, min_doc_chars, max_doc_bytes)
    for row in batch.to_pylist():
        rows = _Rows(row["file_id"])
        yield from reader.read(_InputFile(**row["file"]), rows)
        if len(rows):
            yield rows.flush()


# ---------------------------------------------------------------------------------------------------------
# The ordered consumer on the driver: dedup, split, max_docs, parquet parts.

class _PartWriter:
    """Writes one split as parquet parts with row groups cut at fixed document/byte counts, so the file
    layout depends only on the document stream."""

    def __init__(self, stage_uri: str, split: str):
        self.stage_uri = stage_uri
        self.split = split
        self.parts: list[PartFile] = []
        self.pending: list[pa.Table] = []
        self.writer: pq.ParquetWriter | None = None
        self.stream: Any = None
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
            stop = min(start + ROW_GROUP_DOCS, by_bytes, table.num_rows)
            complete = stop - start == ROW_GROUP_DOCS or sizes[stop - 1] - base >= ROW_GROUP_BYTES
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
            self.stream = fs.open_output_stream(fs_path, compression=None)
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
    def __init__(self, data: DataConfig, corpus: str, files: list[_InputFile], stage_uri: str,
                 stats: IngestStats):
        self.data = data
        self.corpus = corpus
        self.files = files
        self.stats = stats
        self.writers = {s: _PartWriter(stage_uri, s) for s in SPLITS}
        self.seen: set[bytes] = set()
        self.val_threshold = int(data.val_fraction * 2**64)
        self.skipped_inputs: list[dict[str, Any]] = []
        self.kept = 0
        self.last_file_id = -1

    def skip(self, f: _InputFile, index: int | None, reason: str, detail: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
        if len(self.skipped_inputs) < MAX_LISTED_SKIPS:
            self.skipped_inputs.append({"uri": f.uri, "index": index, "reason": reason, "detail": detail})

    def event(self, f: _InputFile, index: int | None, reason: str, detail: str | None) -> None:
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
    stage_uri = storage.stage_dir(storage_root, "ingest", fp)
    if storage.prepare_stage_dir(stage_uri, force):
        logger.info("ingest: reusing %s", stage_uri)
        return IngestOutput.from_dict(storage.read_complete(stage_uri), stage_uri, reused=True)
    if not any(f.format is not None for f in listed):
        raise DataError(f"corpus {corpus}: no input files (expected names ending in {sorted(INPUT_FORMATS)}"
                        + (" or .py" if data.corpus is None else "") + ")")
    listing_s = time.perf_counter() - t0
    ensure_ray()  # before the clock restarts: stage timings leave out the cluster's start-up
    t0 = time.perf_counter() - listing_s

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
        with contextlib.suppress(Exception):
            storage.delete_dir(stage_uri)
        raise
    if consumer.kept == 0:
        storage.delete_dir(stage_uri)
        raise DataError(f"corpus {corpus}: no documents left after reading {stats.files_read} files "
                        f"(dropped: {stats.dropped or 'none'}, duplicates: {stats.duplicates}, "
                        f"skipped: {stats.skipped or 'none'})")
    if stats.documents["train"] == 0:
        storage.delete_dir(stage_uri)
        raise DataError(f"corpus {corpus}: all {consumer.kept} kept documents fell in the validation split "
                        f"(data.val_fraction={data.val_fraction}); add documents or lower val_fraction")
    stats.elapsed_s = round(time.perf_counter() - t0, 3)
    out = IngestOutput(uri=stage_uri, fingerprint=fp, corpus=corpus, parts=parts, stats=stats,
                       skipped_inputs=tuple(consumer.skipped_inputs))
    storage.mark_complete(stage_uri, out.to_dict())
    return out


def _stream(data: DataConfig, listed: list[_InputFile], consumer: _Consumer) -> None:
    """Run the read tasks and feed their ordered output to the consumer."""
    import ray.data

    items = [{"file_id": i, "file": dataclasses.asdict(f)}
             for i, f in enumerate(listed) if f.format is not None]
    total_bytes = sum(it["file"]["size"] for it in items)
    num_blocks = max(1, min(len(items), 256, max(8, math.ceil(total_bytes / (8 << 20)))))
    fs = storage.filesystem(listed[0].uri)
    with ordered_execution():
        ds = ray.data.from_items(items, override_num_blocks=num_blocks)
        ds = ds.map_batches(_read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={
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


@exit_on_data_error
def main(argv: list[str] | None = None) -> None:
    cfg, force = stage_cli("Ingest the corpus (pipelines/stages/ingest.py)", argv)
    out = run_ingest(cfg.data, cfg.storage.root, force=force)
    print(json.dumps({"uri": out.uri, "reused": out.reused, **dataclasses.asdict(out.stats)}, indent=2))


if __name__ == "__main__":
    main()
