"""The data stages end to end on small corpora the tests write themselves: exact round trip from shards
back to documents, determinism across worker counts, reuse and resume, S3, and every kind of bad input
under both ``on_bad_record`` policies."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
import sysconfig
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import zstandard

from pipelines import storage
from pipelines.config import ConfigError, load_config
from pipelines.dag import run_pipeline
from pipelines.data.packed import iter_windows, read_manifest, read_windows
from pipelines.stages import ingest as ingest_stage
from pipelines.stages import pack as shard_stage
from pipelines.stages import readers
from pipelines.stages.ingest import run_ingest
from pipelines.stages.summary import DataOutputs, format_summary
from pipelines.stages.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer, run_tokenizer, train_bpe
from pipelines.storage import DataError

VOCAB = 300
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light "
         "shadow forest ocean quiet rapid north south").split()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    # The S3 server first: the stage tasks the DAG starts read the S3 settings from their environment.
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def run_data_stages(cfg) -> DataOutputs:
    """The DAG's data slice, as ``k2pipe data`` runs it (each stage a Ray task)."""
    return DataOutputs.of(run_pipeline(cfg, until="shard").stage_outputs)


def stage_functions_in_process(cfg) -> DataOutputs:
    """The three stage functions called here, one after another: the units the DAG runs (this skips the
    stage tasks' start-up; the DAG's own runs are ``test_complete_stages_are_reused`` and the S3 test)."""
    ingest = run_ingest(cfg.data, cfg.storage.root)
    tokenizer = run_tokenizer(cfg.data, ingest, cfg.storage.root)
    return DataOutputs(ingest, tokenizer, shard_stage.run_shard(cfg.data, ingest, tokenizer, cfg.storage.root))


def make_doc(rng: random.Random, i: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(20, 70))]
    if i == 5:  # special-token strings in a document are text, never control tokens
        words.insert(3, "<|eos|> <|bos|> <|pad|>")
    return f"doc {i}: " + " ".join(words) + ".\n"


