"""k2model.plan: Kimi K2's own figures (arXiv 2507.20534, section 2.4) from its config and layout, the
planner's states equal to the memory module's every rank (which tests/k2model/test_memory.py holds to real
steps), clear refusals of layouts that cannot run, the smallest change verified by planning it, and a
search that lists fitting layouts fastest first."""

from __future__ import annotations

import pytest
import torch

from k2model.config import OptimizerConfig, count_parameters, preset_config
from k2model.distributed import ParallelLayout
from k2model.memory import rank_memory
from k2model.pipeline import stage_cut
from k2model.plan import GB, HARDWARE, Job, Layout, PlanError, check_layout, plan_layout, search_layouts

K2 = Job(preset_config("k2-1t"), OptimizerConfig(), seq_len=4096, global_batch=16384)  # ~67M tokens a step
H800 = HARDWARE["h800"]
K2_LAYOUT = Layout(256, pp=16, ep=16, micro_batch=1, recompute="full", param_dtype="bfloat16")


@pytest.fixture(scope="module")
def k2_plan():
    return plan_layout(K2, K2_LAYOUT, H800)


def _average_states(plan) -> float:
    """Per-GPU states averaged over every GPU (each stage has dp GPUs alike but for ZeRO-1's shares)."""
    return sum(s.gpu_states for s in plan.stages) / len(plan.stages)


def test_k2_bf16_weights_and_fp32_gradients_are_the_reports_6_tb(k2_plan):
    """The report: bf16 parameters plus fp32 gradient-accumulation buffers come to about 6 TB over the 256-GPU
    model-parallel group: each parameter once, 2 + 4 bytes. The GPUs together hold more: the replicated
    weights (attention, dense FFN, shared experts, routers, embedding and head) once per data-parallel rank
    of their stage (16 here)."""
    total = count_parameters(K2.model).total
    once = total * (2 + 4)
    assert abs(once / 6e12 - 1) < 0.03, once
    held = sum(s.states.parameters + s.states.gradients for s in k2_plan.stages) * K2_LAYOUT.dp
    replicated = total - K2.model.num_moe_layers * K2.model.num_experts * count_parameters(K2.model).expert
    assert held == pytest.approx(once + (K2_LAYOUT.dp - 1) * replicated * 6, rel=0.01)


def test_k2_layout_states_per_gpu_with_and_without_offload(k2_plan):
    """K2's layout on 256 80 GB GPUs: about 60 GB of states per GPU (parameters, gradients, Muon momenta,
    AdamW moments and fp32 masters; the report: 30 GB with some optimizer state offloaded); offloaded, about
    30 GB on the GPU and the host memory of a node well under its 2 TB; ZeRO-1 over 1,024 GPUs brings the
    states down without offload."""
    average = _average_states(k2_plan)
    assert 55 * GB < average < 66 * GB, average / GB
    # The embedding stage: one dense layer, three MoE layers and the embedding (the FLOP-balanced cut gives
    # it 4 layers like the middle stages); the last: one MoE layer and the head.
    stage0, middle, last = k2_plan.stages[0].gpu_states, k2_plan.stages[1].gpu_states, k2_plan.stages[-1].gpu_states
    assert last < stage0 < middle
    offloaded = plan_layout(K2, Layout(**{**K2_LAYOUT.__dict__, "offload_optimizer": True}), H800)
    assert 25 * GB < _average_states(offloaded) < 32 * GB
    assert 0 < offloaded.host_bytes_per_node < 2000 * GB * 0.2
    wider = plan_layout(K2, Layout(**{**K2_LAYOUT.__dict__, "gpus": 1024}), H800)
    assert _average_states(wider) < 0.65 * average
    assert k2_plan.fits and offloaded.fits and wider.fits


def test_k2_with_expert_parallelism_only_does_not_fit_and_says_why():
    plan = plan_layout(K2, Layout(256, pp=1, ep=16, recompute="full", param_dtype="bfloat16"), H800,
                       with_change=False)
    assert not plan.fits
    assert "parameters and gradients alone" in plan.why() and "--pp" in plan.why()
    # Every GPU holds all 61 layers' replicated weights and a sixteenth of the experts: over 400 GB.
    assert plan.worst.states.parameters + plan.worst.states.gradients > 400 * GB


