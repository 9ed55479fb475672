"""The data stages joined: ingest -> tokenizer -> shard, and the reader training uses.

``run_data_stages(cfg)`` runs the three stages (each reuses a complete earlier output with the same
fingerprint: the hash of its upstream fingerprints and its own config fields) and prints a summary.

The packed-shard format (the contract between data and training)
-----------------------------------------------------------------
A shard stage folder ``<storage.root>/stages/shard/<fingerprint>/`` holds::

    train/shard-00000.parquet ...   val/shard-00000.parquet ...   _COMPLETE.json (the manifest)

Each shard is a parquet file with ONE column ``input_ids: list<int32>`` (plain Arrow list, not null);
every row is a window of exactly ``window_len = seq_len + 1`` token ids in ``[0, vocab_size)``: inputs are
``row[:-1]``, targets ``row[1:]``. Rows are in corpus order; documents are ``<bos> ids <eos>`` packed back to
back, so a window may start mid-document and span several. Every shard holds ``windows_per_shard`` rows
except the last of a split. Parquet row groups hold 256 rows (the unit of a partial read).

``_COMPLETE.json`` is written last; a folder without it is partial and must not be read. Its fields::

    schema_version      1 (bumped on any change to this format)
    stage               "shard"
    fingerprint         16 hex: the folder name
    config_hash         sha256 of the data settings that shape the content (all data.* but num_workers)
    tokenizer_sha256    sha256 of the tokenizer.json the ids come from
    seq_len, window_len, vocab_size, bos_id, eos_id, pad_id, column ("input_ids"), dtype ("int32")
    splits: {"train"|"val": {num_documents, num_windows, num_tokens (= num_windows * window_len),
                             dropped_tokens (the final partial window), shards: [
                                 {path (relative to the folder), num_rows, sha256 (of the file), num_bytes}]}}
    skipped_inputs      [{uri, index (line/row or null), reason, detail}] (first 100; counts in ingest)
    inputs              {"ingest": stage URI, "tokenizer": stage URI}
    stats               {elapsed_s, tokens_per_s, startup_s (until the first actor starts encoding),
                         actor_busy_s (summed over actors), num_workers, num_units} (informational)

Read it with ``read_manifest(uri)``; read rows with ``iter_windows``/``read_windows`` (only the shards and
row groups that overlap the requested rows are fetched) or directly with pyarrow.
"""

from __future__ import annotations

import bisect
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import RunConfig
from pipelines.stages import ingest as ingest_stage
from pipelines.stages.ingest import IngestOutput, exit_on_data_error, run_ingest
from pipelines.stages.pack import ShardManifest, read_manifest, run_shard
from pipelines.stages.tokenizer import TokenizerOutput, load_tokenizer, run_tokenizer
from pipelines.storage import DataError

__all__ = ["DataError", "DataOutputs", "ShardManifest", "format_summary", "iter_windows",
           "load_tokenizer", "read_manifest", "read_windows", "run_data_stages"]


@dataclass(frozen=True)
class DataOutputs:
    ingest: IngestOutput
    tokenizer: TokenizerOutput
    shards: ShardManifest

    @property
    def manifest_uri(self) -> str:
        return self.shards.uri

    def summary(self) -> dict[str, object]:
        """The headline figures as plain data (for the command line and MLflow)."""
        st = self.ingest.stats
        return {
            "manifest": storage.join(self.shards.uri, storage.COMPLETE_MARKER),
            "corpus": self.ingest.corpus,
            "files_read": st.files_read, "documents_read": st.records_read, "documents_kept": st.documents,
            "dropped": st.dropped, "duplicates": st.duplicates, "skipped": st.skipped,
            "tokenizer": {"uri": self.tokenizer.uri, "sha256": self.tokenizer.sha256,
                          "vocab_size": self.tokenizer.vocab_size},
            "splits": {k: {"windows": v.num_windows, "tokens": v.num_tokens,
                           "dropped_tokens": v.dropped_tokens, "shards": len(v.shards)}
                       for k, v in self.shards.splits.items()},
            "reused": {"ingest": self.ingest.reused, "tokenizer": self.tokenizer.reused,
                       "shard": self.shards.reused},
        }


def run_data_stages(cfg: RunConfig, force: bool = False) -> DataOutputs:
    """Ingest, tokenizer and shard stages for ``cfg``; ``force`` recomputes all three."""
    root = cfg.storage.root
    ingest = run_ingest(cfg.data, root, force=force)
    tokenizer = run_tokenizer(cfg.data, ingest, root, force=force)
    shards = run_shard(cfg.data, ingest, tokenizer, root, force=force)
    outputs = DataOutputs(ingest, tokenizer, shards)
    print(format_summary(outputs))
    return outputs


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) or "none"


