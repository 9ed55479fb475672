"""What a training run does around ``Trainer.step()``, as callbacks with named hooks.

``standard_callbacks`` builds the list a run uses, in the order their hooks run (the order matters where
they share state: recovery may rewind ``trainer.global_step`` before the metrics read it; the sink logs
what the metric and validation callbacks put into ``trainer.metrics``):

- ``FaultInjection`` and ``NaNInjection`` (``pre_step``; tests of fault tolerance only, off by default);
- ``DivergenceRecovery``: after ``train.max_bad_steps`` skipped steps in a row, restore the latest
  checkpoint once; a second divergence stops the run with an error naming the step;
- ``StepMetrics``: window means of the loss, throughput and MFU every ``train.log_every`` steps;
- ``Validation``: the validation loss every ``train.eval_every`` steps and at the end;
- ``MetricSink``: hands the step's metrics to a logging function (rank 0: MLflow) and prints one line;
- ``Checkpointing``: snapshot every ``train.checkpoint_every`` steps and at the end, upload in the
  background, register once every rank's shard has landed (``pipelines.train.checkpointing``);
- ``PreemptionCheckpoint``: when the cluster gives notice that a node of the run will be taken (Ray's node
  drain, as a cloud's spot preemption notice arrives), checkpoint at once, train on while the deadline
  leaves room, then checkpoint the last step that fits and wait for the restart, so the node's departure
  costs no step (measured: ``benchmarks/results/faults/``).

Nothing here imports Ray: storage is a pyarrow filesystem, registration a ``CheckpointRegistry``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import torch.distributed as dist

from k2model.distributed import agree
from pipelines.console import say
from pipelines.train.checkpointing import CheckpointWriter
from pipelines.train.trainer import Callback, NonFiniteError, StepResult, Trainer


class FaultInjection(Callback):
    """Crash ``rank`` once when it reaches ``step`` (``train.fault_injection=rank:step``). A marker file in
    the run's storage makes it happen once across restarts."""

    def __init__(self, spec: str | None, rank: int, fs: pafs.FileSystem, run_path: str):
        self.target = tuple(int(x) for x in spec.split(":")) if spec else None
        self.rank, self.fs, self.run_path = rank, fs, run_path

    def pre_step(self, trainer: Trainer) -> None:
        if self.target != (self.rank, trainer.global_step):
            return
        marker = f"{self.run_path}/fault-injected-rank{self.rank}-step{trainer.global_step}"
        if self.fs.get_file_info(marker).type != pafs.FileType.NotFound:
            return
        with self.fs.open_output_stream(marker) as f:
            f.write(b"1")
        say(f"[k2pipe] fault injection: rank {self.rank} exits at step {trainer.global_step}")
        os._exit(1)


class NaNInjection(Callback):
    """Make this rank's loss NaN at ``count`` steps from ``step`` (``train.nan_injection=rank:step[:count]``),
    each step once per process."""

    def __init__(self, spec: str | None, rank: int):
        self.steps: set[int] = set()
        if spec:
            rank_s, step_s, *count = spec.split(":")
            if int(rank_s) == rank:
                first = int(step_s)
                self.steps = set(range(first, first + (int(count[0]) if count else 1)))

    def pre_step(self, trainer: Trainer) -> None:
        if trainer.global_step in self.steps:
            self.steps.discard(trainer.global_step)
            trainer.poison_loss = True


class DivergenceRecovery(Callback):
    """A skipped step is reported; ``max_bad_steps`` in a row restore the latest checkpoint once, and a
    second time stop the run (``NonFiniteError``). The count of skipped steps survives the restore."""

    def __init__(self, max_bad_steps: int, writer: CheckpointWriter):
        self.max_bad_steps, self.writer = max_bad_steps, writer
        self.recovered = False

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if not result.skipped:
            return
        if trainer.rank == 0:
            say(f"[k2pipe] step {result.step}: non-finite loss or gradient norm; step skipped "
                f"({trainer.bad_streak} in a row)")
        if trainer.bad_streak < self.max_bad_steps:
            return
        if self.recovered:
            raise NonFiniteError(
                f"training diverged again at step {result.step} after restoring the latest checkpoint: "
                f"{self.max_bad_steps} non-finite steps in a row")
        self.writer.poll_and_register(final=True)  # every rank is here: the skip decision was agreed by all
        skipped = trainer.skipped_total
        if restore_latest(trainer, self.writer) is None:
            raise NonFiniteError(f"training diverged at step {result.step} ({self.max_bad_steps} non-finite "
                                 "steps in a row) and there is no checkpoint to restore")
        trainer.skipped_total = skipped
        self.recovered = True
        say(f"[k2pipe] restored the checkpoint of step {trainer.global_step} after non-finite steps")


