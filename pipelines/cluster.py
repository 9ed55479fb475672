"""Starting or joining Ray, the one way every entry point does it.

``init_ray`` attaches to a running cluster at an address, or starts an embedded one on this machine sized
for the run (enough logical CPUs for the Ray Train workers, the tokenizer pool and the read tasks at once,
so a 2-core machine never deadlocks on CPU reservations; the OS shares the real cores). It does nothing
when Ray is already up in this process, so a stage called on its own (a test, a benchmark) and the DAG
share it. ``ordered_execution`` makes Ray Data keep block order for the datasets built inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from pipelines.config import RunConfig
from pipelines.console import ray_logging_env, verbose


def init_ray(cfg: RunConfig | None = None, address: str | None = None) -> None:
    """Join the cluster at ``address`` as it is, or start a local one for ``cfg`` (defaults when None)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        # Attach as is: inside a Ray job a runtime_env that repeats a key of the job's own is refused
        # (and Ray's error message would print the job's environment).
        ray.init(address=address, log_to_driver=True)
        return
    cfg = cfg or RunConfig()
    env_vars = {"PYTHONUNBUFFERED": "1", **ray_logging_env()}
    wanted = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.num_workers + 2
    # The dashboard (on 127.0.0.1) serves the state API that Ray Train's controller polls.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, int(wanted + 0.999)), include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": env_vars}, log_to_driver=True,
             logging_level=logging.INFO if verbose() else logging.WARNING)


@contextlib.contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data keeps block order for datasets built and consumed inside this block."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved
