"""The ``k2pipe`` command: a thin layer over pipelines/ and k2model/.

Exit codes: 0 success; 1 the work failed (a stage or a job); 2 bad usage or an invalid config
(nothing was started); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A user mistake found before any work started (exit code 2)."""


# ---------------------------------------------------------------------- shared options
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="run config: a YAML file or a bundled name (ci, demo); default: demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--preset", help="shorthand for --set model.preset=NAME")
    p.add_argument("--run-name", help="name of the run (storage prefix, Ray Train run, MLflow parent run)")
    p.add_argument("--storage", help="storage root: a local folder or s3://bucket/prefix "
                                     "(shorthand for --set storage.root=URI)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (shorthand for --set tracking.uri=URI)")


def _load_config(args: argparse.Namespace, default_config: str | None = "demo"):
    from pipelines.config import load_config

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
    except ValueError as e:
        raise UsageError(f"invalid config: {e}") from None


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


# ---------------------------------------------------------------------- data
def cmd_data(args: argparse.Namespace) -> int:
    from pipelines.data.packed import run_data_stages

    cfg = _load_config(args)
    outputs = run_data_stages(cfg, force=args.force)
    print(json.dumps(outputs.summary() if hasattr(outputs, "summary") else str(outputs), indent=2, default=str))
    return EXIT_OK


# ---------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.dag import PipelineError, run_pipeline, select_stages

    cfg = _load_config(args)
    try:
        select_stages(args.from_stage, args.until)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        result = run_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=tuple(args.force),
                              ray_address=args.ray_address)
    except PipelineError as e:
        print(e.result.summary(), file=sys.stderr)
        print(f"k2pipe: pipeline failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(result.summary())
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2pipe", description="Pretrain Kimi-K2-style MoE models with MuonClip on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count total and active parameters of a preset or a config.json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (tiny, small, k2-1t, deepseek-v3)")
    src.add_argument("--hf-config", help="a DeepSeek-V3 family config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("run", help="run the whole pipeline DAG (embedded local Ray unless --ray-address)")
    _add_config_args(p)
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start an embedded one)")
    p.add_argument("--from", dest="from_stage", help="rerun from this stage (earlier stages are reused)")
    p.add_argument("--until", help="stop after this stage")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="recompute this stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("data", help="run the data stages alone (ingest, tokenizer, shard)")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="recompute even complete stages")
    p.set_defaults(func=cmd_data)

    # Job submission to a Ray cluster and run comparison (ray_jobs/submit.py, ray_jobs/compare.py).
    from ray_jobs.compare import add_compare_command
    from ray_jobs.submit import add_job_commands

    add_job_commands(sub, _add_config_args)
    add_compare_command(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"k2pipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("k2pipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
