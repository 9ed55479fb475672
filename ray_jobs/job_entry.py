"""What a k2pipe Ray job runs: the pipeline DAG on the Ray cluster the job belongs to.

The run config comes either resolved, as base64 JSON in ``K2PIPE_RUN_CONFIG`` (written by ``k2pipe submit``,
see ray_jobs/submit.py), or, for jobs started another way (a KubeRay RayJob, ``ray job submit``), from
``--config``/``--set``/``--run-name`` exactly as ``k2pipe run`` reads them, with ``$MLFLOW_TRACKING_URI`` as
the tracking URI when the config names none. S3 and MLflow settings and credentials come from the standard
environment variables. Prints the pipeline's summary; exit code 0 when it succeeded, 1 otherwise. Everything
printed here has the credentials of the environment masked.

    python -m ray_jobs.job_entry [--from STAGE] [--until STAGE] [--force STAGE ...]
    python -m ray_jobs.job_entry --config demo --set storage.root=s3://BUCKET/k2pipe [--run-name NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

from ray_jobs.common import add_stage_args
from ray_jobs.submit import CONFIG_ENV, JOB_ID_ENV, decode_config, redact_secrets


def load_job_config(args: argparse.Namespace):
    """The run config of this job (see the module docstring); ValueError names what is wrong."""
    encoded = os.environ.get(CONFIG_ENV)
    if encoded:
        if args.config or args.overrides or args.run_name:
            raise ValueError(f"{CONFIG_ENV} is set: the job's config comes from `k2pipe submit`, "
                             "so --config, --set and --run-name are not allowed")
        return decode_config(encoded)
    if not args.config:
        raise ValueError(f"no run config: pass --config NAME_OR_YAML (or submit with `k2pipe submit`, "
                         f"which sets {CONFIG_ENV})")
    from pipelines.config import load_config

    cfg = load_config(args.config, args.overrides, run_name=args.run_name)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.enabled and not cfg.tracking.uri and env_uri:
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=env_uri))
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.job_entry",
                                     description="Run a k2pipe pipeline inside a Ray job.")
    parser.add_argument("--config", help="run config (YAML file or bundled name) when K2PIPE_RUN_CONFIG is unset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (with --config)")
    parser.add_argument("--run-name", help="name of the run (with --config)")
    add_stage_args(parser)
    args = parser.parse_args(argv)

    try:
        cfg = load_job_config(args)
    except ValueError as e:
        print(redact_secrets(f"[k2pipe] invalid run config: {e}"), file=sys.stderr, flush=True)
        return 1

    from pipelines.dag import PipelineError, run_pipeline

    job = os.environ.get(JOB_ID_ENV, "(not submitted by k2pipe submit)")
    print(f"[k2pipe] job {job}: run '{cfg.run_name}', storage {cfg.storage.root}", flush=True)
    try:
        # "auto": the cluster this job runs in (Ray Jobs sets RAY_ADDRESS for the entrypoint).
        result = run_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=tuple(args.force),
                              ray_address="auto")
    except PipelineError as e:
        print(redact_secrets(e.result.summary()), file=sys.stderr)
        print(redact_secrets(f"[k2pipe] pipeline failed: {e}"), file=sys.stderr, flush=True)
        return 1
    except Exception:  # printed here, masked: a library's message may quote the job's environment
        print(redact_secrets(f"[k2pipe] the run could not start or failed:\n{traceback.format_exc()}"),
              file=sys.stderr, flush=True)
        return 1
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