def format_summary(outputs: DataOutputs) -> str:
    ing, tok, man = outputs.ingest, outputs.tokenizer, outputs.shards
    st = ing.stats

    def timing(reused: bool, elapsed: float) -> str:
        return "reused" if reused else f"{elapsed:.1f} s"

    docs = sum(st.documents.values())
    lines = [
        f"data stages  corpus {ing.corpus}",
        f"  ingest     [{timing(ing.reused, st.elapsed_s)}] {st.files_read:,}/{st.files_listed:,} files, "
        f"{st.records_read:,} documents read ({st.bytes_read / 1e6:.1f} MB), kept {docs:,} "
        f"(train {st.documents['train']:,}, val {st.documents['val']:,})"
        + (f", {docs / st.elapsed_s:,.0f} docs/s" if not ing.reused and st.elapsed_s else "")
        + (" [stopped at data.max_docs]" if st.stopped_at_max_docs else ""),
        f"             dropped: {_counts(st.dropped)}; duplicates: {st.duplicates:,}; "
        f"skipped: {_counts(st.skipped)}",
        f"  tokenizer  [{timing(tok.reused, tok.elapsed_s)}] {tok.source}, {tok.vocab_size:,} tokens"
        + (f" ({tok.num_reserved} reserved fillers)" if tok.num_reserved else "")
        + (f", trained on {tok.sample_documents:,} documents ({tok.sample_bytes / 1e6:.1f} MB)"
           if tok.source == "trained" else "") + f", sha256 {tok.sha256[:12]}",
    ]
    total = sum(s.num_tokens for s in man.splits.values())
    shard_line = f"  shard      [{timing(man.reused, man.stats.get('elapsed_s', 0.0))}] {total:,} tokens"
    if not man.reused and man.stats.get("tokens_per_s"):
        shard_line += (f" at {man.stats['tokens_per_s']:,.0f} tokens/s with {man.stats['num_workers']} "
                       f"workers (start-up {man.stats.get('startup_s', 0.0):.1f} s)")
    lines.append(shard_line)
    for split, s in man.splits.items():
        lines.append(f"             {split:5s} {s.num_documents:,} docs -> {s.num_windows:,} windows of "
                     f"{man.window_len} ({s.num_tokens:,} tokens, {s.dropped_tokens:,} dropped) "
                     f"in {len(s.shards)} shards")
    for skip in ing.skipped_inputs[:5]:
        where = "" if skip["index"] is None else f" #{skip['index']}"
        lines.append(f"  skipped    {skip['uri']}{where}: {skip['reason']} ({skip['detail']})")
    if len(ing.skipped_inputs) > 5:
        lines.append(f"  skipped    ... {sum(st.skipped.values()) - 5:,} more (see {ing.uri}/_COMPLETE.json)")
    if man.splits["val"].num_windows == 0:
        lines.append("  warning    the validation split has no full window; evaluation will have no data")
    lines.append(f"  manifest   {man.uri}/{storage.COMPLETE_MARKER}")
    return "\n".join(lines)


def _as_windows(column: pa.ChunkedArray, window_len: int, uri: str) -> np.ndarray:
    lists = column.combine_chunks()
    values = lists.flatten().to_numpy()
    if values.size != len(lists) * window_len:
        raise DataError(f"{uri}: rows are not all {window_len} tokens long; not a shard of this manifest")
    return values.reshape(len(lists), window_len)


def iter_windows(manifest: ShardManifest, split: str, start: int = 0, stop: int | None = None,
                 verify: bool = False) -> Iterator[np.ndarray]:
    """Windows ``[start, stop)`` of a split, in order, as int32 arrays of shape (rows, window_len), one per
    parquet row group touched. Reads only the shards and row groups that overlap the range; ``verify``
    checks each touched shard's sha256 first (it then reads the whole shard)."""
    if split not in manifest.splits:
        raise DataError(f"{manifest.uri}: no split {split!r}; splits: {sorted(manifest.splits)}")
    shards = manifest.splits[split].shards
    total = manifest.splits[split].num_windows
    stop = total if stop is None else min(stop, total)
    if not 0 <= start <= total:
        raise ValueError(f"start={start} is outside the split's {total} windows")
    ends = np.cumsum([s.num_rows for s in shards]).tolist()
    i = bisect.bisect_right(ends, start)
    while start < stop and i < len(shards):
        shard_start = ends[i] - shards[i].num_rows
        uri = manifest.shard_uri(split, i)
        fs, path = storage.resolve(uri)
        if verify:
            data = storage.read_bytes(uri)
            if storage.sha256_bytes(data) != shards[i].sha256:
                raise DataError(f"{uri}: sha256 differs from the manifest; the shard is corrupt")
            source = pq.ParquetFile(io.BytesIO(data))
        else:
            source = pq.ParquetFile(fs.open_input_file(path))
        group_start = shard_start
        for g in range(source.metadata.num_row_groups):
            group_rows = source.metadata.row_group(g).num_rows
            group_stop = group_start + group_rows
            if group_stop > start and group_start < stop:
                table = source.read_row_group(g, columns=[manifest.column])
                lo, hi = max(start, group_start) - group_start, min(stop, group_stop) - group_start
                yield _as_windows(table.column(0).slice(lo, hi - lo), manifest.window_len, uri)
                start = group_start + hi
            group_start = group_stop
            if start >= stop:
                break
        i += 1


def read_windows(manifest: ShardManifest, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Windows ``[start, stop)`` of a split as one int32 array of shape (rows, window_len)."""
    parts = list(iter_windows(manifest, split, start, stop))
    if not parts:
        return np.empty((0, manifest.window_len), np.int32)
    return np.concatenate(parts)


@exit_on_data_error
def main(argv: list[str] | None = None) -> None:
    cfg, force = ingest_stage.stage_cli("Run the data stages: ingest, tokenizer, shard (pipelines/data/packed.py)",
                                        argv)
    outputs = run_data_stages(cfg, force=force)
    print(json.dumps(outputs.summary(), indent=2))


if __name__ == "__main__":
    main()
