"""The checkpoint shard format: exact round trips, ranged reads of tensors and expert rows, and clear
errors for files that are not shards or are cut short."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipelines.train import checkpoint_file


def _state():
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {"embed.weight": torch.randn(5, 3, generator=gen),
                  "layers.1.mlp.experts.gate_proj": torch.randn(4, 6, 3, generator=gen).to(torch.bfloat16),
                  "empty": torch.empty(0, 7)},
        "optimizer": {"state": {"w": {"step": 3, "exp_avg": torch.randn(2, 2, generator=gen)}},
                      "param_groups": [{"betas": (0.9, 0.95), "names": ["w"]}]},
        "step": 7,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "ids": [torch.arange(5), (torch.ones(2, dtype=torch.int32), "tag")],
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def test_round_trip_is_exact_for_every_dtype_and_container():
    state = _state()
    _assert_same(checkpoint_file.decode(checkpoint_file.encode(state)), state)


def test_decoded_tensors_are_independent_of_the_source():
    state = {"w": torch.zeros(3)}
    data = checkpoint_file.encode(state)
    state["w"].add_(1)
    out = checkpoint_file.decode(data)
    assert torch.equal(out["w"], torch.zeros(3))
    out["w"].add_(2)  # writable, owns its memory
    assert torch.equal(checkpoint_file.decode(data)["w"], torch.zeros(3))


def test_ranged_reads_fetch_only_the_requested_bytes(tmp_path):
    state = _state()
    path = tmp_path / "rank-00000.shard"
    path.write_bytes(checkpoint_file.encode(state))
    fs = pafs.LocalFileSystem()
    with checkpoint_file.ShardReader(fs, str(path)) as reader:
        after_header = reader.bytes_read
        key = "model/layers.1.mlp.experts.gate_proj"
        rows = reader.tensor(key, range(1, 3))
        assert torch.equal(rows, state["model"]["layers.1.mlp.experts.gate_proj"][1:3])
        assert reader.bytes_read - after_header == 2 * 6 * 3 * 2  # two bf16 experts of [6, 3]
        assert reader.tensor_bytes_read == 2 * 6 * 3 * 2
        assert torch.equal(reader.tensor("model/embed.weight"), state["model"]["embed.weight"])
        assert reader.tensor("model/empty").shape == (0, 7)
        skeleton = reader.skeleton()
        assert skeleton["step"] == 7
        assert skeleton["model"]["embed.weight"] == checkpoint_file.TensorRef("model/embed.weight")
        assert skeleton["optimizer"]["state"]["w"]["step"] == 3
        with pytest.raises(ValueError, match="rows range\\(3, 5\\) outside"):
            reader.tensor(key, range(3, 5))


def test_not_a_shard_and_truncated_shard_are_clear_errors(tmp_path):
    fs = pafs.LocalFileSystem()
    old = tmp_path / "rank-00000.pt"
    torch.save({"w": torch.zeros(2)}, old)
    with pytest.raises(ValueError, match="rank-00000.pt is not a k2pipe checkpoint shard"):
        checkpoint_file.ShardReader(fs, str(old))
    with pytest.raises(ValueError, match="not a k2pipe checkpoint shard"):
        checkpoint_file.decode(old.read_bytes(), str(old))
    cut = tmp_path / "rank-00001.shard"
    data = checkpoint_file.encode({"w": torch.zeros(1000)})
    cut.write_bytes(data[:len(data) - 2000])
    with checkpoint_file.ShardReader(fs, str(cut)) as reader:
        with pytest.raises(OSError, match="rank-00001.shard: short read"):
            reader.tensor("w")


def test_a_key_holding_the_path_separator_is_refused():
    with pytest.raises(ValueError, match="'a/b'"):
        checkpoint_file.encode({"model": {"a/b": torch.zeros(1)}})


def test_ranged_reads_through_the_s3_server(s3_bucket):
    """The reads a resharding rank makes, against an S3 server on 127.0.0.1 through the retrying
    filesystem that Ray Train's storage uses."""
    from pipelines import storage
    from pipelines.retrying_fs import retrying

    state = _state()
    uri = f"s3://{s3_bucket}/ckpt/rank-00000.shard"
    storage.write_bytes(uri, checkpoint_file.encode(state))
    fs, path = storage.resolve(uri)
    with checkpoint_file.ShardReader(retrying(fs), path) as reader:
        key = "model/layers.1.mlp.experts.gate_proj"
        assert torch.equal(reader.tensor(key, range(2, 4)), state["model"]["layers.1.mlp.experts.gate_proj"][2:4])
        assert reader.tensor_bytes_read == 2 * 6 * 3 * 2
        assert reader.skeleton()["step"] == 7
    _assert_same(checkpoint_file.decode(storage.read_bytes(uri)), state)
