"""The checkpoint writer on its own: a persistent storage failure abandons one checkpoint (training goes
on, nothing half-written is registered) and the next one lands; snapshots are independent copies."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from pipelines.train import checkpointing


class FlakyFS:
    """A local filesystem that refuses every write while ``down`` is set."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()
        self.down = False
        self.write_attempts = 0

    def open_output_stream(self, path, *args, **kwargs):
        self.write_attempts += 1
        if self.down:
            raise OSError("connection refused (simulated outage)")
        return self.fs.open_output_stream(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


class RecordingRegistry:
    """A ``CheckpointRegistry`` that records each call as (metrics, registered folder or None)."""

    def __init__(self):
        self.calls: list[tuple[dict, str | None]] = []

    def register(self, folder, metrics):
        self.calls.append((metrics, folder))

    def report(self, metrics):
        self.calls.append((metrics, None))

    def latest(self):
        return None

    max_settle_s = 0.0

    def settle(self, timeout_s):
        return True


@pytest.fixture
def registry():
    return RecordingRegistry()


def test_persistent_failure_abandons_one_checkpoint_and_the_next_lands(tmp_path, registry):
    fs = FlakyFS()
    writer = checkpointing.CheckpointWriter(fs, str(tmp_path), rank=0, signature={"a": 1}, world_size=1, ep=1,
                                            registry=registry, attempts=3, backoff_s=0.001)
    state = {"model": {"w": torch.arange(6.0)}, "step": 2}
    fs.down = True
    writer.start(2, state, {"train/loss": 1.0})
    writer.poll_and_register(final=True)
    assert writer.abandoned == [2]
    assert fs.write_attempts == 3, "retried before giving up"
    (metrics, checkpoint), = registry.calls
    assert checkpoint is None and metrics["checkpoint_abandoned_step"] == 2
    assert not (tmp_path / "checkpoint-step00000002").exists()

    fs.down = False
    writer.start(4, {**state, "step": 4}, {"train/loss": 0.5})
    writer.poll_and_register(final=True)
    metrics, checkpoint = registry.calls[-1]
    assert checkpoint is not None and checkpoint.endswith("checkpoint-step00000004")
    loaded = checkpointing.load_rank_state(fs, checkpoint, 0, {"a": 1}, 1, 1)
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert writer.last_registered_path == checkpoint


def test_snapshot_is_a_copy_taken_before_training_changes_the_state(tmp_path, registry):
    fs = FlakyFS()
    writer = checkpointing.CheckpointWriter(fs, str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    weights = torch.zeros(4)
    writer.start(1, {"model": {"w": weights}, "step": 1}, {})
    weights.add_(1.0)  # the next optimizer step changes the live tensor while the upload runs
    writer.poll_and_register(final=True)
    loaded = checkpointing.load_rank_state(fs, registry.calls[-1][1], 0, {}, 1, 1)
    assert torch.equal(loaded["model"]["w"], torch.zeros(4))
    assert len(writer.stall_seconds) == 1


def test_pending_upload_is_not_registered_until_done(tmp_path, registry):
    import threading

    gate = threading.Event()

    class SlowFS(FlakyFS):
        def open_output_stream(self, path, *args, **kwargs):
            gate.wait(10)
            return super().open_output_stream(path, *args, **kwargs)

    writer = checkpointing.CheckpointWriter(SlowFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    writer.start(3, {"step": 3}, {})
    writer.poll_and_register(final=False)
    assert registry.calls == [], "registered before the shard was written"
    gate.set()
    writer.poll_and_register(final=True)
    assert registry.calls[-1][1].endswith("checkpoint-step00000003")


def test_a_checkpoint_of_the_older_shard_format_is_a_clear_error(tmp_path):
    import json

    folder = tmp_path / "checkpoint-step00000004"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "ep": 1, "signature": {}}))
    torch.save({"model": {}}, folder / "rank-00000.pt")

    with pytest.raises(ValueError, match=r"lacks rank-00000.shard .*rank-00000.pt: shards of the torch.save"):
        checkpointing.load_rank_state(pafs.LocalFileSystem(), str(folder), 0, {}, 1, 1)


def test_checkpoint_now_registers_before_it_returns_and_never_twice(tmp_path, registry):
    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    writer.start(4, {"step": 4}, {})  # a periodic checkpoint of step 4 still in flight
    writer.checkpoint_now(4, {"step": 4}, {})
    assert [c[1].rsplit("/", 1)[1] for c in registry.calls] == ["checkpoint-step00000004"]
    writer.checkpoint_now(4, {"step": 4}, {})  # registered already: nothing more
    writer.checkpoint_now(6, {"step": 6}, {})
    assert [c[1].rsplit("/", 1)[1] for c in registry.calls] == ["checkpoint-step00000004", "checkpoint-step00000006"]
    assert writer._pending is None


