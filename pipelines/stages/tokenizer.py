"""Tokenizer stage: train a byte-level BPE on the train split, or adopt a given ``tokenizer.json``.

- Byte-level BPE (HF ``tokenizers``): GPT-2 pre-tokenisation regex, the 256 byte symbols as the initial
  alphabet (every string is encodable, no unknown token), no normaliser (ingest already applied NFC), so
  ``decode(encode(text)) == text``.
- Special tokens at fixed ids: ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2. Documents are packed as
  ``<bos> tokens <eos>``; pad is reserved (packed windows need no padding). Literal special-token strings
  inside a document are encoded as ordinary text (``encode_special_tokens``), so a corpus cannot inject them.
- ``data.vocab_size`` counts every token, special ones included. When the sample is too small to learn
  enough merges, the vocabulary is filled up with ``<|reserved_N|>`` special tokens (counted in the
  manifest) so the ids always cover exactly ``[0, vocab_size)``.
- Training sample: up to ``data.tokenizer_sample_bytes`` of train documents, taken at an even stride over
  the whole split (every k-th document, exact integer arithmetic), so it is deterministic and spread over
  all sources rather than the first files.

Output (``<root>/stages/tokenizer/<fingerprint>/``): ``tokenizer.json`` and ``_COMPLETE.json`` holding its
sha256, the special-token ids, the vocabulary size and how it was made. ``load_tokenizer`` is how the other
stages (shard, training, evaluation, export) open it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import MIN_TOKENIZER_VOCAB, DataConfig
from pipelines.stages.cache import cached_stage
from pipelines.stages.ingest import IngestOutput
from pipelines.storage import DataError

TOKENIZER_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
NUM_BYTE_SYMBOLS = 256
assert NUM_BYTE_SYMBOLS + len(SPECIAL_TOKENS) == MIN_TOKENIZER_VOCAB, "data.vocab_size's lower bound (pipelines.config)"


def one_thread_per_process() -> None:
    """Make HF tokenizers use a single thread in this process (call before the first encode)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


class TextTokenizer:
    """A loaded tokenizer with the ids the pipeline relies on."""

    def __init__(self, json_text: str, sha256: str, source: str = "<memory>"):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(json_text)
        except Exception as e:  # noqa: BLE001 - the Rust error says what is wrong with the file
            reason = " ".join(str(e).split())[:300]
            raise DataError(f"{source}: not a valid tokenizer.json ({reason})") from None
        ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DataError(f"{source}: the tokenizer lacks the special tokens {missing}; the pipeline needs "
                            f"{list(SPECIAL_TOKENS)} (train one by leaving data.tokenizer unset)")
        self.tokenizer.encode_special_tokens = True
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.sha256 = sha256
        self.source = source

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """``<bos> ids <eos>`` for each text, concatenated in order, as one int32 array."""
        encoded = self.encode_batch(texts)
        out = np.empty(sum(map(len, encoded)) + 2 * len(encoded), dtype=np.int32)
        pos = 0
        for ids in encoded:
            out[pos] = self.bos_id
            out[pos + 1:pos + 1 + len(ids)] = ids
            pos += len(ids) + 2
            out[pos - 1] = self.eos_id
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(uri: str) -> TextTokenizer:
    """Open a tokenizer from a tokenizer stage folder or a ``tokenizer.json`` path/URI."""
    path = uri if uri.endswith(".json") else storage.join(uri, TOKENIZER_FILE)
    raw = storage.read_bytes(path)
    return TextTokenizer(raw.decode("utf-8"), storage.sha256_bytes(raw), source=storage.normalize_uri(path))


