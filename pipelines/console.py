"""What a run prints: one line per event from the workers, and Ray's own logging kept to warnings.

``say`` writes one line to stdout (Ray Train patches ``print`` in workers to also log it, which would show
every line twice in the driver's output). ``quiet_ray_logging`` turns Ray's, Ray Data's and MLflow's INFO
logging and progress bars off (warnings and errors stay), unless the user asked for them (``--verbose``,
``K2PIPE_VERBOSE=1``).
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "K2PIPE_VERBOSE"


def say(message: str) -> None:
    """One line to this process's stdout, flushed."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def ray_logging_env() -> dict[str, str]:
    """Environment for Ray processes (workers, actors) under the current verbosity."""
    if verbose():
        return {}
    return {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def quiet_ray_logging() -> None:
    """Ray's, Ray Data's and Ray Train's INFO logging and Ray Data's progress bars off in this process
    (warnings and errors stay), and the same for the processes Ray starts from here (through
    ``ray_logging_env``). A no-op when verbose."""
    if verbose():
        return
    os.environ.update(ray_logging_env())
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # its warning says only what was just asked for


def train_log_level() -> str:
    """Ray Train's console log level (``ray.train.LoggingConfig``) under the current verbosity."""
    return "INFO" if verbose() else "WARNING"


def quiet_worker_logging() -> None:
    """In a Ray Train worker: INFO records that reach the root logger (Ray Train sends them to the console,
    among them one line per ``ray.train.report``) are dropped unless verbose."""
    if not verbose():
        logging.getLogger().setLevel(logging.WARNING)
