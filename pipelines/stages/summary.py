"""The data stages' outputs read together: the summary ``k2pipe data`` prints after the DAG's data slice."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines import storage
from pipelines.data.packed import ShardManifest
from pipelines.stages.ingest import IngestOutput
from pipelines.stages.tokenizer import TokenizerOutput


@dataclass(frozen=True)
class DataOutputs:
    ingest: IngestOutput
    tokenizer: TokenizerOutput
    shards: ShardManifest

    @classmethod
    def of(cls, stage_outputs: dict[str, object]) -> DataOutputs:
        """From a pipeline run's ``stage_outputs`` (``pipelines.dag.PipelineResult``)."""
        return cls(stage_outputs["ingest"], stage_outputs["tokenizer"], stage_outputs["shard"])

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
