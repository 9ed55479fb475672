"""The one end-to-end DAG: ingest -> tokenizer -> shard -> pretrain -> {evaluate, export}.

Each stage runs as a Ray task whose inputs are the object references of its upstream stages' outputs,
so Ray runs independent branches (evaluate and export) concurrently. Stage tasks only orchestrate
(they start Ray Data or Ray Train, which reserve their own CPUs), so they reserve none (``num_cpus=0``)
and never starve the workers they start on a small machine. They run on the driver's node (the head, for
a submitted job): a stage task is where Ray Train's controller and Ray Data's executor live, so a worker
node lost with a stage task on it would fail the stage instead of costing only the workers on that node.
This is the only place that knows the order of the stages.

Every stage is idempotent (``pipelines.stages.cache``): its output lives in a folder named by the
fingerprint of its inputs and config, with ``_COMPLETE.json`` written last; a rerun reuses complete outputs
and recomputes from the first stage that is not complete. ``from_stage`` reruns that stage and every later
one (earlier stages are reused, or computed when missing), ``until`` stops after a stage, ``force``
recomputes the named stages. Pretraining resumes from its latest checkpoint (Ray Train restores a run by
name). ``k2pipe run``, ``k2pipe data`` (``until="shard"``) and ``python -m pipelines.stages STAGE`` all run
stages through here.

MLflow: one parent run per pipeline run and one nested run per stage, created before any stage starts and
recorded in ``<storage>/runs/<run-name>/tracking.json``; a resumed or resubmitted run logs into the same
runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage, tracking
from pipelines.cluster import init_ray
from pipelines.config import RunConfig
from pipelines.console import quiet_ray_logging, say

STAGES = ("ingest", "tokenizer", "shard", "pretrain", "evaluate", "export")
UPSTREAM = {"ingest": (), "tokenizer": ("ingest",), "shard": ("ingest", "tokenizer"), "pretrain": ("shard",),
            "evaluate": ("tokenizer", "shard", "pretrain"), "export": ("tokenizer", "pretrain")}


@dataclass
class StageResult:
    name: str
    status: str
    """``ran``, ``reused`` (complete output found) or ``not selected``."""
    seconds: float = 0.0
    uri: str | None = None
    fingerprint: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    run_name: str
    storage_root: str
    tracking_uri: str | None
    parent_run_id: str | None
    stages: dict[str, StageResult]
    stage_outputs: dict[str, Any] = field(default_factory=dict)
    """Each stage's own output object (``IngestOutput``, ``ShardManifest``, ``PretrainOutputs``, ...)."""

    def summary(self) -> str:
        lines = [f"k2pipe run '{self.run_name}'  (storage: {self.storage_root})"]
        for name in STAGES:
            r = self.stages.get(name)
            if r is None:
                continue
            where = f"  {r.uri}" if r.uri else ""
            lines.append(f"  {name:<10} {r.status:<13} {r.seconds:7.1f}s{where}")
        evaluate = self.stages.get("evaluate")
        if evaluate and evaluate.outputs.get("report"):
            rep = evaluate.outputs["report"]
            what = "a seeded sample" if rep.get("sampled") else "the whole held-out split"
            lines.append(f"  evaluation: loss {rep['val_loss']:.4f}  perplexity {rep['val_perplexity']:.2f}  "
                         f"accuracy {rep.get('val_accuracy', float('nan')):.3f}  over {rep['val_tokens']:,} tokens "
                         f"({what}: {rep.get('val_windows', '?')} of {rep.get('split_windows', '?')} windows)")
        pretrain = self.stages.get("pretrain")
        metrics = (pretrain.outputs.get("metrics") or {}) if pretrain else {}
        if "val/loss" in metrics:
            tokens = metrics.get("val/tokens")
            lines.append(f"  training's last in-loop validation: loss {metrics['val/loss']:.4f}"
                         + (f" over {int(tokens):,} tokens (train.eval_batches)" if tokens else ""))
        if self.tracking_uri:
            lines.append(f"  MLflow parent run {self.parent_run_id}; open the UI with:")
            lines.append(f"    {ui_command(self.tracking_uri)}")
        return "\n".join(lines)


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def select_stages(from_stage: str | None, until: str | None) -> list[str]:
    for name, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{name} {value!r}: unknown stage; valid: {', '.join(STAGES)}")
    lo = STAGES.index(from_stage) if from_stage else 0
    hi = STAGES.index(until) if until else len(STAGES) - 1
    if lo > hi:
        raise ValueError(f"--from {from_stage} comes after --until {until}")
    return list(STAGES[lo:hi + 1])


