"""``k2pipe sweep SWEEP``: run (or resume) the variants of a sweep file and write its report with a verdict
for each claim (``pipelines.sweep``). ``SWEEP`` is a path or the name of a bundled sweep (``optimizer``,
``qk_clip``, ``sparsity``, ``dense_layers``, ``heads``)."""

from __future__ import annotations

import argparse
import json

from ray_jobs.common import EXIT_FAILED, EXIT_OK, UsageError


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.config import parse_overrides
    from pipelines.sweep import load_sweep, member_config, members, run_sweep

    extra = parse_overrides(args.overrides)
    if args.storage:
        extra["storage.root"] = args.storage
    if args.tracking_uri:
        extra["tracking.uri"] = args.tracking_uri
    sweep = load_sweep(args.sweep)
    if args.list:
        runs = members(sweep, args.quick)
        for m in runs:  # what a run would refuse (the --set overrides too), refused here as well
            member_config(sweep, m, extra)
        for m in runs:
            print(f"{m.run_name}  {json.dumps(m.overrides, default=str)}")
        return EXIT_OK
    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: give at least 1")
    report = run_sweep(sweep, quick=args.quick, extra=extra, ray_address=args.ray_address, parallel=args.parallel,
                       report_only=args.report_only, reuse=args.reuse)
    print(report["text"])
    print(f"\nreport: {report['uri']}/report.md")
    return EXIT_FAILED if report["failures"] else EXIT_OK


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run the variants of a sweep file and write a report with a verdict per claim")
    p.add_argument("sweep", help="a sweep YAML file or a bundled sweep (optimizer, qk_clip, sparsity, "
                                 "dense_layers, heads)")
    p.add_argument("--quick", action="store_true",
                   help="a wiring check: one seed, at most 3 steps a run (its report says it is not evidence)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value in every run (repeatable)")
    p.add_argument("--storage", help="storage root for every run (local folder or s3://bucket/prefix)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start an embedded one)")
    p.add_argument("--parallel", type=int, help="runs at a time (default: the cluster's CPUs over a run's)")
    p.add_argument("--report-only", action="store_true", help="run nothing: the report from what has finished")
    p.add_argument("--reuse", action="append", default=[], metavar="RUNS_JSON",
                   help="the runs.json (or its folder) of an earlier report of this sweep, from any storage: its "
                        "finished runs whose config is unchanged are taken as they are, not run again (repeatable)")
    p.add_argument("--list", action="store_true", help="print the runs and their overrides, run nothing")
    p.set_defaults(func=cmd_sweep)
