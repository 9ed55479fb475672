"""What asking for a preemption notice costs a training step: ``ray.train.get_preemption_info()`` (a barrier
over the workers, through Ray Train's synchronisation actor) against one agreed flag over the workers'
process group (``k2model.distributed.agree``, an all-reduce of one integer over gloo; the trainer makes
several such reductions every step anyway), timed side by side in the same workers.

    python -m benchmarks.preemption_cost [--quick] --out FILE.json

Two Ray Train workers on this machine's embedded Ray; each call is timed ``repeats`` times in rounds that
alternate the two kinds, and the medians and 90th percentiles are reported with their ratio. With
``train.preemption_check_every=N`` a run pays one ask every N steps.

Results measured so far, with their dates and machines: benchmarks/results/preemption_cost.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from typing import Any


def _loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    from k2model.distributed import agree

    rounds, per_round = config["rounds"], config["per_round"]
    asks: list[float] = []
    reduces: list[float] = []
    for _ in range(3):  # warm both paths
        ray.train.get_preemption_info()
        agree(0, dist.ReduceOp.MAX, name="preemption cost")
    for _ in range(rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            ray.train.get_preemption_info()
            asks.append(time.perf_counter() - t0)
        for _ in range(per_round):
            t0 = time.perf_counter()
            agree(0, dist.ReduceOp.MAX, name="preemption cost")
            reduces.append(time.perf_counter() - t0)

    def summary(times: list[float]) -> dict[str, float]:
        ordered = sorted(times)
        return {"median_ms": statistics.median(times) * 1e3, "p90_ms": ordered[int(0.9 * len(ordered))] * 1e3,
                "calls": len(times)}

    if ray.train.get_context().get_world_rank() == 0:  # the workers run on this machine: a file carries it back
        with open(config["out"], "w") as f:
            json.dump({"get_preemption_info": summary(asks), "agree": summary(reduces)}, f)


def measure(rounds: int, per_round: int) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    folder = tempfile.mkdtemp()
    out = f"{folder}/rank0.json"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(_loop, train_loop_config={"rounds": rounds, "per_round": per_round, "out": out},
                     scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(name="preemption-cost", storage_path=folder)).fit()
    finally:
        ray.shutdown()
    with open(out) as f:
        figures = json.load(f)  # rank 0's timings
    figures["ratio_median"] = figures["get_preemption_info"]["median_ms"] / figures["agree"]["median_ms"]
    return {"workers": 2, "rounds": rounds, "per_round": per_round, "rank0": figures}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    args = parse_args(__doc__.split("\n\n")[0], argv)
    rounds, per_round = (2, 50) if args.quick else (6, 100)
    results = measure(rounds, per_round)
    f = results["rank0"]
    print("| call | median ms | p90 ms | calls |\n|---|---|---|---|")
    for name in ("get_preemption_info", "agree"):
        print(f"| {name} | {f[name]['median_ms']:.2f} | {f[name]['p90_ms']:.2f} | {f[name]['calls']} |")
    print(f"get_preemption_info / agree (medians): {f['ratio_median']:.1f}x")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
