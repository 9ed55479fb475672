"""The trainer with its callbacks under plain ``torch.distributed`` (2 gloo processes, ep=2), without Ray:
metrics and validation reach the sink at the configured steps, checkpoints are registered with a
``LocalRegistry``, a run stopped after a checkpoint and started again resumes bit for bit (with fp32 and
with bf16 parameters), and non-finite steps are skipped and recovered from the latest checkpoint; one
process with bf16 parameters tracks fp32 over 50 steps. The CPU runs share one pair of
processes, one run after another (each a new ``Trainer`` that knows the others only by their files); a
resume in new processes is tests/pipelines/stages/test_pretrain.py's, under Ray Train.

``optimizer.ns_dtype`` is left at ``auto``: every comparison here is of two runs on one machine, which
resolve it alike, so the results hold whatever it resolves to (not marked ``auto_dtype``)."""

from __future__ import annotations

import math

import pyarrow.fs as pafs
import pytest
import torch

from k2model.testing import run_workers
from pipelines.config import load_config
from pipelines.train import callbacks, checkpointing
from pipelines.train.trainer import Callback, Trainer, seed_everything, use_deterministic

SEQ, VOCAB, GLOBAL_BATCH, STEPS = 16, 128, 8, 8


def _config(*extra: str):
    return load_config(None, [
        f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=32",
        "train.num_workers=2", "train.ep=2", "train.micro_batch_size=2", f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.checkpoint_every=4", "train.eval_every=4",
        "train.log_every=2", "train.threads_per_worker=1", "tracking.enabled=false", *extra])


class Batches:
    """Step ``s``'s global batch, the same in every run; data-parallel rank ``r`` takes its rows."""

    def __init__(self, micro_batch: int, dp_size: int, dp_rank: int):
        self.micro, self.dp_size, self.dp_rank = micro_batch, dp_size, dp_rank

    def batch(self, step: int, micro: int):
        gen = torch.Generator().manual_seed(1000 + step)
        base = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
        ids = (base + torch.arange(SEQ + 1) * (1 + base % 3)) % VOCAB
        per_rank = GLOBAL_BATCH // self.dp_size
        start = self.dp_rank * per_rank + micro * self.micro
        rows = ids[start:start + self.micro]
        return rows[:, :-1], rows[:, 1:]


