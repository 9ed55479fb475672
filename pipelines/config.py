"""The run configuration: one typed object with the sections ``model``, ``optimizer``, ``data``, ``train``,
``storage``, ``tracking``, ``evaluate`` and ``export``, built from a named run config or YAML file plus dotted
``--set`` overrides.

Resolution order (later wins): the section defaults; the YAML file (``configs/<name>.yaml`` for a bare
name such as ``ci`` or ``demo``); the overrides. ``model.preset`` picks the model's base fields and any
other ``model.*`` key overrides one of them. Every key and value is checked here, before any stage or
cluster time is spent; errors name the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from k2model.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    RopeScaling,
    field_checker,
    preset_config,
)
from k2model.layers import RECOMPUTE_MODES

CONFIG_DIR = Path(__file__).parent / "configs"
BAD_RECORD_POLICIES = ("skip", "fail")
SCHEDULES = ("wsd", "cosine", "constant")
PARAM_DTYPES = ("float32", "bfloat16")
MIN_TOKENIZER_VOCAB = 256 + 3
"""The smallest vocabulary of the byte-level BPE tokenizer: 256 byte symbols and 3 special tokens."""

__all__ = ["ConfigError", "DataConfig", "EvaluateConfig", "ExportConfig", "RunConfig", "StorageConfig",
           "TrackingConfig", "TrainConfig",
           "config_from_dict", "load_config"]


@dataclass(frozen=True)
class DataConfig:
    corpus: str | None = None
    """Folder or ``s3://`` prefix of .txt/.jsonl(.gz/.zst)/.parquet files; None: the Python standard
    library's own sources (present on every machine)."""
    text_field: str = "text"
    """Field holding the document text in .jsonl and .parquet files."""
    on_bad_record: str = "skip"
    """``skip`` (count and list bad inputs) or ``fail`` (stop with an error naming the file)."""
    max_docs: int | None = None
    """Use at most this many documents (in a deterministic order); None: all."""
    min_doc_chars: int = 16
    """Documents shorter than this after normalisation are dropped."""
    max_doc_bytes: int = 1_000_000
    """Documents (or lines) larger than this are skipped or rejected before parsing."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by content hash."""
    seq_len: int = 256
    """Training sequence length; shards hold windows of seq_len + 1 tokens."""
    vocab_size: int = 4096
    """Tokenizer vocabulary (special tokens included); must equal model.vocab_size."""
    tokenizer: str | None = None
    """Path or URI of an existing tokenizer.json; None trains one."""
    tokenizer_sample_bytes: int = 20_000_000
    """Bytes of training text sampled to train the tokenizer."""
    windows_per_shard: int = 2048
    """Rows (windows) per parquet shard."""
    num_workers: int = 2
    """Tokenizer actors in the Ray Data pool."""
    row_group_docs: int = 1024
    """Documents per parquet row group of the ingest output: the shard stage's unit of work (smaller
    groups spread tokenization over more actors; the shards' content does not change)."""

    def __post_init__(self) -> None:
        need = field_checker("data", self)
        need(self.on_bad_record in BAD_RECORD_POLICIES, "on_bad_record", f"expected one of {list(BAD_RECORD_POLICIES)}")
        need(self.max_docs is None or self.max_docs >= 1, "max_docs",
             "expected a positive integer or null (all documents)")
        need(self.min_doc_chars >= 0, "min_doc_chars", "expected >= 0")
        need(self.max_doc_bytes >= 1, "max_doc_bytes", "expected >= 1")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "expected a number in [0, 1)")
        need(bool(self.text_field), "text_field", "empty: name the field holding the text, e.g. 'text'")
        need(self.seq_len >= 2, "seq_len", "expected >= 2")
        need(self.vocab_size >= 8, "vocab_size", "expected >= 8")
        need(self.tokenizer is not None or self.tokenizer_sample_bytes >= 1, "tokenizer_sample_bytes",
             "expected >= 1")
        need(self.windows_per_shard >= 1, "windows_per_shard", "expected >= 1")
        need(self.num_workers >= 1, "num_workers", "expected >= 1")
        need(self.row_group_docs >= 1, "row_group_docs", "expected >= 1")
        need(self.windows_per_shard * (self.seq_len + 1) < 2**31, "windows_per_shard",
             f"windows_per_shard * (seq_len + 1) = {self.windows_per_shard * (self.seq_len + 1)} tokens per "
             "shard exceeds 2**31")

    def check_for_data_stages(self) -> None:
        """What matters only when the data stages run (training on given shards needs none of it): a BPE
        trained here needs ``MIN_TOKENIZER_VOCAB`` tokens."""
        if self.tokenizer is None:
            field_checker("data", self)(self.vocab_size >= MIN_TOKENIZER_VOCAB, "vocab_size",
                                   f"a byte-level BPE needs at least {MIN_TOKENIZER_VOCAB} tokens "
                                   "(256 bytes + 3 special tokens)")


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 1
    """Ray Train workers (one process each). A range ``MIN-MAX`` (or ``[MIN, MAX]``) sets ``min_workers`` too."""
    min_workers: int | None = None
    """With it, the worker group is elastic: Ray Train runs it with any size from ``min_workers`` to
    ``num_workers`` as nodes come and go (a lost node shrinks it, a returning one grows it back), and each
    start resumes the latest checkpoint resharded. At a size below ``num_workers`` the expert-parallel degree is
    the largest divisor of ``ep`` that divides the data-parallel degree, and the global batch stays the same
    (more micro-batches a worker), so the run follows the same math to float rounding. Every size in the range
    must be a valid layout. None: a fixed group of ``num_workers``."""
    preemption_check_every: int = 1
    """Steps between asks whether a node of the run is about to be taken (Ray's node drain: a spot preemption
    notice); on the first notice the run checkpoints at once, and checkpoints the last step that fits before
    the deadline. 0: never ask. Ray Train's ask is a barrier over the workers (about 5 ms on an idle 2-core
    machine, ``benchmarks/results/preemption_cost.md``) and its watcher polls drains every 5 s: where steps
    take well under a second, ask every few steps."""
    elastic_resize_check_s: float = 60.0
    """Elastic groups: seconds between Ray Train's checks for room to grow the group while it is healthy."""
    ep: int = 1
    """Expert-parallel degree; must divide the data-parallel degree (num_workers / pp) and
    model.num_experts."""
    pp: int = 1
    """Pipeline-parallel degree: stages of consecutive layers, each on num_workers / pp ranks (1F1B)."""
    pp_layers: tuple[int, ...] | None = None
    """Layers of each pipeline stage (pp counts summing to model.num_layers); None balances the stages by
    their estimated time, FLOPs and memory traffic (``k2model.pipeline.stage_cut``)."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward."""
    recompute: str = "none"
    """What the backward recomputes instead of keeping: ``none``; ``selective`` (norms, SwiGLU activations with
    their down projections, the MoE gating sum: little compute, much memory); ``full`` (each decoder layer
    from its input: about one more forward). The gradients are the same."""
    device_memory_gb: float | None = None
    """Memory of one training GPU, GB (10^9 bytes): when set, a layout that cannot fit in it (``k2pipe
    plan``'s arithmetic, most loaded GPU, reserve included) is refused when the config is loaded, naming
    the smallest change that would fit. Unset, nothing is assumed; on a cluster each worker checks the GPU
    it finds before its first step either way."""
    offload_optimizer: bool = False
    """Keep the optimizer state and fp32 masters in host memory (pinned) and move each piece to the GPU only
    while the step updates it: device memory for host memory and PCIe traffic (``k2pipe plan`` prices it)."""
    param_dtype: str = "float32"
    """dtype of the parameters the forward and backward use: ``float32``, or ``bfloat16`` (K2's recipe) with
    fp32 gradient accumulation and an fp32 master copy of each parameter, sharded with the optimizer state
    (ZeRO-1). Changes the math: a checkpoint resumes only under the same value."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all workers; a multiple of micro_batch_size times the
    data-parallel degree (num_workers / pp), and at least pp micro-batches per worker under a pipeline."""
    lr: float = 3e-3
    """Peak learning rate (Muon and AdamW share it through update-RMS matching)."""
    schedule: str = "wsd"
    """``wsd`` (warmup-stable-decay, K2), ``cosine`` or ``constant`` (after warmup)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    decay_fraction: float = 0.3
    """wsd: share of the steps spent in the final cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (K2: 2e-5 / 2e-4)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    checkpoint_every: int = 50
    """Steps between checkpoints; 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage."""
    max_failures: int = 3
    """Worker-group restarts Ray Train may make."""
    threads_per_worker: int = 1
    """torch threads per worker (CPU results depend on it)."""
    seed: int = 0
    """Seed of the weight init and the data order."""
    shuffle_shards: int = 8
    """Shards whose rows are shuffled together (more mixes better; the reader's cache bounds memory)."""
    fault_injection: str | None = None
    """``rank:step``: crash that rank once when it reaches that step (tests only)."""
    nan_injection: str | None = None
    """``rank:step[:count]``: make that rank's loss NaN at ``count`` steps from ``step``, each step once
    per process (tests of the non-finite-step handling only)."""
    log_every: int = 10
    """Steps between metric logs."""
    stats_every: int = 100
    """Steps between snapshots of the per-head max logits and per-expert loads (arrays and heatmaps as
    artifacts of the pretrain run, ``stats/``); 0: only at the end. The metrics carry per-layer aggregates
    every ``log_every`` steps."""
    eval_every: int = 50
    """Steps between validation losses; 0: only at the end."""
    eval_batches: int = 4
    """Micro-batches per validation."""
    max_bad_steps: int = 3
    """Non-finite steps in a row before restoring the latest checkpoint."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each Ray Train worker reserves (fractions keep a 2-core machine from deadlocking)."""
    worker_resources: tuple[str, ...] = ()
    """Custom Ray resources each Ray Train worker reserves besides its CPUs and GPU, as ``name:amount``
    (``train.worker_resources=k2node:1``): with one unit of a resource on each node, every worker lands on a
    node of its own, so a lost node takes exactly the workers on it."""
    deterministic: bool = False
    """Deterministic kernels only (``torch.use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG``, NCCL's
    ring algorithm): on GPUs a killed-and-resumed run is then bit-equal to an uninterrupted one, at some
    speed. Off, CUDA's atomic ``index_add``/``scatter_add`` sum in varying order, so a resumed GPU run
    matches only to rounding; CPU runs are deterministic either way."""
    collective_timeout_s: float = 600.0
    """Seconds a collective waits for every rank of its group before it fails, naming the call (a rank
    that died or took another path), instead of hanging the job."""
    min_step_s: float = 0.0
    """A floor on each step's wall time, in seconds (0: none). For fault drills: a fault timed at step N
    then lands mid-run however fast the machine trains."""

    def __post_init__(self) -> None:
        need = field_checker("train", self)
        need(self.param_dtype in PARAM_DTYPES, "param_dtype", f"expected one of {list(PARAM_DTYPES)}")
        need(self.recompute in RECOMPUTE_MODES, "recompute", f"expected one of {list(RECOMPUTE_MODES)}")
        need(self.device_memory_gb is None or self.device_memory_gb > 0, "device_memory_gb",
             "expected a positive number of GB, or null")
        for name in ("num_workers", "ep", "pp", "steps", "micro_batch_size", "global_batch_size", "threads_per_worker",
                     "eval_batches", "shuffle_shards", "keep_checkpoints", "log_every", "max_bad_steps"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("checkpoint_every", "eval_every", "stats_every", "max_failures", "warmup_steps",
                     "preemption_check_every"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        need(self.elastic_resize_check_s > 0, "elastic_resize_check_s", "must be > 0 (seconds)")
        if self.min_workers is not None:
            need(1 <= self.min_workers <= self.num_workers, "min_workers",
                 f"expected 1 to train.num_workers={self.num_workers}")
            for world in range(self.min_workers, self.num_workers):
                try:
                    self.at_world(world)
                except ConfigError as e:
                    raise ConfigError(f"train.num_workers={self.min_workers}-{self.num_workers}: an elastic group "
                                      f"may run with {world} workers, and then {e}") from None
        for item in self.worker_resources:
            name, _, amount = item.partition(":")
            need(re.fullmatch(r"[A-Za-z_][\w.\-/]*", name) is not None and name not in ("CPU", "GPU", "memory")
                 and re.fullmatch(r"\d+(\.\d+)?", amount) is not None and float(amount) > 0, "worker_resources",
                 f"{item!r}: expected name:amount with a custom resource name (CPUs come from "
                 "train.cpus_per_worker, GPUs from the cluster) and an amount > 0, e.g. k2node:1")
        need(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 (seconds)")
        need(self.min_step_s >= 0, "min_step_s", "must be >= 0 (seconds; 0 for no floor)")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.num_workers % self.pp == 0, "pp", f"must divide train.num_workers={self.num_workers}")
        dp = self.num_workers // self.pp
        where = f"train.num_workers={self.num_workers}" if self.pp == 1 else (
            f"the data-parallel degree train.num_workers / train.pp = {dp}")
        need(dp % self.ep == 0, "ep", f"must divide {where}")
        per_step = self.micro_batch_size * dp
        need(self.global_batch_size % per_step == 0, "global_batch_size",
             f"must be a multiple of train.micro_batch_size * {'train.num_workers' if self.pp == 1 else 'dp'}"
             f" = {per_step}")
        micro = self.global_batch_size // per_step
        need(micro >= self.pp, "global_batch_size",
             f"gives {micro} micro-batches a step per worker, fewer than the train.pp={self.pp} stages that 1F1B "
             f"needs: at least {self.pp * per_step}")
        need(self.nan_injection is None or re.fullmatch(r"\d+:\d+(:\d+)?", self.nan_injection) is not None,
             "nan_injection", "expected 'rank:step' or 'rank:step:count'")
        need(self.fault_injection is None or re.fullmatch(r"\d+:\d+", self.fault_injection) is not None,
             "fault_injection", "expected 'rank:step', e.g. '1:20'")
        from k2model.schedule import validate_schedule

        try:
            validate_schedule(self.steps, self.schedule, self.warmup_steps, self.decay_fraction, self.min_lr_ratio)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def worker_counts(self) -> tuple[int, int]:
        """(fewest, most) workers the group runs with: equal for a fixed group."""
        return (self.num_workers if self.min_workers is None else self.min_workers, self.num_workers)

    def at_world(self, world: int) -> TrainConfig:
        """This config as run by ``world`` workers of an elastic group: the expert-parallel degree is the
        largest divisor of ``ep`` that divides the data-parallel degree; everything else is kept."""
        ep = math.gcd(self.ep, max(world // self.pp, 1))
        return dataclasses.replace(self, num_workers=world, ep=ep, min_workers=None)

    @property
    def worker_resource_map(self) -> dict[str, float]:
        """``worker_resources`` as Ray's ``{name: amount}``."""
        return {name: float(amount) for name, _, amount in (r.partition(":") for r in self.worker_resources)}


@dataclass(frozen=True)
class StorageConfig:
    root: str = "./k2runs"
    """Local folder or ``s3://bucket/prefix``; stages under ``stages/``, runs under ``runs/``."""

    def __post_init__(self) -> None:
        field_checker("storage", self)(bool(self.root and self.root.strip()), "root",
                                  "empty: give a local folder or s3://bucket/prefix")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; None: a local sqlite store in the working directory."""
    experiment: str = "k2pipe"
    """MLflow experiment name."""
    enabled: bool = True
    """Log to MLflow at all."""

    def __post_init__(self) -> None:
        field_checker("tracking", self)(bool(self.experiment), "experiment", "empty: name the MLflow experiment")


@dataclass(frozen=True)
class EvaluateConfig:
    max_tokens: int = 0
    """Tokens of the held-out split the evaluate stage measures: 0 for all of it; otherwise a sample of
    ``max_tokens // data.seq_len`` windows (at least one) drawn uniformly from the whole split with ``seed``
    (never its first rows)."""
    seed: int = 0
    """Seed of that sample."""
    batch_size: int = 8
    """Windows per forward."""
    prompts: tuple[str, ...] = ("def ", "import ", "class ", "    return ")
    """Prompts whose greedy continuations the report shows."""
    sample_tokens: int = 32
    """Tokens generated per prompt (fewer if ``<eos>`` comes first)."""

    def __post_init__(self) -> None:
        need = field_checker("evaluate", self)
        need(self.max_tokens >= 0, "max_tokens", "must be >= 0 (0: the whole held-out split)")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.sample_tokens >= 0, "sample_tokens", "must be >= 0")


@dataclass(frozen=True)
class ExportConfig:
    max_shard_bytes: int = 5 * 10**9
    """Largest safetensors file, bytes of tensor data (transformers' own default, 5 GB); a larger model is
    split into ``model-0000k-of-0000n.safetensors`` files with an index."""
    register: bool = True
    """Register each new export as a model version in MLflow's model registry."""
    registered_model: str | None = None
    """Registered model name; None: ``<tracking.experiment>-<model.preset>`` (``custom`` without a preset)."""

    def __post_init__(self) -> None:
        need = field_checker("export", self)
        need(self.max_shard_bytes > 0, "max_shard_bytes", "must be > 0")
        need(self.registered_model is None or bool(self.registered_model.strip()), "registered_model",
             "empty: give a name or leave it unset")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: preset_config("tiny"))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    name: str | None = None
    """Run name; None derives one from the config."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to plain values (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.model.preset or 'custom'}-{config_hash(self.to_dict())[:8]}"

    def validate(self) -> None:
        """Checks across sections (each section checks its own fields when it is built)."""
        m, d, t = self.model, self.data, self.train
        if m.vocab_size != d.vocab_size:
            raise ConfigError(f"model.vocab_size={m.vocab_size} differs from data.vocab_size={d.vocab_size}: "
                              "the tokenizer's vocabulary must equal the model's")
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if m.num_experts % t.ep:
            raise ConfigError(f"train.ep={t.ep} must divide model.num_experts={m.num_experts}")
        if t.pp > 1 or t.pp_layers is not None:
            from k2model.pipeline import partition_layers

            try:
                partition_layers(m, t.pp, d.seq_len, t.pp_layers)
            except ValueError as e:
                raise ConfigError(str(e)) from None


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "optimizer": OptimizerConfig, "data": DataConfig, "train": TrainConfig,
    "storage": StorageConfig, "tracking": TrackingConfig, "evaluate": EvaluateConfig, "export": ExportConfig,
}


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or say what would be valid."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}={value!r}: invalid value")
    if annotation is RopeScaling:
        if isinstance(value, str):
            value = _yaml_value(key, value)
        if isinstance(value, RopeScaling):
            return value
        if isinstance(value, dict):
            fields = _section_fields(RopeScaling)
            unknown = sorted(str(k) for k in value if k not in fields)
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: not a YaRN field; valid: {', '.join(fields)}")
            return RopeScaling(**{k: _coerce(f"{key}.{k}", v, fields[k]) for k, v in value.items()})
        raise ConfigError(f"{key}={value!r}: expected a mapping of YaRN fields")
    if origin is tuple:
        if isinstance(value, str) and value.strip().startswith("["):
            value = _yaml_value(key, value)
        elif isinstance(value, str):
            value = [v for v in (x.strip() for x in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        item = args[0] if args else str
        return tuple(_coerce(key, v, item) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(f)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return f
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    return value


def _yaml_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw!r}: not a valid YAML value") from None


def _section_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.steps=200", "model.preset=tiny"]`` to a dict of dotted keys and raw string values; the
    values are converted to each field's declared type by ``build_config`` (so ``1:20`` stays a string
    where a string is expected, instead of YAML's base-60 integer)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=200")
        key, raw = item.split("=", 1)
        out[key.strip()] = raw
    return out


def resolve_config_path(config: str | None) -> Path | None:
    """A YAML path, or the name of a bundled run config (``ci``, ``demo``)."""
    if config is None:
        return None
    p = Path(config)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {config!r} does not exist")
        return p
    bundled = CONFIG_DIR / f"{config}.yaml"
    if bundled.exists():
        return bundled
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {config!r} is neither a YAML file nor a bundled config; bundled: {names}")


def _flatten_yaml(doc: Any, source: str) -> dict[str, Any]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(doc).__name__}")
    flat: dict[str, Any] = {}
    for section, body in doc.items():
        if section == "name":
            flat["name"] = body
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; valid: {sorted(SECTIONS)} and 'name'")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: Path) -> Any:
    """A config or sweep file's YAML, or a ConfigError naming the file: unreadable, not UTF-8 text, not valid
    YAML, or a key given twice."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # so that a mark says the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def load_config(config: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                run_name: str | None = None, *, vocab_from_model: bool = False) -> RunConfig:
    """Build and validate a RunConfig. ``config`` is a YAML path or a bundled name; ``overrides`` are
    ``section.key=value`` strings (or an already-parsed dict of dotted keys). ``vocab_from_model``: unless
    ``data.vocab_size`` is given, it is the model's (``k2pipe plan`` of a preset: no tokenizer is trained)."""
    flat: dict[str, Any] = {}
    path = resolve_config_path(config)
    if path is not None:
        flat.update(_flatten_yaml(read_yaml_file(path), str(path)))
    flat.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if run_name is not None:
        flat["name"] = run_name
    cfg = build_config(flat, vocab_from_model=vocab_from_model and "data.vocab_size" not in flat)
    if cfg.train.device_memory_gb is not None:
        gb = cfg.train.device_memory_gb
        check_device_memory(cfg, gb * 1e9, f"train.device_memory_gb={gb}")
    return cfg


def check_device_memory(cfg: RunConfig, memory_bytes: float, where: str, device_type: str = "cuda") -> None:
    """Refuse the run's layout when its most loaded GPU needs more than ``memory_bytes`` (``k2model.plan``:
    the arithmetic of ``k2pipe plan``), naming what it needs, why, and the smallest change that fits."""
    from dataclasses import replace

    from k2model.plan import HARDWARE, Job, Layout, PlanError, plan_layout

    t = cfg.train
    job = Job(cfg.model, cfg.optimizer, cfg.data.seq_len, t.global_batch_size)
    layout = Layout(t.num_workers, t.pp, t.ep, t.micro_batch_size, t.recompute, t.param_dtype, t.offload_optimizer,
                    t.pp_layers)
    # Only the GPU's memory is known here: the node size is left out of it (and the host's memory too).
    hardware = replace(HARDWARE["h100"], name=where, memory_gb=memory_bytes / 1e9, gpus_per_node=t.num_workers,
                       host_memory_gb=float("inf"))
    try:
        plan = plan_layout(job, layout, hardware, device_type=device_type)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    if plan.fits:
        return
    worst = plan.worst
    change = plan.smallest_change
    advice = (f"smallest change that fits: {change['change']} ({' '.join('--set ' + s for s in change['set'])})"
              if change else "no single change found fits; see k2pipe plan")
    raise ConfigError(f"{where}: this layout needs {plan.total / 1e9:,.1f} GB on its most loaded GPU (stage "
                      f"{worst.stage}, rank {worst.rank}; reserve included) of {memory_bytes / 1e9:,.1f} GB: "
                      f"{plan.why()}. {advice}")


def _worker_range(flat: dict[str, Any]) -> dict[str, Any]:
    """``train.num_workers`` given as a range (``1-2``, ``[1, 2]``) becomes ``min_workers`` and ``num_workers``."""
    value = flat.get("train.num_workers")
    if isinstance(value, str):
        text = value.strip()
        if m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", text):
            value = [int(m[1]), int(m[2])]
        elif text.startswith(("[", "(")):
            value = _yaml_value("train.num_workers", text.replace("(", "[").replace(")", "]"))
    if not isinstance(value, (list, tuple)):
        return flat
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"train.num_workers={value!r}: expected a count or a range MIN-MAX of two counts, e.g. 1-2")
    low, high = value
    if low > high:
        raise ConfigError(f"train.num_workers={low}-{high}: the range's first count must not exceed its second")
    if "train.min_workers" in flat:
        raise ConfigError("train.num_workers is a range and train.min_workers is set too: give one of them")
    return {**flat, "train.num_workers": high, "train.min_workers": None if low == high else low}


def build_config(flat: dict[str, Any], *, vocab_from_model: bool = False) -> RunConfig:
    flat = _worker_range(flat)
    by_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    name = flat.get("name")
    for key, value in flat.items():
        if key == "name":
            continue
        section, _, field_name = key.partition(".")
        if section not in SECTIONS or not field_name:
            raise ConfigError(f"unknown config key {key!r}; keys look like section.field with section one of "
                             f"{sorted(SECTIONS)}")
        by_section[section][field_name] = value

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        fields = _section_fields(cls)
        values = by_section[section]
        if section == "model":
            preset = values.pop("preset", "tiny")
            if preset is not None and preset not in PRESETS:
                raise ConfigError(f"model.preset={preset!r}: unknown preset; valid: {sorted(PRESETS)}")
            base = dict(PRESETS[preset], preset=preset) if preset else {}
        else:
            base = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown config key '{section}.{key}'; valid keys in {section}: "
                                 f"{sorted(fields)}")
            base[key] = _coerce(f"{section}.{key}", value, fields[key])
        try:
            built[section] = cls(**base)
        except TypeError as e:
            raise ConfigError(f"section {section!r}: {e}") from None
    if vocab_from_model:
        built["data"] = dataclasses.replace(built["data"], vocab_size=built["model"].vocab_size)
    cfg = RunConfig(name=str(name) if name else None, **built)
    cfg.validate()
    return cfg


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of ``RunConfig.to_dict`` (used to ship a config to Ray workers as plain data)."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        for key, value in (d.get(section) or {}).items():
            flat[f"{section}.{key}"] = value
    if d.get("name"):
        flat["name"] = d["name"]
    return build_config(flat)