class StepMetrics(Callback):
    """Every ``log_every`` steps and at the last: means over the steps since the last log (single-step
    losses are noisy), tokens/s, MFU against ``peak_flops`` per rank, and the last step's statistics."""

    def __init__(self, log_every: int, peak_flops: float):
        self.log_every, self.peak_flops = log_every, peak_flops
        self.window: list[StepResult] = []

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        self.window.append(result)
        done = trainer.global_step
        if done % self.log_every and done != trainer.cfg.train.steps:
            return
        seconds = max(sum(r.seconds for r in self.window), 1e-9)
        tokens = sum(r.tokens for r in self.window)
        applied = [r for r in self.window if not r.skipped] or self.window
        trainer.metrics.update({
            "train/loss": sum(r.loss for r in applied) / len(applied),
            "train/lm_loss": sum(r.lm_loss for r in applied) / len(applied), "train/lr": result.lr,
            "train/grad_norm": result.grad_norm, "train/tokens_per_s": tokens / seconds,
            "train/mfu": tokens / seconds * trainer.flops_per_token / (self.peak_flops * trainer.world),
            "train/skipped_steps": float(trainer.skipped_total), "train/seconds_total": trainer.train_seconds,
            **result.extra,
        })
        self.window = []


class Validation(Callback):
    """The validation loss every ``eval_every`` steps (0: only at the end) and at the last step, with the
    number of tokens it measured (``val/tokens``)."""

    def __init__(self, eval_every: int):
        self.eval_every = eval_every

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        done = trainer.global_step
        due = (self.eval_every and done % self.eval_every == 0) or done == trainer.cfg.train.steps
        if due and trainer.val_batches:
            trainer.metrics["val/loss"] = trainer.evaluate()
            trainer.metrics["val/tokens"] = float(trainer.val_tokens)


class StatsSnapshots(Callback):
    """Each new ``Trainer.detail`` snapshot (per-head max logits, per-expert loads) to ``log(step,
    detail)`` on rank 0."""

    def __init__(self, log: Callable[[int, dict[str, Any]], None] | None):
        self.log = log

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        detail = trainer.detail
        if self.log is not None and trainer.rank == 0 and detail is not None and detail["step"] == trainer.global_step:
            self.log(trainer.global_step, detail)


