"""The storage layer on a local folder and on the moto S3 server: URIs, atomic writes, listing, stage
markers, fingerprints, S3 settings from the environment, and no secrets in messages."""

from __future__ import annotations

import json
import os
import pickle

import pyarrow.fs as pafs
import pytest

from pipelines import storage
from pipelines.storage import DataError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/some/prefix"


def test_normalize_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("rel/dir") == str(tmp_path / "rel" / "dir")
    assert storage.normalize_uri("file:///x/y") == "/x/y"
    assert storage.normalize_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    with pytest.raises(DataError, match="bucket"):
        storage.normalize_uri("s3://")
    with pytest.raises(DataError, match="scheme"):
        storage.normalize_uri("gs://bucket/x")


def test_join_resolve_and_layout(tmp_path):
    assert storage.join("s3://b/p", "stages", "/x/") == "s3://b/p/stages/x"
    assert storage.join(str(tmp_path), "a", "b.txt") == str(tmp_path / "a" / "b.txt")
    assert storage.stage_dir("s3://b/root", "ingest", "abc") == "s3://b/root/stages/ingest/abc"
    assert storage.run_dir(str(tmp_path), "tiny-1") == str(tmp_path / "runs" / "tiny-1")
    fs, path = storage.resolve("s3://b/root/x")
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/root/x"
    fs, path = storage.resolve(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    assert storage.relative_to("s3://b/root/x/y.txt", "s3://b/root") == "x/y.txt"
    assert storage.relative_to(str(tmp_path / "a" / "b"), str(tmp_path)) == "a/b"


def test_fingerprint_is_canonical():
    a = storage.fingerprint({"x": 1, "y": [1, 2], "z": {"b": 1, "a": 2}})
    b = storage.fingerprint({"z": {"a": 2, "b": 1}, "y": [1, 2], "x": 1})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert storage.fingerprint({"x": 2}) != storage.fingerprint({"x": 1})
    assert len(storage.fingerprint({}, length=64)) == 64


def test_bytes_json_listing_and_delete(root):
    storage.write_bytes(storage.join(root, "b/2.jsonl"), b"two")
    storage.write_bytes(storage.join(root, "a/1.txt"), b"one")
    storage.write_bytes(storage.join(root, "a/deep/3.txt"), b"three")
    storage.write_json(storage.join(root, "meta.json"), {"k": [1, 2], "s": "x"})
    assert storage.read_bytes(storage.join(root, "a/1.txt")) == b"one"
    assert storage.read_json(storage.join(root, "meta.json")) == {"k": [1, 2], "s": "x"}
    assert storage.exists(storage.join(root, "a")) and storage.exists(storage.join(root, "a/1.txt"))
    assert not storage.exists(storage.join(root, "nope"))
    txt = storage.list_files(root, (".txt",))
    assert txt == [storage.join(root, "a/1.txt"), storage.join(root, "a/deep/3.txt")]
    everything = storage.list_file_infos(root)
    assert [u for u, _ in everything] == sorted(u for u, _ in everything)
    assert dict(everything)[storage.join(root, "b/2.jsonl")] == 3
    # A single file lists as itself.
    assert storage.list_files(storage.join(root, "a/1.txt")) == [storage.join(root, "a/1.txt")]
    with pytest.raises(DataError, match="no such file"):
        storage.read_bytes(storage.join(root, "missing.bin"))
    with pytest.raises(DataError, match="no such file or folder"):
        storage.list_files(storage.join(root, "missing"))
    storage.delete_dir(storage.join(root, "a"))
    assert storage.list_files(root) == [storage.join(root, "b/2.jsonl"), storage.join(root, "meta.json")]
    storage.delete_dir(storage.join(root, "never-existed"))  # no error


def test_bytes_are_raw_whatever_the_suffix(root):
    # pyarrow would (de)compress .gz/.zst names on its own; the storage layer moves bytes untouched.
    data = b"\x1f\x8b not really gzip"
    storage.write_bytes(storage.join(root, "x.jsonl.gz"), data)
    storage.write_bytes(storage.join(root, "y.zst"), data)
    assert storage.read_bytes(storage.join(root, "x.jsonl.gz")) == data
    assert storage.read_bytes(storage.join(root, "y.zst")) == data
    assert dict(storage.list_file_infos(root))[storage.join(root, "y.zst")] == len(data)


def test_local_writes_are_atomic(tmp_path):
    target = str(tmp_path / "d" / "x.json")
    storage.write_json(target, {"a": 1})
    storage.write_json(target, {"a": 2})
    assert storage.read_json(target) == {"a": 2}
    assert os.listdir(tmp_path / "d") == ["x.json"]  # no temporary files left behind


def test_delete_refuses_roots():
    with pytest.raises(DataError, match="refusing"):
        storage.delete_dir("s3://bucket")
    with pytest.raises(DataError, match="refusing"):
        storage.delete_dir("/tmp")


def test_stage_markers(root):
    stage = storage.stage_dir(root, "shard", storage.fingerprint({"a": 1}))
    assert stage == storage.join(root, "stages", "shard", storage.fingerprint({"a": 1}))
    assert not storage.is_complete(stage) and storage.read_complete(stage) is None
    storage.write_bytes(storage.join(stage, "out.bin"), b"done")
    assert not storage.is_complete(stage)
    storage.mark_complete(stage, {"rows": 3})
    assert storage.is_complete(stage) and storage.read_complete(stage) == {"rows": 3}


def test_s3_settings_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000/")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    settings = dict(storage._s3_settings())
    assert settings["endpoint_override"] == "10.1.2.3:9000" and settings["scheme"] == "http"
    assert settings["region"] == "eu-west-3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    settings = dict(storage._s3_settings())
    assert settings["endpoint_override"] == "s3.example.com" and settings["scheme"] == "https"
    described = storage.describe_s3()
    assert "very-secret-value-123" not in described and "AKIAEXAMPLEKEYID" not in described
    assert "s3.example.com" in described
    fs = storage.filesystem("s3://b/x")
    assert fs.region == "eu-west-3"
    assert "very-secret-value-123" not in repr(fs)


def test_s3_filesystem_travels_to_workers_and_errors_hide_secrets(s3_bucket):
    uri = f"s3://{s3_bucket}/x/data.bin"
    storage.write_bytes(uri, b"payload")
    fs = pickle.loads(pickle.dumps(storage.filesystem(uri)))  # how Ray ships it to a worker
    with fs.open_input_stream(f"{s3_bucket}/x/data.bin") as f:
        assert f.read() == b"payload"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(DataError) as err:
        storage.list_files(f"s3://{s3_bucket}/missing")
    assert f"s3://{s3_bucket}/missing" in str(err.value) and "endpoint=http://127.0.0.1" in str(err.value)
    assert secret not in str(err.value) and os.environ["AWS_ACCESS_KEY_ID"] not in str(err.value)
    assert storage.storage_options(uri)["filesystem"] is storage.filesystem(uri)


def test_local_writes_reach_the_disk_before_their_name_says_complete(tmp_path, monkeypatch):
    """A power loss must not leave a complete-looking file (or a marker) whose data never reached the disk:
    the temporary file is synced before its rename, then the folder entry."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "out" / "_COMPLETE.json"
    storage.write_json(str(target), {"ok": True})
    assert len(synced) == 4 and ".tmp-" in synced[0] and synced[1] == synced[3] == str(target.parent)
    assert synced[2] == str(target) and json.loads(target.read_text()) == {"ok": True}
