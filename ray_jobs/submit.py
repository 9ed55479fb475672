"""Running k2pipe on a Ray cluster through Ray Jobs: ``submit``, ``status``, ``logs``, ``stop``, ``list``.

``k2pipe submit`` validates the config here (the same loader as ``k2pipe run``), then submits one Ray job
whose entrypoint is ``python -m ray_jobs.job_entry``. The job carries:

- the project as its ``working_dir`` (run outputs, virtual environments and caches excluded), so the
  cluster runs the submitter's code;
- the resolved config as base64 JSON in ``K2PIPE_RUN_CONFIG`` (a config holds no secrets: S3 and MLflow
  credentials live only in the environment);
- the S3 and MLflow settings of the submitter's environment as runtime-environment ``env_vars``. Their
  values never appear in the entrypoint, the job metadata or anything printed here: only their names.
  Ray shows a job's runtime environment to anyone who can reach its dashboard; on a shared cluster give the
  nodes their own credentials (an IAM role, the Kubernetes Secret of infra/kuberay) and submit with
  ``--no-credentials``.

Submitting again under the same run name resumes the run: the DAG skips complete stages and Ray Train
resumes pretraining from the latest checkpoint, because the job sees the same storage root and run name.
So a storage root (and a file-based MLflow store) must be reachable from the cluster: S3 (or an HTTP
tracking server) for a remote cluster; a local path only for a cluster on this machine, made absolute. The
tracking URI is ``--tracking-uri`` (``tracking.uri``), else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db.

Token authentication (Ray 2.59+): a Ray client sends the cluster's token only when ``RAY_AUTH_MODE=token``
is set; it reads the token from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``. A refused request ends with a message saying exactly that (exit code 2).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime as dt
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_jobs.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_config_args,
    add_stage_args,
    load_run_config,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "K2PIPE_RUN_CONFIG"
"""Environment variable holding the job's resolved RunConfig as base64 JSON."""
JOB_ID_ENV = "K2PIPE_RAY_JOB_ID"
"""Environment variable holding the job's submission id (read by pipelines.dag.ray_job_id)."""
ADDRESS_ENVS = ("K2PIPE_RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
"""Where ``--address`` comes from when it is not given, in this order."""
WORKING_DIR_EXCLUDES = [".venv", "k2runs", "mlruns", "mlflow.db", ".git", "*.egg-info", "__pycache__",
                        ".pytest_cache", "bench-results", ".ruff_cache", ".env", ".state"]
SETTING_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                "MLFLOW_S3_ENDPOINT_URL")
"""Non-secret settings passed to the job when set here."""
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Credentials passed to the job when set here (unless ``--no-credentials``)."""
META_RUN_NAME, META_STORAGE, META_COMMIT = "k2pipe_run_name", "k2pipe_storage", "k2pipe_git_commit"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HELP = """\
  A Ray client sends the cluster's token only when RAY_AUTH_MODE=token is set (now: {mode}).
  Get the token on the head node (`ray get-auth-token`), then on this machine:
    export RAY_AUTH_MODE=token
  and one of:
    put the token in ~/.ray/auth_token
    export RAY_AUTH_TOKEN_PATH=/path/to/token-file
    export RAY_AUTH_TOKEN=<token>"""


class ClusterError(Exception):
    """The cluster could not be reached or refused a request; ``exit_code`` says how to end."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------- what a job carries