class MetricSink(Callback):
    """The step's metrics to ``log(step, metrics)`` (None: not logged) and one console line on rank 0."""

    def __init__(self, log: Callable[[int, dict[str, float]], None] | None, flush: Callable[[], None] | None = None):
        self.log, self.flush = log, flush

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        metrics, done = trainer.metrics, trainer.global_step
        if self.log is not None and metrics:
            self.log(done, metrics)
        if trainer.rank == 0 and "train/loss" in metrics:
            say(f"[k2pipe] step {done}/{trainer.cfg.train.steps} loss {metrics['train/loss']:.4f} "
                f"lr {metrics['train/lr']:.2e} tok/s {metrics['train/tokens_per_s']:.0f}"
                + (f" val {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""))

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.flush is not None:
            self.flush()


class StepPacing(Callback):
    """Sleeps out what is left of ``train.min_step_s`` after a step (after its metrics are logged), so a
    fault drill timed by the logged step lands mid-run on a fast machine. Off at 0."""

    def __init__(self, min_step_s: float):
        self.min_step_s, self.started = min_step_s, None

    def pre_step(self, trainer: Trainer) -> None:
        self.started = time.monotonic()

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if self.min_step_s > 0 and self.started is not None:
            time.sleep(max(0.0, self.min_step_s - (time.monotonic() - self.started)))


class Checkpointing(Callback):
    """Registers finished uploads every step; snapshots every ``checkpoint_every`` steps (0: only at the end)
    and at the last step; waits for the last one at the end."""

    def __init__(self, writer: CheckpointWriter, checkpoint_every: int):
        self.writer, self.checkpoint_every = writer, checkpoint_every

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        self.writer.poll_and_register(final=False)
        done = trainer.global_step
        if done == trainer.cfg.train.steps or (self.checkpoint_every and done % self.checkpoint_every == 0):
            # The step's logged figures travel with the checkpoint: the last one's are the run's final ones.
            self.writer.start(done, trainer.state_dict(), {"train/loss": result.loss, **trainer.metrics, "step": done})

    def on_fit_end(self, trainer: Trainer) -> None:
        self.writer.poll_and_register(final=True)
        steps = trainer.cfg.train.steps
        if steps in self.writer.abandoned:  # every rank has the same list: the verdict on each save is agreed
            # Ending normally would report the run finished with an older checkpoint as its model, the last
            # steps lost. Failing lets Ray Train restart the run (train.max_failures) from its last registered
            # checkpoint, retrain those steps and save again; with no restarts left the stage fails, unmarked.
            raise CheckpointSaveError(
                f"the final checkpoint (step {steps}) could not be written to {self.writer.experiment_path} after "
                f"{self.writer.attempts} attempts; the run fails rather than end on an older checkpoint")


class CheckpointSaveError(RuntimeError):
    """The run's final checkpoint could not be saved."""


class PreemptionCheckpoint(Callback):
    """Every ``every`` steps, ask ``notice()`` whether a node of the run is about to be taken: None, or the
    deadline (epoch seconds; ``inf`` when the cluster gave none). Every rank asks at the same steps and gets
    the same answer (under Ray Train, ``ray.train.get_preemption_info`` is a barrier that agrees one value).

    On the notice, checkpoint the step just done (or wait for the one in flight) until it is registered and
    settled (``CheckpointRegistry.settle``: under Ray Train, taken by the controller, which happens only at
    its next poll of the workers), and train on. While the deadline is ahead, each further step first checks
    (one agreed flag) whether another step plus a settled checkpoint (timed at the notice) still fits before
    it, with a step's time to spare; when not, it checkpoints that step, lets it settle and waits: the node's
    departure then costs no step. The wait ends when Ray Train restarts the group at the deadline, or, should
    the group not be restarted, ``grace_s`` past the deadline, when training goes on. When the run reaches
    ``last_step`` first, that step is checkpointed and settled at once: the run may not return before the
    node goes, and a restart then has nothing left to train."""

    def __init__(self, writer: CheckpointWriter, notice: Callable[[], float | None] | None, every: int,
                 announce: Callable[[str, int], None] | None = None, grace_s: float = 60.0,
                 last_step: int | None = None):
        self.writer, self.notice, self.every, self.announce, self.grace_s = writer, notice, every, announce, grace_s
        self.last_step = last_step
        self.fired_at: int | None = None
        self.deadline = math.inf
        self.parked_at: int | None = None
        self._last: float | None = None
        self.step_s = 0.0
        """Seconds a step takes, smoothed (post_step to post_step; the first step of a start, which carries
        the start-up and the restore, is left out)."""
        self.checkpoint_s = 0.0
        """Seconds a preemption checkpoint takes until it counts: its write and registration as timed at the
        notice, plus its settling, at least the registry's ``max_settle_s`` (the wait for the controller's
        next poll varies from one checkpoint to the next)."""

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        now = time.monotonic()
        if self._last is not None:
            took = now - self._last
            self.step_s = took if self.step_s == 0.0 else 0.8 * self.step_s + 0.2 * took
        self._last = now
        done = trainer.global_step
        if self.notice is None or not self.every:
            return
        metrics = {"train/loss": result.loss, **trainer.metrics, "step": done}
        if self.fired_at is None:
            if done % self.every:
                return
            deadline = self.notice()
            if deadline is None:
                return
            self.fired_at, self.deadline = done, deadline
            settled, write_s, settle_s = self._checkpoint(done, trainer, metrics, deadline)
            self._last = time.monotonic()  # the next step's time leaves this checkpoint out
            self.checkpoint_s = write_s + max(settle_s, self.writer.registry.max_settle_s)
            if trainer.rank == 0:
                left = ("no deadline given" if math.isinf(deadline)
                        else f"{deadline - time.time():.0f} s before the node goes")
                held = "registered" if settled else "registered (not yet taken by the controller)"
                say(f"[k2pipe] preemption notice at step {done}: checkpoint {held} in {write_s + settle_s:.1f} s; "
                    f"training on ({left})")
            if self.announce is not None:
                self.announce("notice", done)
            return
        if self.parked_at is not None:
            return
        if done == self.last_step:
            # The run ends here, perhaps not before the node goes: its last step settled, a restart has
            # nothing left to train.
            self._checkpoint(done, trainer, metrics, self.deadline)
            return
        if math.isinf(self.deadline):
            return
        # Room for another step and its checkpoint, with one step to spare? Every rank must agree.
        late = time.time() + 2 * self.step_s + self.checkpoint_s >= self.deadline
        if not agree(int(late), dist.ReduceOp.MAX, name="preemption deadline"):
            return
        self.parked_at = done
        settled = self._checkpoint(done, trainer, metrics, self.deadline)[0]
        if trainer.rank == 0:
            say(f"[k2pipe] step {done} checkpointed before the preemption deadline "
                f"({'registered' if settled else 'not yet taken by the controller at the deadline'}); "
                "waiting for the restart")
        if self.announce is not None:
            self.announce("parked", done)
        until = self.deadline + self.grace_s
        while time.time() < until:
            time.sleep(0.5)
        if trainer.rank == 0:
            say(f"[k2pipe] the node was not taken within {self.grace_s:.0f} s of its deadline; training on")

    def _checkpoint(self, step: int, trainer: Trainer, metrics: dict[str, Any],
                    deadline: float) -> tuple[bool, float, float]:
        """Checkpoint ``step`` now and wait until the registration settles, at most until the deadline (a
        minute when none was given): whether it settled, and the seconds of the write and of the settling."""
        t0 = time.monotonic()
        self.writer.checkpoint_now(step, trainer.state_dict(), metrics)
        t1 = time.monotonic()
        settled = self.writer.registry.settle(60.0 if math.isinf(deadline) else max(0.0, deadline - time.time()))
        return settled, t1 - t0, time.monotonic() - t1


def restore_latest(trainer: Trainer, writer: CheckpointWriter) -> dict[str, Any] | None:
    """Load the run's latest registered checkpoint into ``trainer`` (resharded if it was written in another
    layout); returns the loaded state, or None when there is none (a fresh start)."""
    state = writer.load_latest_registered()
    if state is None:
        return None
    trainer.load_state_dict(state)
    if trainer.rank == 0:
        say(f"[k2pipe] resumed from {state['checkpoint_folder']} at step {trainer.global_step}")
    if "resharded_from" in state:
        old = state["resharded_from"]
        say(f"[k2pipe] rank {trainer.rank}: resharded a checkpoint of {old['world_size']} workers "
            f"(ep={old['ep']}) into {trainer.world} workers (ep={trainer.layout.ep}), reading "
            f"{sum(old['bytes_read'])} bytes; from here the run equals an uninterrupted one to float rounding, "
            "not bit for bit")
    return state


def standard_callbacks(trainer: Trainer, writer: CheckpointWriter, *, peak_flops: float,
                       log: Callable[[int, dict[str, float]], None] | None = None,
                       flush: Callable[[], None] | None = None,
                       log_stats: Callable[[int, dict[str, Any]], None] | None = None,
                       preemption_notice: Callable[[], float | None] | None = None,
                       announce_preemption: Callable[[str, int], None] | None = None) -> list[Callback]:
    """The callbacks of a pretraining run, in hook order, configured from ``trainer.cfg.train``."""
    t = trainer.cfg.train
    return [
        FaultInjection(t.fault_injection, trainer.rank, writer.fs, writer.experiment_path),
        NaNInjection(t.nan_injection, trainer.rank),
        DivergenceRecovery(t.max_bad_steps, writer),
        StepMetrics(t.log_every, peak_flops),
        Validation(t.eval_every),
        MetricSink(log, flush),
        StepPacing(t.min_step_s),
        StatsSnapshots(log_stats),
        Checkpointing(writer, t.checkpoint_every),
        PreemptionCheckpoint(writer, preemption_notice, t.preemption_check_every, announce_preemption,
                             last_step=t.steps),
    ]
