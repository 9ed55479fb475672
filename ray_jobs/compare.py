"""``k2pipe compare``: pipeline runs side by side, and their curves.

A pipeline run is a parent run tagged ``k2pipe.kind=pipeline`` (pipelines/dag.py), carrying the headline
metrics (``final/*``); its stage runs are its children, tagged ``k2pipe.stage``. The runs are named, or
all runs nested under a sweep's parent run, or every pipeline run of the experiment. The table has a
column per run: the params that differ between them, then the headline metrics. The PNG overlays the
pretrain runs' ``train/loss`` and ``attn/max_logit`` histories. Reads only: a tracking store that does not
exist is an error, never created.
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

PIPELINE_FILTER = "tags.`k2pipe.kind` = 'pipeline'"
STAGE_FILTER = "tags.`k2pipe.kind` = 'stage'"
UNCOMPARED_PARAMS = ("name", "storage.root", "tracking.uri")
"""Params that differ between any two runs without saying anything about them."""
HEADLINE_LABELS = {"final/train_loss": "train loss", "final/val_loss": "val loss", "final/val_perplexity": "perplexity",
                   "final/val_accuracy": "accuracy", "final/tokens_trained": "tokens trained",
                   "final/tokens_per_s": "tokens/s", "final/mfu": "MFU", "final/max_logit": "worst max logit",
                   "final/heads_clipped": "heads clipped", "final/load_imbalance": "load imbalance",
                   "final/train_s": "training s", "final/wall_s": "wall s"}


@dataclass
class PipelineRun:
    name: str
    run_id: str
    status: str
    start_time: int
    params: dict[str, str]
    headline: dict[str, float] = field(default_factory=dict)
    """The parent run's ``final/*`` metrics (``pipelines.dag.HEADLINE_METRICS``)."""
    train_loss: float | None = None
    val_loss: float | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    max_logit_curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_id": self.run_id, "status": self.status, "params": self.params,
                "headline": self.headline, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "loss_curve": [list(p) for p in self.loss_curve],
                "max_logit_curve": [list(p) for p in self.max_logit_curve]}


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


def _run_label(run: Any) -> str:
    from pipelines import tracking

    return run.data.tags.get(tracking.RUN_NAME_TAG) or run.info.run_name or run.info.run_id


def collect_runs(tracking_uri: str, experiment: str, names: list[str] | None = None,
                 parent: str | None = None) -> list[PipelineRun]:
    """The pipeline runs of ``experiment``: only ``names`` when given (in that order), or only those nested
    under the run ``parent`` (a sweep's parent, by name or id); else all, oldest first."""
    from pipelines import tracking

    client = tracking.client(tracking_uri)
    exp = tracking.retry(lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        known = sorted(e.name for e in tracking.retry(lambda: client.search_experiments()))
        raise UsageError(f"--experiment {experiment!r}: no such experiment at {tracking_uri}; "
                         f"experiments there: {known or 'none'}")
    parents = _search_all(client, exp.experiment_id, PIPELINE_FILTER)
    if parent is not None:
        everything = _search_all(client, exp.experiment_id, "")
        match = [r for r in everything if parent in (r.info.run_id, _run_label(r))]
        if not match:
            raise UsageError(f"--parent {parent!r}: no run of that name or id in experiment {experiment!r}")
        ids = {r.info.run_id for r in match}
        parents = [r for r in parents if r.data.tags.get("mlflow.parentRunId") in ids]
    children: dict[str, dict[str, Any]] = {}
    for run in _search_all(client, exp.experiment_id, STAGE_FILTER):
        up = run.data.tags.get("mlflow.parentRunId")
        stage = run.data.tags.get(tracking.STAGE_TAG)
        if up and stage:
            children.setdefault(up, {})[stage] = run

    def curve(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in tracking.retry(lambda: client.get_metric_history(run_id, key)))

    rows = []
    for run in sorted(parents, key=lambda r: r.info.start_time or 0):
        row = PipelineRun(name=_run_label(run), run_id=run.info.run_id, status=run.info.status,
                          start_time=run.info.start_time or 0, params=dict(run.data.params),
                          headline={k: v for k, v in run.data.metrics.items() if k in HEADLINE_LABELS})
        stages = children.get(run.info.run_id, {})
        if "pretrain" in stages:
            pretrain = stages["pretrain"]
            row.train_loss = pretrain.data.metrics.get("train/loss")
            if row.train_loss is not None:
                row.loss_curve = curve(pretrain.info.run_id, "train/loss")
            if "attn/max_logit" in pretrain.data.metrics:
                row.max_logit_curve = curve(pretrain.info.run_id, "attn/max_logit")
        if "evaluate" in stages:
            row.val_loss = stages["evaluate"].data.metrics.get("eval/val_loss")
        rows.append(row)
    if names:
        by_name = {r.name: r for r in rows}  # a name run twice: the newest parent run
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UsageError(f"no pipeline run named {', '.join(map(repr, missing))} in experiment "
                             f"{experiment!r}; runs there: {sorted(by_name) or 'none'}")
        rows = [by_name[n] for n in names]
    return rows


def differing_params(rows: list[PipelineRun]) -> list[str]:
    """The params whose values are not the same in every run (a param a run lacks counts as differing)."""
    keys = sorted({k for r in rows for k in r.params} - set(UNCOMPARED_PARAMS))
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1e4 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}"


