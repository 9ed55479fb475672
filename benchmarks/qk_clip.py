"""QK-Clip at work: the same model, data and optimizer trained twice, with and without QK-Clip, and the
per-step maximum attention logit and loss of both (shared/REFERENCE.md section 4).

Default setup: ``tiny`` narrowed to 2 layers, 2 heads and a 16-token vocabulary; MuonClip at 2e-3
(constant after a 50-step linear warm-up), 16 x 64 tokens per step, 1,000 steps, tau = 8 (K2 uses 100;
its small-model ablation used 30; the issue allows a lower tau so that a CPU run passes it). The data is
an offset copy: after 8 uniform tokens, each token repeats the one 8 positions back with probability 0.9
and is drawn uniformly otherwise, so one head must attend sharply to offset 8 and its logits grow for as
long as training runs. Every step draws new sequences; the logged max logit of step t is the one recorded
in step t's own forward, i.e. measured on new data before step t's clip.

    python -m benchmarks.qk_clip [--quick] --out bench-results/qk_clip.json   (also writes a .png;
    --quick runs 600 steps)

Figures, per run (with and without the clip): the worst step's max logit and its ratio to tau, the 95th
percentile over tau (the JSON also has the 99th), the steps above 1.1 tau (and, in the JSON, above tau),
the mean max_logit / tau over the steps above tau, the final loss (mean of the last 20 steps), the batch
spread (below), the heads clipped and the run's wall time; the curves go to the JSON and the PNG.
Targets: with the clip no step above 1.1 tau; without it, some step above 2 tau.

Why this data: a post-step clip can only cap the next step's maximum if that maximum does not depend on
which sequences the step drew. Every ``probe_every`` steps the benchmark measures the maximum on
``probe_batches`` new batches at fixed weights and reports max / median of those (``batch_spread``: the
largest among the probes whose median is at least tau / 2). Here all 256 token pairs occur in every
batch, so once the logits are large the spread stays close to 1 and what is left is the growth of one
update, which the clip at step t-1 could not see. ``--data markov`` draws a permutation chain instead
(each token follows its predecessor through a fixed permutation of a 512-token vocabulary or, with
probability 0.1, repeats the token 8 back): there a batch holds about a thousand of the 262,144 token
pairs, the batch maximum moves from one batch to the next, and that spread, not the clip, sets the
overshoot (the clipped head's logit on the step's own batch is tau: tests/k2model/test_qk_clip.py).

Results measured so far, and the settings tried with both kinds of data: benchmarks/results/qk_clip.md.

The step follows the trainer's order: forward/backward -> set lr -> optimizer step -> qk_clip with the
recorded max logits -> reset_max_logits -> router-bias update -> reset_expert_load.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import parse_args, table, write_json
from k2model.config import OptimizerConfig, preset_config
from k2model.model import build_model
from k2model.moe import update_router_bias
from k2model.optim import build_optimizer
from k2model.qk_clip import qk_clip
from k2model.schedule import lr_at, set_lr

COPY_OFFSET = 8
SEQ = 64


def _extra(p):
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000, --quick 600)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (constant after warm-up)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--tau", type=float, default=8.0)
    p.add_argument("--optimizer", choices=["adamw", "muonclip"], default="muonclip")
    p.add_argument("--data", choices=["copy", "markov"], default="copy",
                   help="copy: offset copy (the default); markov: the earlier permutation chain")
    p.add_argument("--batch", type=int, default=16, help=f"sequences of {SEQ} tokens per step")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 16 for copy, 512 for markov)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's weights and the data")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")


def copy_batch(gen: torch.Generator, vocab: int, batch: int, seq: int, copy_prob: float = 0.9) -> torch.Tensor:
    """[batch, seq + 1] tokens: the first ``COPY_OFFSET`` uniform, then each repeats the token
    ``COPY_OFFSET`` positions back with probability ``copy_prob`` and is uniform otherwise."""
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    copies = torch.rand(batch, seq + 1, generator=gen) < copy_prob
    for t in range(COPY_OFFSET, seq + 1):
        tokens[:, t] = torch.where(copies[:, t], tokens[:, t - COPY_OFFSET], tokens[:, t])
    return tokens


def markov_batch(gen: torch.Generator, next_token: torch.Tensor, batch: int, seq: int,
                 jump_prob: float = 0.1) -> torch.Tensor:
    """[batch, seq + 1] tokens: each follows its predecessor through ``next_token``, or with probability
    ``jump_prob`` repeats the token ``COPY_OFFSET`` positions back (uniform before that position)."""
    vocab = next_token.shape[0]
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    jumps = torch.rand(batch, seq, generator=gen) < jump_prob
    uniform = torch.randint(0, vocab, (batch, seq), generator=gen)
    for t in range(1, seq + 1):
        jump_to = tokens[:, t - COPY_OFFSET] if t >= COPY_OFFSET else uniform[:, t - 1]
        tokens[:, t] = torch.where(jumps[:, t - 1], jump_to, next_token[tokens[:, t - 1]])
    return tokens


def train(clip: bool, steps: int, lr: float, warmup: int, tau: float, optimizer: str, data: str = "copy",
          batch: int = 16, vocab: int = 16, seed: int = 0, probe_every: int = 100,
          probe_batches: int = 10) -> dict[str, list]:
    """Curves of one run: per step the recorded max logit, loss and heads clipped; every ``probe_every``
    steps the batch spread [step, median, max / median] of the max logit over ``probe_batches`` new
    batches at the step's final weights (drawn from their own generator: the training data is the same
    with or without probing)."""
    cfg = preset_config("tiny", vocab_size=vocab, num_layers=2, num_heads=2, max_seq_len=SEQ)
    model = build_model(cfg, seed=seed).train()
    opt = build_optimizer(model, OptimizerConfig(name=optimizer), lr)
    gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator().manual_seed(seed + 1_000_003)
    if data == "copy":
        def draw(g):
            return copy_batch(g, vocab, batch, SEQ)
    else:
        next_token = torch.randperm(vocab, generator=gen)

        def draw(g):
            return markov_batch(g, next_token, batch, SEQ)
    curves: dict[str, list] = {"max_logit": [], "loss": [], "num_clipped": [], "batch_spread": []}
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, "constant", min(warmup, steps)))
        tokens = draw(gen)
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        opt.step()
        curves["max_logit"].append(float(model.max_logits.max()))
        curves["loss"].append(out.lm_loss.item())
        num_clipped = qk_clip(model, model.max_logits, tau).num_clipped if clip else 0
        curves["num_clipped"].append(num_clipped)
        model.reset_max_logits()
        update_router_bias(model.routers(), model.expert_load(), cfg.router_bias_update_rate)
        model.reset_expert_load()
        opt.zero_grad()
        if (step + 1) % probe_every == 0:
            maxima = []
            with torch.no_grad():
                for _ in range(probe_batches):
                    probe = draw(probe_gen)
                    model(probe[:, :-1], probe[:, 1:])
                    maxima.append(float(model.max_logits.max()))
                    model.reset_max_logits()
            model.reset_expert_load()  # the probe's routing must not move the router bias
            median = statistics.median(maxima)
            curves["batch_spread"].append([step, median, max(maxima) / median if median > 0 else 1.0])
    return curves


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _mean_ratio_above(values: list[float], tau: float) -> float:
    """Mean of max_logit / tau over the steps above tau (the clipped regime); 0 when none."""
    above = [v / tau for v in values if v > tau]
    return sum(above) / len(above) if above else 0.0


def _worst_spread(curves: dict[str, list], tau: float) -> float:
    """Largest batch spread (max / median of the probe batches' maxima) among the probes whose median
    was at least tau / 2: where the clip acts, or is about to."""
    spreads = [spread for _, median, spread in curves["batch_spread"] if median >= tau / 2]
    return max(spreads) if spreads else float("nan")


def _tail_mean(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def plot(path: Path, runs: dict[str, dict[str, list[float]]], tau: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_logit, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curves in runs.items():
        ax_logit.plot(curves["max_logit"], label=label)
        ax_loss.plot(curves["loss"], label=label)
    ax_logit.axhline(tau, color="gray", linestyle="--", label=f"tau = {tau:g}")
    ax_logit.axhline(1.1 * tau, color="gray", linestyle=":", label="1.1 tau")
    ax_logit.set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)", title="Max attention logit")
    ax_loss.set(xlabel="step", ylabel="train loss (nats)", title="Loss", ylim=(0, None))
    ax_logit.legend()
    ax_loss.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, _extra)
    torch.set_num_threads(1)  # tiny matrices: a second thread costs more than it gives
    steps = args.steps or (600 if args.quick else 1000)
    vocab = args.vocab or (16 if args.data == "copy" else 512)
    runs, seconds = {}, {}
    for label, clip in (("with QK-Clip", True), ("without QK-Clip", False)):
        t0 = time.perf_counter()
        runs[label] = train(clip, steps, args.lr, args.warmup, args.tau, args.optimizer, args.data, args.batch,
                            vocab, args.seed)
        seconds[label] = time.perf_counter() - t0
    with_clip, without_clip = runs["with QK-Clip"], runs["without QK-Clip"]
    max_with, max_without = max(with_clip["max_logit"]), max(without_clip["max_logit"])

    rows = [{"run": label, "max logit": max(c["max_logit"]), "max / tau": max(c["max_logit"]) / args.tau,
             "final loss (last 20)": _tail_mean(c["loss"]), "min loss": min(c["loss"]),
             "p95 / tau": _percentile(c["max_logit"], 0.95) / args.tau,
             "steps > 1.1 tau": sum(x > 1.1 * args.tau for x in c["max_logit"]),
             "batch spread": _worst_spread(c, args.tau), "heads clipped": sum(c["num_clipped"]),
             "seconds": seconds[label]} for label, c in runs.items()]
    print(table(rows, list(rows[0])))
    targets = {"with_clip_max_at_most_1.1_tau": max_with <= 1.1 * args.tau,
               "without_clip_max_above_2_tau": max_without > 2 * args.tau}
    print("targets:", targets)

    plot_path = Path(args.plot) if args.plot else (Path(args.out).with_suffix(".png") if args.out else None)
    if plot_path is not None:
        plot(plot_path, runs, args.tau)
        print(f"wrote {plot_path}")
    write_json(args.out, {
        "tau": args.tau,
        "steps": steps,
        "lr": args.lr,
        "warmup": args.warmup,
        "optimizer": args.optimizer,
        "data": args.data,
        "batch": args.batch,
        "seq": SEQ,
        "vocab": vocab,
        "seed": args.seed,
        "max_logit_with_clip": max_with,
        "max_logit_without_clip": max_without,
        "max_logit_with_clip_p95": _percentile(with_clip["max_logit"], 0.95),
        "max_logit_with_clip_p99": _percentile(with_clip["max_logit"], 0.99),
        "mean_over_tau_of_steps_above_tau_with_clip": _mean_ratio_above(with_clip["max_logit"], args.tau),
        "steps_above_1.1_tau_with_clip": sum(x > 1.1 * args.tau for x in with_clip["max_logit"]),
        "steps_above_tau_with_clip": sum(x > args.tau for x in with_clip["max_logit"]),
        "batch_spread_with_clip": _worst_spread(with_clip, args.tau),
        "batch_spread_without_clip": _worst_spread(without_clip, args.tau),
        "final_loss_with_clip": _tail_mean(with_clip["loss"]),
        "final_loss_without_clip": _tail_mean(without_clip["loss"]),
        "targets": targets,
        "plot": str(plot_path) if plot_path else None,
        "curves": runs,
    })


if __name__ == "__main__":
    main()
