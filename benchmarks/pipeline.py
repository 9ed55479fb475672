"""The 1F1B pipeline's bubble, measured against its theory: ``small`` (``--preset``; 8 layers) in 2 stages
on 2 processes joined by gloo, one torch thread each, for several micro-batch counts ``m``.

Per step, each rank's busy time is the time inside its stage's forward and backward chunks (the
schedule's ``forward_one_chunk`` and ``backward_one_chunk``, timed in place, and the last stage's loss,
counted with its forward); the measured bubble is the
idle share of the schedule's step on the step's busiest rank, 1 - busy / step, busy and step time taken
from the same step (the host's load moves both), and the median over the timed steps is reported.
Two theories, both from ``k2model.pipeline.simulate_1f1b`` (the schedule's own order of work, transfers
free): the textbook one for equal stages, (p - 1) / (m + p - 1), and the one for the stages as they are,
from each stage's measured forward and backward time per micro-batch in that step (the balanced cut
cannot make whole layers, an embedding and a head take equal time). ``over_theory`` is measured over the
latter, ``excess_idle_share`` their difference. The same function gives any ``pp`` (``theory_bubble`` in
the JSON, for pp = 2, 4, 8, 16).

Also, informational on 2 cores: tokens/s of ``pp=2`` against one process with both threads, at the same
global batch. With ``--cuts``: the stages the trainer cuts (priced by FLOPs and bytes,
``k2model.pipeline.stage_cut``) against the cut by FLOPs alone, run in turn: each stage's time per
micro-batch and the step time.

    python -m benchmarks.pipeline [--quick] [--cuts] --out bench-results/pipeline.json

Target: the measured bubble within 1.2x of theory at m >= 4p. Figures measured so far, dated with their
machines: benchmarks/results/pipeline.md.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks.common import parse_args, table, write_json
from k2model.pipeline import bubble_fraction, simulate_1f1b
from k2model.testing import run_workers
from pipelines.config import load_config
from pipelines.train.trainer import Trainer

SEQ, MICRO = 128, 2


def _config(preset: str, workers: int, pp: int, m: int, threads: int, pp_layers: list[int] | None = None):
    vocab = {"tiny": 4096, "small": 32768}[preset]
    return load_config(None, [
        f"model.preset={preset}", f"model.vocab_size={vocab}", f"data.vocab_size={vocab}", f"data.seq_len={SEQ}",
        f"train.num_workers={workers}", f"train.pp={pp}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO * m}", "train.steps=1000", "train.warmup_steps=1",
        f"train.threads_per_worker={threads}", "tracking.enabled=false",
        *([f"train.pp_layers=[{','.join(map(str, pp_layers))}]"] if pp_layers else [])])


class Batches:
    def __init__(self, vocab: int):
        self.vocab = vocab

    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(step * 1000 + micro)
        ids = torch.randint(0, self.vocab, (MICRO, SEQ + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]


def measure_rank(rank: int, world: int, preset: str, m: int, steps: int, pp_layers: list[int] | None = None) -> dict:
    """One rank of ``pp=world`` (or one process with ``world`` = 1): per timed step, the schedule's wall
    time and the time inside this rank's forward and backward chunks."""
    cfg = _config(preset, world, world, m, 1 if world > 1 else 2, pp_layers if world > 1 else None)
    torch.set_num_threads(cfg.train.threads_per_worker)
    trainer = Trainer(cfg, Batches(cfg.model.vocab_size), [])
    busy = {"F": 0.0, "B": 0.0}
    if trainer.pipeline is not None:
        stage = trainer.pipeline._stage
        for kind, attr in (("F", "forward_one_chunk"), ("B", "backward_one_chunk")):
            inner = getattr(stage, attr)

            def timed(*args, _inner=inner, _kind=kind, **kwargs):
                t0 = time.perf_counter()
                out = _inner(*args, **kwargs)
                busy[_kind] += time.perf_counter() - t0
                return out

            setattr(stage, attr, timed)
        # The last stage's loss runs between its forward and backward chunks: part of its forward work.
        schedule = trainer.pipeline._schedule
        loss_fn = schedule._loss_fn

        def timed_loss(*args, **kwargs):
            t0 = time.perf_counter()
            out = loss_fn(*args, **kwargs)
            busy["F"] += time.perf_counter() - t0
            return out

        schedule._loss_fn = timed_loss
    schedule_s: list[float] = []
    busy_s: list[float] = []
    forward_backward = trainer.forward_backward

    def timed_schedule(tr, micro_batches):
        busy.update(F=0.0, B=0.0)
        t0 = time.perf_counter()
        out = forward_backward(tr, micro_batches)
        schedule_s.append(time.perf_counter() - t0)
        busy_s.append(busy["F"] + busy["B"])
        per_micro["F"].append(busy["F"] / m)
        per_micro["B"].append(busy["B"] / m)
        return out

    per_micro: dict[str, list[float]] = {"F": [], "B": []}
    trainer.forward_backward = timed_schedule
    trainer.step()  # warm-up
    for lst in (schedule_s, busy_s, per_micro["F"], per_micro["B"]):
        lst.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    step_s = (time.perf_counter() - t0) / steps
    return {"step_s": step_s, "schedule_s": schedule_s, "busy_s": busy_s, "forward_s": per_micro["F"],
            "backward_s": per_micro["B"]}


