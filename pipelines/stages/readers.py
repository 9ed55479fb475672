"""Ingest's read tasks: the code that runs in Ray Data workers, one input file at a time.

Each file is parsed by its format (``INPUT_FORMATS``), its documents normalised (Unicode NFC, NUL
characters removed), filtered (``data.min_doc_chars``) and hashed; what comes out is a stream of tables
(``EVENT_SCHEMA``) in (line/row) order holding either a document with its digest or an event: a dropped
document, a bad record or an unreadable file with the reason (``DROPPED``, ``BAD_RECORD``, ``FATAL``). The
ingest stage's ordered consumer (``pipelines.stages.ingest``) decides what each event means under
``data.on_bad_record``; nothing here raises for bad input.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INPUT_FORMATS = {  # suffix -> (format, compression of the raw stream)
    ".txt": ("text", None),
    ".jsonl": ("jsonl", None),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".parquet": ("parquet", None),
}

READ_CHUNK_BYTES = 1 << 20

# Reasons a record or file is skipped. Bad records follow data.on_bad_record; the others never fail.
BAD_RECORD = ("too_large", "invalid_utf8", "invalid_json", "not_an_object", "missing_field", "not_a_string",
              "unreadable")
ALWAYS_SKIPPED = ("empty_file", "unsupported_type")
DROPPED = ("empty", "too_short")  # documents removed by the content filters
FATAL = "storage_error"

EVENT_SCHEMA = pa.schema([
    ("file_id", pa.int32()), ("index", pa.int64()), ("text", pa.string()), ("digest", pa.binary()),
    ("num_bytes", pa.int64()), ("event", pa.string()), ("detail", pa.string()),
])


@dataclass(frozen=True)
class InputFile:
    uri: str
    path: str
    """Path on the filesystem that serves the corpus (``bucket/key`` on S3)."""
    source: str
    """Path relative to the corpus root (written to the output's ``source`` column)."""
    size: int
    format: str | None
    """``text``, ``jsonl``, ``parquet``, or None for an unsupported file."""
    compression: str | None


def input_format(name: str) -> tuple[str | None, str | None]:
    for suffix, fmt in INPUT_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None, None



def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, ConnectionError, TimeoutError)) or \
        "AWS Error" in str(exc)


class _Rows:
    """Column buffers for the read tasks' output tables."""

    def __init__(self, file_id: int):
        self.file_id = file_id
        self.columns: dict[str, list[Any]] = {name: [] for name in EVENT_SCHEMA.names}
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
        table = pa.table(self.columns, schema=EVENT_SCHEMA)
        self.columns = {name: [] for name in EVENT_SCHEMA.names}
        self.text_bytes = 0
        return table


class FileReader:
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

    def read(self, f: InputFile, rows: _Rows) -> Iterator[pa.Table]:
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
            reason = FATAL if is_storage_error(e) else "unreadable"
            rows.add(None, event=reason, detail=f"{describe_error(e)}{where}")
            return
        if num_records == 0 and f.format != "text":
            rows.add(None, event="empty_file", detail="no records")

    def _read_text(self, f: InputFile, rows: _Rows) -> Iterator[None]:
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

    def _read_jsonl(self, f: InputFile, rows: _Rows) -> Iterator[None]:
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

    def _read_parquet(self, f: InputFile, rows: _Rows) -> Iterator[None]:
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


def read_files(batch: pa.Table, *, fs: Any, text_field: str, min_doc_chars: int,
                max_doc_bytes: int) -> Iterator[pa.Table]:
    """Ray Data map_batches function: one row per file in, documents and events out, in order."""
    reader = FileReader(fs, text_field, min_doc_chars, max_doc_bytes)
    for row in batch.to_pylist():
        rows = _Rows(row["file_id"])
        yield from reader.read(InputFile(**row["file"]), rows)
        if len(rows):
            yield rows.flush()

