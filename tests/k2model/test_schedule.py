"""Learning-rate schedules (k2model.schedule): values at the phase boundaries and input validation."""

from __future__ import annotations

import math

import pytest

from k2model.schedule import lr_at

PEAK = 2e-4


def wsd(step, total=100, warmup=10, decay=0.3, ratio=0.1):
    return lr_at(step, total, PEAK, "wsd", warmup, decay, ratio)


def test_wsd_boundaries():
    assert wsd(0) == pytest.approx(PEAK / 10)
    assert wsd(4) == pytest.approx(PEAK * 5 / 10)
    assert wsd(9) == PEAK  # last warm-up step reaches the peak
    assert wsd(10) == PEAK
    assert wsd(69) == PEAK  # last stable step (decay covers steps 70..99)
    assert PEAK * 0.99 < wsd(70) < PEAK
    assert wsd(84) == pytest.approx(PEAK * 0.1 + PEAK * 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert wsd(99) == pytest.approx(PEAK * 0.1)  # final step runs at the minimum
    values = [wsd(s) for s in range(100)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_wsd_decay_never_overlaps_warmup():
    # 10 steps, 6 of warm-up, decay 80% -> decay starts at warm-up's end.
    values = [lr_at(s, 10, PEAK, "wsd", 6, 0.8, 0.0) for s in range(10)]
    assert values[5] == PEAK and values[6] < PEAK and values[9] == pytest.approx(0.0, abs=1e-20)
    assert lr_at(5, 10, PEAK, "wsd", 0, 0.0, 0.1) == PEAK  # no decay phase at all


def test_cosine_and_constant():
    cos = [lr_at(s, 50, PEAK, "cosine", 5, 0.3, 0.1) for s in range(50)]
    assert cos[4] == PEAK and cos[5] < PEAK
    assert cos[49] == pytest.approx(PEAK * 0.1)
    midpoint = 5 + 45 // 2 - 1  # progress (s - 5 + 1) / 45 nearest one half
    assert cos[midpoint] == pytest.approx(PEAK * 0.1 + PEAK * 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))
    const = [lr_at(s, 20, PEAK, "constant", 4, 0.3, 0.1) for s in range(20)]
    assert const[:4] == pytest.approx([PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK]) and set(const[3:]) == {PEAK}
    assert lr_at(0, 1, PEAK, "cosine", 0, 0.0, 0.25) == pytest.approx(PEAK * 0.25)


@pytest.mark.parametrize("args, match", [
    ((0, 10, PEAK, "linear", 0, 0.2, 0.1), "train.schedule"),
    ((0, 10, PEAK, "wsd", 11, 0.2, 0.1), "train.warmup_steps"),
    ((0, 10, PEAK, "wsd", 1, 1.5, 0.1), "train.decay_fraction"),
    ((0, 10, PEAK, "wsd", 1, 0.2, -0.1), "train.min_lr_ratio"),
    ((0, 0, PEAK, "wsd", 0, 0.2, 0.1), "train.steps"),
    ((10, 10, PEAK, "wsd", 0, 0.2, 0.1), "outside"),
])
def test_invalid_settings_name_the_field(args, match):
    with pytest.raises(ValueError, match=match):
        lr_at(*args)