def write_corpus(root: str) -> None:
    """A corpus in every supported format, with a duplicate, a short and an empty document, NFD text and
    NUL characters. ``root`` is a local folder or an s3:// prefix."""
    rng = random.Random(0)
    docs = [make_doc(rng, i) for i in range(64)]
    nfd = "caf" + "e\u0301" + " cr" + "e\u0300" + "me " + docs[0]
    storage.write_bytes(storage.join(root, "a/one.txt"), nfd.encode())
    storage.write_bytes(storage.join(root, "a/two.txt"), ("with\x00nul " + docs[1]).encode())
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[2:16])]
    lines += [json.dumps({"text": unicodedata.normalize("NFC", nfd)}), json.dumps({"text": "tiny"}),
              "", json.dumps({"text": "   \n  "})]
    storage.write_bytes(storage.join(root, "b/docs.jsonl"), ("\n".join(lines) + "\n").encode())
    gz = "".join(json.dumps({"text": d}) + "\n" for d in docs[16:30]).encode()
    storage.write_bytes(storage.join(root, "b/more.jsonl.gz"), gzip.compress(gz, mtime=0))
    zst = "".join(json.dumps({"text": d}) + "\r\n" for d in docs[30:44]).encode()
    storage.write_bytes(storage.join(root, "c/z.jsonl.zst"), zstandard.ZstdCompressor().compress(zst))
    table = pa.table({"text": docs[44:64], "n": list(range(20))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=7)
    storage.write_bytes(storage.join(root, "d/table.parquet"), sink.getvalue().to_pybytes())
    storage.write_bytes(storage.join(root, "d/README.md"), b"not a corpus file")


def expected_documents() -> list[str]:
    """The kept documents in (source, index) order, computed without the pipeline."""
    rng = random.Random(0)
    docs = [make_doc(rng, i) for i in range(64)]
    first = unicodedata.normalize("NFC", "caf" + "e\u0301" + " cr" + "e\u0300" + "me " + docs[0])
    return [first, "withnul " + docs[1]] + docs[2:64]


def run_config(corpus: str, root: str, **overrides):
    flat = {"data.corpus": corpus, "storage.root": root, "data.vocab_size": VOCAB, "model.vocab_size": VOCAB,
            "data.seq_len": 32, "data.windows_per_shard": 16, "data.val_fraction": 0.2,
            "data.tokenizer_sample_bytes": 100_000, "data.num_workers": 2, "tracking.enabled": False,
            # Several row groups per part, so the shard stage gets several work units from a tiny corpus.
            "data.row_group_docs": 6}
    flat.update(overrides)
    return load_config(None, flat)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local")
    corpus = str(base / "corpus")
    write_corpus(corpus)
    cfg = run_config(corpus, str(base / "root"))
    return cfg, stage_functions_in_process(cfg)


def shard_bytes(manifest) -> dict[str, list[bytes]]:
    return {split: [storage.read_bytes(manifest.shard_uri(split, i)) for i in range(len(s.shards))]
            for split, s in manifest.splits.items()}


def split_documents(out) -> dict[str, list[str]]:
    return {split: [t for uri in out.ingest.files(split) for t in pq.read_table(
        uri, columns=["text"]).column(0).to_pylist()] for split in ("train", "val")}


def test_ingest_cleans_dedups_and_orders(local_run):
    _, out = local_run
    st = out.ingest.stats
    assert st.files_listed == 7 and st.files_read == 6
    assert st.duplicates == 1 and st.dropped == {"empty": 1, "too_short": 1}
    assert st.skipped == {"unsupported_type": 1}
    assert out.ingest.skipped_inputs[0]["uri"].endswith("d/README.md")
    assert st.records_read == 64 + 3
    rows = [r for uri in out.ingest.files("train") + out.ingest.files("val")
            for r in pq.read_table(uri).to_pylist()]
    kept = sorted(rows, key=lambda r: (r["source"], r["index"]))
    assert [r["text"] for r in kept] == expected_documents()
    for split in ("train", "val"):
        part = [(r["source"], r["index"])
                for uri in out.ingest.files(split) for r in pq.read_table(uri).to_pylist()]
        assert part == sorted(part)
    assert st.documents["val"] > 0 and st.documents["train"] > st.documents["val"]
    assert st.bytes["train"] + st.bytes["val"] == sum(len(t.encode()) for t in expected_documents())
    assert (kept[0]["source"], kept[0]["index"]) == ("a/one.txt", 0)
    assert (kept[-1]["source"], kept[-1]["index"]) == ("d/table.parquet", 19)
    assert out.ingest.parts["train"][0].num_row_groups > 2


def test_shards_round_trip_to_documents(local_run):
    cfg, out = local_run
    man = out.shards
    tok = load_tokenizer(out.tokenizer.uri)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS_ID, EOS_ID, PAD_ID, VOCAB)
    assert man.window_len == cfg.data.seq_len + 1 and man.tokenizer_sha256 == out.tokenizer.sha256
    docs = split_documents(out)
    for split in ("train", "val"):
        info = man.splits[split]
        files = [pq.ParquetFile(man.shard_uri(split, i)) for i in range(len(info.shards))]
        for f in files:  # one plain list<int32> column, no extension type
            assert f.schema_arrow.names == ["input_ids"]
            column_type = f.schema_arrow.field("input_ids").type
            assert type(column_type) is pa.ListType and column_type.value_type == pa.int32()
        assert [f.metadata.num_rows for f in files] == [s.num_rows for s in info.shards]
        assert all(s.num_rows == cfg.data.windows_per_shard for s in info.shards[:-1])
        windows = read_windows(man, split)
        assert windows.shape == (info.num_windows, man.window_len) and windows.dtype == np.int32
        assert windows.min() >= 0 and windows.max() < VOCAB
        expected = tok.encode_documents(docs[split])
        assert info.num_documents == len(docs[split])
        assert info.num_tokens + info.dropped_tokens == expected.size
        assert 0 <= info.dropped_tokens < man.window_len
        np.testing.assert_array_equal(windows.reshape(-1), expected[:info.num_tokens])
        # Decoding the stream gives the documents back, in order, each ended by <eos>.
        stream = windows.reshape(-1).tolist()
        assert PAD_ID not in stream
        ends = [i for i, t in enumerate(stream) if t == EOS_ID]
        decoded, start = [], 0
        for end in ends:
            assert stream[start] == BOS_ID
            decoded.append(tok.decode(stream[start + 1:end]))
            start = end + 1
        assert decoded == docs[split][:len(decoded)]
        assert len(decoded) >= len(docs[split]) - 1  # at most the last document lost its tail
        for i, s in enumerate(info.shards):
            assert storage.sha256_bytes(storage.read_bytes(man.shard_uri(split, i))) == s.sha256


