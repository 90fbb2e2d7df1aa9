"""The One-Euro filter (Casiez, Roussel and Vogel, CHI 2012): speed-adaptive low-pass smoothing of
noisy signals over time, used on per-frame 3DMM codes (the progressive-warping authors smooth
the driving codes this way at inference) and on landmark tracks.

Per element, with sampling period ``T_e`` (seconds between samples):

    alpha(f_c) = 1 / (1 + tau / T_e),   tau = 1 / (2 pi f_c)
    dx_t   = (x_t - xhat_{t-1}) / T_e                     the signal's speed
    dxhat_t = alpha(d_cutoff) dx_t + (1 - alpha(d_cutoff)) dxhat_{t-1}
    f_c    = min_cutoff + beta |dxhat_t|                  cut-off grows with the speed
    xhat_t = alpha(f_c) x_t + (1 - alpha(f_c)) xhat_{t-1}

Slow signals get the low ``min_cutoff`` (less jitter), fast ones a higher cut-off (less lag).
The first sample passes unchanged. Parameters follow the paper's tuning advice: lower
``min_cutoff`` to remove jitter at rest, raise ``beta`` to remove lag in motion.
"""
import math

import numpy as np
import torch


def smoothing_factor(period, cutoff):
    """alpha of an exponential low-pass with cut-off ``cutoff`` (Hz, a number or an array) at
    sampling ``period`` (s)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / period)


class OneEuroFilter:
    """Stateful filter of arrays of any fixed shape (each element filtered on its own).

    ``filter(value, timestamp=None)`` -> the smoothed value; timestamps in seconds (default: one
    sample every ``1 / frequency`` seconds, so a skipped sample can be given its real time).
    """

    def __init__(self, frequency, min_cutoff=1.0, beta=0.0, d_cutoff=1.0):
        for name, value in (("frequency", frequency), ("min_cutoff", min_cutoff),
                            ("d_cutoff", d_cutoff)):
            if not value > 0:
                raise ValueError(f"OneEuroFilter {name} must be positive, got {value}")
        if beta < 0:
            raise ValueError(f"OneEuroFilter beta must be >= 0, got {beta}")
        self.frequency, self.min_cutoff = float(frequency), float(min_cutoff)
        self.beta, self.d_cutoff = float(beta), float(d_cutoff)
        self.reset()

    def reset(self):
        self._value = self._speed = self._time = None

    def filter(self, value, timestamp=None):
        value = np.asarray(value, dtype=np.float64)
        if timestamp is None:
            timestamp = 0.0 if self._time is None else self._time + 1.0 / self.frequency
        if self._value is None:
            self._value, self._speed, self._time = value.copy(), np.zeros_like(value), timestamp
            return value.copy()
        period = timestamp - self._time
        if period <= 0:
            raise ValueError(f"timestamps must increase: {timestamp} after {self._time}")
        speed = (value - self._value) / period
        self._speed = self._speed + smoothing_factor(period, self.d_cutoff) * (speed - self._speed)
        cutoff = self.min_cutoff + self.beta * np.abs(self._speed)
        self._value = self._value + smoothing_factor(period, cutoff) * (value - self._value)
        self._time = timestamp
        return self._value.copy()

    __call__ = filter


def hold_last_valid(values, valid):
    """A ``T x ...`` copy where each invalid sample repeats the last valid one before it (the first
    valid one, for leading invalid samples). All invalid: unchanged."""
    values = np.array(values)
    valid = np.asarray(valid, bool)
    if valid.shape != (len(values),):
        raise ValueError(f"valid must hold one boolean per sample ({len(values)}), "
                         f"got shape {valid.shape}")
    if not valid.any():
        return values
    source = np.maximum.accumulate(np.where(valid, np.arange(len(values)), -1))
    return values[np.where(source >= 0, source, int(np.argmax(valid)))]


def smooth_sequence(values, frequency, min_cutoff=1.0, beta=0.0, d_cutoff=1.0, valid=None):
    """A ``T x ...`` sequence filtered along its first axis (sample t at time t / frequency).

    ``valid`` (T booleans): samples marked False are not fed to the filter (the next valid
    sample is filtered with the real time elapsed) and repeat the last smoothed value
    (:func:`hold_last_valid`).
    """
    values = np.asarray(values, dtype=np.float64)
    valid = np.ones(len(values), bool) if valid is None else np.asarray(valid, bool)
    out = values.copy()
    one_euro = OneEuroFilter(frequency, min_cutoff, beta, d_cutoff)
    for t in np.flatnonzero(valid):
        out[t] = one_euro.filter(values[t], timestamp=t / frequency)
    return hold_last_valid(out, valid)


class CodeSmoother:
    """One-Euro filtering of a stream of 3DMM codes, batch after batch in frame order.

    ``CodeSmoother(fps, ...)(codes)``: ``codes`` (``flame.codes.FaceCodes``) holds consecutive
    frames along the batch; returns the codes with the ``fields`` smoothed (each element on its
    own, sample t at time t / fps) and the others unchanged. The filter keeps its state between
    calls, so one smoother serves one video. Default fields: the motion (expression, pose,
    camera); the shape is one identity's and the source's replaces it anyway.
    """

    def __init__(self, frequency, min_cutoff=1.0, beta=0.0, d_cutoff=1.0,
                 fields=("exp", "pose", "cam")):
        self.filters = {name: OneEuroFilter(frequency, min_cutoff, beta, d_cutoff)
                        for name in fields}

    def reset(self):
        for one_euro in self.filters.values():
            one_euro.reset()

    def __call__(self, codes):
        changes = {}
        for name, one_euro in self.filters.items():
            value = getattr(codes, name)
            if value is None:
                continue
            rows = value.detach().cpu().double().numpy()
            smoothed = np.stack([one_euro.filter(row) for row in rows])
            changes[name] = torch.as_tensor(smoothed, dtype=value.dtype, device=value.device)
        return codes.replace(**changes)


__all__ = ["OneEuroFilter", "CodeSmoother", "smooth_sequence", "hold_last_valid",
           "smoothing_factor"]