def test_a_resumed_start_writes_into_folders_of_its_own(tmp_path, registry):
    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    first = writer.path_for(8)
    writer.use_fresh_folders()
    second = writer.path_for(8)
    assert first.endswith("checkpoint-step00000008") and second.startswith(first + "-a") and second != first
    suffix = int(second.rsplit("-a", 1)[1])
    import time

    assert abs(suffix / 1000 - time.time()) < 60, "the suffix is the start time in ms"


class StepTrainer:
    """What ``PreemptionCheckpoint`` reads of a trainer: the rank, the step and the state to checkpoint."""
    rank, global_step, metrics = 0, 0, {}

    def state_dict(self):
        return {"step": self.global_step}


class StepResult:
    loss = 1.0


@pytest.mark.parametrize("max_settle_s, parked, settled_at", [(0.0, 11, 1012.5), (2.5, 10, 1011.5)])
def test_a_preemption_notice_checkpoints_at_once_then_the_last_step_that_fits_and_waits(
        tmp_path, registry, monkeypatch, max_settle_s, parked, settled_at):
    from pipelines.train import callbacks
    from pipelines.train.callbacks import PreemptionCheckpoint

    clock = {"t": 1000.0}  # the steps take 1 s each on this clock; sleeping advances it
    monkeypatch.setattr(callbacks.time, "time", lambda: clock["t"])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(callbacks.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))

    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    asked = []

    def notice():  # the drain is announced at step 5 with a deadline 10.5 s later
        asked.append(trainer.global_step)
        return 1000.0 + 5 + 10.5 if trainer.global_step >= 5 else None

    settled = []

    def settle(timeout_s):  # the controller takes a registration at its next poll: 1.5 s later here
        settled.append((len(registry.calls), clock["t"], timeout_s))
        clock["t"] += 1.5
        return True

    registry.settle, registry.max_settle_s = settle, max_settle_s
    cb, trainer = PreemptionCheckpoint(writer, notice, every=2, grace_s=30), StepTrainer()
    for step in range(1, 25):
        clock["t"] += 1.0
        trainer.global_step = step
        cb.post_step(trainer, StepResult())
        if cb.parked_at is not None:
            break
    assert asked == [2, 4, 6], "asked every 2 steps until the notice, then never again"
    assert cb.fired_at == 6
    assert cb.checkpoint_s == max(1.5, max_settle_s), "a checkpoint's time includes its settling, at least the most"
    # Steps take 1 s; a checkpoint settles 1.5 s after it is registered (the registry may say it can take
    # longer). The notice's checkpoint settles at t=1007.5, and step k ends at 1001.5 + k. After step 11
    # (t=1012.5) another step and a checkpoint settled in 1.5 s would end at 1015, less than a step before the
    # deadline 1015.5: the run checkpoints step 11, lets it settle, and waits. Where settling may take 2.5 s,
    # that comes a step earlier.
    assert cb.step_s == 1.0, "the step time leaves the notice's checkpoint out"
    assert cb.parked_at == parked
    assert [c[1].rsplit("/", 1)[1] for c in registry.calls] == ["checkpoint-step00000006",
                                                                 f"checkpoint-step{parked:08d}"]
    assert [(n, t) for n, t, _ in settled] == [(1, 1006.0), (2, settled_at)], "each settled after its registration"
    assert settled[1][2] == pytest.approx(1015.5 - settled_at), "settling waits at most until the deadline"
    assert clock["t"] >= 1015.5 + 30, "waited out the deadline and the grace before training on"


def test_the_step_time_leaves_out_the_first_step_of_a_start(tmp_path, registry, monkeypatch):
    """The first step of a start carries the start-up (workers, data, the restore): counted, it would make
    steps look slow for many steps after, and the group would stop to wait for the deadline far too early."""
    from pipelines.train import callbacks
    from pipelines.train.callbacks import PreemptionCheckpoint

    clock = {"t": 1000.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["t"])
    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    cb, trainer = PreemptionCheckpoint(writer, lambda: None, every=1), StepTrainer()
    clock["t"] += 40.0  # the start-up, and the first step
    for step in range(1, 4):
        clock["t"] += 0.5
        trainer.global_step = step
        cb.post_step(trainer, StepResult())
    assert cb.step_s == 0.5


def test_under_a_preemption_notice_the_last_step_is_settled_before_the_run_returns(tmp_path, registry):
    """A run that ends before the deadline may still be running (flushing, returning) when the node goes:
    its last step is registered and settled at once, so a restart has nothing left to train."""
    from pipelines.train.callbacks import PreemptionCheckpoint

    settled, announced = [], []
    registry.settle = lambda timeout_s: settled.append(len(registry.calls)) or True
    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path), rank=0, signature={}, world_size=1, ep=1,
                                            registry=registry)
    import time

    cb = PreemptionCheckpoint(writer, lambda: time.time() + 3600, every=1, last_step=5,
                              announce=lambda what, step: announced.append((what, step)))
    trainer = StepTrainer()
    for step in range(1, 6):
        trainer.global_step = step
        if step == 5:
            writer.start(5, trainer.state_dict(), {})  # the periodic callback's final upload, in flight
        cb.post_step(trainer, StepResult())
    assert cb.fired_at == 1 and cb.parked_at is None, "an hour's notice: trained on, never parked"
    names = [c[1].rsplit("/", 1)[1] for c in registry.calls]
    assert names == ["checkpoint-step00000001", "checkpoint-step00000005"], "the final upload, not a second one"
    assert settled == [1, 2], "each settled after its registration"
    assert announced == [("notice", 1)]