def test_manifest_reads_back_and_partial_reads(local_run):
    _, out = local_run
    man = read_manifest(out.shards.uri)
    assert man == out.shards and man.schema_version == 1
    assert man.skipped_inputs == out.ingest.skipped_inputs
    assert man.skipped_inputs[0]["reason"] == "unsupported_type"
    assert "d/README.md: unsupported_type" in format_summary(out)
    payload = storage.read_complete(man.uri)
    assert payload["splits"]["train"]["shards"][0]["path"] == "train/shard-00000.parquet"
    full = read_windows(man, "train")
    n = len(full)
    for start, stop in [(0, 1), (5, 21), (15, 17), (n - 3, n), (7, 7)]:
        np.testing.assert_array_equal(read_windows(man, "train", start, stop), full[start:stop])
    pieces = list(iter_windows(man, "train", 10, 40, verify=True))
    np.testing.assert_array_equal(np.concatenate(pieces), full[10:40])
    with pytest.raises(DataError, match="no split"):
        read_windows(man, "test")
    with pytest.raises(DataError, match="_COMPLETE"):
        read_manifest(storage.join(man.uri, "..", "missing"))


def test_special_token_text_is_not_injected(local_run):
    _, out = local_run
    tok = load_tokenizer(out.tokenizer.uri)
    ids = tok.encode("look: <|eos|> and <|bos|>")
    assert EOS_ID not in ids and BOS_ID not in ids
    assert tok.decode(ids) == "look: <|eos|> and <|bos|>"


def test_deterministic_across_worker_counts(local_run, tmp_path):
    cfg, out = local_run
    one = run_config(cfg.data.corpus, str(tmp_path / "root1"), **{"data.num_workers": 1})
    man1 = shard_stage.run_shard(one.data, out.ingest, out.tokenizer, one.storage.root)
    assert man1.fingerprint == out.shards.fingerprint and man1.config_hash == out.shards.config_hash
    assert (man1.stats["num_workers"], out.shards.stats["num_workers"]) == (1, 2)
    assert {s: [x.sha256 for x in v.shards] for s, v in man1.splits.items()} == \
        {s: [x.sha256 for x in v.shards] for s, v in out.shards.splits.items()}
    assert shard_bytes(man1) == shard_bytes(out.shards)


def test_complete_stages_are_reused(local_run):
    cfg, out = local_run
    again = run_data_stages(cfg)
    assert again.ingest.reused and again.tokenizer.reused and again.shards.reused
    assert again.shards == dataclasses.replace(out.shards, reused=True)
    assert again.ingest == dataclasses.replace(out.ingest, reused=True)


