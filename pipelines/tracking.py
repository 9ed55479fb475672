"""MLflow tracking: where runs go, the parent/stage run structure, and a rank-0 metric logger that never
logs a step twice across resumes.

- With no ``tracking.uri`` the store is ``sqlite:///<abs cwd>/mlflow.db`` with artifacts in
  ``<abs cwd>/mlruns``: absolute, so Ray workers (which run in Ray's session directory) write to the
  same place as the driver. SQLite takes one writer at a time; calls are retried on "database is locked",
  so the driver and rank 0 can log at once.
- Secrets never reach MLflow: ``redact`` drops values of keys that look like credentials, and params are
  the resolved run config, which holds none (S3 credentials live only in the environment).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipelines.config import ConfigError

T = TypeVar("T")
SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)
RUN_NAME_TAG = "k2pipe.run_name"
STAGE_TAG = "k2pipe.stage"


def default_tracking_uri(cwd: str | None = None) -> str:
    base = Path(cwd or os.getcwd()).absolute()
    return f"sqlite:///{base / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store; relative sqlite paths
    made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Make a relative sqlite path absolute for the workers.
            return f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
        return uri
    return default_tracking_uri()


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
HEALTH_TIMEOUT_S = 10.0


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer."""


CREDENTIALS = re.compile(r"(//)[^/@]*@")
"""The user:password part of a URI."""


def _shown(uri: str) -> str:
    """``uri`` with any user:password part masked, for messages."""
    return CREDENTIALS.sub(r"\1***@", uri)


def check_tracking_uri(uri: str, where: str = "tracking.uri") -> None:
    """Before any work is tracked there: a URI MLflow can use, a local store whose folder exists, a server that
    answers (an HTTP error is an answer; a refused or timed-out connection is not). Without this a wrong
    address costs minutes of retries before the error."""
    import urllib.error
    import urllib.request

    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{where}={_shown(uri)}: unknown scheme {scheme!r}; valid: sqlite:///PATH, "
                          "http(s)://HOST:PORT, file:///PATH, a database URI (postgresql, mysql, mssql), databricks")
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError(f"{where}={uri}: the folder {folder} does not exist")
    if scheme in ("http", "https"):
        try:
            bare = CREDENTIALS.sub(r"\1", uri.rstrip("/"))  # /health needs no credentials
            urllib.request.urlopen(bare + "/health", timeout=HEALTH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnreachable(f"the MLflow server at {_shown(uri)} does not answer ({reason}); start it "
                                      "(infra/local/stack.sh starts one) or pass another tracking URI") from None


def default_artifact_root(tracking_uri: str) -> str | None:
    """Absolute artifact location for a local sqlite store (None: let the server decide)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent.joinpath("mlruns").absolute().as_uri()
    return None


def retry(fn: Callable[[], T], attempts: int = 8, what: str = "MLflow call") -> T:
    """Retry transient MLflow failures (a locked SQLite database, a restarting server)."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # MLflow raises several types for the same transient conditions
            text = str(e).lower()
            transient = any(s in text for s in ("locked", "connection", "timed out", "temporarily", "503", "502"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if SECRET_KEY.search(k) else v) for k, v in params.items()}


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""The experiment kind the MLflow UI (3.x) opens on its model-training view for (else the GenAI view)."""


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if missing, marked as model training for the UI."""
    c = client(tracking_uri)
    exp = retry(lambda: c.get_experiment_by_name(name))
    if exp is None:
        artifact_root = default_artifact_root(tracking_uri)
        try:
            retry(lambda: c.create_experiment(name, artifact_location=artifact_root,
                                              tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}))
        except Exception:
            pass  # another process created it first
        exp = retry(lambda: c.get_experiment_by_name(name))
        if exp is None:
            raise RuntimeError(f"MLflow experiment {name!r} at {tracking_uri} could not be created")
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        retry(lambda: c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND))
    return exp.experiment_id


def log_latest(c, run_id: str, metrics: dict[str, float], step: int) -> dict[str, float]:
    """Log ``metrics`` at ``step`` where the run's latest value differs (a rerun that changes nothing logs
    nothing, so no series gains a duplicate point); returns what was logged."""
    import math

    from mlflow.entities import Metric

    current = retry(lambda: c.get_run(run_id)).data.metrics
    def same(key: str, value: float) -> bool:
        old = current.get(key)
        return old is not None and (math.isclose(old, value, rel_tol=1e-12, abs_tol=0)
                                    or (math.isnan(old) and math.isnan(value)))

    new = {k: float(v) for k, v in metrics.items() if v is not None and not same(k, float(v))}
    if new:
        now = int(time.time() * 1000)
        retry(lambda: c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in new.items()]))
    return new


class MetricLogger:
    """Logs metrics of one MLflow run from rank 0. Steps at or below the highest step already stored for
    ``watermark_metric`` are skipped, so a resumed run that replays steps does not log them twice."""

    def __init__(self, tracking_uri: str, run_id: str, watermark_metric: str = "train/loss"):
        self.client = client(tracking_uri)
        self.run_id = run_id
        history = retry(lambda: self.client.get_metric_history(run_id, watermark_metric))
        self.logged_through = max((m.step for m in history), default=-1)
        self._buffer: list[Any] = []

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through and not force:
            return
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items())
        self.flush()

    def set_tag(self, key: str, value: str) -> None:
        retry(lambda: self.client.set_tag(self.run_id, key, value))

    def log_files(self, files: dict[str, bytes] | Callable[[], dict[str, bytes]]) -> None:
        """Artifacts (path in the run: bytes; or a function making them); a path the run already has is
        skipped, so a resumed run that replays steps uploads nothing twice."""
        from pipelines.artifacts import _log_bytes

        made = files() if callable(files) else files
        existing: set[str] = set()
        for folder in {path.rpartition("/")[0] for path in made}:
            existing |= {a.path for a in retry(lambda folder=folder: self.client.list_artifacts(self.run_id, folder))}
        for path, data in made.items():
            if path not in existing:
                _log_bytes(self.client, self.run_id, data, path)

    def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            chunk = batch[i:i + 900]
            retry(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))


def register_model_version(c, name: str, source: str, run_id: str, tags: dict[str, str]) -> tuple[str, bool]:
    """A version of registered model ``name`` (created if missing) whose source is ``source`` (the export's
    storage location: nothing is copied), under run ``run_id``, with ``tags``. A version whose
    ``k2pipe.fingerprint`` tag equals ``tags``'s already stands for this export: it is returned, nothing is
    added. Returns (version, created)."""
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: c.get_registered_model(name))
    except MlflowException:
        try:
            retry(lambda: c.create_registered_model(
                name, description="Kimi-K2-style models exported by k2pipe (Hugging Face folders)"))
        except MlflowException:
            retry(lambda: c.get_registered_model(name))  # created meanwhile by another run
    fingerprint = tags.get("k2pipe.fingerprint")
    if fingerprint:
        versions = retry(lambda: c.search_model_versions(f"name = '{name}'"))
        for v in versions:
            if v.tags.get("k2pipe.fingerprint") == fingerprint:
                return str(v.version), False
    version = retry(lambda: c.create_model_version(name, source, run_id=run_id, tags=tags))
    return str(version.version), True
