"""Run a function on N local gloo ranks and bring back what each returned (or the errors they raised).

``run_workers(fn, world_size, *args)`` starts ``world_size`` processes; each sets one torch thread,
joins a gloo process group and calls ``fn(rank, world_size, *args)``. ``fn`` must be a module-level
function (workers import it by name). Return values travel back through ``torch.save`` files, so
tensors are safe to return.

- Start-up: workers are forked from a fork server (started on first use, one per parent process) that
  has already imported torch and ``fn``'s module; they do not inherit the parent's threads or state.

- Rendezvous: the parent hosts the TCP store on a port the OS picks (port 0) and keeps it open for the
  whole run, so there is no window in which another process can take a port chosen in advance.
- Failures: the first worker to raise writes its traceback; the others, now stuck in a collective, get
  a few seconds and are then killed, and ``WorkerError`` carries every traceback. A run past
  ``timeout_s`` is killed the same way.
- Shutdown: every worker destroys its process group before exiting; the parent joins (or kills) every
  process it started.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


class WorkerError(RuntimeError):
    """One or more workers raised, died or timed out; the message holds their tracebacks."""


def _worker_main(fn: Callable[..., Any], rank: int, world_size: int, store_port: int, out_dir: str,
                 collective_timeout_s: float, args: tuple, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = Path(out_dir)
    timeout = timedelta(seconds=collective_timeout_s)
    try:
        store = dist.TCPStore(HOST, store_port, world_size, is_master=False, timeout=timeout)
        if "cuda" in backend or "nccl" in backend:
            torch.cuda.set_device(rank % torch.cuda.device_count())  # ranks share the GPUs there are
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"result_{rank}.pt")
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _importable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function reached through its module's import name (workers cannot import ``__main__``
    of ``python -m pkg.mod``)."""
    if fn.__module__ != "__main__":
        return fn
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ValueError(f"{fn.__qualname__} must be defined in an importable module, not a script")
    return getattr(importlib.import_module(spec.name), fn.__qualname__)


def run_workers(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout_s: float = 110.0,
                collective_timeout_s: float = 60.0, grace_s: float = 5.0, backend: str = "gloo") -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each run in its own
    rank of a ``backend`` group (gloo on CPUs; ``cuda:gloo`` lets ranks share one GPU with a group that
    takes CUDA tensors only, as NCCL does). Raises ``WorkerError`` if any rank fails or the run exceeds
    ``timeout_s``."""
    fn = _importable(fn)
    ctx = mp.get_context("forkserver")
    # The fork server imports these once; every worker is then forked from it ready to run, instead of
    # importing torch again in each (a slow import). It never runs torch ops itself, so forking it is safe.
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    preload = ["torch", "torch.distributed"]
    if main_spec is None or fn.__module__ != main_spec.name:  # workers re-run ``python -m`` mains anyway
        preload.append(fn.__module__)
    ctx.set_forkserver_preload(preload)
    store = dist.TCPStore(HOST, 0, None, is_master=True, timeout=timedelta(seconds=collective_timeout_s),
                          wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="k2dist-") as out_dir:
        procs = [ctx.Process(target=_worker_main, daemon=True,
                             args=(fn, rank, world_size, store.port, out_dir, collective_timeout_s, args,
                                   backend))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        first_failure: float | None = None
        timed_out = False
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                first_failure = now
            if first_failure is not None and now - first_failure > grace_s:
                break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        killed = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                killed.append(rank)
            p.join()
        del store

        out = Path(out_dir)
        problems = []
        for rank, p in enumerate(procs):
            err = out / f"error_{rank}.txt"
            if err.exists():
                problems.append(f"--- rank {rank} raised:\n{err.read_text()}")
            elif rank in killed:
                problems.append(f"--- rank {rank} killed ({'timeout' if timed_out else 'after another rank failed'})")
            elif p.exitcode != 0:
                problems.append(f"--- rank {rank} exited with code {p.exitcode}")
        if problems:
            raise WorkerError(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(problems))
        return [torch.load(out / f"result_{rank}.pt", weights_only=False) for rank in range(world_size)]


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run a block with ``num_threads`` intra-op threads (single-process references next to workers:
    on a shared 2-core machine, 2 spinning threads are slower than 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
