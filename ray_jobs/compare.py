"""``k2pipe compare``: the pipeline runs of an MLflow experiment side by side, and their loss curves.

A pipeline run is a parent run tagged ``k2pipe.kind=pipeline`` (pipelines/dag.py); its stage runs are its
children, tagged ``k2pipe.stage``. The table shows the key params of each parent run, the last
``train/loss`` of its pretrain stage run and ``eval/val_loss`` of its evaluate stage run; the PNG shows the
pretrain stage runs' ``train/loss`` histories on one plot. Reads only: a tracking store that does not exist
is an error, never created.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_jobs.common import EXIT_OK, UsageError

KEY_PARAMS = ("model.preset", "train.steps", "train.lr", "optimizer.name", "train.global_batch_size")
PIPELINE_FILTER = "tags.`k2pipe.kind` = 'pipeline'"
STAGE_FILTER = "tags.`k2pipe.kind` = 'stage'"


@dataclass
class PipelineRun:
    name: str
    run_id: str
    status: str
    start_time: int
    params: dict[str, str]
    train_loss: float | None = None
    val_loss: float | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_id": self.run_id, "status": self.status, "params": self.params,
                "train_loss": self.train_loss, "val_loss": self.val_loss,
                "loss_curve": [list(p) for p in self.loss_curve]}


def _search_all(client, experiment_id: str, filter_string: str) -> list[Any]:
    from pipelines import tracking

    runs, token = [], None
    while True:
        page = tracking.retry(lambda token=token: client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def collect_runs(tracking_uri: str, experiment: str, names: list[str] | None = None) -> list[PipelineRun]:
    """The pipeline runs of ``experiment`` (only ``names`` when given, in that order; else oldest first)."""
    from pipelines import tracking

    client = tracking.client(tracking_uri)
    exp = tracking.retry(lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        known = sorted(e.name for e in tracking.retry(lambda: client.search_experiments()))
        raise UsageError(f"--experiment {experiment!r}: no such experiment at {tracking_uri}; "
                         f"experiments there: {known or 'none'}")
    parents = _search_all(client, exp.experiment_id, PIPELINE_FILTER)
    children: dict[str, dict[str, Any]] = {}
    for run in _search_all(client, exp.experiment_id, STAGE_FILTER):
        parent = run.data.tags.get("mlflow.parentRunId")
        stage = run.data.tags.get(tracking.STAGE_TAG)
        if parent and stage:
            children.setdefault(parent, {})[stage] = run

    rows = []
    for run in sorted(parents, key=lambda r: r.info.start_time or 0):
        name = run.data.tags.get(tracking.RUN_NAME_TAG) or run.info.run_name or run.info.run_id
        row = PipelineRun(name=name, run_id=run.info.run_id, status=run.info.status,
                          start_time=run.info.start_time or 0,
                          params={k: run.data.params[k] for k in KEY_PARAMS if k in run.data.params})
        stages = children.get(run.info.run_id, {})
        if "pretrain" in stages:
            pretrain = stages["pretrain"]
            row.train_loss = pretrain.data.metrics.get("train/loss")
            if row.train_loss is not None:
                history = tracking.retry(lambda pretrain=pretrain: client.get_metric_history(
                    pretrain.info.run_id, "train/loss"))
                row.loss_curve = sorted((m.step, m.value) for m in history)
        if "evaluate" in stages:
            row.val_loss = stages["evaluate"].data.metrics.get("eval/val_loss")
        rows.append(row)
    if names:
        by_name = {r.name: r for r in rows}  # a name run twice: the newest parent run
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UsageError(f"--runs: no pipeline run named {', '.join(map(repr, missing))} in experiment "
                             f"{experiment!r}; runs there: {sorted(by_name) or 'none'}")
        rows = [by_name[n] for n in names]
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def format_table(rows: list[PipelineRun]) -> str:
    header = ["run", "status", *KEY_PARAMS, "train/loss", "eval/val_loss"]
    body = [[r.name, r.status, *(r.params.get(k, "-") for k in KEY_PARAMS), _number(r.train_loss),
             _number(r.val_loss)] for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in [header, *body])


def plot_loss_curves(rows: list[PipelineRun], out: Path, title: str) -> bool:
    """Write the runs' ``train/loss`` curves to ``out`` (PNG); False when no run has a curve."""
    curves = [r for r in rows if r.loss_curve]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in curves:
        steps, values = zip(*r.loss_curve)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def resolve_compare_uri(uri: str | None) -> str:
    """The tracking URI to read: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the default local
    store; a local SQLite store that does not exist is an error (reading must not create one)."""
    from pipelines.tracking import resolve_tracking_uri

    resolved = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if resolved.startswith("sqlite:///"):
        path = Path(resolved[len("sqlite:///"):])
        if not path.exists():
            raise UsageError(f"no MLflow store at {path}; pass --tracking-uri (sqlite:///PATH or http://HOST:PORT)")
    return resolved


def cmd_compare(args: argparse.Namespace) -> int:
    uri = resolve_compare_uri(args.tracking_uri)
    rows = collect_runs(uri, args.experiment, args.runs or None)
    plotted = plot_loss_curves(rows, Path(args.out), f"train/loss, experiment {args.experiment}") if rows else False
    if args.json:
        print(json.dumps({"tracking_uri": uri, "experiment": args.experiment,
                          "plot": str(args.out) if plotted else None, "runs": [r.to_dict() for r in rows]}, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment!r} at {uri}")
        return EXIT_OK
    print(format_table(rows))
    print(f"loss curves: {args.out}" if plotted else "loss curves: no pretrain run has logged train/loss yet")
    return EXIT_OK


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the pipeline runs of an MLflow experiment (table + loss-curve PNG)")
    p.add_argument("--experiment", default="k2pipe", help="MLflow experiment name (default: k2pipe)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--runs", nargs="+", metavar="NAME", help="only these run names, in this order")
    p.add_argument("--out", default="runs.png", help="PNG of the loss curves (default: runs.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)
