"""Learning-rate schedules as pure functions of the step, and the one call that applies a rate.

- ``wsd`` (warmup-stable-decay, Kimi K2; shared/REFERENCE.md section 5): linear warm-up to the peak,
  constant, then a cosine decay to ``min_lr_ratio * peak`` over the last ``decay_fraction`` of the steps.
- ``cosine``: linear warm-up, then a cosine decay to ``min_lr_ratio * peak`` over all remaining steps.
- ``constant``: linear warm-up, then the peak.

Step convention: steps are numbered ``0 .. total_steps - 1`` and ``lr_at(step)`` is the rate used BY that
step's update. Warm-up step s (s < warmup_steps) runs at ``peak * (s + 1) / warmup_steps``, so the first
update is not wasted at lr 0 and the last warm-up step runs at the peak. A decay phase of n steps
starting at step s0 runs step s0 + i at the cosine value for progress (i + 1) / n, so the final step runs
exactly at the minimum and the step before the decay is the last one at the peak.

When a wsd decay phase would overlap the warm-up (few total steps), it starts at the end of the warm-up
instead and is correspondingly shorter.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("wsd", "cosine", "constant")


def _cosine(progress: float, peak_lr: float, min_lr: float) -> float:
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def validate_schedule(total_steps: int, schedule: str, warmup_steps: int, decay_fraction: float,
                      min_lr_ratio: float) -> None:
    """ValueError naming the ``train.*`` field for settings no schedule can honour."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: unknown schedule; valid: {SCHEDULES}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"train.steps={total_steps!r}: must be a positive integer")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"train.warmup_steps={warmup_steps!r}: must be an integer in "
                         f"[0, steps={total_steps}]")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"train.decay_fraction={decay_fraction!r}: must lie in [0, 1]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio={min_lr_ratio!r}: must lie in [0, 1]")


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str = "wsd", warmup_steps: int = 0,
          decay_fraction: float = 0.2, min_lr_ratio: float = 0.1) -> float:
    """The learning rate of update ``step`` (0-based); see the module docstring for the conventions."""
    validate_schedule(total_steps, schedule, warmup_steps, decay_fraction, min_lr_ratio)
    if not 0 <= step < total_steps:
        raise ValueError(f"step={step} lies outside [0, total_steps={total_steps})")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = peak_lr * min_lr_ratio
    if schedule == "constant":
        return peak_lr
    if schedule == "cosine":
        decay_start = warmup_steps
    else:
        decay_steps = round(decay_fraction * total_steps)
        if decay_steps == 0:
            return peak_lr
        decay_start = max(total_steps - decay_steps, warmup_steps)
    if step < decay_start:
        return peak_lr
    return _cosine((step - decay_start + 1) / (total_steps - decay_start), peak_lr, min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the rate ``lr`` (Muon and AdamW share one rate through
    update-RMS matching)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
