"""``k2pipe plan``: what a run needs before anyone books GPUs (``k2model.plan`` does the arithmetic).

Per GPU, for the most loaded stage and rank: parameters, gradients, optimizer state and master weights,
activations for the micro-batches 1F1B keeps in flight, the optimizer step's largest temporary, a reserve;
whether it fits and with what headroom; host memory per node when the optimizer state is offloaded; the
all-to-all, data-parallel and pipeline bytes a GPU sends per step; Newton-Schulz FLOPs next to the
model's; the 1F1B bubble; an estimated step time under stated assumptions. With no ``--pp``/``--ep`` it
searches the layouts of ``--gpus`` and lists those that fit, fastest first; a layout that does not fit
gets the smallest change that would make it fit. The formulas are in k2model/plan.py, k2model/memory.py
and k2model/activations.py, and in the README.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from ray_jobs.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_args

EPILOG = """\
The batch is the config's: train.global_batch_size sequences of data.seq_len tokens (set them with --set).
Memory: parameters (train.param_dtype), fp32 gradients, the optimizer state and fp32 masters sharded over
data parallelism (ZeRO-1), activations per token times the micro-batch's tokens for each of the min(pp - s,
m) micro-batches 1F1B keeps in flight on stage s, the optimizer step's largest temporary, and a reserve of
2 GB + 4% of the GPU for the CUDA context, NCCL and fragmentation. Fits when that total is at most
--gpu-memory-gb. Step time: each stage's FLOPs at --mfu of the peak and its bytes at --hbm-gbs, through the
1F1B schedule, plus the exposed
all-to-all (1 - --a2a-overlap) and data-parallel reduction (1 - --dp-overlap) at NVLink or network speed,
Newton-Schulz, and PCIe copies under offload.

Worked example, Kimi K2's layout (16-way pipeline x 16-way expert parallelism on 256 H800s):
  k2pipe plan --preset k2-1t --set data.seq_len=4096 --set train.global_batch_size=16384 \\
      --hardware h800 --gpus 256 --pp 16 --ep 16 --micro-batch 1 --param-dtype bfloat16 --recompute full
