"""MuonClip against AdamW on the default corpus (the Python standard library) with the ``tiny`` preset.

1. Each optimizer gets a learning-rate sweep at the full token budget; the best rate must lie strictly
   inside its grid (otherwise the grid is extended once), so neither side is undertuned.
2. With the best rates, MuonClip is rerun as complete runs at shorter budgets (each with its own full
   schedule, decay included) and the token ratio to reach AdamW's final validation loss is interpolated
   between the budgets that bracket it (never read off the middle of a longer run).
3. Validation-loss curves go to a PNG.

The training loop is the trainer's own (``pipelines.train.trainer.Trainer``) in one process, on shards the
data stages build from the standard library.

    python -m benchmarks.convergence [--quick] --out bench-results/convergence.json
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch

from benchmarks.common import parse_args, table, write_json
from pipelines.config import load_config
from pipelines.data.loader import DeterministicSampler, ShardRef, TrainBatches, WindowReader, eval_batches
from pipelines.stages.pretrain import as_manifest_dict, shard_refs
from pipelines.train.trainer import Trainer


def build_data(root: str, quick: bool):
    import ray

    from pipelines.dag import run_pipeline

    cfg = load_config(None, [f"storage.root={root}", f"data.max_docs={600 if quick else 2500}",
                             "data.seq_len=128", "data.vocab_size=4096", "data.tokenizer_sample_bytes=4000000",
                             "data.val_fraction=0.05", "model.max_seq_len=128", "tracking.enabled=false"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        shards = run_pipeline(cfg, until="shard").stage_outputs["shard"]
    finally:
        ray.shutdown()
    return shards.uri, as_manifest_dict(shards)


def train_once(shard_uri: str, manifest: dict, optimizer: str, lr: float, steps: int, eval_points: int,
               batch: int) -> list[tuple[int, float]]:
    cfg = load_config(None, ["data.seq_len=128", "model.max_seq_len=128", f"optimizer.name={optimizer}",
                             f"train.lr={lr}", f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}",
                             "train.decay_fraction=0.3", f"train.micro_batch_size={batch}",
                             f"train.global_batch_size={batch}", "train.threads_per_worker=2",
                             "tracking.enabled=false"])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train = [ShardRef(**r) for r in shard_refs(shard_uri, manifest, "train")]
    val = [ShardRef(**r) for r in shard_refs(shard_uri, manifest, "val")]
    sampler = DeterministicSampler(train, 0, batch, 1, 0, batch)
    trainer = Trainer(cfg, TrainBatches(sampler, WindowReader(train, 128)),
                      eval_batches(WindowReader(val, 128), 16, 16, 1, 0))
    curve = []
    marks = set(np.linspace(0, steps, eval_points + 1).astype(int).tolist()[1:])
    while trainer.global_step < steps:
        trainer.step()
        if trainer.global_step in marks:
            curve.append((trainer.global_step, trainer.evaluate()))
    return curve


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    quick = args.quick
    steps = 120 if quick else 600
    batch = 8 if quick else 16
    grids = {"muonclip": [1e-3, 3e-3, 1e-2] if quick else [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
             "adamw": [1e-3, 3e-3, 1e-2] if quick else [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]}
    with tempfile.TemporaryDirectory() as tmp:
        shard_uri, manifest = build_data(os.path.join(tmp, "store"), quick)
        sweep: dict[str, dict[float, list]] = {"muonclip": {}, "adamw": {}}
        best: dict[str, float] = {}
        for opt, grid in grids.items():
            for _attempt in range(2):
                for lr in grid:
                    if lr not in sweep[opt]:
                        sweep[opt][lr] = train_once(shard_uri, manifest, opt, lr, steps, 6, batch)
                        print(f"{opt} lr={lr:g}: final val loss {sweep[opt][lr][-1][1]:.4f}", flush=True)
                finals = {lr: c[-1][1] for lr, c in sweep[opt].items()}
                best[opt] = min(finals, key=finals.get)
                ordered = sorted(finals)
                if ordered[0] < best[opt] < ordered[-1]:
                    break
                # Best on an edge: extend the grid once in that direction.
                grid = [best[opt] / 2] if best[opt] == ordered[0] else [best[opt] * 2]
        adam_final = sweep["adamw"][best["adamw"]][-1][1]
        muon_full = sweep["muonclip"][best["muonclip"]][-1][1]
        # Complete MuonClip runs at shorter budgets.
        fractions = [0.35, 0.5, 0.65, 0.8] if not quick else [0.5, 0.75]
        budget_loss = {1.0: muon_full}
        for f in fractions:
            s = max(10, int(round(steps * f)))
            budget_loss[s / steps] = train_once(shard_uri, manifest, "muonclip", best["muonclip"], s, 2, batch)[-1][1]
            print(f"muonclip budget {s / steps:.2f}: final val loss {budget_loss[s / steps]:.4f}", flush=True)
    ratio = token_ratio(budget_loss, adam_final)
    results = {
        "steps": steps, "batch": batch, "seq_len": 128,
        "lr_grid": {k: sorted(v) for k, v in sweep.items()}, "best_lr": best,
        "best_lr_inside_grid": {k: min(v) < best[k] < max(v) for k, v in sweep.items()},
        "final_val_loss": {k: {str(lr): c[-1][1] for lr, c in v.items()} for k, v in sweep.items()},
        "adamw_final_loss": adam_final, "muonclip_final_loss": muon_full,
        "muonclip_budget_final_loss": {f"{k:.3f}": v for k, v in sorted(budget_loss.items())},
        "token_ratio_to_adamw_final_loss": ratio,
        # When even the smallest budget tried reaches AdamW's loss, the ratio is only an upper bound.
        "token_ratio_is_upper_bound": ratio == min(budget_loss),
        "curves": {k: {str(lr): c for lr, c in v.items()} for k, v in sweep.items()},
    }
    print(table([{"optimizer": k, "best_lr": best[k], "final_val_loss": sweep[k][best[k]][-1][1]} for k in sweep],
                ["optimizer", "best_lr", "final_val_loss"]))
    print(f"MuonClip reaches AdamW's final loss with {ratio:.3f}x the tokens" if ratio == ratio
          else "MuonClip did not reach AdamW's final loss within the budgets tried")
    if args.out:
        plot(sweep, best, budget_loss, adam_final, os.path.splitext(args.out)[0] + ".png")
        results["plot"] = os.path.splitext(args.out)[0] + ".png"
    write_json(args.out, results)


def token_ratio(budget_loss: dict[float, float], target: float) -> float:
    """Smallest budget fraction whose complete run reaches ``target``, interpolated linearly between the
    two budgets that bracket it; NaN when even the full budget does not reach it."""
    points = sorted(budget_loss.items())
    if points[0][1] <= target:
        return points[0][0]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target < l0:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return math.nan


def plot(sweep, best, budget_loss, adam_final, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for opt, color in (("muonclip", "tab:blue"), ("adamw", "tab:red")):
        for lr, curve in sorted(sweep[opt].items()):
            steps, losses = zip(*curve)
            axes[0].plot(steps, losses, color=color, alpha=1.0 if lr == best[opt] else 0.25,
                         label=f"{opt} lr={lr:g}" + (" (best)" if lr == best[opt] else ""))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=7)
    axes[0].set_title("learning-rate sweeps, equal tokens")
    fr, ls = zip(*sorted(budget_loss.items()))
    axes[1].plot(fr, ls, marker="o", label="MuonClip, complete runs")
    axes[1].axhline(adam_final, color="tab:red", linestyle="--", label="AdamW final (best lr)")
    axes[1].set_xlabel("token budget (fraction of the full run)")
    axes[1].set_ylabel("final validation loss")
    axes[1].legend()
    axes[1].set_title("tokens to reach AdamW's final loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