class StopBefore(Callback):
    """Ends the run before step ``step`` (a preemption after the last checkpoint was registered)."""

    class Stopped(Exception):
        pass

    def __init__(self, step: int, writer: checkpointing.CheckpointWriter):
        self.step, self.writer = step, writer

    def pre_step(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step:
            self.writer.poll_and_register(final=True)
            raise self.Stopped


def run_rank(rank: int, world: int, run_dir: str, extra: tuple[str, ...], stop_before: int | None,
             device: str = "cpu") -> dict:
    cfg = _config(*extra)
    use_deterministic(cfg.train.deterministic)  # as the Ray Train worker entry does
    seed_everything(cfg.train.seed)
    val = [Batches(2, world, rank).batch(10_000, 0)]
    trainer = Trainer(cfg, Batches(cfg.train.micro_batch_size, world, rank), val,
                      torch.device(device, torch.cuda.current_device()) if device == "cuda" else None)
    fs = pafs.LocalFileSystem()
    registry = checkpointing.LocalRegistry(fs, run_dir, rank, keep=cfg.train.keep_checkpoints)
    writer = trainer.checkpoint_writer(fs, run_dir, registry)
    restored = callbacks.restore_latest(trainer, writer)
    logged: list[tuple[int, dict]] = []
    trainer.callbacks = callbacks.standard_callbacks(trainer, writer, peak_flops=1e12,
                                                     log=lambda step, m: logged.append((step, dict(m))))
    if stop_before is not None:
        trainer.callbacks.insert(0, StopBefore(stop_before, writer))
    stopped = False
    try:
        trainer.fit()
    except StopBefore.Stopped:
        stopped = True
    return {"state": checkpointing.snapshot(trainer.state_dict()), "logged": logged, "stopped": stopped,
            "restored_step": None if restored is None else restored["step"], "registered": registry.registered,
            "ns_dtype": trainer.optimizer.ns_dtype}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, entry in a["optimizer"]["state"].items():
        for key, value in entry.items():
            other = b["optimizer"]["state"][name][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, key)


DETERMINISTIC = ("train.deterministic=true",)
NAN_STEPS = ("train.nan_injection=1:5:3", "train.max_bad_steps=3")


BF16 = ("train.param_dtype=bfloat16", "optimizer.qk_clip_tau=0.005")  # QK-Clip acts from the first step


def run_scenarios(rank: int, world: int, base: str) -> dict[str, dict]:
    """Every CPU run of this module, in order, in one pair of processes."""
    return {
        "uninterrupted": run_rank(rank, world, f"{base}/straight", (), None),
        "stopped": run_rank(rank, world, f"{base}/resumed", DETERMINISTIC, 6),
        "resumed": run_rank(rank, world, f"{base}/resumed", DETERMINISTIC, None),
        "non_finite": run_rank(rank, world, f"{base}/non-finite", NAN_STEPS, None),
        "recompute_full": run_rank(rank, world, f"{base}/full", ("train.recompute=full",), None),
        "recompute_selective": run_rank(rank, world, f"{base}/selective", ("train.recompute=selective",), None),
        "bf16_uninterrupted": run_rank(rank, world, f"{base}/bf16-straight", BF16, None),
        "bf16_stopped": run_rank(rank, world, f"{base}/bf16-resumed", BF16, 6),
        "bf16_resumed": run_rank(rank, world, f"{base}/bf16-resumed", BF16, None),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    per_rank = run_workers(run_scenarios, 2, str(tmp_path_factory.mktemp("trainer")))
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return runs["uninterrupted"]


def test_fit_logs_validates_and_registers_checkpoints(uninterrupted):
    rank0, rank1 = uninterrupted
    assert rank0["state"]["step"] == rank1["state"]["step"] == STEPS and rank0["restored_step"] is None
    steps = [step for step, _ in rank0["logged"]]
    assert steps == [2, 4, 6, 8], "a log every train.log_every steps"
    by_step = dict(rank0["logged"])
    assert all("val/loss" in by_step[s] for s in (4, 8)) and all("val/loss" not in by_step[s] for s in (2, 6))
    # The validation loss is one number for the whole run: every rank logged the same.
    assert by_step[8]["val/loss"] == dict(rank1["logged"])[8]["val/loss"]
    first, last = by_step[2]["train/loss"], by_step[8]["train/loss"]
    assert last < first < math.log(VOCAB) + 0.5, (first, last)
    assert by_step[8]["train/skipped_steps"] == 0 and by_step[8]["attn/max_logit"] > 0
    # Checkpoints at steps 4 and 8 were registered by both ranks; the pointer names the last.
    for rank in (rank0, rank1):
        assert [p.rsplit("/", 1)[1] for p in rank["registered"]] == ["checkpoint-step00000004",
                                                                     "checkpoint-step00000008"]


def test_a_stopped_run_resumes_bit_for_bit(runs, uninterrupted):
    """Under ``train.deterministic`` (every op of the step has a deterministic kernel; on CPUs the
    results are those of the uninterrupted run without it)."""
    assert all(r["stopped"] and r["state"]["step"] == 6 and r["restored_step"] is None for r in runs["stopped"])
    resumed = runs["resumed"]
    for rank, result in enumerate(resumed):
        assert result["restored_step"] == 4, "the latest registered checkpoint is step 4"
        _assert_same_state(result["state"], uninterrupted[rank]["state"])
    # Steps replayed after the restore are logged again by this process (the MLflow sink drops them).
    assert [s for s, _ in resumed[0]["logged"]] == [6, 8]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_trains_the_same_run(runs, uninterrupted, mode):
    """2 ranks with ep=2 (the expert all-to-all recomputed too under ``full``): the same state, bit for bit,
    and the same logged metrics (max logits and expert loads recorded once)."""
    for rank, result in enumerate(runs[f"recompute_{mode}"]):
        _assert_same_state(result["state"], uninterrupted[rank]["state"])
        untimed = [[(step, {k: v for k, v in m.items() if not any(s in k for s in ("per_s", "mfu", "seconds"))})
                    for step, m in r["logged"]] for r in (result, uninterrupted[rank])]
        assert untimed[0] == untimed[1]


def test_bf16_parameters_resume_bit_for_bit_with_their_sharded_masters(runs):
    """bf16 weights, fp32 master copies sharded with the optimizer state (ZeRO-1), QK-Clip acting every
    step: a stopped run resumes to the very bits of the uninterrupted one, masters included."""
    straight, resumed = runs["bf16_uninterrupted"], runs["bf16_resumed"]
    assert all(m["qk_clip/heads_clipped"] > 0 for _, m in straight[0]["logged"])
    # Clipped on the owners' masters, then published: the replicas are identical.
    for name, tensor in straight[0]["state"]["model"].items():
        if ".experts." not in name:
            assert torch.equal(tensor, straight[1]["state"]["model"][name]), name
    for rank in range(2):
        state = straight[rank]["state"]
        assert state["step"] == STEPS and resumed[rank]["restored_step"] == 4
        assert all(t.dtype == torch.bfloat16 for n, t in state["model"].items() if not n.endswith("correction_bias"))
        masters = [e["master"] for e in state["optimizer"]["state"].values() if "master" in e]
        assert masters and all(m.dtype == torch.float32 for m in masters)
        _assert_same_state(resumed[rank]["state"], state)
    # The two ranks split the replicated parameters' masters: each keeps part of them, none all.
    sizes = [{n: e["span"][1] - e["span"][0] for n, e in r["state"]["optimizer"]["state"].items()
              if ".experts." not in n} for r in straight]
    whole = {n: t.numel() for n, t in straight[0]["state"]["model"].items() if n in sizes[0] or n in sizes[1]}
    assert all(sizes[0].get(n, 0) + sizes[1].get(n, 0) == numel for n, numel in whole.items())
    assert 0.3 < sum(sizes[0].values()) / sum(whole.values()) < 0.7


def _track(param_dtype: str, steps: int) -> list[tuple[float, float]]:
    cfg = load_config(None, [
        f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "model.max_seq_len=32",
        "train.micro_batch_size=4", f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={steps}",
        "train.warmup_steps=5", "train.threads_per_worker=1", "tracking.enabled=false",
        "optimizer.ns_dtype=float32", f"optimizer.qk_clip_tau={TRACK_TAU}", f"train.param_dtype={param_dtype}"])
    seed_everything(0)
    trainer = Trainer(cfg, Batches(4, 1, 0), [])
    return [(r.loss, r.extra["qk_clip/heads_clipped"]) for r in (trainer.step() for _ in range(steps))]


TRACK_TAU = 0.05
"""Under tau, so that QK-Clip acts from step ~25 of the tracking runs (their max logits reach ~0.06)."""


def test_bf16_parameters_track_fp32_over_50_steps():
    """One process, the same data and seed, fp32 against bf16 parameters (fp32 masters). Stated
    tolerances: the loss within 5% at every step and within 2% over the last 10; QK-Clip first acts at the
    same step and clips within 10% as many heads in all (decisions at a near-tie may differ by a head)."""
    from k2model.testing import torch_threads

    with torch_threads(1):
        fp32, bf16 = _track("float32", 50), _track("bfloat16", 50)
    worst = max(abs(a - b) / a for (a, _), (b, _) in zip(fp32, bf16))
    assert worst < 0.05, worst
    tail = [sum(loss for loss, _ in run[-10:]) / 10 for run in (fp32, bf16)]
    assert abs(tail[0] - tail[1]) / tail[0] < 0.02, tail
    clipped = [[c for _, c in run] for run in (fp32, bf16)]
    first = [next(i for i, c in enumerate(run) if c) for run in clipped]
    assert first[0] == first[1] and 10 <= first[0] <= 40, first
    totals = [sum(run) for run in clipped]
    assert abs(totals[0] - totals[1]) <= 0.1 * totals[0], totals


def test_non_finite_steps_restore_the_latest_checkpoint(runs, uninterrupted):
    for rank, result in enumerate(runs["non_finite"]):
        assert result["state"]["step"] == STEPS and result["state"]["skipped_total"] == 3
        logged = dict(result["logged"])
        assert logged[8]["train/skipped_steps"] == 3
        # Restored at step 4 with the three poisoned steps spent, the run then trains steps 4..7 again
        # cleanly and ends where the uninterrupted run ends.
        _assert_same_state(result["state"], uninterrupted[rank]["state"])


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_ranks_on_one_gpu_over_a_cuda_only_group_validate_checkpoint_and_resume_bit_for_bit(tmp_path, ep):
    """The GPU path's collectives under a group that refuses CPU tensors, as NCCL does (``cuda:gloo``
    lets two ranks share one GPU): validation, checkpoints, a stop and a resume, bit-equal to the
    uninterrupted run under ``train.deterministic`` (bf16 autocast, as the worker runs on a GPU)."""
    extra = (*DETERMINISTIC, f"train.ep={ep}")
    kwargs = {"backend": "cuda:gloo", "timeout_s": 300}
    straight = run_workers(run_rank, 2, str(tmp_path / "straight"), extra, None, "cuda", **kwargs)
    first = run_workers(run_rank, 2, str(tmp_path / "resumed"), extra, 6, "cuda", **kwargs)
    assert all(r["stopped"] and r["state"]["step"] == 6 for r in first)
    resumed = run_workers(run_rank, 2, str(tmp_path / "resumed"), extra, None, "cuda", **kwargs)
    logged = dict(straight[0]["logged"])
    assert math.isfinite(logged[4]["val/loss"]) and logged[8]["val/loss"] == dict(straight[1]["logged"])[8]["val/loss"]
    for rank in range(2):
        assert [p.rsplit("/", 1)[1] for p in straight[rank]["registered"]] == ["checkpoint-step00000004",
                                                                             "checkpoint-step00000008"]
        assert resumed[rank]["restored_step"] == 4
        _assert_same_state(resumed[rank]["state"], straight[rank]["state"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_rank_on_nccl_trains_validates_and_checkpoints(tmp_path):
    (result,) = run_workers(run_rank, 1, str(tmp_path), ("train.num_workers=1", "train.ep=1"), None, "cuda",
                            backend="nccl", timeout_s=300)
    logged = dict(result["logged"])
    assert result["state"]["step"] == STEPS and math.isfinite(logged[8]["val/loss"])
    assert [p.rsplit("/", 1)[1] for p in result["registered"]][-1] == "checkpoint-step00000008"