(about 63 GB of states per GPU on the middle stages; fits an 80 GB GPU with full recomputation; the README
walks through it.)
"""


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    from k2model.layers import RECOMPUTE_MODES
    from k2model.plan import HARDWARE, PARAM_DTYPES

    p = sub.add_parser("plan", help="per-GPU memory, traffic and step time of a layout, or the layouts that fit",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the run (train.num_workers)")
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="h100",
                   help="GPU kind whose defaults the other hardware flags override (default: h100)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU, GB (10^9 bytes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs of one node")
    p.add_argument("--host-memory-gb", type=float, help="host memory of one node, GB")
    p.add_argument("--hbm-gbs", type=float, help="GPU memory bandwidth, GB/s")
    p.add_argument("--nvlink-gbs", type=float, help="intra-node bandwidth per GPU, GB/s each way")
    p.add_argument("--network-gbs", type=float, help="inter-node bandwidth per GPU, GB/s")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of one GPU")
    p.add_argument("--pp", type=int, help="pipeline stages (train.pp); with --ep: plan this layout, else search")
    p.add_argument("--ep", type=int, help="expert-parallel degree (train.ep)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (train.micro_batch_size)")
    p.add_argument("--param-dtype", choices=PARAM_DTYPES, help="train.param_dtype")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, help="train.recompute")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="optimizer state and masters in host memory (train.offload_optimizer)")
    p.add_argument("--mfu", type=float, default=0.35, help="share of the peak the matmuls achieve (default 0.35)")
    p.add_argument("--a2a-overlap", type=float, default=0.8, help="share of the all-to-all hidden (default 0.8)")
    p.add_argument("--dp-overlap", type=float, default=0.5,
                   help="share of the data-parallel reduction hidden (default 0.5)")
    p.add_argument("--top", type=int, default=10, help="layouts listed by a search (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON (keys in the README)")
    p.set_defaults(func=cmd_plan)


def _hardware(args: argparse.Namespace):
    from k2model.plan import HARDWARE

    hw = HARDWARE[args.hardware]
    # The hardware field each flag overrides (--peak-tflops in TFLOP/s, the field in FLOP/s).
    flags = {"gpu_memory_gb": "memory_gb", "gpus_per_node": "gpus_per_node", "host_memory_gb": "host_memory_gb",
             "nvlink_gbs": "nvlink_gbs", "hbm_gbs": "hbm_gbs", "network_gbs": "network_gbs",
             "peak_tflops": "bf16_flops"}
    changes = {}
    for flag, field_name in flags.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
        changes[field_name] = value * 1e12 if flag == "peak_tflops" else value
    return replace(hw, **changes)


def _check_counts(args: argparse.Namespace) -> None:
    """Counts the plan takes as given: at least 1 (0 is not "the default")."""
    for flag in ("gpus", "pp", "ep", "micro_batch", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected at least 1")


def cmd_plan(args: argparse.Namespace) -> int:
    from k2model.plan import Assumptions, Job, Layout, PlanError, plan_layout, search_layouts
    from pipelines.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"model.preset={args.preset}"] if args.preset else [])
    try:
        cfg = load_config(args.config, overrides, vocab_from_model=True)
    except ConfigError as e:
        raise UsageError(f"invalid config: {e}") from None
    _check_counts(args)
    for flag in ("mfu", "a2a_overlap", "dp_overlap"):
        value = getattr(args, flag)
        if not 0 <= value <= 1 or (flag == "mfu" and value == 0):
            share = "(0, 1]" if flag == "mfu" else "[0, 1]"
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected a share in {share}")
    hardware = _hardware(args)
    assumptions = Assumptions(mfu=args.mfu, a2a_overlap=args.a2a_overlap, dp_overlap=args.dp_overlap)
    t = cfg.train
    job = Job(cfg.model, cfg.optimizer, cfg.data.seq_len, t.global_batch_size)
    layout = Layout(args.gpus, args.pp if args.pp is not None else t.pp, args.ep if args.ep is not None else t.ep,
                    t.micro_batch_size if args.micro_batch is None else args.micro_batch, args.recompute or t.recompute,
                    args.param_dtype or t.param_dtype,
                    t.offload_optimizer if args.offload_optimizer is None else args.offload_optimizer,
                    t.pp_layers if args.pp is None else None)
    try:
        if args.pp is not None or args.ep is not None:
            plan = plan_layout(job, layout, hardware, assumptions)
            print(json.dumps(plan.to_dict(), indent=2) if args.json else render_plan(plan))
            return EXIT_OK if plan.fits else EXIT_FAILED
        plans = search_layouts(job, args.gpus, hardware, assumptions, param_dtype=layout.param_dtype,
                               micro_batches=(args.micro_batch,) if args.micro_batch is not None else (1, 2, 4, 8),
                               recompute=(args.recompute,) if args.recompute else None,
                               offload=(args.offload_optimizer,) if args.offload_optimizer is not None else None)
    except PlanError as e:
        raise UsageError(str(e)) from None
    if not plans:
        raise UsageError(f"no layout of --gpus {args.gpus} is valid for this model and batch")
    fitting = [p for p in plans if p.fits]
    best = fitting[0] if fitting else plans[0]
    if not fitting:
        best.smallest_change = smallest(job, best, assumptions)
    if args.json:
        print(json.dumps({"fits": bool(fitting), "layouts": [p.to_dict() for p in (fitting or plans)[:args.top]],
                          "best": best.to_dict()}, indent=2))
    else:
        print(render_search(plans, fitting, best, args.top))
    return EXIT_OK if fitting else EXIT_FAILED


def smallest(job, plan, assumptions):
    from k2model.plan import smallest_change

    return smallest_change(job, plan.layout, plan.hardware, assumptions)


# ---------------------------------------------------------------------- text
def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _layout_line(layout) -> str:
    return (f"pp={layout.pp} ep={layout.ep} dp={layout.dp} micro-batch={layout.micro_batch} "
            f"recompute={layout.recompute} params={layout.param_dtype} "
            f"offload={'yes' if layout.offload_optimizer else 'no'}")


def render_plan(plan) -> str:
    from k2model.config import count_parameters

    job, layout, hw, w = plan.job, plan.layout, plan.hardware, plan.worst
    pc = count_parameters(job.model)
    m = job.global_batch // (layout.micro_batch * layout.dp)
    g = plan.per_gpu()
    lines = [
        f"{job.model.preset or 'model'}: {pc.total / 1e9:,.1f}B parameters, {pc.active / 1e9:,.1f}B active; "
        f"{job.global_batch} sequences x {job.seq_len} tokens a step",
        f"on {layout.gpus} x {hw.name} ({hw.memory_gb:g} GB, {hw.gpus_per_node} a node, "
        f"{hw.host_memory_gb:g} GB host memory a node)",
        f"layout: {_layout_line(layout)}; {m} micro-batches a step per GPU",
        f"per GPU, stage {w.stage} (layers {w.layers.start}-{w.layers.stop - 1}), rank {w.rank}, the most loaded:",
    ]
    rows = [("parameters", g["parameters"]), ("gradients (fp32)", g["gradients"]),
            ("optimizer state", g["optimizer_state"]), ("master weights (fp32)", g["master_weights"]),
            ("buffers", g["buffers"]),
            (f"activations ({w.in_flight} in flight x {_gb(w.activations_per_micro_batch)})", g["activations"]),
            ("optimizer step temporary", g["optimizer_transient"]), ("reserve", g["reserve"])]
    lines += [f"  {name:<44} {_gb(value):>14}" for name, value in rows]
    verdict = (f"fits, {_gb(plan.headroom)} headroom" if plan.fits
               else f"DOES NOT FIT ({_gb(-plan.headroom)} over)" if plan.headroom < 0
               else "DOES NOT FIT (host memory)")
    lines.append(f"  {'peak (states + max(activations, temporary))':<44} {_gb(g['total'] - g['reserve']):>14}")
    lines.append(f"  total {_gb(g['total'])} of {_gb(plan.memory)}: {verdict}")
    if layout.offload_optimizer:
        lines.append(f"host memory of the most loaded node: {_gb(plan.host_bytes_per_node)} of "
                     f"{_gb(hw.host_memory_gb * 1e9)}")
    why = plan.why()
    if why:
        lines.append(f"why: {why}")
    if not plan.fits:
        change = plan.smallest_change
        if change is None:
            lines.append("no single change found makes it fit (tried recomputation, offload, bf16 parameters, "
                         "more stages, more expert parallelism, up to 64x the GPUs)")
        else:
            lines.append(f"smallest change: {change['change']}: {_gb(change['total_bytes'])}, "
                         f"{_gb(change['headroom_bytes'])} headroom")
            lines.append("  " + " ".join(f"--set {s}" for s in change["set"]))
    lines.append("stages (GB): " + ", ".join(f"{s.stage}: {s.gpu_states / 1e9:.1f} states + "
                                            f"{s.activations / 1e9:.1f} activations" for s in plan.stages))
    tr, fl, est = plan.traffic, plan.flops, plan.estimate
    lines += [
        f"traffic per GPU per step: all-to-all {_bytes(tr['all_to_all_bytes'])}, data-parallel "
        f"{_bytes(tr['data_parallel_bytes'])}, pipeline {_bytes(tr['pipeline_bytes'])}",
        f"FLOPs per GPU per step: model {fl['model_per_gpu']:.3g}, Newton-Schulz {fl['newton_schulz_per_gpu']:.3g} "
        f"({100 * fl['newton_schulz_share']:.2f}%)",
        f"1F1B bubble: {100 * plan.bubble:.2f}% ({layout.pp} stages, {m} micro-batches)",
        f"estimate: {est['step_s']:.3g} s a step, {est['tokens_per_s']:,.0f} tokens/s, MFU {est['mfu']:.2f} "
        f"(pipeline {est['pipeline_s']:.3g} s, exposed all-to-all {est['all_to_all_exposed_s']:.3g} s, "
        f"data-parallel {est['data_parallel_exposed_s']:.3g} s, Newton-Schulz {est['newton_schulz_s']:.3g} s"
        + (f", offload {est['offload_s']:.3g} s" if layout.offload_optimizer else "") + ")",
        f"  assuming MFU {plan.assumptions.mfu}, {100 * plan.assumptions.a2a_overlap:g}% of the all-to-all and "
        f"{100 * plan.assumptions.dp_overlap:g}% of the data-parallel reduction hidden, HBM {hw.hbm_gbs:g} GB/s, "
        f"NVLink {hw.nvlink_gbs:g} GB/s, network {hw.network_gbs:g} GB/s, peak {hw.bf16_flops / 1e12:g} TFLOP/s",
    ]
    lines += [f"note: {note}" for note in plan.notes]
    lines.append("run it with: " + " ".join(f"--set {s}" for s in layout.set_lines()))
    return "\n".join(lines)


def render_search(plans, fitting, best, top: int) -> str:
    head = f"{'pp':>3} {'ep':>4} {'dp':>5} {'mb':>3} {'recompute':>9} {'offload':>7} {'per GPU':>11} " \
           f"{'headroom':>11} {'step s':>8} {'tokens/s':>12}"
    lines = [f"{len(fitting)} of {len(plans)} valid layouts fit" + (", fastest first:" if fitting else ":"), head]
    for plan in (fitting or plans)[:top]:
        lay = plan.layout
        lines.append(f"{lay.pp:>3} {lay.ep:>4} {lay.dp:>5} {lay.micro_batch:>3} {lay.recompute:>9} "
                     f"{'yes' if lay.offload_optimizer else 'no':>7} {_gb(plan.total):>11} {_gb(plan.headroom):>11} "
                     f"{plan.estimate['step_s']:>8.3g} {plan.estimate['tokens_per_s']:>12,.0f}")
    lines.append("")
    lines.append(("best: " if fitting else "closest: ") + render_plan(best))
    return "\n".join(lines)