def test_partial_stage_output_is_wiped_and_redone(local_run):
    cfg, out = local_run
    before = shard_bytes(out.shards)
    # A killed shard run: files written, no _COMPLETE.json, plus a stray file the next run never writes.
    stage = out.shards.uri
    storage.delete_dir(storage.join(stage, storage.COMPLETE_MARKER))
    storage.write_bytes(storage.join(stage, "train/shard-00000.parquet"), b"half a shard")
    storage.write_bytes(storage.join(stage, "train/shard-09999.parquet"), b"stale")
    man = shard_stage.run_shard(cfg.data, out.ingest, out.tokenizer, cfg.storage.root)
    assert not man.reused and not storage.exists(storage.join(stage, "train/shard-09999.parquet"))
    assert shard_bytes(man) == before and storage.is_complete(stage)
    # An ingest folder without its marker is not trusted either.
    storage.delete_dir(storage.join(out.ingest.uri, storage.COMPLETE_MARKER))
    storage.write_bytes(storage.join(out.ingest.uri, "train/part-00007.parquet"), b"junk")
    ing = run_ingest(cfg.data, cfg.storage.root)
    assert not ing.reused and ing == dataclasses.replace(out.ingest, stats=ing.stats)
    assert storage.list_files(storage.join(ing.uri, "train")) == ing.files("train")


def test_s3_end_to_end(local_run, s3_bucket):
    cfg, out = local_run
    corpus = f"s3://{s3_bucket}/corpus"
    write_corpus(corpus)
    c = run_config(corpus, f"s3://{s3_bucket}/k2", **{"data.num_workers": 1})
    s3 = run_data_stages(c)
    assert s3.shards.uri.startswith(f"s3://{s3_bucket}/k2/stages/shard/")
    assert s3.ingest.stats.documents == out.ingest.stats.documents
    assert shard_bytes(s3.shards) == shard_bytes(out.shards)  # same documents, same bytes
    man = read_manifest(s3.shards.uri)
    np.testing.assert_array_equal(read_windows(man, "val"), read_windows(out.shards, "val"))
    assert run_data_stages(c).shards.reused


def test_ray_data_reads_and_writes_through_storage_options(s3_bucket):
    uri = f"s3://{s3_bucket}/raydata"
    _, path = storage.resolve(uri)
    ray.data.from_items([{"x": i} for i in range(10)]).write_parquet(path, **storage.storage_options(uri))
    files = storage.list_files(uri, (".parquet",))
    assert files and sorted(x for f in files for x in pq.read_table(
        storage.resolve(f)[1], filesystem=storage.filesystem(f)).column("x").to_pylist()) == list(range(10))
    assert ray.data.read_parquet(path, **storage.storage_options(uri)).count() == 10


# --- bad input -----------------------------------------------------------------------------------------

def write_bad_corpus(root: str) -> dict[str, str]:
    """Good documents plus one file for each kind of bad input; returns name -> path."""
    rng = random.Random(1)
    paths = {}

    def put(name: str, data: bytes) -> None:
        paths[name] = storage.join(root, name)
        storage.write_bytes(paths[name], data)

    put("good.jsonl", "".join(json.dumps({"text": make_doc(rng, i)}) + "\n" for i in range(12)).encode())
    put("latin1.txt", "caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e and more".encode("latin-1"))
    put("mixed.jsonl", (json.dumps({"text": make_doc(rng, 100)}) + "\n").encode()
        + b'{"text": "bad \xff byte"}\n'
        + b"{not json}\n" + b'["a list"]\n' + b'{"body": "no text field"}\n' + b'{"text": 42}\n'
        + b'{"text": "lone \\ud800 surrogate here"}\n')
    put("empty.txt", b"")
    lines = [json.dumps({"text": make_doc(rng, 200 + i) + rng.randbytes(200).hex()}) for i in range(40)]
    full = gzip.compress("".join(line + "\n" for line in lines).encode(), mtime=0)
    put("truncated.jsonl.gz", full[:len(full) // 2])
    put("corrupt.parquet", b"PAR1" + rng.randbytes(300) + b"PAR1")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": ["no text column here, only a body"] * 3}), sink)
    put("notext.parquet", sink.getvalue().to_pybytes())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [make_doc(rng, 300), "y" * 1_000_001, None]}), sink)
    put("wide.parquet", sink.getvalue().to_pybytes())
    put("big.txt", b"z" * 1_000_001)
    return paths


