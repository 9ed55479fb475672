"""The ``k2pipe`` command as a user meets it: a bad input file under ``data.on_bad_record=fail`` and a bad
config value end in a few lines naming the file or key, with the documented exit code and no traceback
(``--debug`` shows it); a stage entry point is the DAG until that stage."""

from __future__ import annotations

import json
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


def test_plan_answers_from_the_config_alone(tmp_path):
    """``k2pipe plan``: a layout as JSON with the documented keys, a refused layout naming the option (exit
    2, no traceback), a search that lists the layouts that fit and the --set lines of the best."""
    done = k2pipe("plan", "--preset", "small", "--set", "data.seq_len=128", "--set", "train.global_batch_size=32",
                  "--gpus", "8", "--pp", "2", "--ep", "2", "--micro-batch", "2", "--gpu-memory-gb", "24", "--json",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["fits"] is True and plan["headroom_bytes"] == plan["gpu_memory_bytes"] - plan["per_gpu"]["total"]
    assert {"parameters", "gradients", "optimizer_state", "master_weights", "activations", "optimizer_transient",
            "reserve", "total"} <= set(plan["per_gpu"])
    assert {"all_to_all_bytes", "data_parallel_bytes", "pipeline_bytes"} == set(plan["traffic"])
    assert plan["estimate"]["step_s"] > 0 and 0 < plan["bubble"] < 1 and len(plan["stages"]) == 2
    assert "train.pp=2" in plan["set"] and plan["smallest_change"] is None
    refused = k2pipe("plan", "--preset", "small", "--gpus", "8", "--pp", "3", cwd=tmp_path)
    assert refused.returncode == 2 and "--pp (train.pp) 3 must divide --gpus 8" in refused.stderr
    assert "Traceback" not in refused.stderr
    search = k2pipe("plan", "--preset", "small", "--set", "data.seq_len=128", "--set", "train.global_batch_size=32",
                    "--gpus", "2", "--micro-batch", "2", "--gpu-memory-gb", "8", cwd=tmp_path)
    assert search.returncode == 0, search.stderr
    assert re.search(r"\d+ of \d+ valid layouts fit, fastest first", search.stdout)
    assert "run it with: --set train.num_workers=2" in search.stdout


def test_a_run_whose_layout_cannot_fit_train_device_memory_gb_is_refused_before_anything_starts(tmp_path):
    """``train.device_memory_gb``: the planner's arithmetic refuses the layout when the config is loaded (exit
    2, no Ray, no storage written), naming what it needs and the smallest change that fits."""
    from pipelines.config import load_config

    small = ["model.preset=small", "model.vocab_size=1024"]
    assert load_config("ci", [*small, "train.device_memory_gb=4"]).train.device_memory_gb == 4
    done = k2pipe("run", "ci", "--storage", str(tmp_path / "store"), *(f"--set={s}" for s in small),
                  "--set", "train.device_memory_gb=3.5", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert re.search(r"train.device_memory_gb=3.5: this layout needs 3\.\d GB on its most loaded GPU", done.stderr)
    assert "smallest change that fits:" in done.stderr and "--set train.offload_optimizer=true" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "store").exists()


def test_values_no_run_could_use_are_refused_naming_the_key():
    from pipelines.config import ConfigError, load_config

    for override, message in (("train.steps=nan", "train.steps='nan': expected an integer"),
                              ("model.hidden_size=1e400", "model.hidden_size='1e400': expected an integer"),
                              ("train.lr=inf", "train.lr='inf': expected a finite number"),
                              ("train.cpus_per_worker=-inf", "train.cpus_per_worker='-inf': expected a finite number"),
                              ("model.rope_scaling={foo: 1}",
                               "model.rope_scaling.foo: not a YaRN field; valid: factor, original_max_position"),
                              ("model.rope_scaling={factor: abc}",
                               "model.rope_scaling.factor='abc': expected a number")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("ci", [override])
    scaled = load_config("ci", ["model.rope_scaling={factor: 4, original_max_position_embeddings: 512}"])
    assert (scaled.model.rope_scaling.factor, scaled.model.rope_scaling.original_max_position_embeddings) == (4.0, 512)


def test_a_tracking_uri_is_checked_before_anything_is_tracked(tmp_path, capsys, monkeypatch):
    """A server that does not answer is said at once (not after minutes of retries), with no credentials in
    the message; any HTTP answer counts as an answer; an unknown scheme or a missing folder is bad usage."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipelines.config import ConfigError
    from pipelines.tracking import TrackingUnreachable, check_tracking_uri
    from ray_jobs import cli

    monkeypatch.delenv("K2PIPE_DEBUG", raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(TrackingUnreachable, match=rf"the MLflow server at http://\*\*\*@127.0.0.1:{closed} does not "
                                                  "answer"):
        check_tracking_uri(f"http://user:hunter2@127.0.0.1:{closed}")
    assert cli.main(["compare", "--tracking-uri", f"http://127.0.0.1:{closed}"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"k2pipe: tracking error: the MLflow server at http://127.0.0.1:{closed} does not answer" in err
    assert "Traceback" not in err

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}")  # it answered: no error
    finally:
        server.shutdown()
    with pytest.raises(ConfigError, match=r"tracking.uri=foo://x: unknown scheme 'foo'; valid: sqlite:///PATH"):
        check_tracking_uri("foo://x")
    with pytest.raises(ConfigError, match=rf"the folder {tmp_path / 'nowhere'} does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()  # checking creates nothing


def test_an_unforeseen_error_is_still_a_few_lines_and_debug_works_after_the_command(capsys, monkeypatch):
    from ray_jobs import cli

    def broken(args):
        raise TypeError("something no check foresaw")

    monkeypatch.setattr(cli, "cmd_params", broken)  # the real parser, with `params` pointed at a failing body
    monkeypatch.delenv("K2PIPE_DEBUG", raising=False)
    assert cli.main(["params"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "k2pipe: error (TypeError): something no check foresaw" in err and "Traceback" not in err
    assert cli.main(["params", "--debug"]) == cli.EXIT_FAILED  # --debug after the command, too
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("K2PIPE_DEBUG", raising=False)  # main set it for the --debug call


def test_params_refuses_a_config_json_that_is_not_an_object(tmp_path, capsys):
    from ray_jobs import cli

    (tmp_path / "list.json").write_text("[1, 2]")
    assert cli.main(["params", "--hf-config", str(tmp_path / "list.json")]) == cli.EXIT_USAGE
    assert f"--hf-config {tmp_path / 'list.json'}: expected a JSON object (a model's config.json), not a list" \
        in capsys.readouterr().err


def test_submit_refuses_what_the_job_would_refuse_before_reaching_the_cluster(capsys):
    from ray_jobs import cli

    # Nothing listens at this address: the refusal comes before any connection is tried.
    code = cli.main(["submit", "ci", "--address", "http://127.0.0.1:9", "--storage", "s3://b/k2", "--set",
                     "data.vocab_size=100", "--set", "model.vocab_size=100"])
    assert code == cli.EXIT_USAGE
    assert "data.vocab_size=100: a byte-level BPE needs at least 259 tokens" in capsys.readouterr().err
    code = cli.main(["submit", "ci", "--address", "http://127.0.0.1:9", "--storage", "s3://b/k2", "--set",
                     "model.score_func=softmax"])
    assert code == cli.EXIT_USAGE and "model.score_func='softmax'" in capsys.readouterr().err


def test_a_missing_local_corpus_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from ray_jobs import cli

    monkeypatch.delenv("K2PIPE_DEBUG", raising=False)
    code = cli.main(["data", "ci", "--set", f"data.corpus={tmp_path / 'nowhere'}", "--set", "tracking.enabled=false",
                     "--storage", str(tmp_path / "store")])
    assert code == cli.EXIT_USAGE
    assert f"data.corpus={tmp_path / 'nowhere'}: no such file or folder on this machine" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "store").exists()



@pytest.mark.parametrize("flags, message", [
    (["--micro-batch", "0"], "--micro-batch 0: expected at least 1"),  # was taken as "the default"
    (["--top", "0"], "--top 0: expected at least 1"),
    (["--pp", "0", "--ep", "1"], "--pp 0: expected at least 1"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0: expected a positive number"),
    (["--gpu-memory-gb", "-1"], "--gpu-memory-gb -1.0: expected a positive number"),  # named the flag
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb nan: expected a positive number"),
    (["--a2a-overlap", "-0.5"], "--a2a-overlap -0.5: expected a share in [0, 1]"),
])
def test_plan_refuses_a_flag_out_of_range_naming_it(flags, message, capsys):
    from ray_jobs import cli

    assert cli.main(["plan", "--preset", "small", "--gpus", "8", *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_config_file_that_cannot_be_read_as_yaml_is_bad_usage_naming_it(tmp_path):
    from pipelines.config import ConfigError, load_config
    from pipelines.sweep import load_sweep

    (tmp_path / "dup.yaml").write_text("train: {steps: 3, steps: 4}\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "folder.yaml").mkdir()
    for name, message in (("dup.yaml", "not valid YAML: key 'steps' given twice\n  in \"{path}\", line 1"),
                          ("binary.yaml", "{path}: not UTF-8 text"),
                          ("folder.yaml", "{path}: cannot be read (Is a directory)")):
        path = tmp_path / name
        for load in (load_config, load_sweep):
            with pytest.raises(ConfigError, match=re.escape(message.format(path=path))):
                load(str(path))
    done = k2pipe("run", str(tmp_path / "folder.yaml"), cwd=tmp_path)  # not a storage error: exit 2
    assert done.returncode == 2 and "cannot be read (Is a directory)" in done.stderr, done.stderr


def test_a_local_corpus_is_found_as_ingest_reads_it(tmp_path, monkeypatch):
    from pipelines.dag import check_local_corpus
    from pipelines.storage import DataError

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    for present in ("~/corpus", f"file://{tmp_path / 'corpus'}", str(tmp_path / "corpus"), "s3://bucket/any", None):
        check_local_corpus(present)
    with pytest.raises(DataError, match=r"data.corpus=~/gone: no such file or folder on this machine"):
        check_local_corpus("~/gone")