def git_commit() -> str | None:
    env = os.environ.get("K2PIPE_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ray_job_id() -> str | None:
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("K2PIPE_RAY_JOB_ID")


# ---------------------------------------------------------------------- tracking runs
def setup_tracking(cfg: RunConfig, nest_under: str | None = None) -> dict[str, Any] | None:
    """Create (or find again) the parent run and one nested run per stage; record their ids. ``nest_under``:
    the run the parent nests under (a sweep's parent run)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_uri(uri)
    c = tracking.client(uri)
    record_uri = storage.join(storage.run_dir(cfg.storage.root, cfg.run_name), "tracking.json")
    record = storage.read_json(record_uri) if storage.exists(record_uri) else None
    if record is not None and record.get("tracking_uri") == uri:
        try:
            tracking.retry(lambda: c.get_run(record["parent_run_id"]))
            tracking.retry(lambda: c.update_run(record["parent_run_id"], status="RUNNING"))
            return {**record, **registry_settings(cfg)}
        except Exception as e:
            print(f"[k2pipe] recorded MLflow runs of '{cfg.run_name}' not found ({type(e).__name__}); "
                  "creating new ones", flush=True)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    tags = {tracking.RUN_NAME_TAG: cfg.run_name}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["k2pipe.git_commit"] = commit
    job = ray_job_id()
    if job:
        tags["k2pipe.ray_job_id"] = job
    parent_tags = {"mlflow.parentRunId": nest_under} if nest_under else {}
    # A previous parent run of this run name (tracking.json lost or another storage): reuse it.
    existing = tracking.retry(lambda: c.search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{cfg.run_name}' and "
                                       f"tags.`k2pipe.kind` = 'pipeline'", max_results=1))
    if existing:
        parent_id = existing[0].info.run_id
        if nest_under:
            tracking.retry(lambda: c.set_tag(parent_id, "mlflow.parentRunId", nest_under))
    else:
        parent = tracking.retry(lambda: c.create_run(
            experiment_id, tags={**tags, **parent_tags, "k2pipe.kind": "pipeline"}, run_name=cfg.run_name))
        parent_id = parent.info.run_id
        params = tracking.redact({k: _param_value(v) for k, v in cfg.flat().items()})
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 90):
            tracking.retry(lambda chunk=items[i:i + 90]: c.log_batch(parent_id, params=chunk))
        tracking.retry(lambda: c.log_text(parent_id, json.dumps(cfg.to_dict(), indent=2, default=str),
                                          "config/run_config.json"))
    tracking.retry(lambda: c.set_tag(parent_id, "mlflow.note.content", run_description(cfg)))
    stage_runs = {}
    for name in STAGES:
        found = tracking.retry(lambda name=name: c.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                           f"tags.`{tracking.STAGE_TAG}` = '{name}'", max_results=1))
        if found:
            stage_runs[name] = found[0].info.run_id
            continue
        run = tracking.retry(lambda name=name: c.create_run(
            experiment_id, run_name=f"{cfg.run_name}/{name}",
            tags={**tags, "mlflow.parentRunId": parent_id, tracking.STAGE_TAG: name, "k2pipe.kind": "stage"}))
        # MLflow creates a run RUNNING; a stage not yet started is SCHEDULED until its task starts it, so a
        # slice (--until shard, a sweep's runs up to evaluate) leaves no stage looking as if it still runs.
        tracking.retry(lambda run=run: c.update_run(run.info.run_id, status="SCHEDULED"))
        stage_runs[name] = run.info.run_id
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
              "stage_run_ids": stage_runs, "run_name": cfg.run_name}
    record.update(registry_settings(cfg))
    storage.write_json(record_uri, record)
    return record


UNDESCRIBED_KEYS = ("storage.root", "tracking.uri", "tracking.experiment", "name")


def run_description(cfg: RunConfig) -> str:
    """The parent run's description in the MLflow UI: the model, the layout, the budget, and every setting
    that differs from the defaults of its preset."""
    from k2model.config import count_parameters
    from pipelines.config import load_config

    m, t = cfg.model, cfg.train
    pc = count_parameters(m)
    defaults = load_config(None, [f"model.preset={m.preset}"] if m.preset else []).flat()
    differing = [f"`{k}={_param_value(v)}`" for k, v in cfg.flat().items()
                 if k not in UNDESCRIBED_KEYS and defaults.get(k) != v]
    dp = t.num_workers // t.pp
    return (f"**{m.preset or 'custom'}** ({pc.total / 1e6:,.1f}M parameters, {pc.active / 1e6:,.1f}M active), "
            f"{t.num_workers} worker(s): pp {t.pp} x dp {dp} (ep {t.ep}); {t.steps} steps of "
            f"{t.global_batch_size} x {cfg.data.seq_len} tokens; optimizer {cfg.optimizer.name}.\n\n"
            f"Differs from the defaults: {', '.join(differing) if differing else 'nothing'}.")


def registry_settings(cfg: RunConfig) -> dict[str, Any]:
    """What ``_register_export`` needs of the config, carried in the tracking record to the stage task."""
    e = cfg.export
    return {"export_register": e.register,
            "registered_model": e.registered_model or f"{cfg.tracking.experiment}-{cfg.model.preset or 'custom'}"}


def _param_value(v: Any) -> str:
    text = json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)
    return text[:500]


# ---------------------------------------------------------------------- stage bodies
def _stage_ingest(cfg: RunConfig, force: bool, _inputs: dict[str, Any]):
    from pipelines.stages.ingest import run_ingest

    return run_ingest(cfg.data, cfg.storage.root, force=force)


def _stage_tokenizer(cfg: RunConfig, force: bool, inputs: dict[str, Any]):
    from pipelines.stages.tokenizer import run_tokenizer

    return run_tokenizer(cfg.data, inputs["ingest"], cfg.storage.root, force=force)


def _stage_shard(cfg: RunConfig, force: bool, inputs: dict[str, Any]):
    from pipelines.stages.pack import run_shard

    return run_shard(cfg.data, inputs["ingest"], inputs["tokenizer"], cfg.storage.root, force=force)


def _stage_pretrain(cfg: RunConfig, force: bool, inputs: dict[str, Any], tracking_record=None):
    from pipelines.stages.pretrain import run_pretrain_stage

    shard = inputs["shard"]
    record = tracking_record or {}
    return run_pretrain_stage(cfg, shard.uri, shard, force=force,
                              mlflow_run_id=(record.get("stage_run_ids") or {}).get("pretrain"),
                              tracking_uri=record.get("tracking_uri"))


def _stage_evaluate(cfg: RunConfig, force: bool, inputs: dict[str, Any], tracking_record=None):
    from pipelines.stages.evaluate import run_evaluate

    shard = inputs["shard"]
    pretrain = inputs["pretrain"]
    return run_evaluate(cfg, pretrain.checkpoint_uri, shard.uri, shard, inputs["tokenizer"].path, force=force,
                        checkpoint_version=pretrain.completed_at, step=pretrain.step)


def _stage_export(cfg: RunConfig, force: bool, inputs: dict[str, Any], tracking_record=None):
    from pipelines.stages.export import run_export

    pretrain = inputs["pretrain"]
    metrics = pretrain.metrics or {}
    facts = {"run_name": cfg.run_name, "mlflow_run_id": (tracking_record or {}).get("parent_run_id"),
             "git_commit": git_commit(), "step": pretrain.step,
             "tokens_trained": pretrain.step * cfg.train.global_batch_size * cfg.data.seq_len,
             "train_loss": metrics.get("train/loss"), "val_loss": metrics.get("val/loss"),
             "val_tokens": metrics.get("val/tokens")}
    return run_export(cfg, pretrain.checkpoint_uri, inputs["tokenizer"].path, force=force,
                      checkpoint_version=pretrain.completed_at, facts=facts)


STAGE_FUNCTIONS = {"ingest": _stage_ingest, "tokenizer": _stage_tokenizer, "shard": _stage_shard,
                   "pretrain": _stage_pretrain, "evaluate": _stage_evaluate, "export": _stage_export}


def run_stage(name: str, cfg: RunConfig, force: bool, record: dict[str, Any] | None, *upstream: Any
              ) -> tuple[Any, StageResult]:
    """Body of one stage task: run (or reuse) the stage and log it to its MLflow run."""
    quiet_ray_logging()  # this task's process: Ray Data's progress bars and INFO lines
    inputs = {up: out for up, (out, _) in zip(UPSTREAM[name], upstream)}
    started = time.time()
    kwargs = {"tracking_record": record} if name in ("pretrain", "evaluate", "export") else {}
    if record is not None:
        c = tracking.client(record["tracking_uri"])
        tracking.retry(lambda: c.update_run(record["stage_run_ids"][name], status="RUNNING"))
    try:
        outputs = STAGE_FUNCTIONS[name](cfg, force, inputs, **kwargs)
    except BaseException:
        if record is not None:
            tracking.retry(lambda: c.set_terminated(record["stage_run_ids"][name], status="FAILED"))
        raise
    seconds = time.time() - started
    reused = bool(getattr(outputs, "reused", False))
    result = StageResult(name=name, status="reused" if reused else "ran", seconds=seconds,
                         uri=getattr(outputs, "uri", None) or getattr(outputs, "checkpoint_uri", None),
                         fingerprint=getattr(outputs, "fingerprint", None),
                         outputs=_summary_of(outputs))
    if record is not None:
        _log_stage(record, name, outputs, result)
    return outputs, result


def _summary_of(outputs: Any) -> dict[str, Any]:
    if outputs is None:
        return {}
    if dataclasses.is_dataclass(outputs):
        d = {}
        for f in dataclasses.fields(outputs):
            v = getattr(outputs, f.name)
            if isinstance(v, (str, int, float, bool)) or f.name in ("report", "metrics", "files"):
                d[f.name] = v
        return d
    return {}


def _log_stage(record: dict[str, Any], name: str, outputs: Any, result: StageResult) -> None:
    c = tracking.client(record["tracking_uri"])
    run_id = record["stage_run_ids"][name]
    tags = {"k2pipe.status": result.status}
    if result.fingerprint:
        tags["k2pipe.fingerprint"] = result.fingerprint
    if result.uri:
        tags["k2pipe.output_uri"] = result.uri
    for k, v in tags.items():
        tracking.retry(lambda k=k, v=v: c.set_tag(run_id, k, v))
        tracking.retry(lambda k=k, v=v: c.set_tag(record["parent_run_id"], f"{name}.{k.split('.')[-1]}", v))
    if result.status == "ran":  # a reused stage's artifacts were logged when it ran
        from pipelines.artifacts import log_stage_artifacts

        log_stage_artifacts(c, run_id, name, outputs, result)
    if name == "export" and record.get("export_register", True):
        _register_export(c, record, outputs)
    tracking.retry(lambda: c.set_terminated(run_id, status="FINISHED"))


def _register_export(c, record: dict[str, Any], outputs: Any) -> None:
    """The export as a model version of the registry, pointing at its storage location, under the
    pipeline's parent run; an export already registered (same fingerprint) adds none."""
    from mlflow.exceptions import MlflowException

    name = record["registered_model"]
    tags = {"k2pipe.run_name": record["run_name"], "k2pipe.fingerprint": outputs.fingerprint,
            "k2pipe.git_commit": git_commit() or "unknown"}
    parent = record["parent_run_id"]
    try:
        version, created = tracking.register_model_version(c, name, outputs.uri, parent, tags)
    except MlflowException as e:
        # A tracking server accepts a local path as a source only inside the run's artifact folder.
        reason = str(e).splitlines()[0][:300]
        say(f"[k2pipe] export not registered as a model version of '{name}': {reason} (the export stays at "
            f"{outputs.uri}; with storage.root on S3 the registry points at it)")
        tracking.retry(lambda: c.set_tag(parent, "export.registry", f"not registered: {reason}"))
        return
    tracking.retry(lambda: c.set_tag(parent, "export.model_version", f"{name}/{version}"))
    tracking.retry(lambda: c.set_tag(record["stage_run_ids"]["export"], "k2pipe.model_version", f"{name}/{version}"))
    if created:
        say(f"[k2pipe] registered model '{name}' version {version} -> {outputs.uri}")


# ---------------------------------------------------------------------- driver
def check_stages(cfg: RunConfig, selected: list[str]) -> None:
    """What only the selected stages need of the config, checked before any cluster time (here, and by
    ``k2pipe submit`` before it submits)."""
    if selected[-1] != "ingest":  # the tokenizer stage runs (or is reused)
        cfg.data.check_for_data_stages()
    if "export" in selected:
        from pipelines.stages.export import check_exportable

        check_exportable(cfg.model)


def check_local_corpus(corpus: str | None) -> None:
    """A local ``data.corpus`` exists (read as ingest reads it: ``~`` and ``file://`` too), checked before Ray
    starts; an S3 corpus is left to the ingest stage."""
    path = storage.normalize_uri(corpus) if corpus else None
    if path and not storage.is_s3(path) and not os.path.exists(path):
        raise storage.DataError(f"data.corpus={corpus}: no such file or folder on this machine")


def run_pipeline(cfg: RunConfig, *, from_stage: str | None = None, until: str | None = None,
                 force: tuple[str, ...] = (), ray_address: str | None = None,
                 nest_under: str | None = None) -> PipelineResult:
    import ray

    selected = select_stages(from_stage, until)
    check_stages(cfg, selected)
    check_local_corpus(cfg.data.corpus)
    for name in force:
        if name not in STAGES:
            raise ValueError(f"--force {name!r}: unknown stage; valid: {', '.join(STAGES)}")
    root = storage.normalize_uri(cfg.storage.root)
    cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=root),
                              name=cfg.run_name)
    started = time.time()
    record = setup_tracking(cfg, nest_under)
    init_ray(cfg, ray_address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_stage)
    # Evaluation runs the model: on a GPU when the cluster has one (it starts after pretraining, whose
    # workers hold the GPUs, have finished).
    evaluate_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # --from S reruns S and everything after it; earlier stages are reused when complete (and computed
    # when missing, so a slice never starts from nothing). --until U stops after U.
    rerun_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    refs: dict[str, Any] = {}
    last_needed = max(STAGES.index(s) for s in selected)
    for i, name in enumerate(STAGES[:last_needed + 1]):
        if name in ("evaluate", "export") and name not in selected:
            continue
        upstream = [refs[u] for u in UPSTREAM[name]]
        refs[name] = task.options(name=f"k2pipe-{name}", num_gpus=evaluate_gpus if name == "evaluate" else 0).remote(
            name, cfg, name in force or i >= rerun_from, record, *upstream)
    results: dict[str, StageResult] = {}
    outputs: dict[str, Any] = {}
    failure: BaseException | None = None
    for i, (name, ref) in enumerate(refs.items(), 1):
        try:
            outputs[name], results[name] = ray.get(ref)
        except Exception as e:  # the first failing stage decides; later ones fail with it
            failure = failure or e
            results[name] = StageResult(name=name, status="failed")
        r = results[name]
        say(f"[k2pipe] stage {i}/{len(refs)} {name:<10} {r.status}" + (f" in {r.seconds:.1f} s" if r.seconds else ""))
    if record is not None:
        c = tracking.client(record["tracking_uri"])
        ran = any(r.status == "ran" for r in results.values())
        try:
            log_headline(c, record, cfg, outputs, time.time() - started if ran else None)
        except Exception as e:  # the summary must not fail a run whose stages succeeded
            say(f"[k2pipe] headline metrics not logged on the parent run: {type(e).__name__}: {e}")
        status = "FAILED" if failure else "FINISHED"
        tracking.retry(lambda: c.set_terminated(record["parent_run_id"], status=status))
    pipeline = PipelineResult(run_name=cfg.run_name, storage_root=root,
                              tracking_uri=record["tracking_uri"] if record else None,
                              parent_run_id=record["parent_run_id"] if record else None, stages=results,
                              stage_outputs=outputs)
    if failure is not None:
        raise PipelineError(pipeline, failure)
    return pipeline