def write_huge_line(path: str, num_bytes: int) -> None:
    """One JSON line of ``num_bytes`` followed by a good line, written in chunks."""
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(num_bytes // len(chunk)):
            f.write(chunk)
        after = json.dumps({"text": "a normal line after the huge one, long enough"})
        f.write(b'"}\n' + after.encode() + b"\n")


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    corpus = str(base / "corpus")
    paths = write_bad_corpus(corpus)
    paths["huge.jsonl"] = storage.join(corpus, "huge.jsonl")
    write_huge_line(paths["huge.jsonl"], 100 << 20)
    yield corpus, paths, base
    os.remove(paths["huge.jsonl"])  # pytest keeps recent temporary folders; do not leave 100 MB behind


def test_bad_inputs_are_counted_and_listed_with_skip(bad_corpus):
    corpus, paths, base = bad_corpus
    cfg = run_config(corpus, str(base / "skip-root"), **{"data.on_bad_record": "skip"})
    out = run_ingest(cfg.data, cfg.storage.root)
    st = out.stats
    assert st.skipped == {"invalid_utf8": 3, "invalid_json": 1, "not_an_object": 1, "missing_field": 3,
                          "not_a_string": 1, "empty_file": 1, "unreadable": 2, "too_large": 3}
    by_file: dict[str, set[str]] = {}
    for s in out.skipped_inputs:
        by_file.setdefault(s["uri"].rsplit("/", 1)[-1], set()).add(s["reason"])
    assert by_file == {"latin1.txt": {"invalid_utf8"}, "empty.txt": {"empty_file"},
                       "mixed.jsonl": {"invalid_utf8", "invalid_json", "not_an_object", "missing_field",
                                       "not_a_string"},
                       "truncated.jsonl.gz": {"unreadable"}, "corrupt.parquet": {"unreadable"},
                       "notext.parquet": {"missing_field"}, "huge.jsonl": {"too_large"},
                       "wide.parquet": {"too_large", "missing_field"}, "big.txt": {"too_large"}}
    assert {(s["index"], s["reason"]) for s in out.skipped_inputs if s["uri"].endswith("wide.parquet")} == \
        {(1, "too_large"), (2, "missing_field")}
    huge = next(s for s in out.skipped_inputs if s["uri"].endswith("huge.jsonl"))
    assert huge["index"] == 0 and str((100 << 20) + len('{"text": ""}')) in huge["detail"]
    trunc = next(s for s in out.skipped_inputs if s["uri"].endswith("truncated.jsonl.gz"))
    assert "Truncated" in trunc["detail"] or "truncated" in trunc["detail"]
    # The good documents survive: 12 + 1 (mixed) + 1 (after the huge line) + 1 (wide) + the readable part of
    # the truncated .gz.
    kept = sum(st.documents.values())
    assert 15 <= kept < 15 + 40 and storage.is_complete(out.uri)
    assert st.records_read >= kept + 8


@pytest.mark.parametrize("name, message", [
    ("latin1.txt", r"latin1\.txt: invalid utf8: invalid UTF-8 at byte 3"),
    ("mixed.jsonl", r"mixed\.jsonl: line 2: invalid utf8"),
    ("truncated.jsonl.gz", r"truncated\.jsonl\.gz: unreadable: .*[Tt]runcated"),
    ("corrupt.parquet", r"corrupt\.parquet: unreadable: "),
    ("notext.parquet", r"notext\.parquet: missing field: no column 'text'"),
    ("huge.jsonl", r"huge\.jsonl: line 1: too large: line of 104857612 bytes exceeds data.max_doc_bytes"),
    ("big.txt", r"big\.txt: too large: file of 1000001 bytes exceeds data.max_doc_bytes=1000000"),
    ("wide.parquet", r"wide\.parquet: row 1: too large: value of 1000001 bytes"),
])
def test_bad_inputs_fail_naming_the_file(bad_corpus, tmp_path, name, message):
    corpus, paths, base = bad_corpus
    single = str(tmp_path / "corpus")
    good = storage.read_bytes(paths["good.jsonl"])
    storage.write_bytes(storage.join(single, "a-good.jsonl"), good)
    if name == "huge.jsonl":
        write_huge_line(storage.join(single, name), 100 << 20)
    else:
        storage.write_bytes(storage.join(single, name), storage.read_bytes(paths[name]))
    cfg = run_config(single, str(tmp_path / "root"), **{"data.on_bad_record": "fail"})
    try:
        with pytest.raises(DataError, match=message) as err:
            run_ingest(cfg.data, cfg.storage.root)
    finally:
        os.remove(storage.join(single, name))
    assert "on_bad_record" in str(err.value)
    stages = storage.join(cfg.storage.root, "stages", "ingest")
    assert not storage.exists(stages) or not storage.list_files(stages, (storage.COMPLETE_MARKER,))


def test_empty_files_and_short_documents_never_fail(tmp_path):
    corpus = str(tmp_path / "corpus")
    storage.write_bytes(storage.join(corpus, "empty.txt"), b"")
    storage.write_bytes(storage.join(corpus, "ok.txt"), make_doc(random.Random(3), 0).encode())
    cfg = run_config(corpus, str(tmp_path / "root"),
                     **{"data.on_bad_record": "fail", "data.val_fraction": 0.0})
    out = run_ingest(cfg.data, cfg.storage.root)
    assert out.stats.skipped == {"empty_file": 1} and out.stats.documents == {"train": 1, "val": 0}


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_empty_corpus_is_an_error_naming_it(tmp_path, policy):
    corpus = str(tmp_path / "corpus")
    storage.write_bytes(storage.join(corpus, "short.txt"), b"hi")
    storage.write_bytes(storage.join(corpus, "blank.jsonl"), b'{"text": "   "}\n')
    storage.write_bytes(storage.join(corpus, "empty.txt"), b"")
    cfg = run_config(corpus, str(tmp_path / "root"), **{"data.on_bad_record": policy})
    with pytest.raises(DataError, match=re.escape(f"corpus {corpus}: no documents left")):
        run_ingest(cfg.data, cfg.storage.root)
    assert not storage.exists(storage.join(cfg.storage.root, "stages", "ingest"))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    cfg = run_config(str(empty_dir), str(tmp_path / "root"), **{"data.on_bad_record": policy})
    with pytest.raises(DataError, match=re.escape(f"corpus {empty_dir}: no input files")):
        run_ingest(cfg.data, cfg.storage.root)
    cfg = run_config(str(tmp_path / "missing"), str(tmp_path / "root"))
    with pytest.raises(DataError, match="missing: no such file or folder"):
        run_ingest(cfg.data, cfg.storage.root)


def test_max_docs_takes_the_first_documents_in_order(local_run, tmp_path):
    cfg, out = local_run
    c = run_config(cfg.data.corpus, str(tmp_path / "root"), **{"data.max_docs": 10})
    ing = run_ingest(c.data, c.storage.root)
    assert sum(ing.stats.documents.values()) == 10 and ing.stats.stopped_at_max_docs
    got = sorted((r for uri in ing.files("train") + ing.files("val") for r in pq.read_table(uri).to_pylist()),
                 key=lambda r: (r["source"], r["index"]))
    assert [r["text"] for r in got] == expected_documents()[:10]


def test_default_corpus_is_the_standard_library():
    from pipelines.config import DataConfig

    corpus, files = ingest_stage.list_corpus(DataConfig())
    assert corpus == storage.normalize_uri(sysconfig.get_paths()["stdlib"]) and len(files) > 300
    sources = [f.source for f in files]
    assert "json/decoder.py" in sources and sources == sorted(sources)
    assert not any(part in ("test", "tests", "site-packages") for s in sources for part in s.split("/"))


# --- tokenizer -------------------------------------------------------------------------------------------

def test_tokenizer_vocab_is_exact_and_training_deterministic():
    texts = [make_doc(random.Random(5), i) for i in range(30)]
    a, reserved_a = train_bpe(iter(texts), 400)
    b, reserved_b = train_bpe(iter(texts), 400)
    assert a.to_str() == b.to_str() and reserved_a == reserved_b
    assert a.get_vocab_size(with_added_tokens=True) == 400
    assert reserved_a > 0  # too little text for 400 - 259 merges: filled with reserved tokens
    assert a.token_to_id("<|reserved_0|>") is not None


def test_given_tokenizer_is_checked(local_run, tmp_path):
    _, out = local_run
    corpus = out.ingest.corpus
    c = run_config(corpus, str(tmp_path / "root"), **{"data.tokenizer": out.tokenizer.path})
    adopted = run_tokenizer(c.data, None, c.storage.root)
    assert adopted.sha256 == out.tokenizer.sha256 and adopted.source == out.tokenizer.path
    assert storage.read_bytes(adopted.path) == storage.read_bytes(out.tokenizer.path)
    wrong = run_config(corpus, str(tmp_path / "root"), **{"data.tokenizer": out.tokenizer.path,
                                                          "data.vocab_size": 512, "model.vocab_size": 512})
    with pytest.raises(DataError, match=re.escape(f"{out.tokenizer.path}: the tokenizer has {VOCAB} tokens "
                                                  "but data.vocab_size=512")):
        run_tokenizer(wrong.data, None, wrong.storage.root)
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"not": "a tokenizer"}')
    c = run_config(corpus, str(tmp_path / "root"), **{"data.tokenizer": str(bogus)})
    with pytest.raises(DataError, match="bogus.json: not a valid tokenizer.json"):
        run_tokenizer(c.data, None, c.storage.root)


