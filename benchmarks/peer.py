"""k2model against its peer implementation: the same forward+backward in Hugging Face transformers'
``DeepseekV3ForCausalLM`` (grouped-matmul experts, SDPA attention), its weights loaded from a k2pipe
export of the k2model, side by side in one process.

1. A ``preset`` k2model is built with the trainer's initialisation and written out by the export stage's
   own function (``pipelines.stages.export.write_hf_folder``) to a local folder; transformers loads that
   folder with ``from_pretrained``.
2. Both models run one fp32 forward on the same tokens: the logits must agree, max |difference| at most
   1e-4 of max |logit| (``logits_match``).
3. Timing: forward, next-token cross-entropy and backward of one micro-batch (``--micro`` sequences of
   ``--seq`` tokens), both models in training mode under the trainer's precision policy (fp32 weights;
   bf16 autocast on a GPU, fp32 on a CPU), k2model with its max-logit recording on (QK-Clip needs it) and
   its sequence-wise balance loss. transformers runs twice: under that same policy (``transformers``; its
   grouped matmul casts its input to the weights' dtype, so its experts run in fp32 there) and with bf16
   weights, as it is usually trained (``transformers_bf16``). They alternate, round after round
   (A B C A B C), and each reports its median: ``k2pipe_over_transformers`` is k2pipe's tokens/s over the
   faster transformers variant's.

    python -m benchmarks.peer --device cuda --preset medium --seq 4096 --micro 4 --out bench-results/peer.json
    python -m benchmarks.peer --device cpu --preset tiny --seq 64 --micro 2   # a dry run: figures mean nothing

Target on one H200 (``medium``, sequence 4096, micro-batch 4): ``k2pipe_over_transformers >= 1.3``.
Figures measured so far, dated with their machines: benchmarks/results/peer.md.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import parse_args, write_json
from k2model.config import preset_config
from k2model.model import build_model
from pipelines.stages.export import write_hf_folder

LOGITS_RTOL = 1e-4


def _args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="medium")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro", type=int, default=4, help="sequences in the timed micro-batch")
    p.add_argument("--rounds", type=int, default=5, help="A B rounds; each model's median is reported")
    p.add_argument("--check-seq", type=int, default=512, help="tokens of the one-sequence logits check")


def load_peer(folder: Path, device: torch.device):
    """transformers' DeepSeek-V3 model from a k2pipe export folder, fp32, its fast kernels chosen by name."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                  experts_implementation="grouped_mm")
    kernels = {"attention": model.config._attn_implementation,
               "experts": getattr(model.config, "_experts_implementation", None)}
    if kernels != {"attention": "sdpa", "experts": "grouped_mm"}:  # never time a slower fallback by accident
        raise SystemExit(f"peer: transformers took {kernels}, not sdpa attention and grouped_mm experts")
    return model.to(device), kernels


def logits_check(k2, peer, vocab: int, seq: int, device: torch.device) -> dict:
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    k2.eval()
    peer.eval()
    with torch.no_grad():
        a = k2(ids).logits.float()
        b = peer(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {"max_abs_difference": diff, "max_abs_logit": scale, "relative": diff / scale,
            "tolerance": LOGITS_RTOL, "logits_match": diff <= LOGITS_RTOL * scale}


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, extra=_args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = preset_config(args.preset, **overrides)
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"peer: --seq {args.seq} exceeds {args.preset}'s max_seq_len {cfg.max_seq_len}")
    k2 = build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory(prefix="k2pipe-peer-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_hf_folder(k2, cfg, str(folder), origin="benchmarks.peer")
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        peer, kernels = load_peer(folder, device)
        load_s = time.perf_counter() - t0
    k2 = k2.to(device)
    check = logits_check(k2, peer, cfg.vocab_size, min(args.check_seq, args.seq), device)
    print(f"logits: max |difference| {check['max_abs_difference']:.3g} of max |logit| {check['max_abs_logit']:.3g} "
          f"({'within' if check['logits_match'] else 'OUTSIDE'} {LOGITS_RTOL:g})")

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (args.micro, args.seq + 1), generator=gen).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def k2_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = k2(inputs, targets).loss
        loss.backward()

    def peer_step(model):
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
        return step

    k2.train()
    k2.record_max_logits = True
    peer.train()
    peer_bf16 = copy.deepcopy(peer).to(torch.bfloat16)
    steps = {"k2pipe": (k2, k2_step), "transformers": (peer, peer_step(peer)),
             "transformers_bf16": (peer_bf16, peer_step(peer_bf16))}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for model, step in steps.values():  # warm-up: kernels, allocator
        step()
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.rounds):
        for name, (model, step) in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    tokens = args.micro * args.seq
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
              "preset": args.preset, "vocab_size": cfg.vocab_size, "seq_len": args.seq, "micro_batch": args.micro,
              "precision": "fp32 weights, bf16 autocast" if cuda else "fp32", "rounds": args.rounds,
              "peer_kernels": kernels, "export_s": export_s, "load_s": load_s, "logits": check,
              "step_s": median, "step_s_all_rounds": times,
              "tokens_per_s": {name: tokens / s for name, s in median.items()},
              "k2pipe_over_transformers": min(median["transformers"], median["transformers_bf16"]) / median["k2pipe"]}
    if cuda:
        result["peak_memory_bytes_both_models"] = torch.cuda.max_memory_allocated(device)
    result["targets"] = {"logits_match": check["logits_match"],
                         "k2pipe_at_least_1.3x_transformers": result["k2pipe_over_transformers"] >= 1.3}
    import transformers

    result["transformers"] = transformers.__version__
    print(f"{args.preset} forward+backward of {args.micro} x {args.seq} on {result['device_name']}, tokens/s: "
          + ", ".join(f"{name} {v:.0f}" for name, v in result["tokens_per_s"].items())
          + f" (transformers: {kernels['experts']} experts, {kernels['attention']} attention); k2pipe over the "
          f"faster transformers: {result['k2pipe_over_transformers']:.2f}x")
    write_json(args.out, result)
    if not check["logits_match"]:
        raise SystemExit("peer: the transformers model's logits differ from k2model's beyond the tolerance")


if __name__ == "__main__":
    main()
