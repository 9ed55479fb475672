"""What every ``k2pipe`` command shares: exit codes, ``UsageError``, the config flags and their loading, and
how an error reaches the user (a few lines naming the file, key or value; the traceback only with
``--debug`` or ``K2PIPE_DEBUG=1``).

Exit codes: 0 success; 1 the work failed (a stage or a job); 2 bad usage or an invalid config (nothing
was started); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "K2PIPE_DEBUG"


class UsageError(Exception):
    """A user mistake found before any work started (exit code 2)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The flags that build a run config: ``CONFIG``, ``--set``, ``--preset``, ``--run-name``, ``--storage``,
    ``--tracking-uri``."""
    p.add_argument("config", nargs="?", default=None,
                   help="run config: a YAML file or a bundled name (ci, demo); default: demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--preset", help="shorthand for --set model.preset=NAME")
    p.add_argument("--run-name", help="name of the run (storage prefix, Ray Train run, MLflow parent run)")
    p.add_argument("--storage", help="storage root: a local folder or s3://bucket/prefix "
                                     "(shorthand for --set storage.root=URI)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (shorthand for --set tracking.uri=URI)")


def add_stage_args(p: argparse.ArgumentParser, *, with_from: bool = True) -> None:
    """``--from``, ``--until`` and ``--force STAGE`` (repeatable), as ``k2pipe run`` and ``submit`` take them."""
    if with_from:
        p.add_argument("--from", dest="from_stage", help="rerun from this stage (earlier stages are reused)")
        p.add_argument("--until", help="stop after this stage")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="recompute this stage even if its output is complete (repeatable)")


def load_run_config(args: argparse.Namespace, default_config: str | None = "demo"):
    """The run config the flags of ``add_config_args`` describe; ``UsageError`` names what is wrong."""
    from pipelines.config import ConfigError, load_config

    overrides = list(args.overrides)
    if getattr(args, "preset", None):
        overrides.append(f"model.preset={args.preset}")
    if getattr(args, "storage", None):
        overrides.append(f"storage.root={args.storage}")
    if getattr(args, "tracking_uri", None):
        overrides.append(f"tracking.uri={args.tracking_uri}")
    config = args.config if args.config is not None else default_config
    try:
        return load_config(config, overrides, run_name=getattr(args, "run_name", None))
    except ConfigError as e:
        raise UsageError(f"invalid config: {e}") from None


def report_error(prefix: str, error: BaseException) -> None:
    """``prefix: message`` on stderr, the traceback too under ``--debug``/``K2PIPE_DEBUG=1``."""
    if debug_enabled():
        traceback.print_exception(error, file=sys.stderr)
    text = str(error).strip() or type(error).__name__
    print(f"{prefix}: {text}", file=sys.stderr, flush=True)
    if not debug_enabled():
        print(f"  (run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
