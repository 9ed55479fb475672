"""Pipeline stages (k2model.pipeline) in one process: the layer prices add up to ``flops_per_token``, the
balanced cut minimises the most expensive stage (against every cut, enumerated), stages of one model run
one after the other give the whole model's loss and gradients (the balance loss included, which each stage
backpropagates itself), and the layout's rank arithmetic puts a stage's ranks side by side."""

from __future__ import annotations

import itertools

import pytest
import torch

from k2model.config import flops_per_token, preset_config
from k2model.distributed import ParallelLayout
from k2model.model import build_model, lm_loss_of
from k2model.pipeline import (
    NOMINAL_SPEED,
    DeviceSpeed,
    bubble_fraction,
    layer_costs,
    layer_times,
    one_f_one_b_order,
    partition_layers,
    simulate_1f1b,
    stage_cut,
)


@pytest.mark.parametrize("preset", ["tiny", "small", "k2-1t"])
def test_layer_prices_add_up_to_the_flops_per_token(preset):
    cfg = preset_config(preset)
    embed, layers, head = layer_costs(cfg, 512)
    assert len(layers) == cfg.num_layers and embed == 0.0
    assert embed + sum(layers) + head == pytest.approx(flops_per_token(cfg, 512), rel=1e-12)
    dense, moe = layers[0], layers[cfg.first_k_dense]
    assert all(c == dense for c in layers[:cfg.first_k_dense]) and all(c == moe for c in layers[cfg.first_k_dense:])


def _max_stage_cost(cfg, seq, counts):
    embed, layers, head = layer_costs(cfg, seq)
    costs, start = [], 0
    for c in counts:
        costs.append(sum(layers[start:start + c]))
        start += c
    costs[0] += embed
    costs[-1] += head
    return max(costs)


@pytest.mark.parametrize("preset,pp", [("tiny", 2), ("tiny", 4), ("small", 3), ("k2-1t", 4)])
def test_the_balanced_cut_is_the_cheapest_of_all_cuts(preset, pp):
    cfg = preset_config(preset)
    stages = partition_layers(cfg, pp, 1024)
    assert len(stages) == pp and stages[0].start == 0 and stages[-1].stop == cfg.num_layers
    assert all(a.stop == b.start and len(a) >= 1 for a, b in zip(stages, stages[1:]))
    n = cfg.num_layers
    if n <= 12:  # every cut, enumerated
        best = min(_max_stage_cost(cfg, 1024, [b - a for a, b in zip((0, *cuts), (*cuts, n))])
                   for cuts in itertools.combinations(range(1, n), pp - 1))
    else:  # one layer moved across any boundary is no better
        counts = [len(s) for s in stages]
        best = _max_stage_cost(cfg, 1024, counts)
        for i in range(pp - 1):
            for moved in ([*counts[:i], counts[i] - 1, counts[i + 1] + 1, *counts[i + 2:]],
                          [*counts[:i], counts[i] + 1, counts[i + 1] - 1, *counts[i + 2:]]):
                if min(moved) >= 1:
                    assert _max_stage_cost(cfg, 1024, moved) >= best
    assert _max_stage_cost(cfg, 1024, [len(s) for s in stages]) == pytest.approx(best)


def test_the_run_cut_prices_flops_and_bytes():
    """``stage_cut`` balances ``layer_times``: a piece's FLOPs at the device's FLOP/s plus its bytes (kept
    activations written and read, weights read three times a micro-batch) at its bandwidth. With bytes
    free it is the FLOP cut; at a CPU's nominal speed ``small``'s head (one large, FLOP-bound matmul) costs
    under 5 MoE layers where it costs 6 in FLOPs, which moves a layer to the last stage; every cut of the
    8 layers, enumerated, is no better under the same prices."""
    cfg = preset_config("small")
    embed_flops, layer_flops, head_flops = layer_costs(cfg, 128)
    free = layer_times(cfg, 128, 2, DeviceSpeed(1e11, float("inf")))
    assert free[1] == [f / 1e11 for f in layer_flops] and free[2] == head_flops / 1e11
    assert partition_layers(cfg, 2, 128, costs=free) == partition_layers(cfg, 2, 128) == [range(0, 7), range(7, 8)]
    embed, layers, head = layer_times(cfg, 128, 2, NOMINAL_SPEED["cpu"])
    assert 4 < head / layers[1] < 5 < head_flops / layer_flops[1]
    cut = stage_cut(cfg, 2, 128, None, 2, "float32", "cpu")
    assert cut == [range(0, 6), range(6, 8)]

    def worst(counts):
        bounds = [0, counts[0], 8]
        return max(sum(layers[bounds[s]:bounds[s + 1]]) + (embed if s == 0 else head if s == 1 else 0)
                   for s in range(2))
    assert worst([6, 2]) == min(worst([k, 8 - k]) for k in range(1, 8))
    assert stage_cut(cfg, 2, 128, [7, 1], 2, "float32", "cpu") == [range(0, 7), range(7, 8)]  # given counts
    assert stage_cut(cfg, 1, 128, None, 2, "float32", "cpu") == [range(0, 8)]


