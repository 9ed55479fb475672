"""The training data order: a pure function of (seed, step), disjoint across ranks, covering every window
once per epoch, and read with bounded memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.loader import DeterministicSampler, ShardRef, TrainBatches, WindowReader, eval_batches

SEQ = 16


def make_shards(tmp_path, sizes, row_group_size=8):
    refs, next_id = [], 0
    for s, rows in enumerate(sizes):
        # Row i of the corpus starts with its global index, so a read row says where it came from.
        data = [[next_id + i] + [0] * SEQ for i in range(rows)]
        next_id += rows
        path = tmp_path / f"shard-{s}.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(data, type=pa.list_(pa.int32()))}), path,
                       row_group_size=row_group_size)
        refs.append(ShardRef(uri=str(path), rows=rows))
    return refs


def test_each_epoch_visits_every_window_once_and_ranks_are_disjoint(tmp_path):
    refs = make_shards(tmp_path, [20, 12, 16])
    total = 48
    seen_by_rank = []
    for rank in range(2):
        sampler = DeterministicSampler(refs, seed=3, global_batch=8, dp_size=2, dp_rank=rank, micro_batch=2)
        batches = TrainBatches(sampler, WindowReader(refs, SEQ))
        ids = []
        for step in range(total // 8):
            for micro in range(sampler.micro_batches_per_step):
                inputs, targets = batches.batch(step, micro)
                assert inputs.shape == (2, SEQ) and targets.shape == (2, SEQ)
                ids += inputs[:, 0].tolist()
        seen_by_rank.append(ids)
    assert not set(seen_by_rank[0]) & set(seen_by_rank[1])
    assert sorted(seen_by_rank[0] + seen_by_rank[1]) == list(range(total))
    # Shuffled, not in corpus order, and one batch mixes rows of several shards.
    assert seen_by_rank[0] != sorted(seen_by_rank[0])
    first_batch = DeterministicSampler(refs, seed=3, global_batch=8, dp_size=1, dp_rank=0, micro_batch=8)
    assert len({first_batch.locate(p)[0] for p in first_batch.positions(0, 0)}) > 1


def test_order_depends_only_on_seed_and_step(tmp_path):
    refs = make_shards(tmp_path, [10, 10])
    a = DeterministicSampler(refs, seed=1, global_batch=4, dp_size=1, dp_rank=0, micro_batch=4)
    b = DeterministicSampler(refs, seed=1, global_batch=4, dp_size=1, dp_rank=0, micro_batch=4)
    c = DeterministicSampler(refs, seed=2, global_batch=4, dp_size=1, dp_rank=0, micro_batch=4)
    # Resuming at step 7 gives the same rows as reaching step 7 from the start.
    for step in (7, 3, 12):
        assert [a.locate(p) for p in a.positions(step, 0)] == [b.locate(p) for p in b.positions(step, 0)]
    assert [a.locate(p) for p in range(20)] != [c.locate(p) for p in range(20)]
    # Epoch 2 is a different permutation of the same windows.
    first = sorted(a.locate(p) for p in range(20))
    second = sorted(a.locate(p) for p in range(20, 40))
    assert first == second
    assert [a.locate(p) for p in range(20)] != [a.locate(p) for p in range(20, 40)]


def test_memory_stays_bounded_with_shards_larger_than_the_budget(tmp_path):
    refs = make_shards(tmp_path, [256, 256], row_group_size=16)
    shard_bytes = 256 * (SEQ + 1) * 4
    budget = shard_bytes // 4  # a quarter of one shard
    reader = WindowReader(refs, SEQ, cache_bytes=budget)
    sampler = DeterministicSampler(refs, seed=0, global_batch=8, dp_size=1, dp_rank=0, micro_batch=8)
    batches = TrainBatches(sampler, reader)
    seen = []
    for step in range(512 // 8):
        inputs, _ = batches.batch(step, 0)
        seen += inputs[:, 0].tolist()
    assert sorted(seen) == list(range(512))
    assert reader.peak_cached_bytes <= budget
    assert reader.peak_cached_bytes < shard_bytes


def test_bad_shapes_are_reported(tmp_path):
    refs = make_shards(tmp_path, [4])
    with pytest.raises(ValueError, match="seq_len"):
        WindowReader(refs, SEQ + 3).read(0, 0)
    with pytest.raises(ValueError, match="manifest"):
        WindowReader([ShardRef(uri=refs[0].uri, rows=5)], SEQ).read(0, 0)
    with pytest.raises(ValueError, match="multiple"):
        DeterministicSampler(refs, seed=0, global_batch=6, dp_size=4, dp_rank=0, micro_batch=1)


def test_eval_batches_are_a_seeded_sample_of_the_whole_split_split_over_ranks(tmp_path):
    refs = make_shards(tmp_path, [10, 10])
    per_rank = [eval_batches(WindowReader(refs, SEQ), 2, 3, 2, r, seed=5) for r in range(2)]
    assert [len(batches) for batches in per_rank] == [2, 2]
    ids = [np.concatenate([b[0][:, 0].numpy() for b in batches]).tolist() for batches in per_rank]
    chosen = sorted(np.random.default_rng(5).choice(20, size=12, replace=False).tolist())
    assert ids[0] + ids[1] == chosen, "rank 0 the first half of the sorted sample, rank 1 the second"
    assert chosen != list(range(12)), "not the split's first rows"
    again = eval_batches(WindowReader(refs, SEQ), 2, 3, 2, 0, seed=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, per_rank[0])), "the same set every evaluation"
    whole = eval_batches(WindowReader(refs, SEQ), 8, 5, 1, 0, seed=5)  # asks for more than the split
    assert np.concatenate([b[0][:, 0].numpy() for b in whole]).tolist() == list(range(20))