@dataclass(frozen=True)
class JobSpec:
    """Everything ``submit_job`` receives; ``env_names`` are the names (only) of the passed variables."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    env_names: tuple[str, ...]


def encode_config(cfg) -> str:
    return base64.b64encode(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).decode("ascii")


def decode_config(text: str):
    from pipelines.config import config_from_dict

    try:
        data = json.loads(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, UnicodeError) as e:
        raise ValueError(f"{CONFIG_ENV}: not base64-encoded JSON ({e})") from None
    return config_from_dict(data)


def normalize_address(address: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT`` of a Ray dashboard, without a trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--address {address!r}: expected the Ray dashboard's http://HOST:PORT "
                         "(port 8265 by default)")
    return address


def is_local_address(address: str) -> bool:
    return (urlparse(normalize_address(address)).hostname or "") in LOCAL_HOSTS


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    for value in (address, *(environ.get(name) for name in ADDRESS_ENVS)):
        if value:
            return normalize_address(value)
    raise UsageError("no Ray cluster address: pass --address http://HEAD:8265 or set "
                     f"{' or '.join(ADDRESS_ENVS)}")


def _is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def locate_for_cluster(cfg, address: str, environ: Mapping[str, str] = os.environ):
    """The config as the job must see it: the same storage root and MLflow store as here, absolute.

    A remote cluster cannot reach this machine's disk: a local storage root or a file-based MLflow store
    is refused there (so a resubmitted run would find its outputs again). On a cluster on this machine
    they are made absolute (the job runs in Ray's session directory)."""
    from pipelines import storage, tracking

    local_cluster = is_local_address(address)
    root = cfg.storage.root
    if _is_local_path(root):
        if not local_cluster:
            raise UsageError(
                f"storage.root={root!r} is a path on this machine, which the cluster at {address} cannot "
                "reach; use shared storage: --storage s3://BUCKET/PREFIX")
        root = storage.normalize_uri(root)
    elif not storage.is_s3(root):
        raise UsageError(f"storage.root={root!r}: expected s3://BUCKET/PREFIX or a local path")
    track = cfg.tracking
    if track.enabled:
        uri = tracking.resolve_tracking_uri(track.uri or environ.get("MLFLOW_TRACKING_URI"))
        parsed = urlparse(uri)
        if parsed.username or parsed.password:
            raise UsageError("tracking.uri holds credentials; pass the plain URI and set "
                             "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if parsed.scheme in ("", "file", "sqlite"):  # a store on this machine's disk
            if not local_cluster:
                raise UsageError(
                    f"tracking URI {uri!r} is a store on this machine, which the cluster at {address} cannot "
                    "reach; use an MLflow server: --tracking-uri http://HOST:5000 (infra/mlflow/run_server.sh)")
            if not parsed.scheme:
                uri = Path(uri).absolute().as_uri()
        track = dataclasses.replace(track, uri=uri)
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=root), tracking=track)


