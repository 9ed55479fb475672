"""One storage layer for every stage: a URI is a local path or ``s3://bucket/prefix``.

Everything goes through ``pyarrow.fs``, so the same code reads and writes a laptop folder, a cluster's shared
disk, or an S3-compatible object store. S3 settings come from the standard AWS environment:
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``; ``http://host:port`` becomes ``endpoint_override`` plus
``scheme``), ``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``. Credentials are read here and handed to pyarrow only; they never appear in a log or
an error message (``describe_s3()`` says which settings are in use without their values).

Layout under a storage root::

    <root>/stages/<stage>/<fingerprint>/   one folder per stage run, keyed by the hash of its inputs
        ...outputs...
        _COMPLETE.json                     written LAST; a folder without it is partial and never trusted
    <root>/runs/<run-name>/                training runs

Ray Data reads and writes take ``filesystem=``: pass ``storage_options(uri)`` and the path from
``resolve(uri)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE.json"
S3_MAX_ATTEMPTS = 6
"""Attempts per S3 request (pyarrow's standard AWS retry strategy: exponential backoff on throttling,
5xx and connection errors)."""


class DataError(ValueError):
    """A problem with a user's data, config or storage that the user can act on; the message names the
    file or URI and what would be valid."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize_uri(uri: str) -> str:
    """``s3://bucket/prefix`` unchanged (trailing slash dropped); local paths (and ``file://``) made
    absolute, since Ray workers run in other working directories."""
    uri = str(uri)
    if is_s3(uri):
        bucket_and_key = uri[len("s3://"):].strip("/")
        if not bucket_and_key:
            raise DataError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return "s3://" + bucket_and_key
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise DataError(f"{uri!r}: unsupported URI scheme; use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def _s3_settings() -> tuple[tuple[str, Any], ...]:
    env = os.environ
    settings: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        settings["scheme"] = parsed.scheme
        settings["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        settings["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        settings["access_key"] = env["AWS_ACCESS_KEY_ID"]
        settings["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = env["AWS_SESSION_TOKEN"]
    return tuple(sorted(settings.items()))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: tuple[tuple[str, Any], ...]) -> pafs.S3FileSystem:
    # Explicit credentials travel with the (pickled) filesystem to Ray workers, whose environment may
    # predate the driver's.
    return pafs.S3FileSystem(
        **dict(settings),
        connect_timeout=10,
        request_timeout=120,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )


def describe_s3() -> str:
    """Which S3 settings are in use, without secret values (for logs and errors)."""
    settings = dict(_s3_settings())
    endpoint = settings.get("endpoint_override")
    scheme = settings.get("scheme", "https")
    parts = [f"endpoint={scheme}://{endpoint}" if endpoint else "endpoint=AWS default",
             f"region={settings.get('region', 'default')}",
             "credentials=" + ("from AWS_ACCESS_KEY_ID" if "access_key" in settings else "AWS default chain")]
    return ", ".join(parts)


def filesystem(uri: str) -> pafs.FileSystem:
    """The pyarrow filesystem that serves ``uri``."""
    if is_s3(uri):
        return _s3_filesystem(_s3_settings())
    return pafs.LocalFileSystem()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)``: S3 paths are ``bucket/key`` (no scheme), local paths absolute."""
    uri = normalize_uri(uri)
    if is_s3(uri):
        return filesystem(uri), uri[len("s3://"):]
    return filesystem(uri), uri


def storage_options(uri: str) -> dict[str, Any]:
    """Keyword arguments for Ray Data ``read_*``/``write_*`` calls on ``resolve(uri)[1]``."""
    return {"filesystem": filesystem(normalize_uri(uri))}


def _to_uri(template_uri: str, path: str) -> str:
    return f"s3://{path}" if is_s3(template_uri) else path


def join(uri: str, *parts: str) -> str:
    """Append path components (``/``-separated) to a URI."""
    base = normalize_uri(uri)
    tail = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if not tail:
        return base
    if is_s3(base):
        return base + "/" + "/".join(tail)
    return os.path.join(base, *tail)


def relative_to(uri: str, root: str) -> str:
    """The part of ``uri`` below ``root`` (``/``-separated), or its basename when ``uri`` is ``root``."""
    uri, root = normalize_uri(uri), normalize_uri(root)
    if uri == root:
        return posixpath.basename(uri.replace(os.sep, "/"))
    prefix = root.rstrip("/" + os.sep) + ("/" if is_s3(root) else os.sep)
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {root}")
    return uri[len(prefix):].replace(os.sep, "/")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object (``open_output``): a reader never sees half of it."""
    with open_output(uri) as f:
        f.write(data)


def fsync_local(path: str) -> None:
    """Flush a local file and its folder's entry to the disk (a rename or a marker written after it must not
    outlive its data in a power loss); what no local filesystem holds is skipped."""
    for target in (path, os.path.dirname(path) or "."):
        try:
            fd = os.open(target, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # a filesystem without fsync on folders (some network mounts)
        finally:
            os.close(fd)


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[Any]:
    """A stream to write one object piece by piece (``write_bytes`` for data that does not fit in memory
    at once). Local files go to a temporary name, synced and renamed when the block ends without an
    error, so a reader never sees half a file, even after a power loss; on S3 the stream is a multipart
    upload, whose object appears when it completes (a failed block's partial object, if any, is deleted)."""
    fs, path = resolve(uri)
    if is_s3(uri):
        try:
            with fs.open_output_stream(path, compression=None) as f:
                yield f
        except BaseException:
            with contextlib.suppress(Exception):
                fs.delete_file(path)
            raise
        return
    parent = os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_output_stream(tmp, compression=None) as f:
            yield f
        fsync_local(tmp)  # the data on disk before the name says it is complete
        fs.move(tmp, path)
        fsync_local(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except ValueError as e:
        raise DataError(f"{uri}: not valid JSON ({e})") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def list_file_infos(uri: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    """``(uri, size)`` of every file under ``uri`` (recursive; ``uri`` itself when it is a file) whose name
    ends with one of ``suffixes`` (all files when None), sorted by URI. Raises ``DataError`` when ``uri``
    does not exist."""
    uri = normalize_uri(uri)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or folder" + (f" (S3: {describe_s3()})" if is_s3(uri) else ""))
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
        pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        if suffixes is not None and not fi.base_name.endswith(tuple(suffixes)):
            continue
        out.append((_to_uri(uri, fi.path), int(fi.size)))
    return sorted(out)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """URIs of the files under ``uri`` ending with one of ``suffixes``, sorted, recursive."""
    return [u for u, _ in list_file_infos(uri, suffixes)]


def delete_dir(uri: str) -> None:
    """Delete a folder (or prefix) and everything under it; nothing happens when it does not exist.
    Refuses a bucket or filesystem root."""
    uri = normalize_uri(uri)
    fs, path = resolve(uri)
    depth = len([p for p in path.split("/") if p])
    if depth < 2:
        raise DataError(f"refusing to delete {uri}: a bucket or filesystem root")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Short hex sha256 of ``obj``'s canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage_dir(storage_root: str, stage: str, fingerprint_hex: str) -> str:
    """``<root>/stages/<stage>/<fingerprint>``."""
    return join(storage_root, "stages", stage, fingerprint_hex)


def run_dir(storage_root: str, run_name: str) -> str:
    """``<root>/runs/<run-name>``."""
    return join(storage_root, "runs", run_name)


def is_complete(stage_uri: str) -> bool:
    """True only when the stage folder holds its ``_COMPLETE.json`` marker."""
    return exists(join(stage_uri, COMPLETE_MARKER))


def mark_complete(stage_uri: str, payload: dict[str, Any]) -> None:
    """Write ``_COMPLETE.json``; call it after every other output of the stage is written."""
    write_json(join(stage_uri, COMPLETE_MARKER), payload)


def read_complete(stage_uri: str) -> dict[str, Any] | None:
    """The payload of ``_COMPLETE.json``, or None when the stage is not complete."""
    marker = join(stage_uri, COMPLETE_MARKER)
    if not exists(marker):
        return None
    return read_json(marker)
