"""What the MLflow UI shows of two pipeline runs that differ in one setting, read as the UI reads it: through
a real ``mlflow server`` on 127.0.0.1 and its REST API, and, where Debian's ``chromium`` is installed, the
runs table rendered headlessly.

Two ``ci`` pipelines (embedded Ray, local storage) differ in ``train.lr``. Checked: the experiment opens on
the model-training view; each parent run carries the headline metrics, equal to what its stage runs
logged, and a description naming the setting that differs; the pretrain runs log exactly the series
``logged_metric_names`` says (per layer, not per head or expert), the per-head and per-expert snapshots
as artifacts whose arrays agree with the per-layer metrics; a rerun adds no point to any series and no
artifact; ``k2pipe compare`` puts the runs side by side."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import ray

from pipelines.config import load_config
from pipelines.dag import HEADLINE_METRICS, run_pipeline
from pipelines.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from pipelines.train.trainer import logged_metric_names
from ray_jobs import cli
from tests.ray_jobs.services import launch_mlflow_server, wait_mlflow_server

LRS = ("0.003", "0.001")
EXPERIMENT = "k2pipe-ui"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    server = launch_mlflow_server(work, "http://127.0.0.1:9", str(work / "mlartifacts"))
    try:
        wait_mlflow_server(server)
        configs = [load_config("ci", [f"storage.root={work / 'k2runs'}", f"tracking.uri={server.uri}",
                                      f"tracking.experiment={EXPERIMENT}", f"train.lr={lr}", "train.steps=6",
                                      "train.stats_every=2"],
                               run_name=f"ui-lr{lr}") for lr in LRS]
        results = [run_pipeline(cfg) for cfg in configs]
        yield {"server": server, "configs": configs, "results": results, "work": work}
    finally:
        ray.shutdown()
        server.stop()


def _runs(server, experiment_id: str, filter_string: str) -> list[dict]:
    found = server.api("POST", "runs/search", {"experiment_ids": [experiment_id], "filter": filter_string,
                                               "max_results": 100}).get("runs", [])
    for run in found:
        data = run["data"]
        run["params"] = {p["key"]: p["value"] for p in data.get("params", [])}
        run["metrics"] = {m["key"]: m["value"] for m in data.get("metrics", [])}
        run["tags"] = {t["key"]: t["value"] for t in data.get("tags", [])}
    return found


def _history(server, run_id: str, key: str) -> list[tuple[int, float]]:
    points = server.api("GET", "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m["step"]), float(m["value"])) for m in points)


def _artifacts(server, run_id: str, path: str) -> list[str]:
    return [f["path"] for f in server.api("GET", "artifacts/list", run_id=run_id, path=path).get("files", [])]


def _download(server, run_id: str, path: str) -> bytes:
    import urllib.request

    url = f"{server.uri}/get-artifact?path={path}&run_uuid={run_id}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_the_runs_table_compares_both_runs_without_expanding_anything(runs):
    server, configs = runs["server"], runs["configs"]
    exp = server.api("GET", "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    parents = {r["tags"]["k2pipe.run_name"]: r for r in _runs(server, exp["experiment_id"],
                                                               "tags.`k2pipe.kind` = 'pipeline'")}
    assert sorted(parents) == sorted(cfg.run_name for cfg in configs)
    for cfg in configs:
        parent = parents[cfg.run_name]
        assert set(parent["metrics"]) == set(HEADLINE_METRICS), sorted(parent["metrics"])
        assert parent["params"]["train.lr"] == str(cfg.train.lr)
        note = parent["tags"]["mlflow.note.content"]
        assert note.startswith("**tiny**") and "`train.stats_every=2`" in note
        assert (f"`train.lr={cfg.train.lr}`" in note) == (cfg.train.lr != 0.003), "the default lr is not listed"
        stages = {r["tags"]["k2pipe.stage"]: r for r in _runs(
            server, exp["experiment_id"], f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")}
        pretrain, evaluate = stages["pretrain"], stages["evaluate"]
        m = parent["metrics"]
        assert m["final/train_loss"] == pretrain["metrics"]["train/loss"]
        assert m["final/val_loss"] == pytest.approx(evaluate["metrics"]["eval/val_loss"])
        assert m["final/val_perplexity"] == pytest.approx(np.exp(m["final/val_loss"]))
        assert m["final/tokens_trained"] == cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
        assert m["final/heads_clipped"] == pretrain["metrics"]["qk_clip/heads_clipped_total"]
        assert m["final/load_imbalance"] == pretrain["metrics"]["moe/load_imbalance"]
        logits = [v for _, v in _history(server, pretrain["info"]["run_id"], "attn/max_logit")]
        assert m["final/max_logit"] == max(logits)
        rates = [v for _, v in _history(server, pretrain["info"]["run_id"], "train/tokens_per_s")]
        assert m["final/tokens_per_s"] == pytest.approx(sum(rates) / len(rates))
        assert 0 < m["final/train_s"] < m["final/wall_s"]
        assert all(_history(server, parent["info"]["run_id"], k)[0][0] == cfg.train.steps for k in HEADLINE_METRICS)
        # The export is not registered: a tracking server takes no local path outside its artifact folder.
        assert parent["tags"]["export.registry"].startswith("not registered")


def test_series_grow_with_layers_and_snapshots_hold_the_heads_and_experts(runs):
    server, cfg = runs["server"], runs["configs"][0]
    exp = server.api("GET", "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    pretrain = next(r for r in _runs(server, exp["experiment_id"], "tags.`k2pipe.stage` = 'pretrain'")
                    if r["tags"]["mlflow.runName"].startswith(cfg.run_name))
    run_id = pretrain["info"]["run_id"]
    logged = {k for k in pretrain["metrics"] if not k.startswith("system/")}
    assert logged == set(logged_metric_names(cfg))
    files = set(_artifacts(server, run_id, "stats"))
    snapshots = range(cfg.train.stats_every, cfg.train.steps + 1, cfg.train.stats_every)
    assert files == {f"stats/step-{s:08d}{suffix}" for s in snapshots
                     for suffix in (".npz", "-max_logits.png", "-expert_load.png")}
    tau, m = cfg.optimizer.qk_clip_tau, cfg.model
    for step in snapshots:
        arrays = np.load(io.BytesIO(_download(server, run_id, f"stats/step-{step:08d}.npz")))
        logits, load = arrays["max_logits"], arrays["expert_load"]
        assert logits.shape == (m.num_layers, m.num_heads) and load.shape == (m.num_moe_layers, m.num_experts)
        assert int(arrays["step"]) == step
        # The snapshot's tokens: every routed token of the step lands on num_experts_per_tok experts.
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        assert (load.sum(axis=1) == tokens * m.num_experts_per_tok).all()
        for i in range(m.num_layers):
            at = dict(_history(server, run_id, f"attn/max_logit_layer{i}"))
            assert at[step] == pytest.approx(float(logits[i].max()), rel=1e-6)
            share = dict(_history(server, run_id, f"qk_clip/clipped_share_layer{i}"))
            assert share[step] == pytest.approx(float((logits[i] > tau).mean()))
        png = _download(server, run_id, f"stats/step-{step:08d}-max_logits.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_logs_no_metric_twice_and_no_artifact_again(runs):
    server, cfg = runs["server"], runs["configs"][0]
    exp = server.api("GET", "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]

    def snapshot():
        parent = next(r for r in _runs(server, exp["experiment_id"], "tags.`k2pipe.kind` = 'pipeline'")
                      if r["tags"]["k2pipe.run_name"] == cfg.run_name)
        pretrain = next(r for r in _runs(server, exp["experiment_id"],
                                         f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
                        if r["tags"]["k2pipe.stage"] == "pretrain")
        series = {("parent", k): _history(server, parent["info"]["run_id"], k) for k in parent["metrics"]}
        series.update({("pretrain", k): _history(server, pretrain["info"]["run_id"], k)
                       for k in logged_metric_names(cfg)})
        return series, _artifacts(server, pretrain["info"]["run_id"], "stats")

    before = snapshot()
    again = run_pipeline(cfg)
    assert {r.status for r in again.stages.values()} == {"reused"}
    after = snapshot()
    assert after == before
    assert all(len(points) == len({s for s, _ in points}) for points in after[0].values())


def test_compare_prints_the_differing_setting_and_the_headline_side_by_side(runs, tmp_path, capsys):
    server, configs = runs["server"], runs["configs"]
    names = [cfg.run_name for cfg in configs]
    png = tmp_path / "cmp.png"
    assert cli.main(["compare", *names, "--experiment", EXPERIMENT, "--tracking-uri", server.uri,
                     "--out", str(png)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == names
    assert re.search(rf"^train\.lr\s+{LRS[0]}\s+{LRS[1]}\s*$", table, re.MULTILINE), table
    assert "train.steps" not in table
    for label in ("train loss", "val loss", "worst max logit", "heads clipped", "tokens/s"):
        row = next(line for line in lines if line.startswith(label))
        assert len(row[len(label):].split()) == 2, row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["compare", *names, "--experiment", EXPERIMENT, "--tracking-uri", server.uri,
                     "--out", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["differing_params"] == ["train.lr"]


def _render(url: str, profile) -> str:
    """The page's text after its scripts ran, as headless Chromium rendered it."""
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1600,1000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", out.stdout))
    return text.replace("&nbsp;", " ")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt install chromium)")
