"""The files in infra/ agree with the code: the RayJob's entrypoint is a valid run, the images copy every
package, the manifests parse, and the scripts refuse unsafe settings before starting anything."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_jobs.submit import META_RUN_NAME

INFRA = Path(__file__).resolve().parents[2] / "infra"
REPO = INFRA.parent


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_rayjob_runs_a_valid_config_on_the_raycluster():
    from pipelines.config import load_config
    from ray_jobs.job_entry import main as _entry  # noqa: F401  (the module the entrypoint runs imports)

    (job,) = _documents(INFRA / "kuberay" / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.job_entry"]
    overrides, options = [], {}
    for flag, value in zip(argv[3::2], argv[4::2]):
        if flag == "--set":
            overrides.append(value)
        else:
            options[flag] = value
    cfg = load_config(options["--config"], overrides, run_name=options["--run-name"])
    assert cfg.storage.root.startswith("s3://") and cfg.train.num_workers % cfg.train.ep == 0
    assert job["spec"]["metadata"][META_RUN_NAME] == cfg.run_name

    cluster = next(d for d in _documents(INFRA / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert cluster["spec"]["rayVersion"] == "2.60.0" and cluster["spec"]["authOptions"]["mode"] == "token"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and "nvidia.com/gpu" in groups["gpu"]["resources"]["limits"]
    for container in (head, *groups.values()):
        sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
        assert sources == {"configMapRef": "k2pipe-settings", "secretRef": "k2pipe-aws"}


def test_images_copy_every_package():
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    names = {p.rstrip("*") for p in packages["include"]}
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (INFRA / "docker" / dockerfile).read_text()
        copied = set(re.findall(r"^COPY (\w+) \1$", text, flags=re.MULTILINE))
        assert copied == names, dockerfile
        assert re.search(r'torch==\$\{TORCH_VERSION\}', text) and "ARG TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/cpu" in (INFRA / "docker" / "Dockerfile").read_text()


def test_cluster_launcher_config_parses():
    config = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    assert {"cpu", "gpu"} <= set(config["available_node_types"])
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"][1:])


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "K2PIPE_"))}
    return subprocess.run(["bash", str(script), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def test_scripts_refuse_unsafe_settings_before_starting(tmp_path):
    server = INFRA / "mlflow" / "run_server.sh"
    not_s3 = _run(server, MLFLOW_ARTIFACTS_DESTINATION="/tmp/artifacts", MLFLOW_DATA_DIR=str(tmp_path))
    assert not_s3.returncode == 2 and "expected s3://" in not_s3.stderr
    exposed = _run(server, MLFLOW_HOST="0.0.0.0", MLFLOW_DATA_DIR=str(tmp_path))
    assert exposed.returncode == 2 and "MLFLOW_ALLOWED_HOSTS" in exposed.stderr
    usage = _run(INFRA / "local" / "stack.sh", "restart")
    assert usage.returncode == 2 and "up|down|status" in usage.stderr
    status = _run(INFRA / "local" / "stack.sh", "status", K2PIPE_STACK_DIR=str(tmp_path / "stack"))
    assert status.returncode == 0 and status.stdout.split("\n")[:3] == ["s3      stopped", "mlflow  stopped",
                                                                          "ray     stopped"]
