"""What ``optimizer.ns_dtype=auto`` resolves to (k2model.optim): bf16 where the CPU multiplies bf16 natively,
fp32 elsewhere, agreed by every rank. Each test sets the CPU flags it means, so none depends on the
machine's kind or on ``--cpu-kind`` (not marked ``auto_dtype``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from k2model import optim
from k2model.config import OptimizerConfig
from k2model.optim import MuonClip, native_bf16_matmul, resolve_ns_dtype
from k2model.testing import run_workers


def test_ns_dtype_auto_follows_the_hardware_and_names_pass_through(monkeypatch):
    assert resolve_ns_dtype("bfloat16", "cpu") == "bfloat16" and resolve_ns_dtype("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="ns_dtype='float16'.*'auto'"):
        resolve_ns_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="optimizer.ns_dtype='half'"):
        OptimizerConfig(ns_dtype="half")
    cases = [({"avx2", "fma"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
             ({"amx_tile", "amx_bf16"}, "bfloat16"), ({"asimd", "bf16"}, "bfloat16"), (set(), "float32")]
    for flags, expected in cases:
        flags = frozenset(flags)
        monkeypatch.setattr(optim, "_cpu_flags", lambda flags=flags: flags)
        assert native_bf16_matmul("cpu") == (expected == "bfloat16")
        assert resolve_ns_dtype("auto", "cpu") == expected
        opt = MuonClip([("w", nn.Parameter(torch.randn(4, 8)))], [], lr=0.1, cfg=OptimizerConfig())
        assert opt.ns_dtype == expected


def _agreement_worker(rank, world_size, flags_per_rank):
    optim._cpu_flags = lambda: flags_per_rank[rank]
    w = nn.Parameter(torch.randn(4, 8))
    auto = MuonClip([("w", w)], [], lr=0.1, cfg=OptimizerConfig(), distributed=True)
    pinned = MuonClip([("w", w)], [], lr=0.1, cfg=OptimizerConfig(ns_dtype="bfloat16"), distributed=True)
    return auto.ns_dtype, pinned.ns_dtype


def test_ns_dtype_auto_is_agreed_by_every_rank():
    """bf16 only if every rank has it: replicas of one expert shard must orthogonalise alike."""
    mixed = run_workers(_agreement_worker, 2, [frozenset({"amx_bf16"}), frozenset({"avx2"})])
    assert mixed == [("float32", "bfloat16")] * 2
    both = run_workers(_agreement_worker, 2, [frozenset({"amx_bf16"}), frozenset({"avx512_bf16"})])
    assert both == [("bfloat16", "bfloat16")] * 2
