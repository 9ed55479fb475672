"""The trainer under a pipeline (``train.pp=2``; 1F1B from ``torch.distributed.pipelining`` over gloo)
equals single-process training of ``tiny`` over several steps: losses, the gradient norm, the parameters
after each optimizer step (router biases included), the MoE load statistics, QK-Clip's decisions and the
validation loss, for ``pp=2``, ``pp=2, ep=2`` (two ranks a stage, experts split between them) and
``pp=2, dp=2`` (two replicas a stage). The sequence-wise balance loss is on (alpha=0.01), so every stage's
MoE layers backpropagate their own part of the loss, and QK-Clip's threshold is low enough that it clips
heads at every step.

Checkpoints: each rank writes its stage's shard; the ``pp=2, ep=2`` run saved at step 2 and resumed in
the same layout ends bit-equal to the uninterrupted run, and resumed on one process (``pp=1``) or on
``pp=4`` (one layer a stage) it ends within 2e-4 of one process trained straight through.

Newton-Schulz runs in fp32 (``optimizer.ns_dtype=float32``): another layout changes the order of float
sums, not the arithmetic, and the results agree within 2e-4 (relative).
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from k2model.model import is_stacked_expert
from k2model.pipeline import one_f_one_b_order
from k2model.testing import run_workers
from pipelines.config import ConfigError, load_config
from pipelines.train.checkpoint_file import tensor_bytes
from pipelines.train.checkpointing import LocalRegistry, snapshot
from pipelines.train.trainer import Trainer

SEQ, VOCAB, GLOBAL_BATCH, MICRO, STEPS = 16, 128, 8, 2, 3
TAU = 0.008
REL = 2e-4
VAL_ROWS = 4


def _config(world: int, ep: int, pp: int, *extra: str):
    return load_config(None, [
        f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=32",
        f"train.num_workers={world}", f"train.ep={ep}", f"train.pp={pp}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL_BATCH}", "train.steps=10", "train.warmup_steps=1",
        "train.threads_per_worker=1", "tracking.enabled=false", "optimizer.ns_dtype=float32",
        "model.seq_aux_loss_alpha=0.01", f"optimizer.qk_clip_tau={TAU}", *extra])


def _rows(step: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    base = torch.randint(0, VOCAB, (count, 1), generator=gen)
    return (base + torch.arange(SEQ + 1) * (1 + base % 3)) % VOCAB  # learnable: arithmetic sequences


class GlobalBatches:
    """Step ``s``'s global batch is the same in every layout; data-parallel rank ``r`` of ``dp`` takes
    its micro-batches."""

    def __init__(self, dp: int, dp_rank: int):
        self.dp, self.dp_rank = dp, dp_rank

    def batch(self, step: int, micro: int):
        start = (micro * self.dp + self.dp_rank) * MICRO
        rows = _rows(step, GLOBAL_BATCH)[start:start + MICRO]
        return rows[:, :-1], rows[:, 1:]


def _val(dp: int, dp_rank: int):
    """One validation set for every layout, its rows split over the data-parallel ranks."""
    rows = _rows(99, VAL_ROWS)
    per = VAL_ROWS // dp
    mine = rows[dp_rank * per:(dp_rank + 1) * per]
    return [(mine[i:i + MICRO, :-1], mine[i:i + MICRO, 1:]) for i in range(0, per, MICRO)]


SAVE_AT = 2


def _writer(trainer: Trainer, folder: str):
    fs = pafs.LocalFileSystem()
    return trainer.checkpoint_writer(fs, folder, LocalRegistry(fs, folder, trainer.rank))


def train(rank: int, world: int, ep: int, pp: int, folder: str | None = None, resume: bool = False,
          poison: tuple[int, int] | None = None) -> dict:
    """Steps to STEPS in the layout; with ``folder``, a checkpoint is saved there at step SAVE_AT, or
    (``resume``) the run starts from the one saved there, in whatever layout it was written. ``poison``
    (rank, step): that rank's first micro-batch output of that step becomes NaN."""
    torch.manual_seed(0)
    cfg = _config(world, ep, pp)
    dp = world // pp
    trainer = Trainer(cfg, GlobalBatches(dp, rank % dp), _val(dp, rank % dp))
    writer = _writer(trainer, folder) if folder else None
    order: list[tuple[str, int]] = []  # the stage's work as the schedule runs it, every step
    if trainer.pipeline is not None:
        stage = trainer.pipeline._stage
        for kind, attr in (("F", "forward_one_chunk"), ("B", "backward_one_chunk")):
            inner = getattr(stage, attr)

            def logged(chunk, *args, _inner=inner, _kind=kind, **kwargs):
                order.append((_kind, chunk))
                return _inner(chunk, *args, **kwargs)

            setattr(stage, attr, logged)
    loaded = None
    if resume:
        state = writer.load_latest_registered()
        loaded = {"step": state["step"], "resharded_from": state.get("resharded_from"),
                  "tensor_bytes": tensor_bytes({k: v for k, v in state.items() if k != "resharded_from"})}
        trainer.load_state_dict(state)
    steps = []
    while trainer.global_step < STEPS:
        trainer.poison_loss = poison == (rank, trainer.global_step)
        r = trainer.step()
        steps.append({"loss": r.loss, "lm_loss": r.lm_loss, "grad_norm": r.grad_norm, "skipped": r.skipped,
                      **r.extra})
        if writer is not None and not resume and trainer.global_step == SAVE_AT:
            writer.start(trainer.global_step, trainer.state_dict(), {})
            writer.poll_and_register(final=True)
    layout = trainer.layout
    return {"steps": steps, "val": trainer.evaluate(), "dp_rank": layout.dp_rank, "loaded": loaded, "order": order,
            "stage": layout.stage, "micro_batches": trainer.accum,
            "experts": layout.local_experts(cfg.model.num_experts), "stage_layers": trainer.model.stage_layers,
            "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": snapshot(trainer.optimizer.state_dict())["state"]}