@pytest.mark.parametrize("key, value, message", [
    ("vocab_size", 100, "at least 259"),
    ("on_bad_record", "ignore", "expected one of"),
    ("val_fraction", 1.0, r"\[0, 1\)"),
    ("seq_len", 0, "seq_len=0"),
    ("num_workers", 0, "num_workers=0"),
    ("max_docs", 0, "max_docs=0"),
    ("windows_per_shard", 0, "windows_per_shard=0"),
    ("max_doc_bytes", 0, "max_doc_bytes=0"),
])
def test_config_errors_before_any_work(key, value, message):
    from pipelines.config import DataConfig

    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(DataConfig(), **{key: value}).check_for_data_stages()


def test_line_reader_matches_split_for_any_chunking(monkeypatch):
    """The bounded line reader agrees with bytes.split for any chunk size, flagging lines over the limit."""
    import io

    class Stream:
        def __init__(self, data: bytes, chunk: int):
            self.buffer, self.chunk = io.BytesIO(data), chunk

        def read(self, _size: int) -> bytes:
            return self.buffer.read(self.chunk)

    reader = readers.FileReader(None, "text", 0, 10)
    rng = random.Random(0)
    for _ in range(500):
        lines = [bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 25)))
                 for _ in range(rng.randint(0, 8))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        chunk = rng.randint(1, 12)
        monkeypatch.setattr(readers, "READ_CHUNK_BYTES", chunk)
        expected = data.split(b"\n")
        if expected[-1] == b"":
            expected.pop()
        assert list(reader._lines(Stream(data, chunk))) == [
            (i, line if len(line) <= 10 else None, len(line)) for i, line in enumerate(expected)]
