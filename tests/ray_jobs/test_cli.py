"""The ``k2pipe`` command as a user meets it: a bad input file under ``data.on_bad_record=fail`` and a bad
config value end in a few lines naming the file or key, with the documented exit code and no traceback
(``--debug`` shows it); a stage entry point is the DAG until that stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def k2pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_data_with_a_bad_record_and_fail_names_the_line_without_a_traceback(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "a document that is long enough to keep"}\n{not json\n')
    done = k2pipe("data", "ci", "--storage", str(tmp_path / "store"), "--set", f"data.corpus={corpus}",
                  "--set", "data.on_bad_record=fail", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"{corpus}/a.jsonl: line 2: invalid json" in done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    # Stage progress, and none of Ray's, Ray Data's or MLflow's INFO lines.
    assert re.search(r"\[k2pipe\] stage 1/3 ingest +failed", done.stdout), done.stdout
    assert not re.search(r"\bINFO\b", done.stdout + done.stderr), done.stdout + done.stderr
    # Nothing half-written is marked complete.
    assert not list((tmp_path / "store").rglob("_COMPLETE.json"))


def test_a_bad_config_value_is_one_line_and_exit_2(tmp_path):
    done = k2pipe("run", "ci", "--set", "train.ep=3", "--set", "train.num_workers=2", cwd=tmp_path)
    assert done.returncode == 2
    assert "train.ep=3: must divide train.num_workers=2" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_stage_entry_point_is_the_dag_until_that_stage(tmp_path, capsys, monkeypatch):
    """``python -m pipelines.stages STAGE`` takes ``k2pipe run``'s flags; what it would run is checked first
    (called in this process: its ``__main__`` exits with what ``main`` returns)."""
    from pipelines.console import ray_logging_env
    from pipelines.stages.__main__ import main as stage

    for key in ("K2PIPE_DEBUG", *ray_logging_env()):  # what main sets in this process goes at teardown
        monkeypatch.delenv(key, raising=False)
    assert stage(["sharding", "ci"]) == 2
    assert "one of ingest, tokenizer, shard, pretrain, evaluate, export" in capsys.readouterr().err
    # Until the tokenizer stage, a BPE vocabulary too small to train is refused before Ray starts ...
    small = ["ci", "--set", "data.vocab_size=100", "--set", "model.vocab_size=100", "--set",
             "tracking.enabled=false", "--storage", str(tmp_path / "s")]
    assert stage(["tokenizer", *small]) == 2
    refused = capsys.readouterr().err
    assert "data.vocab_size=100: a byte-level BPE needs at least 259 tokens" in refused
    assert "Traceback" not in refused and not (tmp_path / "s").exists()
    # ... and --debug, given after the stage like any other flag, shows the traceback.
    assert stage(["tokenizer", *small, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