def train_pp2(rank: int, world: int) -> dict:
    """pp=2, then pp=2 again with the first stage's output poisoned at step 1."""
    return {"straight": train(rank, world, 1, 2), "poisoned": train(rank, world, 1, 2, poison=(0, 1))}


def train_four_rank_layouts(rank: int, world: int, folder: str) -> dict:
    """In these 4 processes, one after the other: pp=2 with ep=2 (saving at step SAVE_AT), pp=2 with ep=1
    (two replicas a stage), that checkpoint resumed in its own layout, and resumed on pp=4."""
    return {"ep2": train(rank, world, 2, 2, folder), "ep1": train(rank, world, 1, 2),
            "ep2_resumed": train(rank, world, 2, 2, folder, resume=True),
            "pp4_resumed": train(rank, world, 1, 4, folder, resume=True)}


@pytest.fixture(scope="module")
def reference():
    return train(0, 1, 1, 1)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pp2-ep2"))


@pytest.fixture(scope="module")
def four_ranks(checkpoint_folder):
    per_rank = run_workers(train_four_rank_layouts, 4, checkpoint_folder)
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _assert_equivalent(results: list[dict], reference: dict, what: str, first_step: int = 0) -> None:
    ref_layers = torch.tensor([[s[f"attn/max_logit_layer{i}"] for i in range(4)] for s in reference["steps"]])
    assert all(not s["skipped"] for s in reference["steps"]) and reference["steps"][0]["qk_clip/heads_clipped"] > 0
    for step, ref in enumerate(reference["steps"]):
        if step < first_step:
            continue
        per_rank = [r["steps"][step - first_step] for r in results]
        # Every rank returns its data-parallel index's losses (summed over the stages); their mean is the
        # global batch's. The norm and the statistics are global: the same on every rank.
        for key in ("loss", "lm_loss"):
            mean = sum(s[key] for s in per_rank) / len(per_rank)
            assert _rel(mean, ref[key]) < REL, (what, step, key, mean, ref[key])
        for s in per_rank:
            assert not s["skipped"]
            for key in ("grad_norm", "attn/max_logit", "moe/load_imbalance", "moe/router_bias_range"):
                assert _rel(s[key], ref[key]) < REL, (what, step, key, s[key], ref[key])
            assert s["qk_clip/heads_clipped"] == ref["qk_clip/heads_clipped"], (what, step)
            layers = torch.tensor([s[f"attn/max_logit_layer{i}"] for i in range(4)])
            torch.testing.assert_close(layers, ref_layers[step], rtol=REL, atol=0)
    for r in results:
        assert _rel(r["val"], reference["val"]) < REL, (what, r["val"], reference["val"])
        stage = r["stage_layers"]
        for name, tensor in r["model"].items():
            want = reference["model"][name]
            if is_stacked_expert(name):
                want = want[r["experts"].start:r["experts"].stop]
            worst = float((tensor - want).abs().max() / want.abs().max().clamp(min=1e-12))
            assert worst < REL, f"{what}: {name} (stage {stage}) differs from one process by {worst:.2e}"
    # Every parameter of the whole model is held by some stage, under its own name.
    held = {n for r in results for n in r["model"]}
    assert held == set(reference["model"]), what