HEADLINE_METRICS = ("final/train_loss", "final/val_loss", "final/val_perplexity", "final/val_accuracy",
                    "final/tokens_trained", "final/tokens_per_s", "final/mfu", "final/max_logit",
                    "final/heads_clipped", "final/load_imbalance", "final/train_s", "final/wall_s")
"""What the parent run of a pipeline carries, so runs compare in the MLflow runs table without expanding."""


def headline_metrics(c, cfg: RunConfig, outputs: dict[str, Any], wall_s: float | None,
                     pretrain_run_id: str | None = None) -> dict[str, float]:
    """The run's headline figures from its stages' outputs and the pretrain run's metric history:
    final training loss (mean of the last logging window) and the evaluate stage's loss, perplexity and
    accuracy; tokens trained; tokens/s and MFU (means over the logged steps); the worst max logit of any
    logged step; heads clipped over the whole run; the last load imbalance; seconds in training steps
    (``final/train_s``, resumes included) and this invocation's wall time when it ran a stage."""
    out: dict[str, float] = {}
    pretrain = outputs.get("pretrain")
    if pretrain is not None:
        m = pretrain.metrics or {}
        out["final/tokens_trained"] = float(pretrain.step * cfg.train.global_batch_size * cfg.data.seq_len)
        for key, name in (("train/loss", "final/train_loss"), ("qk_clip/heads_clipped_total", "final/heads_clipped"),
                          ("moe/load_imbalance", "final/load_imbalance"), ("train/seconds_total", "final/train_s")):
            if key in m:
                out[name] = float(m[key])
        run_id = pretrain_run_id
        if run_id:
            def history(key: str) -> list[float]:
                return [p.value for p in tracking.retry(lambda: c.get_metric_history(run_id, key))]

            for key, name, reduce in (("train/tokens_per_s", "final/tokens_per_s", "mean"),
                                      ("train/mfu", "final/mfu", "mean"), ("attn/max_logit", "final/max_logit", "max")):
                values = history(key)
                if values:
                    out[name] = max(values) if reduce == "max" else sum(values) / len(values)
    evaluate = outputs.get("evaluate")
    if evaluate is not None:
        rep = evaluate.report
        for key in ("val_loss", "val_perplexity", "val_accuracy"):
            if key in rep:
                out[f"final/{key}"] = float(rep[key])
    if wall_s is not None:
        out["final/wall_s"] = float(wall_s)
    return out


def log_headline(c, record: dict[str, Any], cfg: RunConfig, outputs: dict[str, Any], wall_s: float | None) -> None:
    """``headline_metrics`` on the parent run at the trained step, each only where it changed."""
    pretrain = outputs.get("pretrain")
    metrics = headline_metrics(c, cfg, outputs, wall_s, record["stage_run_ids"].get("pretrain"))
    tracking.log_latest(c, record["parent_run_id"], metrics, int(pretrain.step) if pretrain is not None else 0)


class PipelineError(RuntimeError):
    def __init__(self, result: PipelineResult, cause: BaseException):
        cause = getattr(cause, "cause", None) or cause  # a stage task's own exception, not Ray's wrapper
        cause_text = str(cause).strip().splitlines()
        super().__init__(cause_text[-1] if cause_text else type(cause).__name__)
        self.result = result
        self.cause = cause