def test_the_ui_renders_both_runs_with_their_headline_metrics(runs, tmp_path):
    """MLflow 3.17's runs table collapses metric columns behind "Show more columns" (a choice its URL cannot
    make), so the table is opened sorted by a headline metric, and the compare view of the two parents shows
    their headline metrics row by row."""
    from urllib.parse import quote

    server, configs = runs["server"], runs["configs"]
    exp = server.api("GET", "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    table = _render(f"{server.uri}/#/experiments/{exp['experiment_id']}/runs?orderByKey="
                    f"{quote('metrics.`final/val_loss`')}&orderByAsc=true", tmp_path / "a")
    assert "Training runs" in table, table[:2000]  # the model-training view, not the GenAI one
    assert all(cfg.run_name in table for cfg in configs), table[:3000]
    assert "Sort: final/val_loss" in table
    parents = [r for r in _runs(server, exp["experiment_id"], "tags.`k2pipe.kind` = 'pipeline'")]
    ids = [r["info"]["run_id"] for r in parents]
    compare = _render(f"{server.uri}/#/compare-runs?runs={quote(json.dumps(ids))}"
                      f"&experiments={quote(json.dumps([exp['experiment_id']]))}", tmp_path / "b")
    assert all(cfg.run_name in compare for cfg in configs), compare[:3000]
    # Its metrics table: the names in one column, then each row's two values.
    section = compare[compare.index("Metrics Show diff only"):compare.index("Artifacts")].split()[4:]
    names = section[:len(HEADLINE_METRICS)]
    assert names == sorted(HEADLINE_METRICS), section
    values = section[len(HEADLINE_METRICS):]
    assert len(values) == 2 * len(HEADLINE_METRICS) and all(re.fullmatch(r"[0-9.e+-]+", v) for v in values), values
    assert re.search(r"train\.lr (0\.00[13]) (0\.00[13])", compare)