def test_the_planners_states_are_the_memory_modules_for_every_rank():
    job = Job(preset_config("small"), OptimizerConfig(), seq_len=64, global_batch=64)
    layout = Layout(8, pp=2, ep=2, micro_batch=2, param_dtype="bfloat16")
    plan = plan_layout(job, layout, HARDWARE["h100"])
    stages = stage_cut(job.model, 2, 64, None, 2, "bfloat16", "cuda", ep=2)
    for stage in plan.stages:
        assert stage.layers == stages[stage.stage]
        by_rank = {r: rank_memory(job.model, job.optimizer, ParallelLayout(8, r, 2, 2, create_groups=False),
                                  stage_layers=stages[stage.stage], param_dtype=torch.bfloat16)
                   for r in range(stage.stage * 4, stage.stage * 4 + 4)}
        assert stage.states == by_rank[stage.rank]
        # The rank chosen is the one whose peak (states + activations or the step's temporary) is largest.
        for memory in by_rank.values():
            assert memory.states + max(stage.activations, memory.largest_transient) <= stage.peak
    assert plan.fits and plan.headroom == plan.memory - plan.total


@pytest.mark.parametrize("layout,message", [
    (Layout(256, pp=3), r"--pp \(train.pp\) 3 must divide --gpus 256 .* valid: 1, 2, 4, 8, 16, 32"),
    (Layout(256, pp=128), r"--pp \(train.pp\) 128 must divide --gpus 256 and be at most the model's 61 layers"),
    (Layout(256, pp=16, ep=32), r"--ep \(train.ep\) 32 must divide the data-parallel degree --gpus / --pp = 16"),
    (Layout(256, pp=16, ep=5), r"--ep \(train.ep\) 5 .* valid: 1, 2, 4, 8, 16"),
    (Layout(256, pp=16, micro_batch=3), r"--micro-batch \(train.micro_batch_size\) 3 times the data-parallel"),
    (Layout(252, pp=4), r"--gpus 252 is not a whole number of nodes of --gpus-per-node 8"),
    (Layout(256, pp=16, micro_batch=1024), r"1 micro-batches a step per GPU are fewer than the --pp 16 stages"),
    (Layout(256, pp=16, recompute="some"), r"--recompute 'some'"),
])
def test_bad_layouts_name_the_option_and_a_valid_value(layout, message):
    with pytest.raises(PlanError, match=message):
        check_layout(K2, layout, 8)


def test_the_smallest_change_fits_when_planned():
    """K2's layout with fp32 parameters under autocast, no recomputation, 8 sequences a micro-batch: far over.
    The change named is the first that fits of a fixed order, and planning it fits."""
    layout = Layout(256, pp=16, ep=16, micro_batch=8)
    plan = plan_layout(K2, layout, H800)
    assert not plan.fits and plan.smallest_change is not None
    change = plan.smallest_change
    assert plan_layout(K2, Layout(**change["layout"]), H800, with_change=False).fits
    assert change["set"][0] == "train.num_workers=256" and change["headroom_bytes"] >= 0
    assert "autocast keep a bf16 cast of every matmul weight" in " ".join(plan.notes)


def test_a_search_lists_the_fitting_layouts_fastest_first():
    job = Job(preset_config("small"), OptimizerConfig(), seq_len=256, global_batch=64)
    plans = search_layouts(job, 8, HARDWARE["h100"], param_dtype="bfloat16", micro_batches=(1, 2))
    fitting = [p for p in plans if p.fits]
    assert fitting and plans[:len(fitting)] == fitting
    steps = [p.estimate["step_s"] for p in fitting]
    assert steps == sorted(steps)
    assert {(p.layout.pp, p.layout.ep) for p in plans} >= {(1, 1), (2, 2), (8, 1), (1, 8)}