def test_given_layer_counts_and_impossible_cuts():
    cfg = preset_config("tiny")
    assert partition_layers(cfg, 2, 64, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match=r"train.pp_layers=\[2, 1\]: need 2 counts .* summing to model.num_layers=4"):
        partition_layers(cfg, 2, 64, [2, 1])
    with pytest.raises(ValueError, match=r"train.pp_layers=\[4, 0\]"):
        partition_layers(cfg, 2, 64, [4, 0])
    with pytest.raises(ValueError, match=r"train.pp=5 stages need at least 5 layers; model.num_layers=4"):
        partition_layers(cfg, 5, 64)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_stages_run_in_turn_equal_the_whole_model(alpha):
    """Two stages cut from one seeded model, run one after the other with the activation handed over as a
    fresh leaf (as the pipeline receives it): the loss and every parameter's gradient equal the whole
    model's, including the balance loss's part, which the last stage's loss does not carry."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", seq_aux_loss_alpha=alpha)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    whole = build_model(cfg, seed=4).train()
    out = whole(inputs, targets)
    (out.loss / 2).backward()
    first, last = build_model(cfg, seed=4).train(), build_model(cfg, seed=4).train()
    first.keep_stage(range(0, 2))
    last.keep_stage(range(2, 4))
    for stage in (first, last):
        stage.aux_loss_scale = 0.5
    hidden = first.stage_forward(inputs)
    received = hidden.detach().requires_grad_(True)
    lm = lm_loss_of(last.stage_forward(received), targets)
    (lm / 2).backward()
    hidden.backward(received.grad)
    assert torch.equal(lm, out.lm_loss)
    aux = first.stage_aux_loss + last.stage_aux_loss
    want = 0.0 if out.aux_loss is None else float(out.aux_loss.detach())
    assert float(aux) == pytest.approx(want, rel=1e-6, abs=1e-12)
    stage_params = {**dict(first.named_parameters()), **dict(last.named_parameters())}
    assert set(stage_params) == {n for n, _ in whole.named_parameters()}, "names are the whole model's"
    for name, p in whole.named_parameters():
        torch.testing.assert_close(stage_params[name].grad, p.grad, rtol=1e-5, atol=1e-9, msg=name)
    assert torch.equal(first.stage_max_logits(), whole.max_logits[:2])
    assert torch.equal(last.stage_max_logits(), whole.max_logits[2:])
    assert first.lm_head is None and last.model.embed_tokens is None
    with pytest.raises(RuntimeError, match="pipeline stage of layers range"):
        first(inputs)


def test_layout_with_a_pipeline_puts_each_stage_on_contiguous_ranks():
    layout = ParallelLayout(8, 6, ep=2, pp=2, create_groups=False)
    assert (layout.dp_size, layout.stage, layout.dp_rank, layout.ep_rank) == (4, 1, 2, 0)
    assert layout.stage_ranks() == [4, 5, 6, 7] and layout.ep_group_ranks() == [6, 7]
    assert layout.expert_replica_ranks() == [4, 6] and layout.pp_group_ranks() == [2, 6]
    assert layout.is_last_stage and not layout.is_first_stage
    every_pp_group = sorted(r for d in range(4) for r in layout.pp_group_ranks(d))
    assert every_pp_group == list(range(8))
    with pytest.raises(ValueError, match=r"pp=3 must be >= 1 and divide world_size=8"):
        ParallelLayout(8, 0, pp=3, create_groups=False)
    with pytest.raises(ValueError, match=r"ep=4 .* data-parallel degree 2 \(world_size=8 / pp=4\)"):
        ParallelLayout(8, 0, ep=4, pp=4, create_groups=False)


@pytest.mark.parametrize("pp,m", [(pp, m) for pp in (1, 2, 3, 4, 8, 16) for m in (1, 2, 4, 8, 32, 64) if m >= pp])
def test_the_1f1b_bubble_is_the_textbook_one_for_equal_stages(pp, m):
    assert bubble_fraction(pp, m) == pytest.approx((pp - 1) / (m + pp - 1), rel=1e-12, abs=1e-15)


def test_the_1f1b_order_is_the_schedules_own_and_uneven_stages_lengthen_the_step():
    assert one_f_one_b_order(2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2),
                                         ("B", 3)]
    assert one_f_one_b_order(2, 1, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3),
                                         ("B", 3)]
    even = simulate_1f1b(2, 8, 1.0, 2.0)
    slow_last = simulate_1f1b(2, 8, [1.0, 1.5], [2.0, 3.0])
    assert even["makespan"] == pytest.approx((8 + 1) * 3.0)
    # The slow stage sets the pace: its 8 micro-batches plus the fast stage's share of the fill and drain.
    assert slow_last["makespan"] == pytest.approx(8 * 4.5 + 3.0) and slow_last["busy"] == [24.0, 36.0]
