"""The One-Euro filter (modules/one_euro.py) against hand computations and on noisy signals."""
import math

import numpy as np
import pytest

from modules.one_euro import OneEuroFilter, hold_last_valid, smooth_sequence

RATE = 30.0


def test_first_steps_match_the_hand_computation():
    one_euro = OneEuroFilter(frequency=10.0, min_cutoff=1.0, beta=0.1, d_cutoff=1.0)
    assert one_euro(np.array([0.0, 2.0]))[0] == 0.0                  # first sample passes
    out = one_euro(np.array([1.0, 2.0]))
    period, tau = 0.1, 1 / (2 * math.pi)                             # tau at 1 Hz
    alpha_d = 1 / (1 + tau / period)
    speed = alpha_d * (1.0 - 0.0) / period                           # smoothed speed, first step
    cutoff = 1.0 + 0.1 * speed
    alpha = 1 / (1 + 1 / (2 * math.pi * cutoff) / period)
    assert out[0] == pytest.approx(alpha * 1.0, rel=1e-12)
    assert out[1] == 2.0                                             # a still element stays put


def noisy_ramp(slope=0.5, sigma=0.05, frames=300, seed=0):
    t = np.arange(frames) / RATE
    truth = slope * t
    return truth, truth + np.random.default_rng(seed).normal(0, sigma, frames)


def rms(a, b, warm_up=30):
    return float(np.sqrt(np.mean((a[warm_up:] - b[warm_up:]) ** 2)))


def test_noisy_ramp_is_smoothed_and_the_speed_term_removes_the_lag():
    truth, noisy = noisy_ramp()
    adaptive = smooth_sequence(noisy, RATE, min_cutoff=1.0, beta=10.0)
    fixed = smooth_sequence(noisy, RATE, min_cutoff=1.0, beta=0.0)
    assert rms(adaptive, truth) < 0.75 * rms(noisy, truth)          # less error than the input
    lag_fixed = np.mean(truth[30:] - fixed[30:])                     # a plain low-pass lags ...
    lag_adaptive = np.mean(truth[30:] - adaptive[30:])
    assert lag_fixed > 0.05                                          # ~ slope / (2 pi f_c) = 0.08
    assert abs(lag_adaptive) < 0.2 * lag_fixed                       # ... the speed term fixes it
    # a still signal keeps the low cut-off: its jitter drops most
    still = 1.0 + np.random.default_rng(1).normal(0, 0.05, 300)
    assert np.std(smooth_sequence(still, RATE, min_cutoff=1.0, beta=10.0)[30:]) < 0.7 * 0.05
    assert np.std(smooth_sequence(still, RATE, min_cutoff=1.0, beta=0.0)[30:]) < 0.35 * 0.05


def test_invalid_samples_are_skipped_and_held():
    truth, noisy = noisy_ramp(frames=40)
    values = np.stack([noisy, -noisy], axis=1)                       # T x 2
    valid = np.ones(40, bool)
    valid[[0, 1, 10, 11, 12, 30]] = False
    out = smooth_sequence(values, RATE, min_cutoff=1.0, beta=1.0, valid=valid)
    # the valid samples alone, filtered at their own times
    reference = OneEuroFilter(RATE, 1.0, 1.0)
    expected = {t: reference(values[t], timestamp=t / RATE) for t in np.flatnonzero(valid)}
    for t in range(40):
        held = expected[t] if valid[t] else expected[max([s for s in expected if s < t], default=2)]
        np.testing.assert_allclose(out[t], held, rtol=0, atol=1e-12)
    assert np.array_equal(hold_last_valid(values, np.zeros(40, bool)), values)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="min_cutoff must be positive"):
        OneEuroFilter(30.0, min_cutoff=0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        OneEuroFilter(30.0, beta=-1.0)
    with pytest.raises(ValueError, match="one boolean per sample"):
        smooth_sequence(np.zeros(5), 30.0, valid=np.ones(4, bool))
    one_euro = OneEuroFilter(30.0)
    one_euro(0.0, timestamp=1.0)
    with pytest.raises(ValueError, match="timestamps must increase"):
        one_euro(1.0, timestamp=1.0)
