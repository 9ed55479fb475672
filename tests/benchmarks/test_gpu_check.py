"""The prepared device run, ``benchmarks/gpu_check.sh``, as CI can run it: ``--dry-run`` on the CPU runs
every part that can run without a GPU, writes its JSON and logs to ``$OUT``, and says what it skipped,
with the packages the device image lacks made absent, as they are there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_the_dry_run_runs_what_a_cpu_can_and_says_what_it_skipped(tmp_path):
    done = gpu_check("--dry-run", out=tmp_path)  # every part
    assert done.returncode == 0, done.stdout + done.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["cuda_available"] is False and env["problems"] == []
    assert env["medium_params"] == {"total": 2_605_974_528, "active": 668_206_080}
    assert "grouped_mm_bfloat16_max_error" in env
    assert "skipped on this machine (no CUDA device)" in done.stdout
    assert "test_cuda.py::test_nccl_refuses_a_cpu_tensor" in (tmp_path / "tests.log").read_text()
    bench = json.loads((tmp_path / "bench-dry.json").read_text())
    assert bench["device"] == "cpu" and bench["tokens_per_s"] > 0 and bench["preset"] == "tiny"
    phases = bench["breakdown_s"]
    assert {"forward", "backward", "causal_max_logit_per_head", "gradient_sync", "optimizer_step",
            "newton_schulz", "qk_clip"} <= set(phases)
    assert 0 < phases["causal_max_logit_per_head"] < phases["forward"]
    assert 0 < bench["ns_flop_share_at_1m_tokens"] < bench["ns_flop_share"] < 1 and bench["recording_share"] > 0
    # Without --dry-run on a machine without a GPU: refused, nothing run.
    refused = gpu_check("env", out=tmp_path / "real")
    assert refused.returncode == 2 and "run with --dry-run" in refused.stderr
    # The peer: transformers' model loaded from a k2pipe export, its logits checked, both timed.
    peer = json.loads((tmp_path / "peer-dry.json").read_text())
    assert peer["logits"]["logits_match"] and peer["logits"]["relative"] < 1e-4
    assert peer["peer_kernels"] == {"attention": "sdpa", "experts": "grouped_mm"}
    assert set(peer["tokens_per_s"]) == {"k2pipe", "transformers", "transformers_bf16"}
    assert all(len(t) == 2 for t in peer["step_s_all_rounds"].values())


def test_the_device_run_collects_every_module_with_cuda_tests_and_nothing_the_image_lacks():
    """The device run names the test modules it collects (collecting the whole tree there would import Ray,
    which the image lacks): the list is every module with a ``cuda`` test, and under the dry run's
    ``benchmarks/device_image`` the packages missing there are absent here too."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    listed = set(re.search(r"^CUDA_TEST_MODULES=\(([^)]*)\)", script, re.M).group(1).split())
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"^(@pytest\.mark\.cuda|pytestmark = .*\bcuda\b)", p.read_text(), re.M)}
    assert listed == marked
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks" / "device_image")}
    probe = ("import importlib.util as u, sys; import torch, yaml, pyarrow, safetensors; "
             "sys.exit(sum(u.find_spec(m) is not None for m in ('ray', 'mlflow', 'boto3', 'moto', 'zstandard')))")
    assert subprocess.run([sys.executable, "-c", probe], env=env, timeout=60).returncode == 0