def test_step_pacing_sleeps_out_the_floor_after_the_step_and_is_off_at_zero(monkeypatch):
    from pipelines.config import ConfigError, load_config
    from pipelines.train import callbacks
    from pipelines.train.callbacks import StepPacing

    clock, slept = {"t": 100.0}, []
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(callbacks.time, "sleep", slept.append)
    pacing, trainer = StepPacing(1.0), StepTrainer()
    for took in (0.25, 1.5):  # a fast step sleeps the rest of the second; a slow one not at all
        pacing.pre_step(trainer)
        clock["t"] += took
        pacing.post_step(trainer, StepResult())
    assert slept == [0.75, 0.0]
    off = StepPacing(0.0)
    off.pre_step(trainer)
    off.post_step(trainer, StepResult())
    assert slept == [0.75, 0.0]
    assert load_config("ci", ["train.min_step_s=0.5"]).train.min_step_s == 0.5
    with pytest.raises(ConfigError, match="min_step_s.*must be >= 0"):
        load_config("ci", ["train.min_step_s=-1"])


def test_a_start_takes_fresh_folder_names_when_an_earlier_start_wrote_any(tmp_path, registry):
    """Even with nothing registered to resume from: an earlier start cut off before its first checkpoint was
    registered may still be writing into the plain names."""
    writer = checkpointing.CheckpointWriter(FlakyFS(), str(tmp_path / "run"), rank=0, signature={}, world_size=1,
                                            ep=1, registry=registry)
    assert not writer.earlier_start_wrote()  # the run's folder does not exist yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert not writer.earlier_start_wrote()  # Ray's own files are not checkpoints
    (tmp_path / "run" / "checkpoint-step00000002").mkdir()  # never registered
    assert writer.earlier_start_wrote()


class _FakeTrainer:
    """What the Checkpointing callback reads of a trainer."""

    def __init__(self, steps: int):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(train=SimpleNamespace(steps=steps))
        self.global_step = 0
        self.metrics = {}

    def state_dict(self):
        return {"step": self.global_step, "model": {"w": torch.full((2,), float(self.global_step))}}


def test_a_run_whose_final_checkpoint_cannot_be_saved_fails_instead_of_ending_on_an_older_one(tmp_path, registry):
    from types import SimpleNamespace

    from pipelines.train.callbacks import Checkpointing, CheckpointSaveError

    def run(down_at: set[int]) -> None:
        fs = FlakyFS()
        writer = checkpointing.CheckpointWriter(fs, str(tmp_path / f"run{sorted(down_at)}"), rank=0, signature={},
                                                world_size=1, ep=1, registry=registry, attempts=2, backoff_s=0.001)
        callback, trainer = Checkpointing(writer, checkpoint_every=2), _FakeTrainer(steps=4)
        for step in (1, 2, 3, 4):
            trainer.global_step = step
            fs.down = step in down_at
            callback.post_step(trainer, SimpleNamespace(loss=1.0))
            writer.poll_and_register(final=True)  # let this step's upload finish while the store is as set
        callback.on_fit_end(trainer)

    run(down_at={2})  # a lost mid-run checkpoint costs nothing at the end
    with pytest.raises(CheckpointSaveError, match=r"the final checkpoint \(step 4\) could not be written to .* after "
                                                  r"2 attempts"):
        run(down_at={4})


def test_a_stage_that_ended_on_an_older_checkpoint_is_not_complete(tmp_path):
    import json

    from pipelines.stages.pretrain import check_final_checkpoint

    folder = tmp_path / "checkpoint-step00000004"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "ep": 1, "signature": {}}))
    check_final_checkpoint(pafs.LocalFileSystem(), str(folder), 4, "ckpt")
    with pytest.raises(RuntimeError, match=r"ended with checkpoint ckpt of step 4, not of the last step "
                                           r"\(train.steps=6\); the stage is not marked complete"):
        check_final_checkpoint(pafs.LocalFileSystem(), str(folder), 6, "ckpt")


def test_a_checkpoint_on_local_disk_is_synced_before_it_is_registered(tmp_path, registry, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    writer = checkpointing.CheckpointWriter(pafs.LocalFileSystem(), str(tmp_path), rank=0, signature={},
                                            world_size=1, ep=1, registry=registry)
    writer.start(2, {"step": 2, "model": {"w": torch.ones(3)}}, {})
    writer.poll_and_register(final=True)
    folder = tmp_path / "checkpoint-step00000002"
    assert registry.calls[-1][1] == str(folder)
    assert {str(folder / "rank-00000.shard"), str(folder / "meta.json"), str(folder)} <= set(synced)
