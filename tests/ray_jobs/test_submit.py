"""``k2pipe submit`` and the job commands.

Without services: what a job carries (settings by name only, never a secret in the entrypoint, the metadata or
anything printed), where a job may store its run, and the messages for a refused or unreachable cluster
(against a stub HTTP server and a closed port).

With real services on 127.0.0.1 (module scope): a Ray head started here, the session's moto S3 server and an
MLflow server with its artifacts in that S3. The ``ci`` pipeline runs as a Ray job and lands in S3 and MLflow;
resubmitting it recomputes nothing; a job stopped mid-pretraining and submitted again resumes from its
latest checkpoint into the same MLflow runs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ray_jobs import cli, submit
from tests.ray_jobs import services

REPO = Path(__file__).resolve().parents[2]
SECRET = f"k2pipe-test-secret-{uuid.uuid4().hex}"
SESSION_TOKEN = f"k2pipe-test-session-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- without services
def _ci_config(**overrides):
    from pipelines.config import load_config

    return load_config("ci", [f"{k}={v}" for k, v in overrides.items()])


def test_job_spec_passes_settings_by_name_only():
    environ = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SESSION_TOKEN,
               "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "HOME": "/home/someone", "UNRELATED": "x"}
    cfg = submit.locate_for_cluster(_ci_config(**{"storage.root": "s3://bucket/k2"}), "http://10.0.0.7:8265",
                                    environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    spec = submit.build_job_spec(cfg, environ=environ, git_commit="0123abcd" * 5, from_stage="shard",
                                 force=("evaluate",))

    assert spec.entrypoint == "python -m ray_jobs.job_entry --from shard --force evaluate"
    env = spec.runtime_env["env_vars"]
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET and env["AWS_SESSION_TOKEN"] == SESSION_TOKEN
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["K2PIPE_GIT_COMMIT"] == "0123abcd" * 5
    assert "HOME" not in env and "UNRELATED" not in env and "PYTHONUNBUFFERED" not in env
    assert set(spec.env_names) == {"AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                   "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
                                   "K2PIPE_GIT_COMMIT"}
    visible = json.dumps([spec.entrypoint, spec.metadata, spec.submission_id, spec.env_names])
    assert SECRET not in visible and SESSION_TOKEN not in visible and "AKIAEXAMPLE" not in visible
    assert spec.metadata[submit.META_RUN_NAME] == "ci" and spec.metadata[submit.META_STORAGE] == "s3://bucket/k2"
    assert re.fullmatch(r"k2pipe-ci-\d{8}-\d{6}", spec.submission_id)
    assert env[submit.JOB_ID_ENV] == spec.submission_id
    # The config travels whole and comes back equal; it holds no credential.
    assert submit.decode_config(env[submit.CONFIG_ENV]) == cfg
    assert SECRET not in base64.b64decode(env[submit.CONFIG_ENV]).decode()
    assert Path(spec.runtime_env["working_dir"], "ray_jobs", "job_entry.py").is_file()
    assert {".venv", "k2runs", "mlruns", "mlflow.db", ".git", "*.egg-info", "__pycache__", ".pytest_cache",
            "bench-results"} <= set(spec.runtime_env["excludes"])

    bare = submit.build_job_spec(cfg, environ=environ, credentials=False)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(bare.runtime_env["env_vars"])


def test_submit_prints_variable_names_not_values(monkeypatch, capsys):
    submitted = {}

    class FakeClient:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            return kwargs["submission_id"]

    monkeypatch.setattr(submit, "connect", lambda address: FakeClient())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    code = cli.main(["submit", "ci", "--address", "http://10.1.2.3:8265", "--storage", "s3://bucket/k2",
                     "--tracking-uri", "http://mlflow.internal:5000", "--run-name", "names-only"])
    out = capsys.readouterr()
    assert code == cli.EXIT_OK
    assert "AWS_SECRET_ACCESS_KEY" in out.out and "AWS_SESSION_TOKEN" in out.out
    for value in (SECRET, SESSION_TOKEN, "AKIAEXAMPLE"):
        assert value not in out.out + out.err
        assert value not in submitted["entrypoint"] + json.dumps(submitted["metadata"])
    assert submitted["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert submitted["metadata"][submit.META_RUN_NAME] == "names-only"
    assert re.search(r"submitted job k2pipe-names-only-\d{8}-\d{6}", out.out)


def test_logs_are_printed_with_credentials_masked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    half = len(SECRET) // 2

    class FakeClient:
        async def tail_job_logs(self, job_id):
            for chunk in ("[k2pipe] start\nenv {'AWS_SECRET_ACCESS_KEY': '", SECRET[:half], SECRET[half:],
                          "'}\n[k2pipe] done"):
                await asyncio.sleep(0)
                yield chunk

    out = io.StringIO()
    submit.follow_logs(FakeClient(), "http://127.0.0.1:1", "job", out=out)
    assert out.getvalue() == "[k2pipe] start\nenv {'AWS_SECRET_ACCESS_KEY': '***'}\n[k2pipe] done\n"


@pytest.mark.parametrize("address", ["http://10.0.0.5:8265", "https://ray.example.com"])
def test_submit_refuses_a_local_storage_root_for_a_remote_cluster(address, capsys):
    code = cli.main(["submit", "ci", "--address", address, "--storage", "relative/runs"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "storage.root='relative/runs'" in err and address in err and "s3://" in err


def test_job_locations_for_local_and_remote_clusters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = submit.locate_for_cluster(_ci_config(**{"storage.root": "runs"}), "http://127.0.0.1:8265", environ={})
    assert local.storage.root == str(tmp_path / "runs")
    assert local.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert submit.locate_for_cluster(_ci_config(**{"storage.root": "runs"}), "localhost:8265",
                                     environ={}).storage.root == str(tmp_path / "runs")
    with pytest.raises(cli.UsageError, match="MLflow server"):
        submit.locate_for_cluster(_ci_config(**{"storage.root": "s3://b/p"}), "http://10.0.0.5:8265", environ={})
    with pytest.raises(cli.UsageError, match="MLFLOW_TRACKING_USERNAME"):
        submit.locate_for_cluster(_ci_config(**{"storage.root": "s3://b/p", "tracking.uri": "http://u:pw@mlflow:5000"}),
                                  "http://10.0.0.5:8265", environ={})
    remote = submit.locate_for_cluster(_ci_config(**{"storage.root": "s3://b/p/"}), "http://10.0.0.5:8265",
                                       environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert (remote.storage.root, remote.tracking.uri) == ("s3://b/p/", "http://mlflow:5000")


class _Refusing(BaseHTTPRequestHandler):
    status = 401
    body = b"Unauthorized: Missing authentication token"

    def _answer(self):
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, body, expected", [
    (401, b"Unauthorized: Missing authentication token", "requires an authentication token"),
    (403, b"Forbidden: Invalid authentication token", "refused this client's authentication token"),
])
def test_a_refused_token_says_what_to_do(status, body, expected, capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-without-its-mode")
    handler = type("Handler", (_Refusing,), {"status": status, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        code = cli.main(["status", "some-job", "--address", address])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert expected in err and address in err
    for hint in ("RAY_AUTH_MODE=token", "~/.ray/auth_token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN=",
                 "ray get-auth-token", "RAY_AUTH_TOKEN set, but unused without RAY_AUTH_MODE=token"):
        assert hint in err
    assert "a-token-without-its-mode" not in err


def test_an_unreachable_cluster_names_the_address(capsys):
    address = f"http://127.0.0.1:{services.free_port()}"
    assert cli.main(["list", "--address", address]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"cannot reach the Ray cluster at {address}" in err
    assert "ray start --head --dashboard-host 127.0.0.1" in err and "port-forward" in err


def test_job_entry_reads_the_submitted_config_or_a_named_one(monkeypatch):
    from ray_jobs import job_entry

    parser_args = lambda **kw: type("Args", (), {"config": None, "overrides": [], "run_name": None, **kw})  # noqa: E731
    cfg = _ci_config(**{"storage.root": "s3://b/p"})
    monkeypatch.setenv(submit.CONFIG_ENV, submit.encode_config(cfg))
    assert job_entry.load_job_config(parser_args()) == cfg
    with pytest.raises(ValueError, match="not allowed"):
        job_entry.load_job_config(parser_args(config="demo"))
    monkeypatch.delenv(submit.CONFIG_ENV)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    named = job_entry.load_job_config(parser_args(config="ci", overrides=["storage.root=s3://b/q"], run_name="k8s"))
    assert (named.run_name, named.storage.root, named.tracking.uri) == ("k8s", "s3://b/q", "http://mlflow:5000")
    with pytest.raises(ValueError, match="--config"):
        job_entry.load_job_config(parser_args())


# ---------------------------------------------------------------------- real services
RESUME_STEPS = 120
RESUME_OVERRIDES = ["--set", f"train.steps={RESUME_STEPS}", "--set", "train.checkpoint_every=10",
                    "--set", "train.log_every=10", "--set", "train.eval_every=0", "--set", "train.stats_every=10",
                    "--until", "pretrain"]
"""The stop/resume run: long enough to be stopped mid-way, checkpoints every 10 steps, no evaluate/export."""


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """A Ray head, an MLflow server (artifacts in S3) and a bucket; the client's environment for ``k2pipe``."""
    import boto3

    work = tmp_path_factory.mktemp("jobs")
    bucket = f"k2pipe-jobs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=bucket)
    mlflow_server = services.launch_mlflow_server(work, s3_server["endpoint"], f"s3://{bucket}/mlflow")
    head = services.launch_ray_head(num_cpus=4)
    try:
        services.wait_mlflow_server(mlflow_server)
        services.wait_ray_head(head)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "K2PIPE_"))}
        env.update(RAY_AUTH_MODE="disabled", AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SESSION_TOKEN,
                   MLFLOW_S3_ENDPOINT_URL=s3_server["endpoint"], PYTHONUNBUFFERED="1")
        yield {"address": head.address, "mlflow": mlflow_server, "bucket": bucket, "env": env, "work": work,
               "storage": f"s3://{bucket}/k2", "s3": boto3.client("s3", endpoint_url=s3_server["endpoint"])}
    finally:
        head.stop()
        mlflow_server.stop()


