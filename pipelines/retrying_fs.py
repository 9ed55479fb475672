"""A pyarrow filesystem that rides out storage outages: every operation is retried with exponential
backoff for up to ``retry_seconds`` when the store answers with a transient error (a refused or dropped
connection, throttling, a 5xx). Random-access files read by byte range, each range retried.

Writes are spooled and sent whole on close, so a write that fails half-way is simply sent again: the
spool is memory up to ``spool_memory_bytes`` (64 MiB by default), then an unlinked temporary file on local
disk (``spool_dir``, else ``TMPDIR``), so a multi-GB checkpoint shard costs disk, not a second copy of the
shard in host memory. A stream closed by an exception raised inside its ``with`` block (the writer failed
half-way) sends nothing: no partial object appears under the final key.

Ray Train writes its own run state (``checkpoint_manager_snapshot.json``) through the filesystem it is
given; wrapping the S3 filesystem here keeps a short outage of the object store from killing the run's
controller. Errors that retrying cannot fix (a missing key, access denied) are raised at once.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")
SPOOL_MEMORY_BYTES = 64 << 20
SEND_CHUNK_BYTES = 8 << 20
PERMANENT = ("not found", "no such", "does not exist", "access denied", "forbidden", "path does not exist",
             "is a directory", "not a directory", "invalid")


def is_transient(error: BaseException) -> bool:
    text = str(error).lower()
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(error, OSError) and not any(p in text for p in PERMANENT)


class RetryingHandler(pafs.FileSystemHandler):
    def __init__(self, inner: pafs.FileSystem, retry_seconds: float = 120.0, first_backoff: float = 0.25,
                 spool_memory_bytes: int = SPOOL_MEMORY_BYTES, spool_dir: str | None = None):
        if spool_memory_bytes < 0:
            raise ValueError(f"spool_memory_bytes must be >= 0, got {spool_memory_bytes}")
        self.inner = inner
        self.retry_seconds = retry_seconds
        self.first_backoff = first_backoff
        self.spool_memory_bytes = spool_memory_bytes
        self.spool_dir = spool_dir

    def __reduce__(self):  # travels to Ray workers with the wrapped filesystem
        return RetryingHandler, (self.inner, self.retry_seconds, self.first_backoff, self.spool_memory_bytes,
                                 self.spool_dir)

    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_seconds
        delay = self.first_backoff
        while True:
            try:
                return fn()
            except OSError as e:
                if not is_transient(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    # ------------------------------------------------------------------ FileSystemHandler
    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def get_file_info(self, paths):
        return self._retry(lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry(lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry(lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry(lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root of a storage filesystem")

    def delete_file(self, path):
        self._retry(lambda: self.inner.delete_file(path))

    def move(self, src, dest):
        self._retry(lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        self._retry(lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path):
        data = self._retry(lambda: _read_all(self.inner, path))
        return pa.BufferReader(data)

    def open_input_file(self, path):
        return pa.PythonFile(_RangedReads(self, path), mode="r")

    def open_output_stream(self, path, metadata=None):
        return pa.PythonFile(_SpooledWrite(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata=None):
        raise OSError("append is not supported on object storage")


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


class _RangedReads(io.RawIOBase):
    """Random access to one object: every read is a ranged read of the inner file (``read_at``, one GET
    on S3), retried like every other call, the file reopened after a failure. A reader that needs a few
    pieces of a large object (a resharding rank, a parquet footer) fetches just those bytes."""

    def __init__(self, handler: RetryingHandler, path: str):
        self.handler, self.path = handler, path
        self._file = handler._retry(lambda: handler.inner.open_input_file(path))
        self._size = self._file.size()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(0, self._size - self._pos))
        if n == 0:
            return 0
        offset = self._pos

        def attempt() -> bytes:
            try:
                return self._file.read_at(n, offset)
            except OSError:
                self._file = self.handler.inner.open_input_file(self.path)  # a fresh connection next time
                raise

        data = self.handler._retry(attempt)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _SpooledWrite(io.RawIOBase):
    """Collects a write in a spool (memory, then a temporary file past the handler's
    ``spool_memory_bytes``) and sends it whole, with retries, when closed; every attempt re-reads the spool
    from its start in ``SEND_CHUNK_BYTES`` pieces. Nothing is sent if the stream is closed while an
    exception raised after it was opened is propagating (compared with the one, if any, being handled when
    it was opened, so a file written inside an ``except`` block is still sent)."""

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool: io.BufferedIOBase = io.BytesIO()
        self.spilled_to_disk = False
        self.size = 0
        self._exception_at_open = sys.exc_info()[1]

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if not self.spilled_to_disk and self.size + n > self.handler.spool_memory_bytes:
            on_disk = tempfile.TemporaryFile(dir=self.handler.spool_dir)  # unlinked: gone when closed
            on_disk.write(self.spool.getbuffer())
            self.spool, self.spilled_to_disk = on_disk, True
        self.spool.write(b)
        self.size += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        failing = sys.exc_info()[1]
        try:
            if failing is None or failing is self._exception_at_open:
                self.handler._retry(self._send)
        finally:
            self.spool.close()
            super().close()

    def _send(self) -> None:
        self.spool.seek(0)
        with self.handler.inner.open_output_stream(self.path, compression=None, metadata=self.metadata) as f:
            while chunk := self.spool.read(SEND_CHUNK_BYTES):
                f.write(chunk)


def retrying(fs: pafs.FileSystem, retry_seconds: float = 120.0) -> pafs.FileSystem:
    """``fs`` wrapped for outages; local filesystems are returned as they are."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs, retry_seconds))