def step_bubbles(ranks: list[dict], pp: int, m: int) -> tuple[list[float], list[float]]:
    """Per timed step: the measured bubble (the idle share of the schedule's step on that step's busiest
    rank, busy and step time from the same step) and the bubble ``simulate_1f1b`` gives for that step's
    measured per-stage forward and backward times."""
    measured, theory = [], []
    for i in range(len(ranks[0]["schedule_s"])):
        busiest = max(ranks, key=lambda r: r["busy_s"][i])
        measured.append(1.0 - busiest["busy_s"][i] / max(r["schedule_s"][i] for r in ranks))
        theory.append(float(simulate_1f1b(pp, m, [r["forward_s"][i] for r in ranks],
                                          [r["backward_s"][i] for r in ranks])["bubble"]))
    return measured, theory


def _args(p) -> None:
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--m", type=int, nargs="+", default=None, help="micro-batch counts (default 2 4 8 16)")
    p.add_argument("--cuts", action="store_true",
                   help="instead: the trainer's cut (FLOPs and bytes) against the FLOP-only cut, alternately")


def compare_cuts(preset: str, m: int, steps: int, rounds: int) -> dict:
    """The stages the trainer cuts (``k2model.pipeline.stage_cut``, FLOPs and bytes) against the cut by FLOPs
    alone (``partition_layers``' default), run in turn (A B A B ...): per cut, each stage's forward and
    backward time per micro-batch (median over every timed step of every round), the slower stage over
    the faster one, and the step time."""
    from k2model.pipeline import partition_layers, stage_cut

    cfg = _config(preset, 2, 2, m, 1)
    cuts = {"flops_and_bytes": [len(r) for r in stage_cut(cfg.model, 2, SEQ, None, MICRO, "float32", "cpu")],
            "flops_only": [len(r) for r in partition_layers(cfg.model, 2, SEQ)]}
    per_cut: dict[str, dict] = {name: {"stage_s": [[], []], "step_s": []} for name in cuts}
    for _ in range(rounds):
        for name, counts in cuts.items():
            ranks = run_workers(measure_rank, 2, preset, m, steps, counts)
            for s, r in enumerate(ranks):
                per_cut[name]["stage_s"][s] += [f + b for f, b in zip(r["forward_s"], r["backward_s"])]
            per_cut[name]["step_s"].append(max(r["step_s"] for r in ranks))
    out = {}
    for name, counts in cuts.items():
        stage_s = [statistics.median(v) for v in per_cut[name]["stage_s"]]
        out[name] = {"layers_per_stage": counts, "stage_micro_batch_s": stage_s,
                     "slower_over_faster": max(stage_s) / min(stage_s),
                     "step_s": statistics.median(per_cut[name]["step_s"]), "step_s_all": per_cut[name]["step_s"]}
    out["step_ratio_flops_only_over_flops_and_bytes"] = out["flops_only"]["step_s"] / out["flops_and_bytes"]["step_s"]
    return out


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, extra=_args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    preset, pp = args.preset, 2
    if args.cuts:
        m = args.m[0] if args.m else 8
        result = compare_cuts(preset, m, 2 if args.quick else 3, 1 if args.quick else 2)
        print(table([{"cut": name, "layers": str(r["layers_per_stage"]),
                      "stage 0 s": r["stage_micro_batch_s"][0], "stage 1 s": r["stage_micro_batch_s"][1],
                      "slower/faster": r["slower_over_faster"], "step s": r["step_s"]}
                     for name, r in result.items() if isinstance(r, dict)],
                    ["cut", "layers", "stage 0 s", "stage 1 s", "slower/faster", "step s"]))
        print("step time, FLOP-only cut over the trainer's:", result["step_ratio_flops_only_over_flops_and_bytes"])
        write_json(args.out, {"preset": preset, "m": m, "seq_len": SEQ, "micro_batch": MICRO, **result})
        return
    steps = 2 if args.quick else 4
    ms = tuple(args.m) if args.m else ((8,) if args.quick else (2, 4, 8, 16))
    rows, runs = [], {}
    for m in ms:
        ranks = run_workers(measure_rank, pp, preset, m, steps)
        measured_all, theory_all = step_bubbles(ranks, pp, m)
        measured, as_is = statistics.median(measured_all), statistics.median(theory_all)
        textbook = bubble_fraction(pp, m)
        (single,) = run_workers(measure_rank, 1, preset, m, steps)
        tokens = m * MICRO * SEQ
        runs[m] = {"ranks": ranks, "measured_bubble": measured, "measured_bubble_all_steps": measured_all,
                   "theory_bubble_these_stages_all_steps": theory_all, "theory_bubble_equal_stages": textbook,
                   "theory_bubble_these_stages": as_is, "over_theory": measured / as_is,
                   "excess_idle_share": measured - as_is,
                   "over_textbook": measured / textbook, "tokens_per_s_pp2": tokens / max(r["step_s"] for r in ranks),
                   "tokens_per_s_one_process": tokens / single["step_s"]}
        runs[m]["pp2_over_one_process"] = runs[m]["tokens_per_s_pp2"] / runs[m]["tokens_per_s_one_process"]
        rows.append({"m": m, "measured": measured, "theory": as_is, "textbook": textbook,
                     "over_theory": measured / as_is, "pp2/1 tok/s": runs[m]["pp2_over_one_process"]})
    print(table(rows, ["m", "measured", "theory", "textbook", "over_theory", "pp2/1 tok/s"]))
    results = {"preset": preset, "pp": pp, "seq_len": SEQ, "micro_batch": MICRO, "steps": steps,
               "runs": {str(m): r for m, r in runs.items()},
               "theory_bubble": {str(p): {str(m): bubble_fraction(p, m) for m in (p, 4 * p, 8 * p)}
                                 for p in (2, 4, 8, 16)},
               "targets": {f"m{m}_within_1.2x_of_theory": runs[m]["over_theory"] <= 1.2 for m in ms if m >= 4 * pp}}
    print("targets:", results["targets"])
    write_json(args.out, results)


if __name__ == "__main__":
    main()
