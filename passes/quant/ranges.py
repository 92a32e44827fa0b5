"""Range estimators and activation quantization parameters.

From a tensor's statistics (:class:`TensorStats`: min/max, a 2048-bin histogram over ``[min, max]``):

* ``minmax``: ``[min, max]``.
* ``percentile``: the range holding ``percentile`` % of the values, the tail split between both ends;
  one threshold on ``|x|`` when the range is symmetric or non-negative.
* ``entropy``: on the histogram of ``|x|``, the clipping threshold ``t`` whose 128-level quantization keeps
  the distribution closest in KL divergence (TensorRT's method): outliers fold into the last kept bin;
  empty quantized bins get ``1e-4`` so the divergence stays finite; 96 candidate thresholds.
* ``mse``: the range ``[a, b]`` (a scaled copy of ``[min, max]``, 101 candidates) minimizing the expected
  squared error under the histogram: clipped tails ``Σ p (x − clip(x))²`` plus rounding ``s²/12`` inside.

Activation parameters for ``[lo, hi]`` (widened to hold 0, so 0 is exact for padding and Relu):
cpu/mobile uint8 asymmetric ``s = (hi − lo)/255``, ``z = round(−lo/s)``; tensorrt int8 symmetric
``s = max(|lo|, |hi|)/127``, ``z = 0`` (TensorRT takes symmetric activations only).
"""

from __future__ import annotations

import math

import numpy as np

HIST_BINS = 2048