@pytest.mark.slow
def test_pp2_equals_one_process(reference):
    runs = run_workers(train_pp2, 2)
    results = [r["straight"] for r in runs]
    assert [r["stage_layers"] for r in results] == [range(0, 2), range(2, 4)]
    _assert_equivalent(results, reference, "pp=2")
    # The schedule ran each stage's work in the order the bubble model (benchmarks/pipeline.py) assumes.
    for r in results:
        assert r["order"] == one_f_one_b_order(2, r["stage"], r["micro_batches"]) * STEPS
    # A NaN in the first stage reaches the last stage's loss and every gradient: both stages skip the step.
    for r in (r["poisoned"] for r in runs):
        assert [s["skipped"] for s in r["steps"]] == [False, True, False]
        assert all(torch.isfinite(t).all() for t in r["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_pp2_ep2_equals_one_process(reference, four_ranks):
    _assert_equivalent(four_ranks["ep2"], reference, "pp=2, ep=2")


@pytest.mark.slow
def test_pp2_dp2_equals_one_process(reference, four_ranks):
    _assert_equivalent(four_ranks["ep1"], reference, "pp=2, dp=2")


@pytest.mark.slow
def test_a_pp2_ep2_checkpoint_resumes_bit_equal_in_its_layout(four_ranks):
    for straight, resumed in zip(four_ranks["ep2"], four_ranks["ep2_resumed"]):
        assert (resumed["loaded"]["step"], resumed["loaded"]["resharded_from"]) == (SAVE_AT, None)
        assert resumed["steps"] == straight["steps"][SAVE_AT:]
        for name, tensor in straight["model"].items():
            assert torch.equal(resumed["model"][name], tensor), name
        assert resumed["optimizer"].keys() == straight["optimizer"].keys()
        for name, entry in straight["optimizer"].items():
            for key, value in entry.items():
                other = resumed["optimizer"][name][key]
                assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (name, key)


@pytest.mark.slow
def test_a_pp2_ep2_checkpoint_resumes_on_pp4_and_on_one_process(reference, four_ranks, checkpoint_folder):
    pp4 = four_ranks["pp4_resumed"]
    assert [r["stage_layers"] for r in pp4] == [range(i, i + 1) for i in range(4)]
    for r in pp4:
        assert r["loaded"]["step"] == SAVE_AT and r["loaded"]["resharded_from"]["pp"] == 2
        # Of the tensors, each rank read exactly what its state holds: its layer, its share of the momenta.
        assert sum(r["loaded"]["resharded_from"]["tensor_bytes_read"]) == r["loaded"]["tensor_bytes"]
    _assert_equivalent(pp4, reference, "pp=2, ep=2 -> pp=4", first_step=SAVE_AT)
    single = train(0, 1, 1, 1, checkpoint_folder, resume=True)
    old_layout = single["loaded"]["resharded_from"]
    assert (old_layout["world_size"], old_layout["ep"], old_layout["pp"]) == (4, 2, 2)
    _assert_equivalent([single], reference, "pp=2, ep=2 -> one process", first_step=SAVE_AT)


@pytest.mark.parametrize("overrides,message", [
    (("train.num_workers=4", "train.pp=3"), "train.pp=3: must divide train.num_workers=4"),
    (("train.num_workers=4", "train.pp=2", "train.ep=4"),
     "train.ep=4: must divide the data-parallel degree train.num_workers / train.pp = 2"),
    (("train.num_workers=2", "train.pp=2", "train.global_batch_size=2", "train.micro_batch_size=2"),
     "gives 1 micro-batches a step per worker, fewer than the train.pp=2 stages"),
    (("train.num_workers=8", "train.pp=8", "train.global_batch_size=16", "train.micro_batch_size=2"),
     "train.pp=8 stages need at least 8 layers; model.num_layers=4"),
    (("train.num_workers=2", "train.pp=2", "train.pp_layers=[3,2]"),
     "train.pp_layers=[3, 2]: need 2 counts (train.pp), each >= 1, summing to model.num_layers=4"),
    (("train.num_workers=2", "train.pp=2", "train.pp_layers=[4,0]"), "train.pp_layers=[4, 0]"),
])
def test_an_invalid_pipeline_layout_is_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["model.preset=tiny", "train.global_batch_size=8", "train.micro_batch_size=2",
                           *overrides])

