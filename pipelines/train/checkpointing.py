"""Sharded, asynchronous, fault-tolerant checkpoints of the trainer.

Layout, inside the Ray Train run folder (``<storage>/runs/<run-name>/<run-name>-pretrain-<fp>/``)::

    checkpoint-step00000050/                    (a later start of the run adds ``-a<its start time, ms>``)
        rank-00000.shard  rank-00001.shard ...  one shard per rank (``pipelines.train.checkpoint_file``): its parameters
                                                (local experts included), its optimizer state, step, RNG
        meta.json                               written by rank 0: step, world size, ep, math signature

How a save works, and why a crash never leaves a trusted partial checkpoint:
1. ``start``: the loop stalls only to snapshot its state (tensors cloned to CPU memory).
2. A background thread serialises the snapshot and writes this rank's shard, retrying transient storage
   errors (throttling, dropped connections, a store that is down for a while) with exponential backoff.
3. ``poll_and_register`` (called every step; one tiny all-reduce while a save is pending): once every
   rank's upload finished, the ranks agree; if all succeeded, the folder is registered with the run's
   ``CheckpointRegistry`` (under Ray Train, ``ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)``,
   which keeps the last ``num_to_keep``). If any rank failed for good, the checkpoint is abandoned
   (reported in the log and metrics; the folder is deleted best-effort) and training goes on; the next
   checkpoint tries again.
A run resumes only from registered checkpoints, so a folder whose upload was cut short by a crash is
never trusted. In the layout that wrote it, each rank reads back only ``meta.json`` and its own shard.
In another layout (other worker count or ep), each rank reads every shard's index and, of the tensors,
exactly the bytes it keeps (``pipelines.train.reshard``).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from k2model.distributed import agree
from pipelines.console import say
from pipelines.storage import fsync_local
from pipelines.train import checkpoint_file

SHARD_NAME = "rank-{rank:05d}.shard"
META_NAME = "meta.json"
UPLOAD_ATTEMPTS = 3
FIRST_BACKOFF_S = 1.0


class CheckpointRegistry(Protocol):
    """Where a run's complete checkpoints are registered and found again. The trainer imports no Ray: the
    Ray Train worker entry implements this with ``ray.train.report`` (``pipelines.train.worker``), and
    ``LocalRegistry`` serves runs under plain ``torch.distributed``. Every rank calls ``register`` and
    ``report`` the same number of times (under Ray Train each is a barrier)."""

    def register(self, folder: str, metrics: dict[str, Any]) -> None:
        """``folder`` holds a complete checkpoint (every rank's shard and ``meta.json``)."""

    def report(self, metrics: dict[str, Any]) -> None:
        """Metrics without a checkpoint (a checkpoint was abandoned)."""

    def latest(self) -> str | None:
        """The folder of the latest checkpoint registered before this run started, or None."""

    max_settle_s: float
    """The longest a registration takes to settle when all is well (a preemption checkpoint's margin)."""

    def settle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every registration made so far is held where a restart finds it;
        True once it is, False on the timeout or where that cannot be told."""


class LocalRegistry:
    """A ``CheckpointRegistry`` without Ray: rank 0 writes ``latest_checkpoint.json`` (the folder of the
    newest registered checkpoint) into the run folder after each registration, so a restarted run finds
    it; older checkpoints beyond ``keep`` are deleted. ``registered`` holds the ``keep`` newest folders."""

    POINTER = "latest_checkpoint.json"
    max_settle_s = 0.0

    def __init__(self, fs: pafs.FileSystem, experiment_path: str, rank: int, keep: int = 2):
        self.fs, self.experiment_path, self.rank, self.keep = fs, experiment_path.rstrip("/"), rank, keep
        self.registered: list[str] = []

    def register(self, folder: str, metrics: dict[str, Any]) -> None:
        self.registered.append(folder)
        dropped, self.registered = self.registered[:-self.keep], self.registered[-self.keep:]
        if self.rank != 0:
            return
        _write_with_retry(self.fs, f"{self.experiment_path}/{self.POINTER}",
                          json.dumps({"folder": folder, "metrics": metrics}, default=str).encode(),
                          UPLOAD_ATTEMPTS, FIRST_BACKOFF_S)
        for old in dropped:
            try:
                self.fs.delete_dir(old)
            except OSError:
                pass  # already gone, or the store is down: it is no longer pointed to either way

    def report(self, metrics: dict[str, Any]) -> None:
        """Nothing to report to without Ray: the writer's ``abandoned`` list and the log hold it."""

    def settle(self, timeout_s: float) -> bool:
        """The pointer is written before ``register`` returns."""
        return True

    def latest(self) -> str | None:
        path = f"{self.experiment_path}/{self.POINTER}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())["folder"]


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-step{step:08d}"


def snapshot(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU (the only part of a save the training loop waits for)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def _write_with_retry(fs: pafs.FileSystem, path: str, data: bytes | Callable[[Any], Any], attempts: int,
                      backoff: float) -> None:
    """Write ``data`` (bytes, or a function that writes to the open stream) to ``path``, retrying with
    exponential backoff; every attempt writes the whole file again."""
    delay = backoff
    for attempt in range(attempts):
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data)
            if getattr(fs, "type_name", "") == "local":  # registered checkpoints must survive a power loss
                fsync_local(path)
            return
        except OSError as e:
            if attempt == attempts - 1:
                raise OSError(f"writing {path} failed after {attempts} attempts: {e}") from None
            time.sleep(delay)
            delay *= 2


class CheckpointWriter:
    """Saves this rank's shard in the background and registers a checkpoint with ``registry`` once every
    rank's shard has landed (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem, experiment_path: str, rank: int, signature: dict[str, Any],
                 world_size: int, ep: int, registry: CheckpointRegistry, attempts: int = UPLOAD_ATTEMPTS,
                 backoff_s: float = FIRST_BACKOFF_S, reshard: ReshardSpec | None = None, pp: int = 1):
        self.fs = fs
        self.registry = registry
        self.reshard = reshard
        self.experiment_path = experiment_path.rstrip("/")
        self.rank = rank
        self.signature = signature
        self.world_size = world_size
        self.ep = ep
        self.pp = pp
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: tuple[int, concurrent.futures.Future, dict[str, Any]] | None = None
        self.last_registered_path: str | None = None
        self.folder_suffix = ""
        """Added to this writer's folder names: a resumed start writes into folders no earlier start of the
        run wrote (``use_fresh_folders``)."""
        self.abandoned: list[int] = []
        self.stall_seconds: list[float] = []

    def path_for(self, step: int) -> str:
        return f"{self.experiment_path}/{checkpoint_dir_name(step)}{self.folder_suffix}"

    def earlier_start_wrote(self) -> bool:
        """Whether some earlier start of this run wrote a checkpoint folder here, registered or not (agreed
        over the ranks). A start that finds one must take fresh folder names even with no checkpoint to
        resume from: the earlier start may have been cut off before its first checkpoint was registered,
        and one of its workers may still be writing into a folder of the plain name."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.experiment_path, allow_not_found=True))
            found = int(any(i.base_name.startswith("checkpoint-step") for i in infos))
        except OSError:
            found = 1  # cannot tell: fresh names cost nothing
        return bool(agree(found, dist.ReduceOp.MAX, name="earlier checkpoint folders"))

    def use_fresh_folders(self) -> None:
        """From here on, write checkpoints into folders named for this start of the run (every rank takes the
        same name: the latest start time over the ranks, in ms). A worker of an earlier start that was cut off
        from the cluster but not from storage may still finish an upload it began; it then writes into its
        own, never registered folder, not into a checkpoint this start registers for the same step."""
        stamp = agree(time.time_ns() // 1_000_000, dist.ReduceOp.MAX, name="checkpoint folder names")
        self.folder_suffix = f"-a{stamp}"

    # ------------------------------------------------------------------ saving
    def start(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self._pending is not None:
            # One save in flight at a time: finish the previous one first (rare: slow storage).
            self._finish(wait=True)
        t0 = time.perf_counter()
        snap = snapshot(state)
        self.stall_seconds.append(time.perf_counter() - t0)
        folder = self.path_for(step)
        meta = {"step": step, "world_size": self.world_size, "ep": self.ep, "pp": self.pp,
                "signature": self.signature, "time": time.time()}
        future = self._pool.submit(self._upload, folder, snap, meta)
        self._pending = (step, future, metrics)

    def _upload(self, folder: str, snap: dict[str, Any], meta: dict[str, Any]) -> None:
        _write_with_retry(self.fs, f"{folder}/{SHARD_NAME.format(rank=self.rank)}",
                          lambda stream: checkpoint_file.write(stream, snap), self.attempts, self.backoff_s)
        if self.rank == 0:
            _write_with_retry(self.fs, f"{folder}/{META_NAME}", json.dumps(meta, default=str).encode(),
                              self.attempts, self.backoff_s)

    def checkpoint_now(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """A checkpoint of ``step``, registered before this returns (unless its upload failed for good):
        the one in flight when it is of this step, none when this step's is registered already."""
        if self._pending is not None and self._pending[0] != step:
            self._finish(wait=True)
        if self._pending is None and self.last_registered_path != self.path_for(step):
            self.start(step, state, metrics)
        if self._pending is not None:
            self._finish(wait=True)

    def poll_and_register(self, final: bool) -> None:
        if self._pending is None:
            return
        self._finish(wait=final)

    def _finish(self, wait: bool) -> None:
        step, future, metrics = self._pending
        if wait:
            concurrent.futures.wait([future])
        # Every rank makes the same decision, from one reduction: 0 this rank's upload is still running,
        # 1 it failed, 2 it landed; the MIN over ranks says whether all finished and whether all landed.
        error = future.exception() if future.done() else None
        verdict = agree(0 if not future.done() else 1 if error is not None else 2, dist.ReduceOp.MIN,
                        name="checkpoint uploads")
        if verdict == 0:
            return
        ok = verdict == 2
        self._pending = None
        folder = self.path_for(step)
        if ok:
            self.registry.register(folder, dict(metrics))
            self.last_registered_path = folder
        else:
            self.abandoned.append(step)
            if error is not None:
                say(f"[k2pipe] rank {self.rank}: checkpoint of step {step} abandoned: {error}")
            if self.rank == 0:
                try:
                    self.fs.delete_dir(folder)
                except OSError:
                    pass  # the store is still down; the folder was never registered, so it is never trusted
            # Keep report() calls equal on every rank even when no checkpoint is registered.
            self.registry.report({**metrics, "checkpoint_abandoned_step": step})

    def load_latest_registered(self) -> dict[str, Any] | None:
        """This rank's state from the newest checkpoint registered by this writer or, failing that, before
        the run started (its folder added as ``checkpoint_folder``); None when there is none."""
        folder = self.last_registered_path or self.registry.latest()
        if folder is None:
            return None
        state = load_rank_state(self.fs, folder, self.rank, self.signature, self.world_size, self.ep,
                                self.reshard, pp=self.pp)
        state["checkpoint_folder"] = folder
        return state


# ---------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ReshardSpec:
    """What a rank needs to load a checkpoint written in another layout."""

    num_experts: int
    """Routed experts per MoE layer (the rows of every expert stack, all ranks together)."""
    state_span: Callable[[str], tuple[int, int] | None]
    """The flat elements of a parameter (of the whole model) whose optimizer state this rank keeps, by name
    (``MuonClip.global_span``); None: none."""
    model_names: frozenset[str] | None = None
    """The state-dict names of this rank's model (its pipeline stage's); None: the whole model."""


def read_meta(fs: pafs.FileSystem, folder: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{folder}/{META_NAME}") as f:
        return json.loads(f.read().decode())


def check_compatible(meta: dict[str, Any], signature: dict[str, Any], where: str) -> None:
    saved = meta["signature"]
    differing = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {signature.get(k)!r}" for k in differing)
        raise ValueError(f"checkpoint {where} was written under a config that changes the math ({details}); "
                         "refusing to resume. Use another run name to start fresh.")


def _check_shards_present(fs: pafs.FileSystem, folder: str, world_size: int) -> None:
    """Every rank's shard is in ``folder``, or a ValueError that says what is there instead."""
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(folder))}
    missing = [SHARD_NAME.format(rank=k) for k in range(world_size) if SHARD_NAME.format(rank=k) not in names]
    if not missing:
        return
    older = sorted(n for n in names if n.startswith("rank-") and n.endswith(".pt"))
    hint = (f"it holds {', '.join(older[:3])}: shards of the torch.save format used before the indexed "
            "shard format, which cannot be resumed; start the run under another name" if older
            else f"it holds {sorted(names)}")
    raise ValueError(f"checkpoint {folder} lacks {', '.join(missing[:3])} (written by {world_size} workers); "
                     + hint)


def load_rank_state(fs: pafs.FileSystem, folder: str, rank: int, signature: dict[str, Any], world_size: int,
                    ep: int, reshard: ReshardSpec | None = None, *, pp: int = 1) -> dict[str, Any]:
    """This rank's state from the checkpoint in ``folder``. In the layout that wrote it: ``meta.json`` and
    this rank's shard only. In another layout (``world_size``, ``ep`` or ``pp`` differ): resharded
    (``pipelines.train.reshard``), which needs ``reshard``; without it the layout change is an error."""
    meta = read_meta(fs, folder)
    check_compatible(meta, signature, folder)
    if meta["world_size"] == world_size and meta["ep"] == ep and meta.get("pp", 1) == pp:
        _check_shards_present(fs, folder, meta["world_size"])
        path = f"{folder}/{SHARD_NAME.format(rank=rank)}"
        with fs.open_input_stream(path) as f:
            return checkpoint_file.decode(f.read(), path)
    if reshard is None:
        raise ValueError(f"checkpoint {folder} was written by {meta['world_size']} workers with "
                         f"ep={meta['ep']}; this run has {world_size} workers with ep={ep}, and this loader "
                         "cannot reshard")
    return read_resharded(fs, folder, meta, rank, world_size, ep, reshard, pp=pp)


def read_resharded(fs: pafs.FileSystem, folder: str, meta: dict[str, Any], rank: int, world_size: int, ep: int,
                   reshard: ReshardSpec, *, pp: int = 1) -> dict[str, Any]:
    """The state of ``rank`` in the layout (``world_size``, ``ep``, ``pp``) from the checkpoint in ``folder``,
    written in the layout ``meta`` names, with ``resharded_from`` added: the old layout and the bytes read
    from each old shard."""
    from pipelines.train.reshard import load_resharded

    _check_shards_present(fs, folder, meta["world_size"])
    readers = [checkpoint_file.ShardReader(fs, f"{folder}/{SHARD_NAME.format(rank=k)}")
               for k in range(meta["world_size"])]
    try:
        state = load_resharded(readers, meta["ep"], rank, world_size, ep, reshard.num_experts,
                               reshard.state_span, old_pp=meta.get("pp", 1), pp=pp, model_names=reshard.model_names)
    finally:
        for r in readers:
            r.close()
    state["resharded_from"] = {"world_size": meta["world_size"], "ep": meta["ep"], "pp": meta.get("pp", 1),
                               "bytes_read": [r.bytes_read for r in readers],
                               "tensor_bytes_read": [r.tensor_bytes_read for r in readers]}
    return state


def load_checkpoint_model(checkpoint_uri: str, cfg: Any, device: torch.device | str | None = None
                          ) -> torch.nn.Module:
    """The whole model of run config ``cfg`` (every stage, every expert) from a checkpoint of any layout, on
    ``device`` (default CPU), in eval mode. It is built there (``build_model``: on the meta device first,
    parameters in ``train.param_dtype``), then filled one tensor at a time, an expert stack one expert at a
    time, from ranged reads of the rank shards: only model bytes are read, and on a GPU the CPU never holds
    more than one such tensor."""
    from k2model.model import build_model
    from pipelines.hf_folder import CheckpointTensors

    model = build_model(cfg.model, seed=cfg.train.seed, device=device,
                        param_dtype=getattr(torch, cfg.train.param_dtype))
    targets = model.state_dict()
    filled: set[str] = set()
    with torch.no_grad(), CheckpointTensors(checkpoint_uri, cfg.model.num_experts) as source:
        for spec in source.specs:
            name, expert = source.origin(spec.name)
            if name not in targets:
                raise ValueError(f"checkpoint {checkpoint_uri} holds {name!r}, which the model of this config "
                                 "lacks: the checkpoint is of another model")
            target = targets[name] if expert is None else targets[name][expert]
            if tuple(target.shape) != spec.shape:
                raise ValueError(f"checkpoint {checkpoint_uri}: {spec.name} has shape {spec.shape}, the model "
                                 f"of this config {tuple(target.shape)}")
            target.copy_(source.read(spec.name))
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"checkpoint {checkpoint_uri} lacks {missing[:3]} ({len(missing)} tensors): it is "
                         "incomplete or of another model")
    return model.eval()