def k2pipe(stack, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=REPO, env=stack["env"],
                            capture_output=True, text=True, timeout=timeout)
    for value in (SECRET, SESSION_TOKEN):  # whatever k2pipe prints, including the followed job logs
        assert value not in result.stdout + result.stderr
    return result


def submit_run(stack, run_name: str, *extra: str, wait: bool = True) -> tuple[subprocess.CompletedProcess, str]:
    result = k2pipe(stack, "submit", "ci", "--address", stack["address"], "--storage", stack["storage"],
                    "--tracking-uri", stack["mlflow"].uri, "--run-name", run_name, *extra,
                    *(["--wait"] if wait else []))
    found = re.search(r"submitted job (k2pipe-\S+)", result.stdout)
    assert found, result.stdout[-3000:] + result.stderr[-3000:]
    return result, found.group(1)


def s3_objects(stack, prefix: str) -> dict[str, Any]:
    """Key: last-modified time of every object under ``prefix``."""
    objects, token = {}, None
    while True:
        kwargs = {"Bucket": stack["bucket"], "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = stack["s3"].list_objects_v2(**kwargs)
        objects.update({o["Key"]: o["LastModified"] for o in page.get("Contents", [])})
        token = page.get("NextContinuationToken")
        if not token:
            return objects


def s3_keys(stack, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        kwargs = {"Bucket": stack["bucket"], "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = stack["s3"].list_objects_v2(**kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def checkpoint_folders(stack, run_name: str) -> set[str]:
    return {m.group(0) for k in s3_keys(stack, f"k2/runs/{run_name}/")
            if (m := re.search(r"[^/]+/checkpoint-step\d+", k))}


def tracking_record(stack, run_name: str) -> dict:
    body = stack["s3"].get_object(Bucket=stack["bucket"], Key=f"k2/runs/{run_name}/tracking.json")["Body"].read()
    return json.loads(body)


def mlflow_runs(stack, run_name: str) -> list[dict]:
    exp = stack["mlflow"].api("GET", "experiments/get-by-name", experiment_name="k2pipe")["experiment"]
    runs = stack["mlflow"].api("POST", "runs/search", {
        "experiment_ids": [exp["experiment_id"]], "max_results": 100,
        "filter": f"tags.`k2pipe.run_name` = '{run_name}'"}).get("runs", [])
    for run in runs:
        run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        run["metrics"] = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    return runs


def stage_runs(runs: list[dict]) -> dict[str, dict]:
    return {r["tags"]["k2pipe.stage"]: r for r in runs if r["tags"].get("k2pipe.kind") == "stage"}


def loss_history(stack, run_id: str) -> list[tuple[int, float]]:
    history = stack["mlflow"].api("GET", "metrics/get-history", run_id=run_id, metric_key="train/loss")
    return [(int(m["step"]), float(m["value"])) for m in history.get("metrics", [])]


@pytest.mark.slow
def test_submitted_run_lands_in_s3_and_mlflow(stack):
    from safetensors.torch import load as load_safetensors

    result, job_id = submit_run(stack, "ci-job")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"job {job_id} SUCCEEDED" in result.stdout
    assert "passing environment variables (names only): " in result.stdout
    assert "AWS_SECRET_ACCESS_KEY" in result.stdout and "MLFLOW_TRACKING_URI" in result.stdout

    # Outputs in S3: every stage complete, the export loadable.
    keys = s3_keys(stack, "k2/")
    for stage in ("ingest", "tokenizer", "shard", "evaluate", "export"):
        assert any(re.fullmatch(rf"k2/stages/{stage}/[0-9a-f]+/_COMPLETE\.json", k) for k in keys), stage
    assert any(re.fullmatch(r"k2/runs/ci-job/ci-job-pretrain-[0-9a-f]+/_COMPLETE\.json", k) for k in keys)
    export_key = next(k for k in keys if re.fullmatch(r"k2/stages/export/[0-9a-f]+/model\.safetensors", k))
    tensors = load_safetensors(stack["s3"].get_object(Bucket=stack["bucket"], Key=export_key)["Body"].read())
    assert len(tensors) > 10 and all(t.isfinite().all() for t in tensors.values())

    # MLflow: one finished parent run, six finished stage runs, metrics and artifacts (stored in S3).
    record = tracking_record(stack, "ci-job")
    runs = mlflow_runs(stack, "ci-job")
    parents = [r for r in runs if r["tags"].get("k2pipe.kind") == "pipeline"]
    assert [p["info"]["run_id"] for p in parents] == [record["parent_run_id"]]
    assert parents[0]["info"]["status"] == "FINISHED"
    assert parents[0]["tags"].get("k2pipe.ray_job_id") == job_id
    stages = stage_runs(runs)
    assert set(stages) == {"ingest", "tokenizer", "shard", "pretrain", "evaluate", "export"}
    assert all(r["info"]["status"] == "FINISHED" and r["tags"]["k2pipe.status"] == "ran" for r in stages.values())
    history = loss_history(stack, stages["pretrain"]["info"]["run_id"])
    assert [s for s, _ in history] == [2, 4, 6, 8, 10, 12]
    report_key = next(k for k in keys if re.fullmatch(r"k2/stages/evaluate/[0-9a-f]+/report\.json", k))
    report = json.loads(stack["s3"].get_object(Bucket=stack["bucket"], Key=report_key)["Body"].read())
    assert stages["evaluate"]["metrics"]["eval/val_loss"] == pytest.approx(report["val_loss"])
    assert stages["evaluate"]["metrics"]["eval/val_tokens"] == report["val_tokens"]
    export_run = stages["export"]["info"]["run_id"]
    listed = stack["mlflow"].api("GET", "artifacts/list", run_id=export_run, path="model")
    assert {f["path"] for f in listed["files"]} >= {"model/config.json", "model/README.md"}
    assert any(k.endswith(f"{export_run}/artifacts/model/config.json") for k in s3_keys(stack, "mlflow/"))
    assert not any(k.endswith(".safetensors") for k in s3_keys(stack, "mlflow/")), "weights stay in the export"

    # The registry: one version of k2pipe-tiny under the parent run, pointing at the export in S3.
    export_uri = "s3://{}/{}".format(stack["bucket"], export_key.rsplit("/", 1)[0])
    versions = stack["mlflow"].api("GET", "model-versions/search", filter="name = 'k2pipe-tiny'")["model_versions"]
    assert [(v["source"], v["run_id"]) for v in versions] == [(export_uri, record["parent_run_id"])]
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert tags["k2pipe.run_name"] == "ci-job" and tags["k2pipe.fingerprint"] == export_key.split("/")[-2]

    stack["ci_job"] = {"record": record, "checkpoints": checkpoint_folders(stack, "ci-job"), "history": history}


@pytest.mark.slow
def test_resubmitting_a_finished_run_recomputes_nothing(stack):
    before = stack.get("ci_job") or pytest.skip("needs test_submitted_run_lands_in_s3_and_mlflow")
    result, _ = submit_run(stack, "ci-job")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert len(re.findall(r"^\s+\w+\s+reused\s", result.stdout, flags=re.MULTILINE)) == 6
    assert tracking_record(stack, "ci-job") == before["record"]
    assert checkpoint_folders(stack, "ci-job") == before["checkpoints"]
    stages = stage_runs(mlflow_runs(stack, "ci-job"))
    assert {name: r["tags"]["k2pipe.status"] for name, r in stages.items()} == dict.fromkeys(stages, "reused")
    assert loss_history(stack, stages["pretrain"]["info"]["run_id"]) == before["history"]
    versions = stack["mlflow"].api("GET", "model-versions/search", filter="name = 'k2pipe-tiny'")["model_versions"]
    assert len(versions) == 1, "a reused export adds no model version"


@pytest.mark.slow
def test_a_stopped_job_resumes_from_its_checkpoint_when_submitted_again(stack):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(stack["address"])
    result, job_id = submit_run(stack, "resume-job", *RESUME_OVERRIDES, wait=False)
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.monotonic() + 300
    while "[k2pipe] step 20/" not in client.get_job_logs(job_id):
        assert str(client.get_job_status(job_id)) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-4000:]
        assert time.monotonic() < deadline, "pretraining did not reach step 20 in time"
        time.sleep(0.5)
    stopped = k2pipe(stack, "stop", job_id, "--address", stack["address"])
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert checkpoint_folders(stack, "resume-job"), "no checkpoint was written before the stop"
    record = tracking_record(stack, "resume-job")
    assert not any(k.endswith("/_COMPLETE.json") for k in s3_keys(stack, "k2/runs/resume-job/")), \
        "pretraining finished before the stop; raise RESUME_STEPS"
    pretrain_id = record["stage_run_ids"]["pretrain"]
    stats = f"/{pretrain_id}/artifacts/stats/"
    snapshots_before = {k: t for k, t in s3_objects(stack, "mlflow/").items() if stats in k}
    assert snapshots_before, "no stats snapshot before the stop"

    result, _ = submit_run(stack, "resume-job", *RESUME_OVERRIDES)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    resumed = re.search(r"\[k2pipe\] resumed from \S+checkpoint-step(\d+) at step (\d+)", result.stdout)
    assert resumed, result.stdout[-4000:]
    assert 10 <= int(resumed.group(2)) < RESUME_STEPS and int(resumed.group(1)) == int(resumed.group(2))
    assert tracking_record(stack, "resume-job")["parent_run_id"] == record["parent_run_id"]
    runs = mlflow_runs(stack, "resume-job")
    parents = [r["info"]["run_id"] for r in runs if r["tags"].get("k2pipe.kind") == "pipeline"]
    assert parents == [record["parent_run_id"]]
    steps = [s for s, _ in loss_history(stack, stage_runs(runs)["pretrain"]["info"]["run_id"])]
    assert steps == list(range(10, RESUME_STEPS + 1, 10))  # each step once across both jobs
    # The per-layer series and the snapshots too: each step once, nothing logged before the stop logged again.
    for key in ("qk_clip/clipped_share_layer0", "attn/max_logit_layer3", "qk_clip/heads_clipped_total",
                "train/seconds_total"):
        history = stack["mlflow"].api("GET", "metrics/get-history", run_id=pretrain_id, metric_key=key)["metrics"]
        assert sorted(int(m["step"]) for m in history) == list(range(10, RESUME_STEPS + 1, 10)), key
    snapshots = {k: t for k, t in s3_objects(stack, "mlflow/").items() if stats in k}
    assert sorted(k.rsplit("/", 1)[1] for k in snapshots) == sorted(
        f"step-{s:08d}{suffix}" for s in range(10, RESUME_STEPS + 1, 10)
        for suffix in (".npz", "-max_logits.png", "-expert_load.png"))
    assert {k: snapshots[k] for k in snapshots_before} == snapshots_before, "a snapshot was uploaded again"
    parent = next(r for r in runs if r["tags"].get("k2pipe.kind") == "pipeline")
    history = stack["mlflow"].api("GET", "metrics/get-history", run_id=parent["info"]["run_id"],
                                  metric_key="final/train_loss")["metrics"]
    assert [int(m["step"]) for m in history] == [RESUME_STEPS]


@pytest.mark.slow
def test_list_status_and_compare(stack, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cli.main(["list", "--address", stack["address"], "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    by_run: dict[str, list[str]] = {}
    for job in jobs:
        by_run.setdefault(job["run_name"], []).append(job["status"])
    assert by_run.get("ci-job") == ["SUCCEEDED", "SUCCEEDED"]
    assert by_run.get("resume-job") == ["STOPPED", "SUCCEEDED"]
    job_id = next(j["job"] for j in jobs if j["run_name"] == "ci-job")
    assert cli.main(["status", job_id, "--address", stack["address"]]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^status\s+SUCCEEDED$", status, re.MULTILINE)
    assert re.search(r"^run\s+ci-job$", status, re.MULTILINE)

    png = tmp_path / "runs.png"
    assert cli.main(["compare", "--tracking-uri", stack["mlflow"].uri, "--out", str(png), "--json",
                     "--runs", "ci-job", "resume-job"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["runs"]}
    assert list(rows) == ["ci-job", "resume-job"]
    expected = {"model.preset": "tiny", "train.steps": "12", "train.lr": "0.003", "optimizer.name": "muonclip",
                "train.global_batch_size": "8"}
    assert {k: rows["ci-job"]["params"][k] for k in expected} == expected
    assert rows["resume-job"]["params"]["train.steps"] == str(RESUME_STEPS)
    assert "train.steps" in report["differing_params"] and "model.preset" not in report["differing_params"]
    for row in rows.values():
        assert row["status"] == "FINISHED" and row["train_loss"] == row["loss_curve"][-1][1]
        assert row["headline"]["final/train_loss"] == row["train_loss"]
        assert row["max_logit_curve"] and [s for s, _ in row["max_logit_curve"]] == [s for s, _ in row["loss_curve"]]
    assert [step for step, _ in rows["resume-job"]["loss_curve"]] == list(range(10, RESUME_STEPS + 1, 10))
    assert rows["ci-job"]["val_loss"] > 0 and rows["resume-job"]["val_loss"] is None  # it ran --until pretrain
    assert rows["ci-job"]["headline"]["final/val_loss"] == pytest.approx(rows["ci-job"]["val_loss"])
    assert "final/val_loss" not in rows["resume-job"]["headline"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["compare", "ci-job", "resume-job", "--tracking-uri", stack["mlflow"].uri, "--out", str(png)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ci-job", "resume-job"] and table[1].split() == ["status", "FINISHED", "FINISHED"]
    assert re.search(r"^train\.steps\s+12\s+" + str(RESUME_STEPS) + "$", "\n".join(table), re.MULTILINE)
