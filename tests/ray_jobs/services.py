"""Real services on 127.0.0.1 for the job-submission tests: a Ray head (dashboard and Jobs API) and an MLflow
tracking server whose artifacts go to the session's moto S3 server.

Each runs in its own session (process group) started here, so stopping it ends exactly what it started:
SIGTERM to the group, SIGKILL after a grace period, then any process that still names the cluster's private
temp dir (workers the raylet started). Never ``ray stop``: it kills every Ray process on the machine.

Every port is a free one chosen here: the GCS port outside Ray's worker-port range (10002-19999), and the
dashboard agent's and Ray client server's ports too, whose defaults (52365, 10001) another cluster on the
same machine may hold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra" / "local"))
from netcluster import pids_mentioning  # noqa: E402  (the one implementation, stdlib only)

VENV_BIN = Path(sys.executable).parent
RAY_WORKER_PORTS = range(10002, 20000)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 outside Ray's worker-port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port


def http_json(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; log:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s; log:\n{log.read_text()[-4000:]}")


def stop_session(proc: subprocess.Popen, marker: str | None = None, grace_s: float = 8.0) -> None:
    """End the process group ``proc`` leads, then any leftover process whose command line holds ``marker``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            if not _group_alive(proc.pid):
                break
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)
    if marker:
        for pid in pids_mentioning(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def service_env(**extra: str) -> dict[str, str]:
    """This environment without S3/MLflow settings (a service gets only what it is given), venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "K2PIPE_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        stop_session(self.proc, marker=self.temp_dir, grace_s=3.0)  # its state is thrown away
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def launch_ray_head(num_cpus: int = 4) -> RayHead:
    """Start ``ray start --head --block`` on loopback with token authentication off, from the venv (so jobs
    get the venv's python); ``wait_ray_head`` waits for it. Its temp dir is short and private (Unix socket
    paths are limited to 107 bytes)."""
    temp_dir = tempfile.mkdtemp(prefix="k2ray-", dir="/tmp")
    log = Path(temp_dir) / "head.log"
    gcs, dashboard = free_port(), free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--num-cpus", str(num_cpus), "--object-store-memory", str(512 << 20), "--include-dashboard", "true",
           "--disable-usage-stats", "--temp-dir", temp_dir]
    env = service_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=temp_dir)
    return RayHead(proc, temp_dir, gcs, dashboard, log)


def wait_ray_head(head: RayHead, timeout_s: float = 180.0) -> None:
    wait_for_http(f"{head.address}/api/version", head.proc, timeout_s, head.log)
    _wait_for_job_agent(head, timeout_s)


def _wait_for_job_agent(head: RayHead, timeout_s: float) -> None:
    """Run a trivial job: the dashboard answers before the head's job agent has registered, and a job
    submitted earlier fails with "No available agent"."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = http_json("POST", f"{head.address}/api/jobs/",
                            {"entrypoint": "python -c \"import ray_jobs, mlflow; print('ready')\""})
            break
        except urllib.error.HTTPError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head's job agent never became available ({e})") from None
            time.sleep(1.0)
    job_id = job["submission_id"]
    while time.monotonic() < deadline:
        info = http_json("GET", f"{head.address}/api/jobs/{job_id}")
        if info["status"] == "SUCCEEDED":
            return
        if info["status"] in ("FAILED", "STOPPED"):
            raise RuntimeError(f"the readiness job failed: {info.get('message')}")
        time.sleep(0.5)
    raise TimeoutError("the readiness job did not finish")


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
        """Call the REST API (``endpoint`` below ``/api/2.0/mlflow/``)."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return http_json(method, url, body)

    def stop(self) -> None:
        stop_session(self.proc)


def launch_mlflow_server(work_dir: Path, s3_endpoint: str, artifacts: str) -> MlflowServer:
    """Start ``mlflow server`` on 127.0.0.1 (``wait_mlflow_server`` waits for it): SQLite backend in
    ``work_dir``, artifacts proxied to ``artifacts`` (``s3://bucket/prefix``) on the moto endpoint; one worker,
    no job-execution processes."""
    port = free_port()
    log = work_dir / "mlflow-server.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{(work_dir / 'mlflow.db').absolute()}",
           "--artifacts-destination", artifacts]
    env = service_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                      AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=work_dir)
    return MlflowServer(proc, port, log)


def wait_mlflow_server(server: MlflowServer, timeout_s: float = 120.0) -> None:
    wait_for_http(f"{server.uri}/health", server.proc, timeout_s, server.log)
