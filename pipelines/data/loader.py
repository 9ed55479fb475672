"""Deterministic, resumable, memory-bounded reading of packed shards for training.

The global sample order is a pure function of (seed, step): epoch e visits the shards in a seeded
permutation, taken in blocks of ``shuffle_shards`` shards whose rows are permuted jointly (so a batch mixes
documents of several shards rather than walking one shard's neighbouring documents); step s takes global
positions [s * G, (s + 1) * G) of that endless order (G = global batch), data-parallel rank r takes its
contiguous slice of G / dp_size rows, and micro-batch m the m-th part of that slice. The only state a
checkpoint needs is the step, so Ray Data iterators (not checkpointable) are not used here.

A rank opens only the shards its rows live in and reads only the parquet row groups holding them,
through an LRU cache bounded in bytes (``cache_bytes``): memory does not grow with the dataset or the
shard size.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines import storage


@dataclass(frozen=True)
class ShardRef:
    uri: str
    rows: int


class WindowReader:
    """Random access to rows (windows of seq_len + 1 tokens) of a list of shards."""

    def __init__(self, shards: list[ShardRef], seq_len: int, cache_bytes: int = 64 << 20):
        if not shards:
            raise ValueError("no shards to read")
        self.shards = shards
        self.seq_len = seq_len
        self.cache_bytes = cache_bytes
        self._files: dict[int, pq.ParquetFile] = {}
        self._row_group_starts: dict[int, np.ndarray] = {}
        self._cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._cached_bytes = 0
        self.peak_cached_bytes = 0
        self.row_groups_read = 0

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            fs, path = storage.resolve(self.shards[shard].uri)
            f = pq.ParquetFile(fs.open_input_file(path))
            if f.metadata.num_rows != self.shards[shard].rows:
                raise ValueError(f"shard {self.shards[shard].uri} has {f.metadata.num_rows} rows, the manifest "
                                 f"says {self.shards[shard].rows}: the data stage output is inconsistent")
            sizes = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
            self._row_group_starts[shard] = np.cumsum([0] + sizes)
            self._files[shard] = f
            # Keep only a few open files: the cache below bounds the data, this bounds the handles.
            if len(self._files) > 8:
                oldest = next(iter(self._files))
                del self._files[oldest]
        return self._files[shard]

    def _row_group(self, shard: int, group: int) -> np.ndarray:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._file(shard).read_row_group(group, columns=["input_ids"])
        column = table.column("input_ids").combine_chunks()
        flat = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        rows = flat.reshape(len(column), -1)
        if rows.shape[1] != self.seq_len + 1:
            raise ValueError(f"shard {self.shards[shard].uri}: windows hold {rows.shape[1]} tokens, expected "
                             f"seq_len + 1 = {self.seq_len + 1}")
        self.row_groups_read += 1
        self._cache[key] = rows
        self._cached_bytes += rows.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        self.peak_cached_bytes = max(self.peak_cached_bytes, self._cached_bytes)
        return rows

    def read(self, shard: int, row: int) -> np.ndarray:
        self._file(shard)
        starts = self._row_group_starts[shard]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        return self._row_group(shard, group)[row - starts[group]]


class DeterministicSampler:
    """Maps (step, data-parallel rank, micro-batch) to rows; see the module docstring. ``dp_size`` ranks
    read different rows of each global batch; ranks that share a data-parallel index (the stages of one
    pipeline) read the same rows."""

    def __init__(self, shards: list[ShardRef], seed: int, global_batch: int, dp_size: int, dp_rank: int,
                 micro_batch: int, shuffle_shards: int = 8):
        if global_batch % (dp_size * micro_batch):
            raise ValueError(f"global batch {global_batch} is not a multiple of the data-parallel size {dp_size} "
                             f"x micro-batch {micro_batch}")
        self.shards = shards
        self.seed = seed
        self.global_batch = global_batch
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.micro_batch = micro_batch
        self.shuffle_shards = max(1, shuffle_shards)
        self.total_rows = sum(s.rows for s in shards)
        if self.total_rows == 0:
            raise ValueError("the shards hold no rows")
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._row_perm_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.dp_size * self.micro_batch)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order and the cumulative row offsets of the shard blocks in that order."""
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.shards))
            block_rows = [sum(self.shards[i].rows for i in order[b:b + self.shuffle_shards])
                          for b in range(0, len(order), self.shuffle_shards)]
            self._epoch_cache = {epoch: (order, np.cumsum([0] + block_rows))}  # one epoch at a time
        return self._epoch_cache[epoch]

    def _block_permutation(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A block's shards, their cumulative row offsets, and the joint permutation of their rows."""
        key = (epoch, block)
        if key not in self._row_perm_cache:
            if len(self._row_perm_cache) >= 2:
                self._row_perm_cache.pop(next(iter(self._row_perm_cache)))
            order, _ = self._epoch_order(epoch)
            shards = order[block * self.shuffle_shards:(block + 1) * self.shuffle_shards]
            offsets = np.cumsum([0] + [self.shards[i].rows for i in shards])
            rng = np.random.default_rng([self.seed, epoch, block, 2])
            self._row_perm_cache[key] = (shards, offsets, rng.permutation(int(offsets[-1])))
        return self._row_perm_cache[key]

    def locate(self, global_position: int) -> tuple[int, int]:
        """(shard, row) of a position in the endless global order."""
        epoch, position = divmod(global_position, self.total_rows)
        _, block_offsets = self._epoch_order(epoch)
        block = int(np.searchsorted(block_offsets, position, side="right") - 1)
        shards, offsets, permutation = self._block_permutation(epoch, block)
        index = int(permutation[position - block_offsets[block]])
        slot = int(np.searchsorted(offsets, index, side="right") - 1)
        return int(shards[slot]), index - int(offsets[slot])

    def positions(self, step: int, micro: int) -> range:
        per_rank = self.global_batch // self.dp_size
        start = step * self.global_batch + self.dp_rank * per_rank + micro * self.micro_batch
        return range(start, start + self.micro_batch)


class TrainBatches:
    """Batches of (inputs, targets) for a rank: the sampler plus the reader."""

    def __init__(self, sampler: DeterministicSampler, reader: WindowReader):
        self.sampler = sampler
        self.reader = reader

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for pos in self.sampler.positions(step, micro):
            shard, row = self.sampler.locate(pos)
            rows.append(self.reader.read(shard, row))
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        return ids[:, :-1], ids[:, 1:]


def eval_batches(reader: WindowReader, num_batches: int, micro_batch: int, dp_size: int, dp_rank: int,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set for the in-loop validation: ``num_batches`` micro-batches a rank of windows
    drawn uniformly from the whole validation split with ``seed`` (the same every evaluation, never the
    split's first rows), in order, split over data-parallel ranks; the whole split when it is smaller."""
    total = sum(s.rows for s in reader.shards)
    rows_needed = min(total, num_batches * micro_batch * dp_size)
    per_rank = rows_needed // dp_size
    if per_rank == 0:
        return []
    chosen = (np.arange(total) if rows_needed >= total
              else np.sort(np.random.default_rng(seed).choice(total, size=rows_needed, replace=False)))
    positions = [int(p) for p in chosen[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
    offsets = np.cumsum([0] + [s.rows for s in reader.shards])
    rows = []
    for pos in positions:
        shard = int(np.searchsorted(offsets, pos, side="right") - 1)
        rows.append(reader.read(shard, pos - int(offsets[shard])))
    ids = torch.from_numpy(np.stack(rows).astype(np.int64))
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in ids.split(micro_batch)]