@dataclass(frozen=True)
class TokenizerOutput:
    uri: str
    """Stage folder (holds tokenizer.json)."""
    fingerprint: str
    sha256: str
    """sha256 of tokenizer.json's bytes."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    source: str
    """``trained`` or the URI of the adopted tokenizer.json."""
    num_reserved: int = 0
    """``<|reserved_N|>`` tokens added because training learned fewer merges than the vocabulary allows."""
    sample_documents: int = 0
    sample_bytes: int = 0
    elapsed_s: float = 0.0
    reused: bool = False

    @property
    def path(self) -> str:
        return storage.join(self.uri, TOKENIZER_FILE)

    def load(self) -> TextTokenizer:
        return load_tokenizer(self.uri)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("uri")
        d.pop("reused")
        d.update(stage="tokenizer", version=TOKENIZER_VERSION, file=TOKENIZER_FILE,
                 special_tokens={BOS: self.bos_id, EOS: self.eos_id, PAD: self.pad_id})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str, reused: bool = False) -> TokenizerOutput:
        names = {f.name for f in dataclasses.fields(cls)} - {"uri", "reused"}
        return cls(uri=uri, reused=reused, **{k: v for k, v in d.items() if k in names})


def sample_texts(ingest: IngestOutput, sample_bytes: int) -> Iterator[str]:
    """Train documents at an even stride over the split, about ``sample_bytes`` of UTF-8 in all."""
    total = ingest.stats.bytes["train"]
    # Keep document i when floor((i + 1) * r) > floor(i * r), r = sample_bytes / total (at most 1).
    numerator, denominator = min(sample_bytes, total), max(total, 1)
    index = taken = 0
    for uri in ingest.files("train"):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column(0).to_pylist():
                    if ((index + 1) * numerator) // denominator > (index * numerator) // denominator:
                        yield text
                        taken += len(text.encode("utf-8"))
                        if taken >= sample_bytes:
                            return
                    index += 1


def train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[Any, int]:
    """A byte-level BPE with exactly ``vocab_size`` tokens; returns it and the number of reserved fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    learned = tokenizer.get_vocab_size(with_added_tokens=True)
    num_reserved = vocab_size - learned
    if num_reserved > 0:
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(num_reserved)])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size, "the BPE trainer overshot"
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]
    return tokenizer, max(num_reserved, 0)


def run_tokenizer(data: DataConfig, ingest: IngestOutput | None, storage_root: str,
                  force: bool = False) -> TokenizerOutput:
    """Train (on ``ingest``'s train split) or adopt (``data.tokenizer``) the tokenizer; reuse a complete
    earlier run with the same inputs."""
    data.check_for_data_stages()
    t0 = time.perf_counter()
    given: bytes | None = None
    if data.tokenizer is not None:
        given = storage.read_bytes(data.tokenizer)
        inputs: dict[str, Any] = {"given_sha256": storage.sha256_bytes(given)}
    else:
        if ingest is None:
            raise ValueError("run_tokenizer needs the ingest output to train a tokenizer")
        inputs = {"ingest": ingest.fingerprint, "sample_bytes": data.tokenizer_sample_bytes}
    fp = storage.fingerprint({"stage": "tokenizer", "version": TOKENIZER_VERSION,
                              "vocab_size": data.vocab_size, **inputs})
    stage_uri = storage.stage_dir(storage_root, "tokenizer", fp)

    def build(stage_uri: str) -> tuple[TokenizerOutput, dict[str, Any]]:
        if given is not None:
            source = storage.normalize_uri(data.tokenizer)
            try:
                text = given.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{source} (data.tokenizer): not UTF-8 text; expected a HF tokenizer.json"
                                ) from None
            tok = TextTokenizer(text, storage.sha256_bytes(given), source=source)
            if tok.vocab_size != data.vocab_size:
                raise DataError(f"{tok.source}: the tokenizer has {tok.vocab_size} tokens but data.vocab_size="
                                f"{data.vocab_size}; set data.vocab_size (and model.vocab_size) to "
                                f"{tok.vocab_size}")
            raw, source, num_reserved, num_docs, num_bytes = given, tok.source, 0, 0, 0
        else:
            sampled = {"docs": 0, "bytes": 0}

            def counted() -> Iterator[str]:
                for text in sample_texts(ingest, data.tokenizer_sample_bytes):
                    sampled["docs"] += 1
                    sampled["bytes"] += len(text.encode("utf-8"))
                    yield text

            trained, num_reserved = train_bpe(counted(), data.vocab_size)
            raw = trained.to_str(pretty=False).encode("utf-8")
            source, num_docs, num_bytes = "trained", sampled["docs"], sampled["bytes"]
            tok = TextTokenizer(raw.decode("utf-8"), storage.sha256_bytes(raw))
        storage.write_bytes(storage.join(stage_uri, TOKENIZER_FILE), raw)
        out = TokenizerOutput(uri=stage_uri, fingerprint=fp, sha256=tok.sha256, vocab_size=tok.vocab_size,
                              bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, source=source,
                              num_reserved=num_reserved, sample_documents=num_docs, sample_bytes=num_bytes,
                              elapsed_s=round(time.perf_counter() - t0, 3))
        return out, out.to_dict()

    return cached_stage(stage_uri, build,
                        lambda record: TokenizerOutput.from_dict(record, stage_uri, reused=True), force=force)
