"""What each stage leaves in its MLflow run: the tokenizer, the data manifest, training plots (loss, max
attention logit per layer, expert load), the evaluation report and metrics, and the export's config files
and model card (its weights stay in storage, where the model registry points)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from pipelines import storage, tracking

EXPORT_ARTIFACTS = ("config.json", "generation_config.json", "tokenizer_config.json", "README.md",
                    "model.safetensors.index.json")


def _log_bytes(client, run_id: str, data: bytes, artifact_path: str) -> None:
    folder, _, name = artifact_path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        tracking.retry(lambda: client.log_artifact(run_id, path, folder or None))


def training_plots(client, run_id: str) -> dict[str, bytes]:
    """PNG plots from the metric history of a pretrain run."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = tracking.retry(lambda: client.get_run(run_id))
    keys = sorted(run.data.metrics)

    def history(key: str) -> tuple[list[int], list[float]]:
        points = sorted(tracking.retry(lambda: client.get_metric_history(run_id, key)), key=lambda m: m.step)
        return [p.step for p in points], [p.value for p in points]

    plots: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        plots[name] = buf.getvalue()

    if "train/loss" in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*history("train/loss"), label="train")
        if "val/loss" in keys:
            ax.plot(*history("val/loss"), marker="o", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("loss")
        ax.legend()
        save(fig, "loss.png")
    layer_keys = [k for k in keys if k.startswith("attn/max_logit_layer")]
    if layer_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in sorted(layer_keys, key=lambda k: int(k.rsplit("layer", 1)[1])):
            ax.plot(*history(k), label=k.rsplit("/", 1)[1])
        ax.set_xlabel("step")
        ax.set_ylabel("max pre-softmax logit")
        ax.set_title("max attention logit per layer")
        ax.legend(fontsize=7)
        save(fig, "max_logit.png")
    if "moe/load_imbalance" in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*history("moe/load_imbalance"), label="max/mean load")
        if "moe/router_bias_range" in keys:
            ax2 = ax.twinx()
            ax2.plot(*history("moe/router_bias_range"), color="tab:orange", label="router-bias range")
            ax2.set_ylabel("router-bias range")
        ax.set_xlabel("step")
        ax.set_ylabel("expert load max/mean")
        ax.set_title("expert load")
        save(fig, "expert_load.png")
    return plots


def snapshot_files(detail: dict[str, Any], tau: float | None) -> dict[str, bytes]:
    """A ``Trainer.detail`` snapshot as artifacts of the pretrain run, named by its step: the arrays in one
    compressed ``.npz`` (``max_logits`` [layers, heads], ``expert_load`` [MoE layers, experts], ``step``) and
    two heatmaps: max logits (layers x heads, with ``tau`` marked on the colour bar) and each expert's load
    over its layer's mean (layers x experts; 1 is perfect balance)."""
    import io

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = int(detail["step"])
    logits = detail["max_logits"].double().numpy()
    load = detail["expert_load"].double().numpy()
    stem = f"stats/step-{step:08d}"
    buf = io.BytesIO()
    np.savez_compressed(buf, max_logits=logits, expert_load=load, step=np.array(step))
    files = {f"{stem}.npz": buf.getvalue()}

    def heatmap(values, title: str, xlabel: str, ylabel: str, label: str, name: str, mark: float | None = None,
                first_row: int = 0) -> None:
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.08 * values.shape[1]), min(10, 2 + 0.15 * values.shape[0])))
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(-0.5, values.shape[1] - 0.5, first_row + values.shape[0] - 0.5, first_row - 0.5))
        bar = fig.colorbar(image, ax=ax, label=label)
        if mark is not None and np.nanmin(values) <= mark <= np.nanmax(values):
            bar.ax.axhline(mark, color="red", linewidth=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, step {step}")
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        files[f"{stem}-{name}.png"] = out.getvalue()

    finite = np.where(np.isfinite(logits), logits, np.nan)
    heatmap(finite, "max pre-softmax logit per head" + (f" (tau {tau:g} in red)" if tau else ""), "head", "layer",
            "max logit", "max_logits", mark=tau)
    if load.size:
        mean = load.mean(axis=1, keepdims=True)
        heatmap(load / np.where(mean > 0, mean, 1.0), "expert load / layer mean", "expert", "layer",
                "load / mean", "expert_load", first_row=int(detail.get("first_moe_layer", 0)))
    return files


def log_stage_artifacts(client, run_id: str, name: str, outputs: Any, result: Any) -> None:
    if outputs is None:
        return
    if name == "tokenizer":
        _log_bytes(client, run_id, storage.read_bytes(outputs.path), "tokenizer/tokenizer.json")
    elif name == "shard":
        manifest = storage.read_complete(outputs.uri)
        _log_bytes(client, run_id, json.dumps(manifest, indent=2, default=str).encode(), "data/manifest.json")
    elif name == "pretrain":
        for plot_name, data in training_plots(client, run_id).items():
            _log_bytes(client, run_id, data, f"plots/{plot_name}")
    elif name == "evaluate":
        report = outputs.report
        _log_bytes(client, run_id, json.dumps(report, indent=2).encode(), "evaluation/report.json")
        _log_bytes(client, run_id, storage.read_bytes(storage.join(outputs.uri, "report.md")), "evaluation/report.md")
        metrics = {f"eval/{key}": float(report[key]) for key in ("val_loss", "val_perplexity", "val_accuracy",
                                                                "val_tokens") if key in report}
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, int(report.get("step") or 0)) for k, v in metrics.items()]
        tracking.retry(lambda: client.log_batch(run_id, metrics=items))
    elif name == "export":
        # The weights stay where the export wrote them (the model registry points there); the run keeps
        # the small files that say what they are.
        for file_name in outputs.files:
            if file_name in EXPORT_ARTIFACTS:
                _log_bytes(client, run_id, storage.read_bytes(storage.join(outputs.uri, file_name)),
                           f"model/{file_name}")
