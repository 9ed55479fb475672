"""The whole DAG on the ``ci`` config with the embedded defaults (local Ray, local storage, local MLflow),
then a rerun that reuses everything, and a forced stage."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from k2model.optim import resolve_ns_dtype
from pipelines import storage, tracking
from pipelines.config import load_config
from pipelines.dag import STAGES, run_pipeline, select_stages


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    import os

    old = os.getcwd()
    os.chdir(work)  # the embedded defaults are relative to the working directory
    try:
        cfg = load_config("ci", ["storage.root=k2runs"], run_name="ci-dag")
        first = run_pipeline(cfg)
        second = run_pipeline(cfg)
        forced = run_pipeline(cfg, force=("export",))
        yield work, cfg, first, second, forced
    finally:
        os.chdir(old)
        ray.shutdown()


def test_every_stage_runs_then_is_reused(pipeline_run):
    work, cfg, first, second, forced = pipeline_run
    assert [first.stages[s].status for s in STAGES] == ["ran"] * len(STAGES)
    assert [second.stages[s].status for s in STAGES] == ["reused"] * len(STAGES)
    assert [forced.stages[s].status for s in STAGES] == ["reused"] * 5 + ["ran"]
    assert first.storage_root == str(work / "k2runs")
    for stage in ("ingest", "tokenizer", "shard", "evaluate", "export"):
        uri = first.stages[stage].uri
        assert uri.startswith(str(work / "k2runs" / "stages" / stage)), uri
        assert storage.is_complete(uri)
    report = first.stages["evaluate"].outputs["report"]
    assert 0 < report["val_loss"] < 8 and report["val_tokens"] > 0


def test_export_is_a_loadable_model_equal_to_the_checkpoint(pipeline_run):
    from safetensors.torch import load_file

    from k2model.config import ModelConfig
    from pipelines.train.checkpointing import load_checkpoint_model

    work, cfg, first, *_ = pipeline_run
    export = first.stages["export"].uri
    hf_config = json.loads(storage.read_bytes(storage.join(export, "config.json")))
    assert ModelConfig.from_hf_config(hf_config) == cfg.model.replace(preset=None)
    tensors = load_file(storage.join(export, "model.safetensors"))
    model = load_checkpoint_model(first.stages["pretrain"].uri, cfg)
    layer = cfg.model.first_k_dense
    assert torch.equal(tensors[f"model.layers.{layer}.mlp.experts.3.up_proj.weight"],
                       model.model.layers[layer].mlp.experts.up_proj[3])
    assert storage.exists(storage.join(export, "tokenizer.json"))


def test_mlflow_has_one_parent_with_stage_runs_metrics_and_artifacts(pipeline_run):
    work, cfg, first, *_ = pipeline_run
    c = tracking.client(first.tracking_uri)
    assert first.tracking_uri == f"sqlite:///{work / 'mlflow.db'}"
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    parents = c.search_runs([exp.experiment_id], "tags.`k2pipe.kind` = 'pipeline' and "
                                                 "tags.`k2pipe.run_name` = 'ci-dag'")
    assert len(parents) == 1, "a rerun must log into the same parent run"
    parent = parents[0]
    assert parent.data.params["train.steps"] == str(cfg.train.steps)
    assert parent.data.params["model.preset"] == "tiny"
    stages = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["k2pipe.stage"] for r in stages) == sorted(STAGES)
    pretrain = next(r for r in stages if r.data.tags["k2pipe.stage"] == "pretrain")
    # optimizer.ns_dtype=auto, resolved on the worker (this machine's CPU) and recorded on the run.
    assert pretrain.data.tags["k2pipe.ns_dtype"] == resolve_ns_dtype("auto", "cpu")
    assert json.loads(pretrain.data.tags["k2pipe.run_history"]) == [
        {"from_step": 0, "world_size": cfg.train.num_workers, "ep": cfg.train.ep, "pp": cfg.train.pp}]
    losses = c.get_metric_history(pretrain.info.run_id, "train/loss")
    steps = [m.step for m in losses]
    assert steps == sorted(set(steps)), "each step logged once, even across reruns"
    assert steps[-1] == cfg.train.steps
    assert losses[-1].value < losses[0].value
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "attn/max_logit",
                "moe/load_imbalance", "val/loss"):
        assert c.get_metric_history(pretrain.info.run_id, key), key
    artifacts = {a.path for a in c.list_artifacts(pretrain.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/max_logit.png", "plots/expert_load.png"} <= artifacts
    assert c.get_metric_history(pretrain.info.run_id, "val/tokens")[-1].value == (
        cfg.train.eval_batches * cfg.train.micro_batch_size * cfg.train.num_workers * cfg.data.seq_len)
    evaluate_run = next(r for r in stages if r.data.tags["k2pipe.stage"] == "evaluate")
    report = first.stages["evaluate"].outputs["report"]
    for key in ("val_loss", "val_perplexity", "val_accuracy", "val_tokens"):
        assert evaluate_run.data.metrics[f"eval/{key}"] == pytest.approx(report[key]), key
    assert {"evaluation/report.json", "evaluation/report.md"} <= {
        a.path for a in c.list_artifacts(evaluate_run.info.run_id, "evaluation")}

    # The export: its config and card as artifacts, its weights left in storage, where the registry points.
    export_run = next(r for r in stages if r.data.tags["k2pipe.stage"] == "export")
    logged = {a.path for a in c.list_artifacts(export_run.info.run_id, "model")}
    assert {"model/config.json", "model/README.md", "model/generation_config.json"} <= logged
    assert not any(p.endswith(".safetensors") for p in logged), "weights are not copied into artifacts"
    name = f"{cfg.tracking.experiment}-tiny"
    versions = c.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, "three runs of one export (the last forced): one version"
    version = versions[0]
    assert version.source == first.stages["export"].uri and version.run_id == parent.info.run_id
    assert version.tags["k2pipe.fingerprint"] == first.stages["export"].fingerprint
    assert version.tags["k2pipe.run_name"] == "ci-dag" and version.tags["k2pipe.git_commit"]
    assert c.get_run(parent.info.run_id).data.tags["export.model_version"] == f"{name}/{version.version}"
    record = json.loads((work / "k2runs" / "runs" / "ci-dag" / "tracking.json").read_text())
    assert record["parent_run_id"] == parent.info.run_id


def test_stage_selection_is_validated():
    assert select_stages("pretrain", None) == ["pretrain", "evaluate", "export"]
    assert select_stages(None, "shard") == ["ingest", "tokenizer", "shard"]
    with pytest.raises(ValueError, match="valid"):
        select_stages("train", None)
    with pytest.raises(ValueError, match="after"):
        select_stages("export", "ingest")