def format_table(rows: list[PipelineRun]) -> str:
    """One column a run: its status, the params that differ between the runs, then the headline metrics
    (the train and validation losses of its stage runs where its parent has none)."""
    lines = [["", *(r.name for r in rows)], ["status", *(r.status for r in rows)]]
    lines += [[k, *(r.params.get(k, "-")[:40] for r in rows)] for k in differing_params(rows)]
    for key, label in HEADLINE_LABELS.items():
        values = [r.headline.get(key) for r in rows]
        if key == "final/train_loss":
            values = [v if v is not None else r.train_loss for v, r in zip(values, rows)]
        if key == "final/val_loss":
            values = [v if v is not None else r.val_loss for v, r in zip(values, rows)]
        if any(v is not None for v in values):
            lines.append([label, *map(_number, values)])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def plot_curves(rows: list[PipelineRun], out: Path, title: str) -> bool:
    """Write the runs' ``train/loss`` and max-logit curves, overlaid, to ``out`` (PNG, two panels); False
    when no run has a loss curve."""
    if not any(r.loss_curve for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, logit_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        for ax, points in ((loss_ax, r.loss_curve), (logit_ax, r.max_logit_curve)):
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=r.name)
    for ax, label in ((loss_ax, "train/loss"), (logit_ax, "max attention logit")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def resolve_compare_uri(uri: str | None) -> str:
    """The tracking URI to read: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the default local
    store; a local SQLite store that does not exist is an error (reading must not create one)."""
    from pipelines.tracking import check_tracking_uri, resolve_tracking_uri

    resolved = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if resolved.startswith("sqlite:///"):
        path = Path(resolved[len("sqlite:///"):])
        if not path.is_file():
            raise UsageError(f"no MLflow store at {path}; pass --tracking-uri (sqlite:///PATH or http://HOST:PORT)")
    check_tracking_uri(resolved, "--tracking-uri")
    return resolved


def cmd_compare(args: argparse.Namespace) -> int:
    uri = resolve_compare_uri(args.tracking_uri)
    names = [*(args.names or []), *(args.runs or [])]
    rows = collect_runs(uri, args.experiment, names or None, parent=args.parent)
    plotted = plot_curves(rows, Path(args.out), f"experiment {args.experiment}") if rows else False
    if args.json:
        print(json.dumps({"tracking_uri": uri, "experiment": args.experiment,
                          "plot": str(args.out) if plotted else None, "differing_params": differing_params(rows),
                          "runs": [r.to_dict() for r in rows]}, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment!r} at {uri}")
        return EXIT_OK
    print(format_table(rows))
    print(f"loss and max-logit curves: {args.out}" if plotted
          else "curves: no pretrain run has logged train/loss yet")
    return EXIT_OK


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare pipeline runs: the params that differ, the headline metrics side "
                                       "by side, and their loss and max-logit curves overlaid (PNG)")
    p.add_argument("names", nargs="*", metavar="RUN", help="run names to compare, in this order (default: all)")
    p.add_argument("--experiment", default="k2pipe", help="MLflow experiment name (default: k2pipe)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--runs", nargs="+", metavar="NAME", help="only these run names, in this order (as RUN ...)")
    p.add_argument("--parent", metavar="RUN", help="the pipeline runs nested under this run (a sweep's parent), "
                                                    "by name or id")
    p.add_argument("--out", default="runs.png", help="PNG of the loss and max-logit curves (default: runs.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)
