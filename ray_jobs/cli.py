"""The ``k2pipe`` command: a thin layer over pipelines/ and k2model/.

Exit codes (``ray_jobs.common``): 0 success; 1 the work failed (a stage or a job); 2 bad usage or an
invalid config (nothing was started); 130 interrupted. Errors are a few lines naming the file, key or
value; ``--debug`` (or ``K2PIPE_DEBUG=1``) adds the traceback. Ray's INFO logging is off unless
``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ray_jobs.common import (
    DEBUG_ENV,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_config_args,
    add_stage_args,
    load_run_config,
    report_error,
)


# ---------------------------------------------------------------------- params
def cmd_params(args: argparse.Namespace) -> int:
    from k2model.config import ModelConfig, count_parameters, describe, preset_config

    if args.hf_config:
        path = Path(args.hf_config)
        if not path.exists():
            raise UsageError(f"--hf-config {path}: no such file")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--hf-config {path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise UsageError(f"--hf-config {path}: expected a JSON object (a model's config.json), "
                             f"not a {type(hf).__name__}")
        try:
            cfg = ModelConfig.from_hf_config(hf, source=str(path))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        try:
            cfg = preset_config(args.preset or "tiny")
        except ValueError as e:
            raise UsageError(str(e)) from None
    pc = count_parameters(cfg)
    if args.json:
        print(json.dumps({"total": pc.total, "active": pc.active, "preset": cfg.preset,
                          "breakdown": pc.breakdown, "config": cfg.to_hf_config()}, indent=2))
    else:
        print(describe(cfg))
        for key, value in pc.breakdown.items():
            print(f"  {key:<24} {value:>18,}")
        print(f"  {'total':<24} {pc.total:>18,}\n  {'active per token':<24} {pc.active:>18,}")
    return EXIT_OK


# ---------------------------------------------------------------------- run and data
def _run_dag(args: argparse.Namespace, from_stage: str | None, until: str | None):
    """The DAG for the parsed flags; returns (result or None, exit code)."""
    from pipelines.dag import STAGES, PipelineError, run_pipeline, select_stages

    cfg = load_run_config(args)
    try:
        select_stages(from_stage, until)
    except ValueError as e:
        raise UsageError(str(e)) from None
    unknown = [name for name in args.force if name not in STAGES]
    if unknown:
        raise UsageError(f"--force {unknown[0]!r}: unknown stage; valid: {', '.join(STAGES)}")
    try:
        result = run_pipeline(cfg, from_stage=from_stage, until=until, force=tuple(args.force),
                              ray_address=getattr(args, "ray_address", None))
    except PipelineError as e:
        print(e.result.summary(), file=sys.stderr)
        report_error("k2pipe: pipeline failed", e)
        return None, EXIT_FAILED
    return result, EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    result, code = _run_dag(args, args.from_stage, args.until)
    if result is not None:
        print(result.summary())
    return code


def cmd_data(args: argparse.Namespace) -> int:
    """The DAG up to and including the shard stage, then the data summary."""
    from pipelines.stages.summary import DataOutputs, format_summary

    result, code = _run_dag(args, None, "shard")
    if result is not None:
        outputs = DataOutputs.of(result.stage_outputs)
        print(format_summary(outputs))
        print(json.dumps(outputs.summary(), indent=2, default=str))
    return code


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2pipe", description="Pretrain Kimi-K2-style MoE models with MuonClip on Ray.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--verbose", action="store_true", help="keep Ray's INFO logging and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count total and active parameters of a preset or a config.json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (tiny, small, medium, k2-1t, deepseek-v3)")
    src.add_argument("--hf-config", help="a DeepSeek-V3 family config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("run", help="run the whole pipeline DAG (embedded local Ray unless --ray-address)")
    add_config_args(p)
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start an embedded one)")
    add_stage_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("data", help="run the data stages alone (the DAG until shard: ingest, tokenizer, shard)")
    add_config_args(p)
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start an embedded one)")
    add_stage_args(p, with_from=False)
    p.set_defaults(func=cmd_data)

    # Job submission to a Ray cluster and run comparison (ray_jobs/submit.py, ray_jobs/compare.py).
    from ray_jobs.compare import add_compare_command
    from ray_jobs.submit import add_job_commands

    add_job_commands(sub)
    add_compare_command(sub)
    from ray_jobs.plan import add_plan_command
    from ray_jobs.sweep import add_sweep_command

    add_plan_command(sub)
    add_sweep_command(sub)
    # The global flags are taken after the command too (`k2pipe run ... --debug`); SUPPRESS keeps a
    # command's parser from resetting one given before it.
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="keep Ray's INFO logging and progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ConfigError
    from pipelines.console import VERBOSE_ENV, quiet_ray_logging
    from pipelines.storage import DataError
    from pipelines.tracking import TrackingUnreachable

    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_ray_logging()
    try:
        return args.func(args)
    except UsageError as e:
        print(f"k2pipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, DataError) as e:  # a bad value or input file, found before the work it would spoil
        report_error("k2pipe: error", e)
        return EXIT_USAGE
    except TrackingUnreachable as e:
        report_error("k2pipe: tracking error", e)
        return EXIT_FAILED
    except OSError as e:  # storage: a missing object, access denied, S3 unreachable after retries
        report_error("k2pipe: storage error", e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("k2pipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a case the checks above miss: still a few lines, the traceback under --debug
        report_error(f"k2pipe: error ({type(e).__name__})", e)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
