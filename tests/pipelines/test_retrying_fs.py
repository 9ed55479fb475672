"""The retrying filesystem against a real S3 server on 127.0.0.1 that goes away and comes back."""

from __future__ import annotations

import pickle
import threading
import time

import boto3
import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from pipelines.retrying_fs import RetryingHandler, is_transient, retrying


@pytest.fixture
def own_s3(monkeypatch):
    import uuid

    bucket = f"retry-{uuid.uuid4().hex[:8]}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1",
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    state = {"server": server, "port": port, "bucket": bucket}
    yield fs, state
    state["server"].stop()


def restart_later(state, after_s: float = 2.0) -> None:
    """Start the stopped S3 server again on its port after ``after_s``, in the background."""

    def come_back():
        time.sleep(after_s)
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=state["port"], verbose=False)
        state["server"].start()

    threading.Thread(target=come_back, daemon=True).start()


def test_writes_and_reads_survive_an_outage(own_s3):
    raw, state = own_s3
    fs = retrying(raw, retry_seconds=30)
    b = state["bucket"]
    with fs.open_output_stream(f"{b}/before.bin") as f:
        f.write(b"x" * 10)
    state["server"].stop()
    restart_later(state)
    started = time.monotonic()
    with fs.open_output_stream(f"{b}/during.bin") as f:  # the store is down right now
        f.write(b"hello")
    assert time.monotonic() - started >= 1.5
    with fs.open_input_stream(f"{b}/during.bin") as f:
        assert f.read() == b"hello"
    assert fs.get_file_info(f"{b}/before.bin").size == 10


def test_permanent_errors_are_not_retried(own_s3):
    raw, state = own_s3
    fs = retrying(raw, retry_seconds=30)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{state['bucket']}/missing.bin")
    assert time.monotonic() - started < 5
    assert not is_transient(FileNotFoundError("x")) and is_transient(OSError("Could not connect to server"))


def test_local_filesystems_are_not_wrapped_and_the_wrapper_pickles(own_s3):
    raw, _ = own_s3
    local = pafs.LocalFileSystem()
    assert retrying(local) is local
    wrapped = retrying(raw)
    clone = pickle.loads(pickle.dumps(wrapped))
    assert isinstance(clone.handler, RetryingHandler) and clone.handler.retry_seconds == 120.0


class RecordingFS:
    """The S3 filesystem, with every ranged read of an input file recorded as (offset, nbytes)."""

    def __init__(self, fs):
        self.fs, self.reads = fs, []

    def open_input_file(self, path):
        inner, reads = self.fs.open_input_file(path), self.reads

        class File:
            def size(self):
                return inner.size()

            def read_at(self, nbytes, offset):
                reads.append((offset, nbytes))
                return inner.read_at(nbytes, offset)

            def close(self):
                inner.close()

        return File()


def test_random_access_reads_only_the_ranges_asked_for_and_survives_an_outage(own_s3):
    raw, state = own_s3
    b = state["bucket"]
    payload = bytes(range(256)) * 4096  # 1 MiB
    with raw.open_output_stream(f"{b}/big.bin") as f:
        f.write(payload)
    recording = RecordingFS(raw)
    handler = RetryingHandler(recording, retry_seconds=30)
    f = handler.open_input_file(f"{b}/big.bin")
    assert f.size() == len(payload)
    assert f.read_at(16, 500_000) == payload[500_000:500_016]
    f.seek(1_048_570)
    assert f.read() == payload[-6:]
    assert recording.reads == [(500_000, 16), (1_048_570, 6)], "only the asked-for bytes were fetched"

    state["server"].stop()
    restart_later(state)
    assert f.read_at(8, 123) == payload[123:131]  # the store is down right now
    f.close()


def test_a_large_write_spills_to_disk_and_is_sent_whole_after_an_outage(own_s3, tmp_path):
    from pipelines.retrying_fs import _SpooledWrite

    raw, state = own_s3
    b = state["bucket"]
    handler = RetryingHandler(raw, retry_seconds=30, spool_memory_bytes=1 << 20, spool_dir=str(tmp_path))
    payload = bytes(range(251)) * 12_000  # 3 MB, a prime period so a misplaced chunk shows
    stream = _SpooledWrite(handler, f"{b}/spilled.bin", None)
    stream.write(payload[:700_000])
    assert not stream.spilled_to_disk, "under the threshold the spool stays in memory"
    stream.write(payload[700_000:])
    assert stream.spilled_to_disk and stream.size == len(payload)
    assert list(tmp_path.iterdir()) == [], "the spill file is unlinked: nothing is left behind"
    state["server"].stop()
    restart_later(state)
    stream.close()  # the store is down right now: sent once it is back
    with raw.open_input_stream(f"{b}/spilled.bin") as f:
        assert f.read() == payload

    small = _SpooledWrite(handler, f"{b}/small.bin", None)
    small.write(b"abc")
    small.close()
    assert not small.spilled_to_disk
    with raw.open_input_stream(f"{b}/small.bin") as f:
        assert f.read() == b"abc"


def test_a_writer_that_fails_half_way_sends_nothing(own_s3):
    raw, state = own_s3
    fs = retrying(raw, retry_seconds=30)
    key = f"{state['bucket']}/shard.bin"
    with fs.open_output_stream(key) as f:
        f.write(b"version one")
    with pytest.raises(RuntimeError, match="serialiser broke"):
        with fs.open_output_stream(key) as f:
            f.write(b"version two, first half")
            raise RuntimeError("serialiser broke")
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(f"{state['bucket']}/never.bin") as f:
            f.write(b"half")
            raise RuntimeError("again")
    with fs.open_input_stream(key) as f:
        assert f.read() == b"version one", "the earlier object is untouched"
    assert fs.get_file_info(f"{state['bucket']}/never.bin").type == pafs.FileType.NotFound

    try:  # a file written while an earlier exception is being handled is still sent
        raise KeyError("handled")
    except KeyError:
        with fs.open_output_stream(f"{state['bucket']}/from-handler.bin") as f:
            f.write(b"sent")
    with fs.open_input_stream(f"{state['bucket']}/from-handler.bin") as f:
        assert f.read() == b"sent"