def local_git_commit(cwd: Path = PROJECT_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", commit) else None


def job_env_vars(tracking_uri: str | None, environ: Mapping[str, str] = os.environ,
                 credentials: bool = True, git_commit: str | None = None) -> dict[str, str]:
    """The environment of the job: this environment's S3/MLflow settings (and credentials), the run's
    tracking URI and the commit the code comes from."""
    names = SETTING_ENVS + (CREDENTIAL_ENVS if credentials else ())
    env = {name: environ[name] for name in names if environ.get(name)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if git_commit:
        env["K2PIPE_GIT_COMMIT"] = git_commit
    # No PYTHONUNBUFFERED: Ray Jobs sets it for the driver, and the DAG's ray.init passes it to the tasks;
    # a key in both the job's and ray.init's env_vars makes ray.init refuse to start.
    return env


def redact_secrets(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """``text`` with the values of the credential variables of ``environ`` replaced by ``***``."""
    for name in CREDENTIAL_ENVS:
        value = environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def submission_id_for(run_name: str, now: dt.datetime | None = None) -> str:
    """``k2pipe-<run-name>-<UTC timestamp>``; characters a job id cannot hold become ``-``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "run"
    return f"k2pipe-{safe}-{now.strftime('%Y%m%d-%H%M%S')}"


def entrypoint_for(from_stage: str | None = None, until: str | None = None, force: tuple[str, ...] = ()) -> str:
    parts = ["python", "-m", "ray_jobs.job_entry"]
    if from_stage:
        parts += ["--from", from_stage]
    if until:
        parts += ["--until", until]
    for name in force:
        parts += ["--force", name]
    return " ".join(parts)


def build_job_spec(cfg, *, environ: Mapping[str, str] = os.environ, credentials: bool = True,
                   git_commit: str | None = None, from_stage: str | None = None, until: str | None = None,
                   force: tuple[str, ...] = (), now: dt.datetime | None = None,
                   working_dir: Path = PROJECT_ROOT) -> JobSpec:
    """The job for an already located config (``locate_for_cluster``)."""
    env = job_env_vars(cfg.tracking.uri if cfg.tracking.enabled else None, environ, credentials, git_commit)
    submission_id = submission_id_for(cfg.run_name, now)
    env[CONFIG_ENV] = encode_config(cfg)
    env[JOB_ID_ENV] = submission_id  # the DAG tags the MLflow runs with it
    metadata = {META_RUN_NAME: cfg.run_name, META_STORAGE: cfg.storage.root}
    if git_commit:
        metadata[META_COMMIT] = git_commit
    runtime_env = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env}
    return JobSpec(submission_id=submission_id,
                   entrypoint=entrypoint_for(from_stage, until, force), runtime_env=runtime_env, metadata=metadata,
                   env_names=tuple(sorted(k for k in env if k not in (CONFIG_ENV, JOB_ID_ENV))))


# ---------------------------------------------------------------------- talking to the cluster
def _unreachable(address: str, detail: str = "") -> ClusterError:
    why = f" ({detail})" if detail else ""
    return ClusterError(
        f"cannot reach the Ray cluster at {address}{why}.\n"
        "  The address is the Ray dashboard (port 8265 by default), not the GCS port. Check that:\n"
        "    the head is running: ray start --head --dashboard-host 127.0.0.1 (or ray status on the head)\n"
        "    a port-forward to a remote dashboard is up, e.g. kubectl port-forward svc/k2pipe-head-svc 8265:8265\n"
        "      or ssh -L 8265:127.0.0.1:8265 HEAD", EXIT_FAILED)


def _refused(address: str, error: Exception) -> ClusterError:
    message = getattr(error, "message", "") or ""
    if "Authentication failed" in message or "403" in message:
        what = "refused this client's authentication token (invalid, or another cluster's)"
    else:
        what = "requires an authentication token and none was sent"
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    unsent = [name for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if os.environ.get(name)]
    if unsent and mode.lower() != "token":
        what += f" ({' and '.join(unsent)} set, but unused without RAY_AUTH_MODE=token)"
    return ClusterError(f"the Ray cluster at {address} {what}.\n{AUTH_HELP.format(mode=mode)}", EXIT_USAGE)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    import requests

    return (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            aiohttp.ClientConnectionError)


def cluster_call(address: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` turning connection and authentication failures into ``ClusterError``."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise _refused(address, e) from None
    except _connection_errors() as e:
        raise _unreachable(address, type(e).__name__) from None
    except RuntimeError as e:
        text = str(e)
        if "status code 401" in text or "status code 403" in text:
            raise _refused(address, e) from None
        if "status code 404" in text or "does not exist" in text:
            detail = re.sub(r"^Request failed with status code 404:\s*", "", text.strip()).rstrip(".")
            raise ClusterError(f"{detail} on {address}; list the jobs with `k2pipe list --address {address}`",
                               EXIT_USAGE) from None
        raise


def connect(address: str):
    """A JobSubmissionClient for ``address`` (checks the connection and the cluster's version)."""
    from ray.job_submission import JobSubmissionClient

    return cluster_call(address, lambda: JobSubmissionClient(address))


def follow_logs(client, address: str, job_id: str, out=None) -> None:
    """Print the job's logs as they come until the job ends, whole lines at a time with this environment's
    credentials masked (a library's error message on the cluster may quote the job's environment)."""
    out = out or sys.stdout

    async def tail() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            pending += chunk
            complete, _, pending = pending.rpartition("\n")
            if complete:
                out.write(redact_secrets(complete + "\n"))
                out.flush()
        if pending:
            out.write(redact_secrets(pending + "\n"))
            out.flush()

    cluster_call(address, lambda: asyncio.run(tail()))


def wait_until_terminal(client, address: str, job_id: str, timeout_s: float | None = None,
                        poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(cluster_call(address, lambda: client.get_job_status(job_id)))
        if status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(poll_s)


def submit_with_retry(client, address: str, spec: JobSpec, attempts: int = 4, delay_s: float = 5.0) -> str:
    """Submit ``spec``; a head that has just started answers "No available agent" until its job agent has
    registered, so that answer is retried."""
    for attempt in range(attempts):
        try:
            return cluster_call(address, lambda: client.submit_job(
                entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, submission_id=spec.submission_id,
                metadata=spec.metadata))
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == attempts - 1:
                raise
            print(f"k2pipe: the cluster's job agent is not ready yet; retrying in {delay_s:g}s", file=sys.stderr)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def _job_command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a job subcommand, turning cluster failures into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ClusterError as e:
            print(f"k2pipe: error: {e}", file=sys.stderr)
            return e.exit_code

    return wrapper


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------------- commands
@_job_command
def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.dag import check_stages, select_stages

    address = resolve_address(args.address)
    cfg = load_run_config(args)
    try:
        selected = select_stages(args.from_stage, args.until)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_stages(cfg, selected)  # what the job would refuse on the cluster, refused before it is submitted
    cfg = locate_for_cluster(cfg, address)
    commit = local_git_commit()
    spec = build_job_spec(cfg, credentials=args.credentials, git_commit=commit, from_stage=args.from_stage,
                          until=args.until, force=tuple(args.force))
    client = connect(address)
    print(f"k2pipe: submitting run '{cfg.run_name}' to {address}")
    print(f"  storage   {cfg.storage.root}")
    print(f"  tracking  {cfg.tracking.uri if cfg.tracking.enabled else 'disabled'}")
    print(f"  code      {PROJECT_ROOT} at {commit or 'unknown commit'}")
    print(f"  passing environment variables (names only): {', '.join(spec.env_names) or 'none'}")
    job_id = submit_with_retry(client, address, spec)
    print(f"k2pipe: submitted job {job_id}")
    if not args.wait:
        print(f"  follow it with: k2pipe logs {job_id} --address {address} --follow")
        return EXIT_OK
    try:
        try:
            follow_logs(client, address, job_id)
        except RuntimeError as e:  # the log stream closed before the job ended; its status still tells
            print(f"k2pipe: the log stream of job {job_id} closed ({e}); waiting for the job to end",
                  file=sys.stderr)
        status = wait_until_terminal(client, address, job_id, timeout_s=None, poll_s=2.0)
    except KeyboardInterrupt:
        print(f"\nk2pipe: stopped following; job {job_id} keeps running. Stop it with: "
              f"k2pipe stop {job_id} --address {address}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"k2pipe: job {job_id} {status}")
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


@_job_command
def cmd_status(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    info = cluster_call(address, lambda: client.get_job_info(args.job_id))
    meta = info.metadata or {}
    rows = [("job", info.submission_id or info.job_id), ("status", str(info.status)),
            ("run", meta.get(META_RUN_NAME, "-")), ("storage", meta.get(META_STORAGE, "-")),
            ("entrypoint", info.entrypoint), ("started", _when(info.start_time)), ("ended", _when(info.end_time))]
    if info.message:
        rows.append(("message", info.message.strip()))
    for key, value in rows:  # never the runtime environment: it holds credentials
        print(f"{key:<11} {value}")
    return EXIT_OK


@_job_command
def cmd_logs(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    if args.follow:
        try:
            follow_logs(client, address, args.job_id)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    else:
        sys.stdout.write(redact_secrets(cluster_call(address, lambda: client.get_job_logs(args.job_id))))
        sys.stdout.flush()
    return EXIT_OK


@_job_command
def cmd_stop(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    stopped = cluster_call(address, lambda: client.stop_job(args.job_id))
    if not stopped:
        status = cluster_call(address, lambda: client.get_job_status(args.job_id))
        print(f"k2pipe: job {args.job_id} had already ended ({status})")
        return EXIT_OK
    print(f"k2pipe: stop requested for job {args.job_id}")
    if args.timeout <= 0:
        return EXIT_OK
    status = wait_until_terminal(client, address, args.job_id, timeout_s=args.timeout, poll_s=0.5)
    if status not in TERMINAL:
        print(f"k2pipe: job {args.job_id} still {status} after {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILED
    print(f"k2pipe: job {args.job_id} {status}")
    return EXIT_OK


@_job_command
def cmd_list(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    jobs = [j for j in cluster_call(address, client.list_jobs) if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    if args.json:
        print(json.dumps([{"job": j.submission_id, "status": str(j.status),
                           "run_name": (j.metadata or {}).get(META_RUN_NAME), "start_time": j.start_time,
                           "end_time": j.end_time} for j in jobs], indent=2))
        return EXIT_OK
    if not jobs:
        print(f"no jobs on {address}")
        return EXIT_OK
    width = max(len(j.submission_id) for j in jobs)
    print(f"{'JOB':<{width}}  {'STATUS':<9}  {'STARTED':<23}  RUN")
    for j in jobs:
        run = (j.metadata or {}).get(META_RUN_NAME, "-")
        print(f"{j.submission_id:<{width}}  {str(j.status):<9}  {_when(j.start_time):<23}  {run}")
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``status``, ``logs``, ``stop`` and ``list`` on the k2pipe parser."""

    def address_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="Ray dashboard address, http://HEAD:8265 (default: "
                                         f"${' or $'.join(ADDRESS_ENVS)})")

    p = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray job (same config as `run`)")
    add_config_args(p)
    address_arg(p)
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 0 if it succeeded")
    p.add_argument("--no-credentials", dest="credentials", action="store_false",
                   help="do not pass AWS/MLflow credentials to the job (the nodes have their own)")
    add_stage_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="status of a submitted job")
    p.add_argument("job_id", metavar="JOB")
    address_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id", metavar="JOB")
    address_arg(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job_id", metavar="JOB")
    address_arg(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the job to end (0: do not wait); default 60")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("list", help="jobs on a Ray cluster with their run names")
    address_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
