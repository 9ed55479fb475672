"""The device run's first part (``benchmarks/gpu_check.sh env``): the versions on the machine and the
APIs the GPU path needs, checked by calling them, so a missing one fails loudly here instead of the run
silently taking a slower fallback later.

    python -m benchmarks.gpu_env [--dry-run] --out env.json

Without a GPU (``--dry-run``) it reports the versions and checks what a CPU can run: ``F.grouped_mm`` in
fp32 and bf16, the collectives module, the presets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def check(dry_run: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from k2model.config import count_parameters, preset_config

    report: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        report["transformers"] = None
    problems: list[str] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not dry_run:
        problems.append("no CUDA device: run with --dry-run on a machine without a GPU")
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        report["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    if not hasattr(F, "grouped_mm"):
        problems.append(f"torch {torch.__version__} has no F.grouped_mm: the experts would take the padded "
                        "fallback")
    else:
        dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            x = torch.randn(48, 64, device=device, dtype=dtype)
            w = torch.randn(3, 64, 32, device=device, dtype=dtype)
            offs = torch.tensor([16, 32, 48], device=device, dtype=torch.int32)
            try:
                out = F.grouped_mm(x, w, offs=offs)
                ref = torch.cat([x[i * 16:(i + 1) * 16] @ w[i] for i in range(3)])
                err = (out.float() - ref.float()).abs().max().item()
                report[f"grouped_mm_{str(dtype).split('.')[-1]}_max_error"] = err
            except Exception as e:  # the kernel exists but refuses this device or dtype
                problems.append(f"F.grouped_mm on {device} in {dtype}: {type(e).__name__}: {e}")
    medium = count_parameters(preset_config("medium"))
    report["medium_params"] = {"total": medium.total, "active": medium.active}
    report["problems"] = problems
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: check what a CPU can run")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    report = check(args.dry_run)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for problem in report["problems"]:
        print(f"gpu_env: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