def activation_qparams(lo: float, hi: float, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (numpy scalars, zero point typed) for an activation range ``[lo, hi]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if target == "tensorrt":
        amax = max(-lo, hi)
        scale = amax / 127.0 if amax > 0 else 1.0
        return np.asarray(scale, np.float32), np.asarray(0, np.int8)
    span = hi - lo
    scale = span / 255.0 if span > 0 else 1.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.asarray(scale, np.float32), np.asarray(zp, np.uint8)



class TensorStats:
    """Streaming statistics of one activation tensor: min/max, per-channel means, a histogram."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0
        self.nonfinite = 0  # batches that held NaN/Inf (masks, -inf scores): such tensors stay float
        self.channel_sum: np.ndarray | None = None
        self.channel_n = 0
        self.hist: np.ndarray | None = None
        self.edges: tuple[float, float] | None = None

    def add_minmax(self, x: np.ndarray, channel_axis: int | None) -> None:
        if x.size == 0:
            return
        all_finite_ = bool(np.all(np.isfinite(x)))
        if not all_finite_:
            self.nonfinite += 1
        finite = x if all_finite_ else x[np.isfinite(x)]
        if finite.size:
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))
        self.count += x.size
        if channel_axis is not None and x.ndim > channel_axis:
            axes = tuple(i for i in range(x.ndim) if i != channel_axis)
            s = x.astype(np.float64).sum(axis=axes)
            self.channel_sum = s if self.channel_sum is None else self.channel_sum + s
            self.channel_n += x.size // x.shape[channel_axis]

    def add_hist(self, x: np.ndarray) -> None:
        if self.edges is None:
            lo, hi = (self.lo, self.hi) if self.lo < self.hi else (self.lo - 1.0, self.lo + 1.0)
            self.edges = (lo, hi)
            self.hist = np.zeros(HIST_BINS, np.int64)
        h, _ = np.histogram(x[np.isfinite(x)], bins=HIST_BINS, range=self.edges)
        self.hist += h

    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or self.channel_n == 0:
            return None
        return (self.channel_sum / self.channel_n).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"range": np.array([self.lo, self.hi, self.count, self.nonfinite], np.float64)}
        if self.channel_sum is not None:
            out["csum"] = self.channel_sum
            out["cn"] = np.array([self.channel_n])
        if self.hist is not None and self.edges is not None:
            out["hist"] = self.hist
            out["edges"] = np.array(self.edges)
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> TensorStats:
        s = cls()
        s.lo, s.hi, s.count = float(d["range"][0]), float(d["range"][1]), int(d["range"][2])
        s.nonfinite = int(d["range"][3]) if len(d["range"]) > 3 else 0
        if "csum" in d:
            s.channel_sum = d["csum"]
            s.channel_n = int(d["cn"][0])
        if "hist" in d:
            s.hist = d["hist"]
            s.edges = (float(d["edges"][0]), float(d["edges"][1]))
        return s


def _bin_centers(edges: tuple[float, float]) -> np.ndarray:
    lo, hi = edges
    width = (hi - lo) / HIST_BINS
    return lo + width * (np.arange(HIST_BINS) + 0.5)


def choose_range(stats: TensorStats, method: str, percentile: float, symmetric: bool) -> tuple[float, float]:
    """The quantization range of a tensor from its statistics (see the module docstring)."""
    lo, hi = stats.lo, stats.hi
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 0.0
    if method == "minmax" or stats.hist is None or stats.hist.sum() == 0:
        return lo, hi
    hist = stats.hist.astype(np.float64)
    centers = _bin_centers(stats.edges)
    width = (stats.edges[1] - stats.edges[0]) / HIST_BINS
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        tail = (100.0 - percentile) / 100.0
        if symmetric or lo >= 0:
            # one threshold on |x|
            return _abs_threshold(hist, centers, width, lambda h, c: _percentile_abs(h, c, tail), lo, hi)
        i_lo = int(np.searchsorted(cdf, tail / 2))
        i_hi = int(np.searchsorted(cdf, 1 - tail / 2))
        return float(min(lo, centers[i_lo] - width / 2) if i_lo == 0 else centers[i_lo] - width / 2), float(
            hi if i_hi >= HIST_BINS - 1 else centers[i_hi] + width / 2)
    if method == "entropy":
        return _abs_threshold(hist, centers, width, _kl_threshold, lo, hi)
    if method == "mse":
        return _mse_range(hist, centers, lo, hi, symmetric)
    raise ValueError(method)


def _abs_hist(hist: np.ndarray, centers: np.ndarray, nbins: int = HIST_BINS) -> tuple[np.ndarray, float]:
    amax = float(np.max(np.abs(centers))) if centers.size else 0.0
    if amax <= 0:
        return np.zeros(nbins), 0.0
    idx = np.minimum((np.abs(centers) / amax * nbins).astype(int), nbins - 1)
    out = np.zeros(nbins)
    np.add.at(out, idx, hist)
    return out, amax


def _abs_threshold(hist, centers, width, chooser, lo, hi) -> tuple[float, float]:
    ahist, amax = _abs_hist(hist, centers)
    if amax <= 0:
        return lo, hi
    t = chooser(ahist, amax) + width / 2
    t = min(t, max(-lo, hi))
    return (max(lo, -t), min(hi, t)) if lo < 0 else (max(lo, 0.0), min(hi, t))


def _percentile_abs(ahist: np.ndarray, amax: float, tail: float) -> float:
    cdf = np.cumsum(ahist) / ahist.sum()
    i = int(np.searchsorted(cdf, 1 - tail))
    return (i + 1) / len(ahist) * amax


def _kl_threshold(ahist: np.ndarray, amax: float, levels: int = 128) -> float:
    """Entropy calibration on a histogram of |x|: the clipping threshold whose ``levels``-level
    quantization keeps the distribution closest in KL divergence (outliers folded into the last bin,
    empty quantized bins smoothed so the divergence stays finite)."""
    h = ahist.astype(np.float64)
    n = len(h)
    if h.sum() == 0:
        return amax
    best, best_i = math.inf, n
    candidates = sorted(set(np.linspace(levels, n, 96).astype(int).tolist()))
    eps = 1e-4
    for i in candidates:
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        edges = np.linspace(0, i, levels + 1).astype(int)
        q = np.zeros(i)
        seg_nonzero = np.add.reduceat((h[:i] > 0).astype(np.float64), edges[:-1])
        seg_sum = np.add.reduceat(h[:i], edges[:-1])
        per = np.where(seg_nonzero > 0, seg_sum / np.maximum(seg_nonzero, 1), 0.0)
        idx = np.repeat(np.arange(levels), np.diff(edges))
        q = np.where(h[:i] > 0, per[idx], 0.0)
        ps = p / p.sum()
        qs = q / q.sum() if q.sum() > 0 else q
        # smooth: give empty bins where p > 0 a little mass
        zero = (qs == 0) & (ps > 0)
        if zero.any():
            qs = qs * (1 - eps * zero.sum() / max(1, (qs > 0).sum())) if (qs > 0).any() else qs
            qs[zero] = eps
        mask = ps > 0
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / qs[mask])))
        if kl < best:
            best, best_i = kl, i
    return best_i / n * amax


def _mse_range(hist, centers, lo, hi, symmetric) -> tuple[float, float]:
    """Range minimizing E[(x − Q(x))²]: clipping error of the tails + rounding error s²/12 inside."""
    best, best_r = math.inf, (lo, hi)
    p = hist / hist.sum()
    levels = 255.0
    for frac in np.concatenate([np.geomspace(0.01, 0.3, 30, endpoint=False), np.linspace(0.3, 1.0, 71)]):
        a, b = (lo * frac, hi * frac)
        if symmetric:
            m = max(-lo, hi) * frac
            a, b = (-m if lo < 0 else 0.0), m
        a, b = min(a, 0.0), max(b, 0.0)
        s = (b - a) / levels if b > a else 1.0
        clipped = np.clip(centers, a, b)
        err = float(np.sum(p * (centers - clipped) ** 2)) + s * s / 12.0 * float(
            np.sum(p[(centers >= a) & (centers <= b)]))
        if err < best - 1e-18:
            best, best_r = err, (a, b)
    return best_r
