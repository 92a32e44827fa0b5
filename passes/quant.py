"""quant: int8/int4 quantization to QDQ (or QLinear ops) that keeps accuracy and loads on its target.

Modes
-----
* ``weights`` (default without data): every Conv/ConvTranspose/Gemm/MatMul weight ``W`` (an initializer
  or a Constant node, in the main graph or an If/Loop/Scan body) becomes ``DequantizeLinear(q, s, 0)``
  with symmetric per-channel int8: ``s_c = max|W_c| / 127``, ``q = clip(round(W / s_c), -127, 127)``,
  along the output-channel axis (Conv: 0, ConvTranspose: 1, Gemm: 0 if ``transB`` else 1, MatMul: 1).
  LSTM/GRU/RNN ``W`` and ``R`` are quantized the same way, one scale per gate row (axis 1); in
  ``dynamic``/``static`` they stay float, because onnxruntime runs a DequantizeLinear of a constant at
  every inference (measured 2× slower on a small LSTM) — those modes are about speed.
  ``bits=4`` quantizes MatMul weights block-wise along K (``block_size`` rows per scale): with
  ``target=cpu`` as onnxruntime's ``com.microsoft::MatMulNBits`` (uint4, implicit zero point 8), else as
  an opset-21 blocked ``DequantizeLinear`` of int4.
* ``dynamic``: ``MatMul``/``Gemm`` with a constant weight become
  ``DynamicQuantizeLinear(x) → MatMulInteger(xq, Wq, xz, 0) → Cast → Mul(x_scale · s_c)`` (+ bias),
  the u8s8 form onnxruntime's CPU provider runs and fuses. Conv is never quantized dynamically
  (ConvInteger u8s8 has no CPU kernel and dynamic Conv is slower than float).
* ``static`` (default with data): weights as above, and every float activation that feeds a quantizable
  op (Conv, Gemm, MatMul, Add, Concat, pooling, Resize and data-movement ops) gets one
  ``QuantizeLinear → DequantizeLinear`` pair with a calibrated range ``[lo, hi]``:
  ``cpu``/``mobile``: uint8 asymmetric, ``s = (hi − lo)/255``, ``z = round(−lo/s)``;
  ``tensorrt``: int8 symmetric, ``s = max(|lo|, |hi|)/127``, ``z = 0``. Conv biases stay float in QDQ
  (onnxruntime still fuses QLinearConv; it saves a scale per channel); Gemm biases become int32 behind
  DequantizeLinear and Gemm/MatMul weights keep an explicit zero point (cpu/mobile), without which
  onnxruntime does not form QGemm and dequantizes the weights at every run; ``format=qop`` makes them int32
  with ``s_b = s_x · s_W`` as QLinearConv requires. On x86 without VNNI the u8s8 integer kernels sum
  pairs of products in int16 and saturate, so ``target=cpu|mobile`` use 7-bit weights (``reduce_range``) —
  except depthwise Conv weights, whose kernel sums in int32 (measured exact with 255 × 127 products) and
  keep all 8 bits (digits MobileNetV2 output rel-L2 0.0182 → 0.0177). Activation Q/DQ pairs with equal
  parameters share one scale and zero-point initializer. Concat inputs and outputs share one range (the union) so the
  concat moves int8 without requantizing; data-movement ops share their input's range; with
  ``target=tensorrt`` both inputs of a residual Add share one range too (TensorRT then fuses the Add into
  the Conv; onnxruntime's QLinearAdd rescales each input, so cpu/mobile keep the finer separate ranges). Softmax,
  LayerNormalization, GELU/Erf, Div, Pow, reductions and everything not listed stay float. SiLU as
  exported (``Mul(x, Sigmoid(x))``) is quantized through for cpu/mobile (QLinearSigmoid + QLinearMul), so
  the Conv before it runs as QLinearConv: a float SiLU left every Conv of the digits detector float behind
  DequantizeLinear (2.1× fp32 latency; 1.4× with SiLU in int8, 1.6× with only the Conv output quantized).
  Detection heads (``heads=auto``): a Conv/Gemm/MatMul whose output reaches a graph output through no
  other weighted op, and whose path scales it by a constant (stride/anchor ``Mul``) or takes a
  ``Pow``/``Exp`` — a YOLO-style in-graph decode — keeps a float input, and its weight, read by a float op,
  gets the full 8-bit range (reduce_range only matters to integer kernels). Measured on the shipped
  digits detector (with SiLU quantized through): mAP@.5:.95 0.7249 vs fp32 0.7255; ``heads=int8`` 0.7124.
  ``format=qop`` then rewrites ``DQ → Conv/MatMul/Add → Q`` patterns into QLinearConv, QLinearMatMul and
  ``com.microsoft::QLinearAdd`` and drops ``Q(DQ(x))`` pairs with equal parameters.

Calibration (static)
--------------------
Streaming over the data (``samples`` at most), one batch at a time through onnxruntime
(:class:`onnxshrink.capture.ActivationCapture`): pass 1 records per-tensor min/max (and per-channel means
of Conv/Gemm inputs for bias correction); for ``percentile|entropy|mse`` pass 2 fills a 2048-bin
histogram over ``[min, max]``. Memory is the histograms plus one batch, whatever the number of samples.
``percentile``: the range holding ``percentile`` % of the values (split between the tails);
``entropy``: the clipping threshold minimizing the KL divergence between the histogram and its
quantized version (TensorRT's method, on ``|x|``); ``mse``: the range minimizing the expected squared
error (clipping + rounding) under the histogram. Statistics are cached by model hash + data hash
(``PassContext.store``) so a re-run with another ``calib`` or target reuses them.

Accuracy keepers
----------------
* Cross-layer equalization (``cle``): for ``Conv₁ → Relu → Conv₂`` (either may be depthwise or grouped),
  with per-channel weight ranges ``r₁ᵢ`` (outputs of Conv₁) and ``r₂ᵢ`` (inputs of Conv₂),
  ``sᵢ = √(r₁ᵢ / r₂ᵢ)``; ``W₁ᵢ /= sᵢ``, ``b₁ᵢ /= sᵢ``, ``W₂[:, i] *= sᵢ`` (three sweeps). Exact because
  ``relu(x/s) = relu(x)/s`` for ``s > 0``. ``Clip(0, M)`` (ReLU6) is not scale-equivariant: channel ``i``
  would need its own bound ``M/sᵢ``. So the per-channel maxima of the Clip's input are measured on the
  calibration data first; after equalizing, the Clip gets one bound ``C = maxᵢ min(maxᵢ, M)/sᵢ`` and the
  channels the Clip cut in calibration are rescaled once more to ``sᵢ = M/C``: the pair is then exact
  for those channels on any input, and for the others on any input within their calibrated range (where
  the quantized model clamps anyway). Default ``auto``: on only with per-tensor weights — with
  per-channel weight scales equalizing buys nothing for the weights and widens the activation ranges
  (measured on the digits models: output rel-L2 0.018 → 0.025 on MobileNetV2 with it, 0.044 → 0.032
  per-tensor).
* Bias correction (``bias_correction``, static): the expected output shift of the weight rounding,
  ``Δb_o = Σ_c E[x_c] · Σ_k (Ŵ − W)[o, c, k]``, is subtracted from the bias (E[x] from calibration).
* ``max_drop``: the quantized model is scored against the float one on the data (``metric``: top-1
  agreement or labeled accuracy drop in points, ``1 − cosine``, or relative L2); while the drop exceeds
  the budget, layers are ranked by how much the score recovers when that layer alone stays float, and
  the fewest, most sensitive layers fall back to float until it holds. The stats list them.

Preconditions: float32 weights (other dtypes are declined with a reason); weights shared by a
non-quantizable node are left float; per-channel weights need opset ≥ 13: older models (11/12) are
upgraded in place (Squeeze/Unsqueeze/Split/Reduce* axes to inputs, Softmax-family axis checked) or, when
that is not exact, weights are dequantized per-channel by ``DequantizeLinear(q, 1) · s`` and activations
stay per-tensor. ``tolerance`` (0.15 relative L2 on outputs) is the validation bound for 8-bit;
task accuracy is what ``max_drop`` and the benchmarks measure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import UsageError
from onnxshrink.model import name_matcher, taken_names, unique_name
from onnxshrink.targets import static_problems
from onnxshrink.registry import ShrinkPass, option, register

__all__ = ["QuantOptions", "QuantPass"]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")
_MS = "com.microsoft"
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "LSTM": 1, "GRU": 1, "RNN": 1}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # W and R weights: weight-only (DequantizeLinear feeding the float op)
_FAST_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # static mode: integer kernels exist
# Ops whose float activation inputs get a Q/DQ pair in static mode (input slots that are activations).
_STATIC_OPS = {
    "Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1), "Add": (0, 1),
    "Concat": None, "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,),
    "GlobalMaxPool": (0,), "Resize": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Split": (0,), "Sigmoid": (0,), "Mul": (0, 1),
}
# Ops whose output range is their input's (int8 passes through; one shared range).
_SAME_RANGE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool",
                   "Split"}
_HIST_BINS = 2048


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Options of the quant pass."""

    mode: Literal["auto", "weights", "dynamic", "static"] = option(
        "auto", "what to quantize: auto = static with --data, weights without", choices=None)
    format: Literal["qdq", "qop"] = option("qdq", "static output form: QDQ pairs or QLinear ops")
    target: Literal["cpu", "mobile", "tensorrt"] = option(
        "cpu", "runtime whose rules the output follows (types, symmetry, placement)")
    bits: int = option(8, "weight bits: 8, or 4 (block-wise MatMul weights, weights mode)")
    block_size: int = option(32, "rows of K per scale for 4-bit MatMul weights (power of 2, >= 16)")
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    reduce_range: Literal["auto", "on", "off"] = option(
        "auto", "7-bit weights for integer kernels (auto: on for cpu/mobile static/dynamic: onnxruntime's "
        "u8s8 kernels on x86 without VNNI saturate int16 sums; off for tensorrt)")
    calib: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "percentile", "activation range estimator (static)")
    percentile: float = option(99.999, "percent of values the percentile range keeps")
    samples: int = option(256, "calibration samples used at most")
    cle: Literal["auto", True, False] = option(
        "auto", "cross-layer equalization of Conv→Relu/Clip→Conv chains (auto: with per-tensor weights only)")
    bias_correction: bool = option(True, "correct the output mean shift of weight rounding (static)")
    max_drop: float = option(-1.0, "accuracy budget (see metric); < 0: no fallback to float")
    metric: Literal["auto", "top1", "accuracy", "cosine", "rel_l2"] = option(
        "auto", "max_drop metric: auto = accuracy with labels, else top1 for class scores, else cosine")
    exclude: str = option("none", "node names kept float: items joined by '|' (or '+'); a glob (* ? []) "
                                  "matches the whole name, a plain item any name containing it")
    matmul_act: bool = option(True, "quantize MatMuls whose both inputs are activations (attention)")
    heads: Literal["auto", "int8", "float"] = option(
        "auto", "last weighted layers before an output (static): auto = float when the graph decodes their "
                "output with constant arithmetic (YOLO-style boxes), float = always, int8 = never kept float")

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of 2, at least 16")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.bits == 4 and self.mode not in ("weights", "auto"):
            raise ValueError("bits=4 is for mode=weights")


# ---------------------------------------------------------------------------------------------------
# numeric helpers


_CHUNK_BYTES = 16 << 20  # weights are quantized in slices of this size: big models stay within ~1x memory


def _row_chunks(w: np.ndarray) -> Iterable[slice]:
    rows = w.shape[0] if w.ndim else 1
    per_row = max(1, w.nbytes // max(rows, 1))
    step = max(1, _CHUNK_BYTES // per_row)
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def weight_absmax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per channel along ``axis`` (or over everything), reading ``w`` slice by slice."""
    if w.ndim == 0:
        return np.asarray(np.abs(w), np.float32)
    out = None
    for rows in _row_chunks(w):
        chunk = np.abs(np.asarray(w[rows], dtype=np.float32))
        if axis is None:
            m = np.asarray(chunk.max() if chunk.size else 0.0, np.float32)
            out = m if out is None else np.maximum(out, m)
        elif axis == 0:
            m = chunk.reshape(chunk.shape[0], -1).max(axis=1) if chunk.size else np.zeros(chunk.shape[0], np.float32)
            out = m if out is None else np.concatenate([out, m])
        else:
            red = tuple(i for i in range(w.ndim) if i != axis)
            m = chunk.max(axis=red) if chunk.size else np.zeros(w.shape[axis], np.float32)
            out = m if out is None else np.maximum(out, m)
    return np.asarray(out, np.float32)


def all_finite(w: np.ndarray) -> bool:
    """True if ``w`` holds no NaN/Inf (read slice by slice)."""
    if w.ndim == 0:
        return bool(np.isfinite(w))
    return all(bool(np.isfinite(w[rows]).all()) for rows in _row_chunks(w))


def quantize_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w`` per channel along ``axis`` (or per tensor when None).

    ``bits`` is the number of bits actually used (7 = reduced range, values in [-63, 63]).
    Returns ``(q int8, scale float32)``; ``scale`` has one entry per channel (or is a scalar). Large
    weights are read and quantized in slices, so memory is the int8 result plus one slice.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = weight_absmax(w, axis)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    if w.ndim == 0:
        q[...] = np.clip(np.rint(np.float32(w) / scale), -qmax, qmax)
        return q, np.asarray(scale, np.float32).reshape(())
    for rows in _row_chunks(w):
        chunk = np.asarray(w[rows], dtype=np.float32)
        if axis is None:
            s = scale
        elif axis == 0:
            s = scale[rows].reshape([-1] + [1] * (w.ndim - 1))
        else:
            bshape = [1] * w.ndim
            bshape[axis] = -1
            s = scale.reshape(bshape)
        q[rows] = np.clip(np.rint(chunk / s), -qmax, qmax)
    if axis is None:
        scale = np.asarray(scale, np.float32).reshape(())
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """The float weight a DequantizeLinear of ``q`` yields."""
    if axis is None or np.ndim(scale) == 0:
        return q.astype(np.float32) * np.float32(scale)
    bshape = [1] * q.ndim
    bshape[axis] = -1
    return q.astype(np.float32) * scale.reshape(bshape)


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
            self.hist = np.zeros(_HIST_BINS, np.int64)
        h, _ = np.histogram(x[np.isfinite(x)], bins=_HIST_BINS, range=self.edges)
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
    width = (hi - lo) / _HIST_BINS
    return lo + width * (np.arange(_HIST_BINS) + 0.5)


def choose_range(stats: TensorStats, method: str, percentile: float, symmetric: bool) -> tuple[float, float]:
    """The quantization range of a tensor from its statistics (see the module docstring)."""
    lo, hi = stats.lo, stats.hi
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 0.0
    if method == "minmax" or stats.hist is None or stats.hist.sum() == 0:
        return lo, hi
    hist = stats.hist.astype(np.float64)
    centers = _bin_centers(stats.edges)
    width = (stats.edges[1] - stats.edges[0]) / _HIST_BINS
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        tail = (100.0 - percentile) / 100.0
        if symmetric or lo >= 0:
            # one threshold on |x|
            return _abs_threshold(hist, centers, width, lambda h, c: _percentile_abs(h, c, tail), lo, hi)
        i_lo = int(np.searchsorted(cdf, tail / 2))
        i_hi = int(np.searchsorted(cdf, 1 - tail / 2))
        return float(min(lo, centers[i_lo] - width / 2) if i_lo == 0 else centers[i_lo] - width / 2), float(
            hi if i_hi >= _HIST_BINS - 1 else centers[i_hi] + width / 2)
    if method == "entropy":
        return _abs_threshold(hist, centers, width, _kl_threshold, lo, hi)
    if method == "mse":
        return _mse_range(hist, centers, lo, hi, symmetric)
    raise ValueError(method)


def _abs_hist(hist: np.ndarray, centers: np.ndarray, nbins: int = _HIST_BINS) -> tuple[np.ndarray, float]:
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


# ---------------------------------------------------------------------------------------------------
# graph helpers


def _is_onnx(node: ir.Node, *ops: str) -> bool:
    return node.domain in _ONNX and (not ops or node.op_type in ops)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _is_weight(value: ir.Value | None) -> bool:
    """A constant float tensor that is not an overridable graph input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    return value.const_value.dtype == ir.DataType.FLOAT


def _depthwise(node: ir.Node, slot: int) -> bool:
    """A Conv weight with one input and one output channel per group (depthwise, multiplier 1)."""
    if slot != 1 or not _is_onnx(node, "Conv") or node.inputs[1] is None:
        return False
    w = node.inputs[1]
    shape = w.const_value.shape if w.const_value is not None else w.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[0], int):
        return False
    return shape[1] == 1 and _attr(node, "group", 1) == shape[0]


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _weight_axis(node: ir.Node, slot: int, rank: int) -> int | None:
    """The output-channel axis of the weight in ``slot`` of ``node`` (None: per tensor only)."""
    op = node.op_type
    if op == "Conv" and slot == 1:
        return 0
    if op == "ConvTranspose" and slot == 1:
        return 1 if _attr(node, "group", 1) == 1 else None
    if op == "Gemm" and slot == 1:
        return 0 if _attr(node, "transB", 0) else 1
    if op == "Gemm" and slot == 0:
        return None
    if op == "MatMul" and slot == 1 and rank == 2:
        return 1
    if op in RECURRENT_OPS and slot in (1, 2) and rank == 3:
        return 1  # [directions, gates·hidden, input]: one scale per gate row
    return None


def _all_nodes(model: ir.Model) -> Iterable[ir.Node]:
    for graph in model.graphs():
        yield from list(graph)


# ---------------------------------------------------------------------------------------------------


@register("quant", QuantOptions, summary="int8/int4 quantization to QDQ or QLinear ops (weights/dynamic/static)")
class QuantPass(ShrinkPass):
    """Quantization; see the module docstring for the math, modes and preconditions."""

    tolerance = 0.15

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        return _applicability(model)

    @classmethod
    def validation_tolerance(cls, options: QuantOptions) -> float:
        """Relative L2 on outputs: 0.15 for 8-bit (activation + weight rounding, and bounded fallback
        of saturating kernels), 0.3 for 4-bit weights (16 levels per block)."""
        return 0.3 if options.bits == 4 else cls.tolerance

    def run(self, model: ir.Model) -> bool:
        o = self.options
        data = self.context.data
        mode = o.mode if o.mode != "auto" else ("static" if data is not None else "weights")
        if mode == "static" and data is None:
            raise UsageError("quant(mode=static) needs calibration data", pass_name=self.name, option="mode",
                             hint="give --data (an .npz with one array per input), or use mode=weights")
        if mode == "dynamic" and o.target == "tensorrt":
            raise UsageError("TensorRT does not run DynamicQuantizeLinear", pass_name=self.name,
                             option="mode", hint="use mode=static or mode=weights with target=tensorrt")
        if o.format == "qop" and o.target == "tensorrt":
            raise UsageError("TensorRT takes QDQ only", pass_name=self.name, option="format",
                             hint="use format=qdq with target=tensorrt")
        if o.max_drop >= 0 and data is None:
            raise UsageError("max_drop needs data to measure the drop", pass_name=self.name, option="max_drop",
                             hint="give --data")
        self.details["mode"] = mode
        self._restore: dict[int, tuple[ir.Node, dict[int, list]]] = {}
        self._unnamed: list[ir.Node] = []
        self._counter = 0  # short-name counter
        self._zeros: dict[ir.DataType, ir.Value] = {}  # shared scalar zero points of QLinear ops
        reduce = o.reduce_range == "on" or (o.reduce_range == "auto" and o.target in ("cpu", "mobile")
                                            and mode in ("static", "dynamic"))
        self._wbits = 7 if reduce else 8
        self._int_input: set[int] | None = None  # static: nodes that read a quantized activation
        self._keep_zp = False  # DequantizeLinear's zero point defaults to 0; QLinear ops get a shared scalar
        if reduce:
            self.details["weights"] = "int8 with 7-bit range (reduce_range)"
        if o.max_drop >= 0:
            if mode != "static":
                raise UsageError("max_drop works with mode=static", pass_name=self.name, option="max_drop",
                                 hint="drop max_drop, or use mode=static")
            _infer_shapes(model, self.context)
            try:
                outs = _run_outputs(self.context, model, o.samples)
            except (RuntimeError, ValueError) as e:
                raise UsageError(f"max_drop needs onnxruntime to run the model: {str(e).splitlines()[0][:200]}",
                                 pass_name=self.name, option="max_drop", hint="drop max_drop for this model") from e
            self._reference = _reference(outs, o.metric, self.context)
        self._exclude = name_matcher(o.exclude)
        self._taken: set[str] = taken_names(*model.graphs())
        opset = _opset(model)
        if opset < 10 or (mode == "dynamic" and opset < 11):
            need = 11 if mode == "dynamic" else 10
            self.decline(f"opset {opset} < {need}: no {'DynamicQuantizeLinear' if need == 11 else 'QuantizeLinear'}")
            self.details["skipped"] = f"opset {opset} has no quantization ops (needs >= {need})"
            return False
        changed = self._lift_constants(model)
        if model.ir_version is not None and model.ir_version < 4:
            model.ir_version = 4  # initializers need not be graph inputs any more
        self._per_channel_ok = True
        if o.per_channel and (mode in ("static", "weights")) and _opset(model) < 13:
            changed |= self._upgrade_opset(model)
        if mode == "weights":
            changed |= self._quantize_weights(model)
        elif mode == "dynamic":
            changed |= self._quantize_dynamic(model)
        else:
            changed |= self._quantize_static(model)
        self._remove_unused(model)
        for node in self._unnamed:
            node.name = None
        problems = static_problems(model, o.target)
        self.details["target_check"] = f"{o.target}: ok" if not problems else f"{o.target}: " + "; ".join(problems[:3])
        if problems:
            self.decline(f"output breaks {o.target} rules")
        return changed

    # -- shared -----------------------------------------------------------------------------------

    def _excluded(self, node: ir.Node) -> bool:
        return self._exclude(node.name)

    def _lift_constants(self, model: ir.Model) -> bool:
        """Constant nodes feeding weight slots become initializers (Paddle/TF exports store weights so)."""
        from onnxshrink.passes.fold import lift_constant

        changed = False
        for graph in model.graphs():
            for node in list(graph):
                if not _is_onnx(node, "Constant") or node.outputs[0].is_graph_output():
                    continue
                if not any(_is_onnx(u, *WEIGHT_OPS) for u, _ in node.outputs[0].uses()):
                    continue
                value = lift_constant(graph, node)
                if value is None:
                    continue
                self._taken.add(value.name)
                self.count("constant_weights_lifted")
                changed = True
        return changed

    def _new_init(self, graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        name = unique_name(base, self._taken)
        tensor = ir.tensor(array, dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(np.shape(array)), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        return value

    def _short(self, kind: str) -> str:
        """A short unique base name (``w3``, ``a17``): on small models names are a large part of the file."""
        while True:
            self._counter += 1
            name = f"{kind}{self._counter}"
            if not any(n.startswith(name) for n in (name, name + "s", name + "z", name + "q", name + "d")
                       if n in self._taken):
                return name

    def _node(self, op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
              *, domain: str = "", name: str | None = None, num_outputs: int = 1,
              outputs: list[ir.Value] | None = None) -> ir.Node:
        attributes = ir.convenience.convert_attributes(
            {k: int(v) if isinstance(v, np.integer) else v for k, v in (attrs or {}).items()})
        node = ir.Node(domain, op, inputs, attributes, outputs=outputs,
                       num_outputs=None if outputs is not None else num_outputs,
                       name=unique_name(name, self._taken) if name else None)
        if not name:
            self._unnamed.append(node)  # the graph names nodes on insertion; saved files need no names
        return node

    def _remove_unused(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for node in reversed(list(graph)):
                if _is_onnx(node, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") and all(
                        not o.uses() and not o.is_graph_output() for o in node.outputs):
                    graph.remove(node, safe=True)
            used = {v.name for n in graph.all_nodes() for v in n.inputs if v is not None}
            for name in list(graph.initializers):
                v = graph.initializers[name]
                if name not in used and not v.is_graph_input() and not v.is_graph_output() and not v.uses():
                    del graph.initializers[name]

    # -- opset ------------------------------------------------------------------------------------

    def _upgrade_opset(self, model: ir.Model) -> bool:
        """Upgrade an opset-11/12 model to 13 in place where that is exact; else note per-tensor."""
        old = _opset(model)
        if old < 11:
            self._per_channel_ok = False
            self.details["per_channel"] = f"per-tensor activations: opset {old} < 11 is not upgraded"
            return False
        blockers = []
        for node in _all_nodes(model):
            if not _is_onnx(node):
                continue
            if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
                axis = _attr(node, "axis", 1)
                rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
                if rank is None or (axis % rank) != rank - 1:
                    blockers.append(f"{node.op_type} {node.name!r} axis {axis}")
        if blockers:
            self._per_channel_ok = False
            self.details["per_channel"] = (f"opset {old} kept: {blockers[0]} changes meaning at opset 13; "
                                               "weights per-channel via DequantizeLinear·scale")
            return False
        for graph in model.graphs():
            for node in list(graph):
                if not _is_onnx(node):
                    continue
                op = node.op_type
                if op in ("Softmax", "LogSoftmax", "Hardmax"):
                    node.attributes["axis"] = ir.AttrInt64("axis", -1)
                elif op in ("Squeeze", "Unsqueeze", "ReduceSum") and "axes" in node.attributes:
                    axes = list(node.attributes.pop("axes").value)
                    c = self._new_init(graph, f"{node.name or op}_axes", np.array(axes, np.int64))
                    node.resize_inputs(2) if hasattr(node, "resize_inputs") else None
                    node.replace_input_with(1, c) if len(node.inputs) > 1 else _append_input(node, c)
                elif op == "Dropout" and ("ratio" in node.attributes or "is_test" in node.attributes):
                    # Dropout-10 → 12: the ratio attribute became an optional input (inference mode default)
                    ratio = node.attributes.pop("ratio").value if "ratio" in node.attributes else 0.5
                    node.attributes.pop("is_test", None)
                    c = self._new_init(graph, self._short("r"), np.asarray(ratio, np.float32))
                    _append_input(node, c)
                elif op == "Split" and "split" in node.attributes:
                    split = list(node.attributes.pop("split").value)
                    c = self._new_init(graph, f"{node.name or op}_split", np.array(split, np.int64))
                    _append_input(node, c)
        model.opset_imports[""] = 13
        model.opset_imports.pop("ai.onnx", None)
        self.details["opset_upgraded"] = f"{old} -> 13 (per-channel DequantizeLinear needs opset 13)"
        self.count("opset_upgraded")
        return True

    # -- weights ----------------------------------------------------------------------------------

    def _weight_slots(self, model: ir.Model, ops: Iterable[str]) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
        """Constant float weights of ``ops`` with every (node, slot) using them, in graph order."""
        found: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        ops = set(ops)
        for node in _all_nodes(model):
            if not _is_onnx(node, *ops):
                continue
            if self._excluded(node):
                self.decline("excluded by name", node)
                continue
            slots = [1, 0] if node.op_type == "MatMul" else [1, 2] if node.op_type in RECURRENT_OPS else [1]
            for slot in slots:
                v = node.inputs[slot] if slot < len(node.inputs) else None
                if v is None or v.const_value is None or v.is_graph_input():
                    continue
                if v.const_value.dtype != ir.DataType.FLOAT:
                    self.decline(f"weight dtype {v.const_value.dtype.name} (float32 only)", node)
                    continue
                found.setdefault(v, []).append((node, slot))
        for v in list(found):
            users = v.uses()
            if len(users) != len(found[v]):
                self.decline("weight shared with a node that is not quantized", found[v][0][0])
                del found[v]
                continue
            arr_shape = v.shape
            if arr_shape is None or any(not isinstance(d, int) for d in arr_shape) or np.prod(list(arr_shape)) < 16:
                self.decline("weight too small to gain from quantization", found[v][0][0])
                del found[v]
                continue
            if not all_finite(v.const_value.numpy()):
                self.decline("weight holds NaN/Inf: left float", found[v][0][0])
                del found[v]
        return found

    def _weight_bits(self, uses: list[tuple[ir.Node, int]]) -> int:
        """Reduced (7-bit) range only where an integer kernel will multiply: a weight whose consumers all
        keep a float input (heads, excluded or unquantized paths) runs in a float op and gets all 8 bits."""
        if self._int_input is not None and not any(id(n) in self._int_input for n, _ in uses):
            return 8
        if all(_depthwise(n, slot) for n, slot in uses):
            # onnxruntime's depthwise QLinearConv (one input and one output channel per group) sums
            # in int32 and never saturates (measured with 255 x 127 products; every other Conv and
            # the Gemm/MatMul kernels do on AVX2): its weights keep all 8 bits
            return 8
        return self._wbits

    def _keep_recurrent_float(self, model: ir.Model) -> None:
        n = sum(1 for node in _all_nodes(model) if _is_onnx(node, *RECURRENT_OPS))
        if n:
            # onnxruntime does not fold a DequantizeLinear of a constant: it would run every inference
            # (measured 2x slower on a small LSTM); mode=weights, which is about size, quantizes them
            self.decline("LSTM/GRU/RNN weights kept float in static/dynamic mode (mode=weights quantizes them)")
            self.count("recurrent_kept_float", n)

    def _dq_for_weight(self, weight: ir.Value, uses: list[tuple[ir.Node, int]], bits: int = 8,
                       share_axis: bool = True) -> dict[tuple[ir.Node, int], ir.Value] | None:
        """Quantize ``weight`` and route every use through one DequantizeLinear per axis."""
        w = weight.const_value.numpy()
        graph = weight.graph or uses[0][0].graph
        out: dict[tuple[ir.Node, int], ir.Value] = {}
        by_axis: dict[int | None, list[tuple[ir.Node, int]]] = {}
        for node, slot in uses:
            axis = _weight_axis(node, slot, w.ndim) if self.options.per_channel else None
            by_axis.setdefault(axis, []).append((node, slot))
        for axis, group in by_axis.items():
            q, scale = quantize_weight(w, axis, self._weight_bits(group))
            base = self._short("w")
            qv = self._new_init(graph, base, q)
            sv = self._new_init(graph, f"{base}s", scale)
            # the zero point defaults to 0, but onnxruntime fuses DQ→Gemm/MatMul into QGemm/QLinearMatMul
            # only with it spelled out (measured: without it the digits CNN's Gemms stayed float behind a
            # per-run weight dequantization); Conv fuses either way, so it is omitted there (smaller file)
            keep_zp = self._keep_zp or (self._int_input is not None and any(
                n.op_type in ("Gemm", "MatMul") and id(n) in self._int_input for n, _ in group))
            zv = self._new_init(graph, f"{base}z", np.zeros(scale.shape, np.int8)) if keep_zp else None
            if axis is not None and not self._per_channel_ok:
                # opset < 13: per-tensor DequantizeLinear(q, 1) then a per-channel Mul (exact)
                one = self._new_init(graph, f"{base}u", np.asarray(1.0, np.float32))
                zero = self._new_init(graph, f"{base}z", np.asarray(0, np.int8))
                bshape = [1] * w.ndim
                bshape[axis] = -1
                sv_b = self._new_init(graph, f"{base}b", scale.reshape(bshape))
                dq = self._node("DequantizeLinear", [qv, one, zero])
                mul = self._node("Mul", [dq.outputs[0], sv_b])
                nodes = [dq, mul]
                result = mul.outputs[0]
                self.count("weights_per_channel_by_mul")
            else:
                attrs = {"axis": axis} if axis is not None else {}
                if axis is None:
                    sv.const_value = ir.tensor(np.asarray(scale, np.float32).reshape(()), name=sv.name)
                    sv.shape = ir.Shape([])
                    if zv is not None:
                        zv.const_value = ir.tensor(np.asarray(0, np.int8), name=zv.name)
                        zv.shape = ir.Shape([])
                dq = self._node("DequantizeLinear", [qv, sv] + ([zv] if zv is not None else []), attrs)
                nodes = [dq]
                result = dq.outputs[0]
            result.name = unique_name(f"{base}d", self._taken)
            result.dtype = ir.DataType.FLOAT
            result.shape = ir.Shape(list(w.shape))
            self._insert_front(graph, group, nodes)
            for node, slot in group:
                self._replace(node, slot, result)
                out[(node, slot)] = result
            self.count("weights_quantized")
            self.count("weight_bytes_saved", int(w.nbytes - q.nbytes))
        return out

    def _insert_front(self, graph: ir.Graph, uses: list[tuple[ir.Node, int]], nodes: list[ir.Node]) -> None:
        """Insert ``nodes`` before the first use in ``graph`` (or at its start if uses are in subgraphs)."""
        # uses come in graph order (collected by walking the graph), so the first one is the earliest;
        # no scan of the graph per weight (that made the pass quadratic on 100k-node graphs)
        first = uses[0][0] if all(n.graph is graph for n, _ in uses) else next(iter(graph), None)
        if first is None:
            graph.extend(nodes)
        else:
            graph.insert_before(first, nodes)

    def _quantize_weights(self, model: ir.Model, static: bool = False) -> bool:
        """Weight-only int8/int4; ``static``: the fallback of mode=static, which leaves recurrent ops float."""
        o = self.options
        changed = False
        if static:
            self._keep_recurrent_float(model)
        found = self._weight_slots(model, _FAST_WEIGHT_OPS if static else WEIGHT_OPS)
        for weight, uses in found.items():
            if o.bits == 4:
                if all(n.op_type == "MatMul" and s == 1 for n, s in uses) and weight.const_value.numpy().ndim == 2:
                    if self._int4_matmul(model, weight, uses):
                        changed = True
                    continue
                self.decline("4-bit is for MatMul weights: quantized to 8 bits", uses[0][0])
            if self._dq_for_weight(weight, uses):
                changed = True
        return changed

    def _int4_matmul(self, model: ir.Model, weight: ir.Value, uses: list[tuple[ir.Node, int]]) -> bool:
        o = self.options
        w = weight.const_value.numpy().astype(np.float32)
        k, n = w.shape
        bs = o.block_size
        nblocks = -(-k // bs)
        padded = np.zeros((nblocks * bs, n), np.float32)
        padded[:k] = w
        blocks = padded.reshape(nblocks, bs, n)
        amax = np.abs(blocks).max(axis=1)  # [nblocks, n]
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)  # [nblocks, bs, n]
        graph = weight.graph or uses[0][0].graph
        base = self._short("w")
        if o.target == "cpu":
            # MatMulNBits: B uint8 [N, nblocks, bs/2], low nibble first; scales [N * nblocks]; zero point 8
            u = (q + 8).astype(np.uint8).transpose(2, 0, 1)  # [n, nblocks, bs]
            packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
            bv = self._new_init(graph, base, packed)
            sv = self._new_init(graph, f"{base}s", scale.T.reshape(-1).copy())
            for node, _slot in uses:
                out = node.outputs[0]
                new = self._node("MatMulNBits", [node.inputs[0], bv, sv],
                                 {"K": k, "N": n, "bits": 4, "block_size": bs, "accuracy_level": 0},
                                 domain=_MS, name=f"{node.name or 'MatMul'}_NBits")
                node.graph.insert_before(node, [new])
                new.outputs[0].dtype = ir.DataType.FLOAT
                new.outputs[0].shape = out.shape
                out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
                name = out.name
                node.graph.remove(node, safe=True)
                new.outputs[0].name = name
            if _MS not in model.opset_imports:
                model.opset_imports[_MS] = 1
            self.count("weights_int4_matmulnbits")
        else:
            if _opset(model) < 21:
                self.decline("int4 DequantizeLinear needs opset 21: quantized to 8 bits", uses[0][0])
                return bool(self._dq_for_weight(weight, uses))
            q2 = q.reshape(nblocks * bs, n)[:k]
            qv = self._new_init(graph, base, q2, dtype=ir.DataType.INT4)
            sv = self._new_init(graph, f"{base}s", scale)
            dq = self._node("DequantizeLinear", [qv, sv], {"axis": 0, "block_size": bs})
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape([k, n])
            self._insert_front(graph, uses, [dq])
            for node, slot in uses:
                node.replace_input_with(slot, dq.outputs[0])
            self.count("weights_int4_blocked")
        self.count("weights_quantized")
        self.count("weight_bytes_saved", int(w.nbytes - q.size // 2 - scale.nbytes))
        return True

    # -- dynamic ------------------------------------------------------------------------------------

    def _quantize_dynamic(self, model: ir.Model) -> bool:
        changed = False
        found = self._weight_slots(model, ("MatMul", "Gemm"))
        for weight, uses in found.items():
            w = weight.const_value.numpy()
            for node, slot in uses:
                if node.op_type == "MatMul" and (slot != 1 or w.ndim != 2):
                    self.decline("dynamic MatMul needs a 2-D weight on the right", node)
                    continue
                if node.op_type == "Gemm":
                    if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or (
                            len(node.inputs) > 2 and node.inputs[2] is not None and _attr(node, "beta", 1.0) != 1.0):
                        self.decline("Gemm with transA/alpha/beta kept float", node)
                        continue
                self._dynamic_node(node, w)
                changed = True
        self._keep_recurrent_float(model)
        skipped_conv = sum(1 for n in _all_nodes(model) if _is_onnx(n, "Conv"))
        if skipped_conv:
            self.decline("Conv kept float in dynamic mode (slower than float on CPU)")
            self.count("conv_kept_float", skipped_conv)
        return changed

    def _dynamic_node(self, node: ir.Node, w: np.ndarray) -> None:
        graph = node.graph
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            w = w.T
        q, scale = quantize_weight(w, 1 if self.options.per_channel else None, self._wbits)
        base = node.name or node.op_type
        x = node.inputs[0]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        qv = self._new_init(graph, f"{base}_W_quantized", q)
        zv = self._new_init(graph, f"{base}_W_zero_point",
                            np.zeros(scale.shape, np.int8) if scale.ndim else np.asarray(0, np.int8))
        sv = self._new_init(graph, f"{base}_W_scale", scale)
        dql = self._node("DynamicQuantizeLinear", [x], name=f"{base}_DynamicQuantizeLinear", num_outputs=3)
        mmi = self._node("MatMulInteger", [dql.outputs[0], qv, dql.outputs[2], zv], name=f"{base}_MatMulInteger")
        cast = self._node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
        sc = self._node("Mul", [dql.outputs[1], sv], name=f"{base}_ScaleProduct")
        out = node.outputs[0]
        mul = self._node("Mul", [cast.outputs[0], sc.outputs[0]], name=f"{base}_Rescale")
        new_nodes = [dql, mmi, cast, sc, mul]
        final = mul.outputs[0]
        if bias is not None:
            add = self._node("Add", [final, bias], name=f"{base}_Bias")
            new_nodes.append(add)
            final = add.outputs[0]
        graph.insert_before(node, new_nodes)
        final.dtype = ir.DataType.FLOAT
        final.shape = out.shape
        name = out.name
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        final.name = name
        self.count("dynamic_matmuls")
        self.count("weights_quantized")
        self.count("weight_bytes_saved", int(w.nbytes - q.nbytes))

    # -- static -----------------------------------------------------------------------------------

    def _quantize_static(self, model: ir.Model) -> bool:
        o = self.options
        _infer_shapes(model, self.context)
        changed = False
        if o.cle is True or (o.cle == "auto" and not o.per_channel):
            changed |= self._cle(model)
        plan = self._plan(model)
        if not plan:
            self.decline("no activation feeds a quantizable op: weights only")
            return self._quantize_weights(model, static=True) or changed
        groups = self._range_groups(model, plan)
        names = sorted({v.name for g in groups for v in g})
        mean_axes = self._mean_axes(plan)
        try:
            stats = self._calibrate(model, names, mean_axes)
        except (RuntimeError, ValueError) as e:
            # onnxruntime cannot run this graph (custom or training ops, old kernels): weights only
            self.decline("calibration impossible (onnxruntime cannot run the model): weights only")
            self.details["calibration"] = f"not possible: {str(e).splitlines()[0][:200]}"
            return self._quantize_weights(model, static=True) or changed
        ranges: dict[str, tuple[float, float]] = {}
        symmetric = o.target == "tensorrt"
        for g in groups:
            if any(stats.get(v.name) is not None and stats[v.name].nonfinite for v in g):
                self.decline("activation holds NaN/Inf in calibration (e.g. a -inf mask): left float")
                continue
            los, his = [], []
            for v in g:
                st = stats.get(v.name)
                if st is None or not math.isfinite(st.lo):
                    continue
                lo, hi = choose_range(st, o.calib, o.percentile, symmetric)
                los.append(lo)
                his.append(hi)
            if not los:
                continue
            for v in g:
                ranges[v.name] = (min(los), max(his))
        # weights (all graphs; inside If/Loop/Scan bodies weight-only), with bias correction first
        self._keep_recurrent_float(model)
        found = self._weight_slots(model, _FAST_WEIGHT_OPS)
        self._int_input = {id(node) for v, uses in plan.items() if v.name in ranges for node, _ in uses}
        if o.bias_correction:
            self._bias_correction(model, found, stats, plan)
        for weight, uses in found.items():
            self._dq_for_weight(weight, uses)
        in_main = {id(n) for n in model.graph}
        sub_weights = sum(1 for uses in found.values() for n, _ in uses if id(n) not in in_main)
        if sub_weights:
            self.count("subgraph_weights_weight_only", sub_weights)
        # activations
        qparams: dict[str, tuple[ir.Value, ir.Value]] = {}
        for value, uses in plan.items():
            if value.name not in ranges:
                self.decline("activation never observed in calibration: left float")
                continue
            lo, hi = ranges[value.name]
            scale, zp = activation_qparams(lo, hi, o.target)
            self._insert_qdq(model, value, uses, scale, zp)
            qparams[value.name] = (scale, zp)
            self.count("activations_quantized")
        if o.format == "qop":
            self._quantize_biases(model)  # QLinearConv takes an int32 bias; QDQ keeps it float (ORT fuses)
        elif o.target != "tensorrt":
            # onnxruntime fuses a Gemm whose output is not requantized (a classifier's last layer) into
            # QGemm only with an int32 bias behind DequantizeLinear (measured on the digits CNN's fc2)
            self._quantize_biases(model, ("Gemm",))
        self._activation_ranges = ranges
        if o.max_drop >= 0:
            self._fallback(model)
        self._fold_activations_into_q(model)
        if o.format == "qop":
            self._to_qop(model)
        else:
            self._compact_qparams(model)
        return True

    def _compact_qparams(self, model: ir.Model) -> None:
        """Equal scalar initializers of the main graph (activation scales and zero points, mostly) become
        one: a smaller file, the same numbers. (onnx_ir's DeduplicateInitializersPass does this too, but
        logs a warning per initializer of an IR < 4 model, which reaches API users' stderr.) Zero points
        stay spelled out even when they are the default 0: onnxruntime matches Q/DQ pairs around
        MaxPool/Flatten/Reshape and forms QGemm only with them (measured: leaving them out left 3
        DequantizeLinear in the optimized digits CNN)."""
        graph = model.graph
        seen: dict[tuple, ir.Value] = {}
        for v in list(graph.initializers.values()):
            arr = _const_array(v)
            if arr is None or arr.size != 1 or v.is_graph_input() or v.is_graph_output():
                continue
            first = seen.setdefault((v.dtype, arr.shape, arr.tobytes()), v)
            if first is not v:
                v.replace_all_uses_with(first)
                del graph.initializers[v.name]
                self.count("qparams_shared")

    def _fold_activations_into_q(self, model: ir.Model) -> None:
        """Drop a Relu/Clip(0, M) whose only consumer is a QuantizeLinear that already clamps to it.

        Exact for the quantized model: ``Q(x)`` saturates to ``[s·(0 − z), s·(255 − z)]``; with ``z = 0``
        (uint8) the lower clamp is the Relu, and when ``255·s ≤ M`` the upper one is inside the Clip, so
        ``Q(relu(x)) = Q(x)`` and ``Q(clip(x, 0, M)) = Q(x)`` bit for bit (onnxruntime does the same fusion
        when it loads the model). Symmetric int8 (tensorrt) is left alone.
        """
        graph = model.graph
        for node in list(graph):
            if not _is_onnx(node, "Relu", "Clip"):
                continue
            q = _sole_consumer(node.outputs[0])
            if q is None or not _is_onnx(q, "QuantizeLinear") or node.outputs[0].is_graph_output():
                continue
            zp = _const_array(q.inputs[2]) if len(q.inputs) > 2 else None
            scale = _const_array(q.inputs[1])
            if zp is None or zp.dtype != np.uint8 or zp.size != 1 or int(zp) != 0 or scale is None or scale.size != 1:
                continue
            if node.op_type == "Clip":
                lo = _const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
                hi = _const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
                if "min" in node.attributes or "max" in node.attributes:
                    continue  # opset < 11 form
                if lo is None or float(lo) != 0.0 or hi is None or float(scale) * 255 > float(hi) * (1 + 1e-6):
                    continue
            src = node.inputs[0]
            if src is None or src.dtype != ir.DataType.FLOAT:
                continue
            q.replace_input_with(0, src)
            graph.remove(node, safe=True)
            self.count(f"{node.op_type.lower()}_folded_into_q")

    # static: placement ------------------------------------------------------------------------------

    def _plan(self, model: ir.Model) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
        """Float activations of the main graph to quantize, with the (node, slot) uses that read them."""
        anchors: set[int] = set()
        nodes = list(model.graph)
        softmax_region = _softmax_region(model.graph)
        heads = self._float_heads(model)
        for node in nodes:
            if not _is_onnx(node) or self._excluded(node) or id(node) in heads:
                continue
            op = node.op_type
            if op in ("Conv", "ConvTranspose", "Gemm"):
                anchors.add(id(node))
            elif op == "MatMul":
                acts = [v for v in node.inputs[:2] if _is_activation(v)]
                if len(acts) == 2 and not self.options.matmul_act:
                    self.decline("activation x activation MatMul kept float (matmul_act=false)", node)
                    continue
                anchors.add(id(node))
            elif op == "Mul" and self.options.target != "tensorrt" and _is_silu(node):
                # x·σ(x): QLinearSigmoid + QLinearMul keep the Conv before it int8 in onnxruntime;
                # TensorRT fuses Conv+SiLU itself and wants Q/DQ only on the Conv inputs
                anchors.add(id(node))
            elif op == "Add" and all(_is_activation(v) for v in node.inputs[:2]):
                if id(node) in softmax_region:
                    self.decline("Add feeding a Softmax (attention mask/bias) kept float", node)
                    continue
                anchors.add(id(node))
        # followers (pools, Concat, Resize, data movement) join when their output reaches an anchor
        included = set(anchors)
        for node in reversed(nodes):
            if id(node) in included or not _is_onnx(node) or node.op_type not in _STATIC_OPS:
                continue
            if node.op_type == "Mul":
                continue  # only SiLU's Mul, as an anchor
            if self._excluded(node):
                continue
            if any(id(u) in included for out in node.outputs for u, _ in out.uses()):
                included.add(id(node))
        plan: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        for node in nodes:
            if id(node) not in included:
                continue
            slots = _STATIC_OPS[node.op_type]
            slots = range(len(node.inputs)) if slots is None else slots
            for slot in slots:
                v = node.inputs[slot] if slot < len(node.inputs) else None
                if _is_activation(v):
                    plan.setdefault(v, []).append((node, slot))
        return plan

    def _float_heads(self, model: ir.Model) -> set[int]:
        """Weighted nodes kept float by ``heads`` (their input activation is not quantized)."""
        if self.options.heads == "int8":
            return set()
        found = _output_heads(model.graph, decode_only=self.options.heads == "auto")
        for node in found.values():
            self.decline("detection/regression head kept float (its output is decoded by arithmetic)"
                         if self.options.heads == "auto" else "output head kept float (heads=float)", node)
        if found:
            self.details["heads_float"] = sorted(found)
        return {id(n) for n in found.values()}

    def _range_groups(self, model: ir.Model, plan: dict[ir.Value, list]) -> list[list[ir.Value]]:
        """Tensors that must share one range: Concat inputs with its output, data movement in/out."""
        parent: dict[ir.Value, ir.Value] = {}

        def find(v: ir.Value) -> ir.Value:
            while parent.get(v, v) is not v:
                v = parent[v]
            return v

        def union(a: ir.Value, b: ir.Value) -> None:
            ra, rb = find(a), find(b)
            if ra is not rb:
                parent[ra] = rb

        members = set(plan)
        for node in model.graph:
            if not _is_onnx(node):
                continue
            if node.op_type == "Concat" and any(v in plan for v in node.inputs):
                out = node.outputs[0]
                members.add(out)
                for v in node.inputs:
                    if _is_activation(v):
                        members.add(v)
                        union(v, out)
            elif (node.op_type == "Add" and self.options.target == "tensorrt"
                  and all(v in plan for v in node.inputs[:2])):
                # TensorRT fuses a residual Add into the Conv when both inputs share one scale
                union(node.inputs[0], node.inputs[1])
            elif node.op_type in _SAME_RANGE_OPS and node.inputs and node.inputs[0] in plan:
                for out in node.outputs:
                    if out in plan:
                        union(node.inputs[0], out)
        groups: dict[int, list[ir.Value]] = {}
        for v in members:
            groups.setdefault(id(find(v)), []).append(v)
        return [sorted(g, key=lambda x: x.name or "") for g in groups.values()]

    def _mean_axes(self, plan: dict[ir.Value, list]) -> dict[str, int]:
        axes: dict[str, int] = {}
        for v, uses in plan.items():
            for node, slot in uses:
                if slot == 0 and node.op_type in ("Conv", "Gemm", "MatMul"):
                    rank = len(v.shape) if v.shape is not None else None
                    if node.op_type == "Conv":
                        axes[v.name] = 1
                    elif rank is not None:
                        axes[v.name] = rank - 1
                    break
        return axes

    # static: calibration ----------------------------------------------------------------------------

    def _calibrate(self, model: ir.Model, names: list[str], mean_axes: dict[str, int]) -> dict[str, TensorStats]:
        from onnxshrink.capture import plan_groups

        o = self.options
        data = self.context.data
        need_hist = o.calib != "minmax"
        store = self.context.store
        key = None
        stats: dict[str, TensorStats] = {}
        if store is not None:
            key = _calib_key(model, names, data, o.samples)
            cached = store.get(key)
            if cached is not None:
                stats = {n: TensorStats.from_arrays(d) for n, d in cached.items()}
                if all(n in stats for n in names) and (not need_hist or all(
                        stats[n].hist is not None for n in names)):
                    self.count("calibration_cache_hits")
                    self.details["calibration"] = f"cached ({len(names)} tensors)"
                    return stats
                stats = {}
        limit = min(o.samples, data.num_samples)
        groups = plan_groups(model, names)
        progress = self.context.progress
        for gi, group in enumerate(groups):
            for n in group:
                stats[n] = TensorStats()
            with self.context.capture(model, group) as cap:
                for batch in cap.run(data, limit=limit, progress=progress,
                                     label=f"calibrating (min/max, group {gi + 1}/{len(groups)})"):
                    for n in group:
                        x = batch[n]
                        if x.dtype.kind != "f":
                            continue
                        stats[n].add_minmax(x, mean_axes.get(n))
                if need_hist:
                    for batch in cap.run(data, limit=limit, progress=progress,
                                         label=f"calibrating (histograms, group {gi + 1}/{len(groups)})"):
                        for n in group:
                            x = batch[n]
                            if x.dtype.kind == "f" and math.isfinite(stats[n].lo):
                                stats[n].add_hist(x)
        self.details["calibration"] = f"{o.calib} on {limit} samples, {len(names)} tensors, {len(groups)} group(s)"
        if store is not None and key is not None:
            store.put(key, {n: s.to_arrays() for n, s in stats.items()})
        return stats

    # static: rewrites -------------------------------------------------------------------------------

    def _insert_qdq(self, model: ir.Model, value: ir.Value, uses: list[tuple[ir.Node, int]],
                    scale: np.ndarray, zp: np.ndarray) -> None:
        graph = model.graph
        base = self._short("a")
        sv = self._new_init(graph, f"{base}s", scale)
        zv = self._new_init(graph, f"{base}z", zp)
        q = self._node("QuantizeLinear", [value, sv, zv])
        q.outputs[0].name = unique_name(f"{base}q", self._taken)
        q.outputs[0].dtype = ir.DataType.UINT8 if zp.dtype == np.uint8 else ir.DataType.INT8
        q.outputs[0].shape = value.shape
        dq = self._node("DequantizeLinear", [q.outputs[0], sv, zv])
        dq.outputs[0].name = unique_name(f"{base}d", self._taken)
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is None:
            first = next(iter(graph), None)
            if first is None:
                graph.extend([q, dq])
            else:
                graph.insert_before(first, [q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        for node, slot in uses:
            self._replace(node, slot, dq.outputs[0])

    def _quantize_biases(self, model: ir.Model, ops: tuple[str, ...] = ("Conv", "Gemm")) -> None:
        """Conv/Gemm biases to int32 with scale s_x·s_W, where input and weight are dequantized."""
        for node in list(model.graph):
            if not _is_onnx(node, *ops) or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            if node.op_type == "Gemm" and _attr(node, "beta", 1.0) != 1.0:
                continue
            b = node.inputs[2]
            xs = _dq_scale(node.inputs[0])
            ws = _dq_scale(node.inputs[1])
            if xs is None or ws is None or not _is_weight(b) or len(b.uses()) != 1:
                continue
            barr = b.const_value.numpy()
            if barr.ndim != 1:
                continue
            bscale = (xs * ws).astype(np.float32)
            if bscale.ndim == 0:
                bscale = np.full(barr.shape, bscale, np.float32)
            if bscale.shape != barr.shape or np.any(bscale <= 0):
                continue
            bq = np.clip(np.rint(barr / bscale), -(2 ** 31) + 1, 2 ** 31 - 1).astype(np.int32)
            graph = model.graph
            base = self._short("b")
            qv = self._new_init(graph, base, bq)
            sv = self._new_init(graph, f"{base}s", bscale)
            dq = self._node("DequantizeLinear", [qv, sv], {"axis": 0})
            dq.outputs[0].name = unique_name(f"{base}d", self._taken)
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(list(barr.shape))
            graph.insert_before(node, [dq])
            self._replace(node, 2, dq.outputs[0])
            self.count("biases_int32")

    def _bias_correction(self, model: ir.Model, found: dict[ir.Value, list], stats: dict[str, TensorStats],
                         plan: dict[ir.Value, list]) -> None:
        for weight, uses in found.items():
            for node, slot in uses:
                if slot != 1 or node.graph is not model.graph or node.op_type not in ("Conv", "Gemm"):
                    continue
                x = node.inputs[0]
                st = stats.get(x.name) if x is not None else None
                mean = st.channel_mean() if st is not None else None
                if mean is None:
                    continue
                if len(weight.uses()) != 1:
                    continue
                w = weight.const_value.numpy()
                axis = _weight_axis(node, 1, w.ndim) if self.options.per_channel else None
                q, scale = quantize_weight(w, axis, self._weight_bits(uses))
                dw = dequantize_weight(q, scale, axis) - w
                if node.op_type == "Conv":
                    group = _attr(node, "group", 1)
                    cout, cpg = w.shape[0], w.shape[1]
                    if mean.shape[0] != cpg * group:
                        continue
                    per_oc = dw.reshape(cout, cpg, -1).sum(axis=2)  # [cout, cpg]
                    opg = cout // group
                    m = np.stack([mean[(o // opg) * cpg:(o // opg + 1) * cpg] for o in range(cout)])
                    delta = (per_oc * m).sum(axis=1)
                else:
                    if _attr(node, "transA", 0):
                        continue
                    dwt = dw.T if _attr(node, "transB", 0) else dw  # [K, N]
                    if mean.shape[0] != dwt.shape[0]:
                        continue
                    delta = mean @ dwt * _attr(node, "alpha", 1.0)
                    if len(node.inputs) > 2 and node.inputs[2] is not None:
                        delta = delta / _attr(node, "beta", 1.0)
                if not np.any(np.abs(delta) > 0):
                    continue
                b = node.inputs[2] if len(node.inputs) > 2 else None
                if b is not None and (not _is_weight(b) or len(b.uses()) != 1 or b.const_value.numpy().shape != delta.shape):
                    self.decline("bias shared, not constant or broadcast: no bias correction", node)
                    continue
                old = b.const_value.numpy() if b is not None else np.zeros(delta.shape, np.float32)
                new = (old - delta).astype(np.float32)
                graph = node.graph
                nb = self._new_init(graph, self._short("c"), new)
                if b is None:
                    if node.op_type == "Gemm":
                        continue  # a Gemm without C would need beta semantics: skip
                    if len(node.inputs) == 2:
                        node.resize_inputs(3)
                self._replace(node, 2, nb)
                self.count("bias_corrected")

    # static: cross-layer equalization ---------------------------------------------------------------

    def _cle(self, model: ir.Model) -> bool:
        """Cross-layer equalization of Conv→Relu→Conv and Conv→Clip(0, M)→Conv pairs (see module doc)."""
        pairs: list[tuple[ir.Node, ir.Node, ir.Node]] = []
        for conv1 in model.graph:
            if not _is_onnx(conv1, "Conv") or self._excluded(conv1):
                continue
            act = _sole_consumer(conv1.outputs[0])
            if act is None or not _is_onnx(act, "Relu", "Clip") or act.outputs[0].is_graph_output():
                continue
            conv2 = _sole_consumer(act.outputs[0])
            if conv2 is None or not _is_onnx(conv2, "Conv") or self._excluded(conv2):
                continue
            if act.op_type == "Clip" and _clip_bound(act) is None:
                self.decline("CLE: Clip is not Clip(0, M) with constant bounds", act)
                continue
            pairs.append((conv1, act, conv2))
        clips = [(c1, act) for c1, act, _ in pairs if act.op_type == "Clip"]
        seen: dict[str, np.ndarray] = {}
        if clips:
            seen = self._channel_max(model, [c1.outputs[0].name for c1, _ in clips])
        scale: dict[int, np.ndarray] = {}  # id(Clip) -> cumulative s (Conv₁ output channel i now holds x_i / s_i)
        usable = []
        for conv1, act, conv2 in pairs:
            if act.op_type == "Clip":
                m = seen.get(conv1.outputs[0].name)
                w1 = conv1.inputs[1]
                if m is None or not _is_weight(w1) or m.shape[0] != w1.const_value.shape[0]:
                    self.decline("CLE: Clip input not observed per channel in calibration", act)
                    continue
                scale[id(act)] = np.ones(m.shape[0], np.float64)
            usable.append((conv1, act, conv2))
        changed = False
        for _round in range(3):
            n = 0
            for conv1, act, conv2 in usable:
                s = self._equalize(conv1, conv2)
                if s is not None:
                    n += 1
                    if id(act) in scale:
                        scale[id(act)] *= s
            if not n:
                break
            changed = True
            if _round == 0:
                self.count("cle_pairs", n)
        for conv1, act, conv2 in usable:
            if id(act) in scale and not np.allclose(scale[id(act)], 1.0):
                self._rebound_clip(conv1, act, conv2, scale[id(act)], seen[conv1.outputs[0].name])
        return changed

    def _channel_max(self, model: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
        """Per-channel (axis 1) maximum of each tensor over the calibration data, streamed."""
        from onnxshrink.capture import plan_groups

        data = self.context.data
        limit = min(self.options.samples, data.num_samples)
        out: dict[str, np.ndarray] = {}
        try:
            for group in plan_groups(model, names):
                with self.context.capture(model, group) as cap:
                    for batch in cap.run(data, limit=limit, progress=self.context.progress,
                                         label="CLE: per-channel ranges"):
                        for n in group:
                            x = batch[n]
                            if x.ndim < 2 or x.dtype.kind != "f":
                                continue
                            m = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).max(axis=1).astype(np.float64)
                            out[n] = m if n not in out else np.maximum(out[n], m)
        except (RuntimeError, ValueError):
            return {}
        return out

    def _rebound_clip(self, conv1: ir.Node, act: ir.Node, conv2: ir.Node, s: np.ndarray, seen: np.ndarray) -> None:
        """Give the equalized ``Clip(0, M)`` one new bound ``C`` that keeps the pair exact on the data.

        Channel ``i`` now holds ``x_i / s_i`` and needs the bound ``M / s_i``. Channels the Clip cut in
        calibration (``max x_i ≥ M``) get ``s_i := M / C`` (rescaled once more, exactly), so ``C`` is their
        bound; the others stayed below ``M`` and ``C ≥ max x_i / s_i`` never cuts them on such inputs.
        """
        bound = _clip_bound(act)
        assert bound is not None
        c = float(np.max(np.minimum(seen, bound) / s))
        if not (c > 0 and math.isfinite(c)):
            return
        active = seen >= bound
        target = np.where(active, bound / c, s)
        t = (target / s).astype(np.float64)
        if not np.allclose(t, 1.0):
            self._scale_pair(conv1, conv2, t)
        graph = act.graph
        act.replace_input_with(2, self._new_init(graph, self._short("clip"), np.array(c, np.float32)))
        self.count("cle_clip_rebounded")

    def _equalize(self, conv1: ir.Node, conv2: ir.Node) -> np.ndarray | None:
        w1v, w2v = conv1.inputs[1], conv2.inputs[1]
        b1v = conv1.inputs[2] if len(conv1.inputs) > 2 else None
        for v in (w1v, w2v, b1v):
            if v is not None and (not _is_weight(v) or len(v.uses()) != 1):
                return None
        w1, w2 = w1v.const_value.numpy(), w2v.const_value.numpy()
        c = w1.shape[0]
        g2 = _attr(conv2, "group", 1)
        cpg2 = w2.shape[1]
        if cpg2 * g2 != c:
            return None
        r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
        opg2 = w2.shape[0] // g2
        # input channel i of conv2 is column (i % cpg2) of the output channels of its group
        r2 = np.zeros(c, np.float32)
        for i in range(c):
            g = i // cpg2
            r2[i] = np.abs(w2[g * opg2:(g + 1) * opg2, i % cpg2]).max()
        ok = (r1 > 0) & (r2 > 0)
        s = np.ones(c, np.float64)
        s[ok] = np.sqrt(r1[ok] / r2[ok])
        if np.allclose(s, 1.0, rtol=1e-3):
            return None
        self._scale_pair(conv1, conv2, s)
        return s

    def _scale_pair(self, conv1: ir.Node, conv2: ir.Node, s: np.ndarray) -> None:
        """Output channel i of Conv₁ (weights, bias) ÷ sᵢ, input channel i of Conv₂ × sᵢ."""
        w1v, w2v = conv1.inputs[1], conv2.inputs[1]
        b1v = conv1.inputs[2] if len(conv1.inputs) > 2 else None
        w1, w2 = w1v.const_value.numpy(), w2v.const_value.numpy()
        c, cpg2 = w1.shape[0], w2.shape[1]
        opg2 = w2.shape[0] // (c // cpg2)
        w1n = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
        w2n = w2.astype(np.float64)
        for i in range(c):
            g = i // cpg2
            w2n[g * opg2:(g + 1) * opg2, i % cpg2] *= s[i]
        w1v.const_value = ir.tensor(w1n.astype(np.float32), name=w1v.name)
        w2v.const_value = ir.tensor(w2n.astype(np.float32), name=w2v.name)
        if b1v is not None:
            b1v.const_value = ir.tensor((b1v.const_value.numpy() / s).astype(np.float32), name=b1v.name)

    # static: QLinear ops ----------------------------------------------------------------------------

    def _to_qop(self, model: ir.Model) -> None:
        graph = model.graph
        for node in list(graph):
            if not _is_onnx(node, "Conv", "MatMul", "Add"):
                continue
            out = node.outputs[0]
            consumer = _sole_consumer(out)
            relu = None
            if consumer is not None and _is_onnx(consumer, "Relu", "Clip") and not out.is_graph_output():
                relu, consumer = consumer, _sole_consumer(consumer.outputs[0])
            if consumer is None or not _is_onnx(consumer, "QuantizeLinear") or out.is_graph_output():
                continue
            if relu is not None:
                zp = _const_array(consumer.inputs[2])
                if zp is None or zp.dtype != np.uint8 or int(zp) != 0:
                    continue  # the Q saturates at 0 only when its zero point is the minimum
                if relu.op_type == "Clip":
                    lo = _const_array(relu.inputs[1]) if len(relu.inputs) > 1 and relu.inputs[1] is not None else None
                    hi = _const_array(relu.inputs[2]) if len(relu.inputs) > 2 and relu.inputs[2] is not None else None
                    qs = _const_array(consumer.inputs[1])
                    if lo is None or float(lo) != 0.0 or hi is None or qs is None or float(qs) * 255 > float(hi) + 1e-6:
                        continue
            ins = [_dq_parts(v) for v in node.inputs[:2]]
            if any(p is None for p in ins):
                continue
            ins = [(q, sc, zp if zp is not None else self._zero(graph, q.dtype)) for q, sc, zp in ins]
            yq = consumer.outputs[0]
            ys, yz = consumer.inputs[1], consumer.inputs[2]
            (aq, as_, az), (bq, bs, bz) = ins
            if node.op_type == "Conv":
                bias = None
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    bp = _dq_parts(node.inputs[2])
                    if bp is None:
                        continue
                    bias = bp[0]
                new = self._node("QLinearConv", [aq, as_, az, bq, bs, bz, ys, yz] + ([bias] if bias is not None else []),
                                 dict(node.attributes), name=f"{node.name}_quant",
                                 outputs=[ir.Value(name=None)])
            elif node.op_type == "MatMul":
                if bs.shape is not None and len(bs.shape) > 1:
                    continue
                new = self._node("QLinearMatMul", [aq, as_, az, bq, bs, bz, ys, yz], name=f"{node.name}_quant",
                                 outputs=[ir.Value(name=None)])
            else:
                if (as_.shape is not None and len(as_.shape) > 0) or (bs.shape is not None and len(bs.shape) > 0):
                    continue
                new = self._node("QLinearAdd", [aq, as_, az, bq, bs, bz, ys, yz], domain=_MS,
                                 name=f"{node.name}_quant", outputs=[ir.Value(name=None)])
                model.opset_imports.setdefault(_MS, 1)
            graph.insert_before(node, [new])
            new.outputs[0].dtype = yq.dtype
            new.outputs[0].shape = yq.shape
            name = yq.name
            yq.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            graph.remove(consumer, safe=True)
            if relu is not None:
                graph.remove(relu, safe=True)
            graph.remove(node, safe=True)
            new.outputs[0].name = name
            self.count(f"qop_{new.op_type}")
        # Q(DQ(x)) with equal parameters is x
        for node in list(graph):
            if not _is_onnx(node, "QuantizeLinear"):
                continue
            src = node.inputs[0].producer() if node.inputs[0] is not None else None
            if src is None or not _is_onnx(src, "DequantizeLinear"):
                continue
            if _same_qparams(src, node):
                node.outputs[0].replace_all_uses_with(src.inputs[0], replace_graph_outputs=False)
                if not node.outputs[0].is_graph_output():
                    graph.remove(node, safe=True)
        self._remove_unused(model)

    # static: accuracy-driven fallback ---------------------------------------------------------------

    def _zero(self, graph: ir.Graph, dtype: ir.DataType) -> ir.Value:
        """A shared scalar zero point of ``dtype`` (QLinear ops require one; 0 for symmetric weights)."""
        if dtype not in self._zeros:
            self._zeros[dtype] = self._new_init(graph, f"zero_{dtype.name.lower()}",
                                                np.zeros((), dtype.numpy()))
        return self._zeros[dtype]

    def _replace(self, node: ir.Node, slot: int, new: ir.Value) -> None:
        """Rewire ``node``'s input ``slot`` and remember the float original (for fallback)."""
        rec = self._restore.setdefault(id(node), (node, {}))[1]
        if slot not in rec:
            rec[slot] = [node.inputs[slot] if slot < len(node.inputs) else None, None]
        rec[slot][1] = new
        node.replace_input_with(slot, new)

    def _set_float(self, node: ir.Node, use_float: bool) -> None:
        for slot, (orig, quant) in self._restore[id(node)][1].items():
            target = orig if use_float else quant
            if target is not None and target.const_value is not None and target.graph is None:
                node.graph.register_initializer(target)
            node.replace_input_with(slot, target)

    def _fallback(self, model: ir.Model) -> None:
        """Fall back the fewest, most sensitive layers to float until the drop is within ``max_drop``."""
        o = self.options
        ref = self._reference
        layers = [node for node, _ in self._restore.values()
                  if node.graph is model.graph and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")]
        drop = self._score(model, ref)
        report: dict[str, Any] = {"metric": ref["metric"], "budget": o.max_drop, "drop_all_int8": round(drop, 6)}
        fallen: list[str] = []
        if drop > o.max_drop:
            sens = []
            for i, node in enumerate(layers):
                self._set_float(node, True)
                sens.append((drop - self._score(model, ref), i))
                self._set_float(node, False)
                if self.context.progress:
                    self.context.progress("ranking layer sensitivity", i + 1, len(layers))
            sens.sort(key=lambda t: (-t[0], t[1]))
            for gain, i in sens:
                node = layers[i]
                self._set_float(node, True)
                fallen.append(node.name or node.op_type)
                drop = self._score(model, ref)
                self.count("layers_float_fallback")
                if drop <= o.max_drop:
                    break
        report["drop_final"] = round(drop, 6)
        report["float_layers"] = fallen
        report["met"] = bool(drop <= o.max_drop)
        self.details["max_drop"] = report
        if not report["met"]:
            self.decline("max_drop not met even with every layer in float")

    def _score(self, model: ir.Model, ref: dict[str, Any]) -> float:
        """The drop of ``model`` against the float reference, in the metric's units."""
        outs = _run_outputs(self.context, model, self.options.samples)
        return _drop(ref, outs, self.context)


def _applicability(model: ir.Model) -> str:
    n, nbytes = 0, 0
    for node in _all_nodes(model):
        if _is_onnx(node, *WEIGHT_OPS):
            for v in node.inputs[:3 if node.op_type in RECURRENT_OPS else 2]:
                if v is not None and v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT:
                    n += 1
                    nbytes += v.const_value.nbytes
    if not n:
        return "no float Conv/Gemm/MatMul/LSTM/GRU/RNN weights to quantize"
    return f"{n} Conv/Gemm/MatMul/LSTM/GRU/RNN weight(s), {nbytes:,} B float → about {nbytes // 4:,} B int8"


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast",
                "Identity", "Expand", "Neg", "Max", "Min", "Clip"}


_SCALE_OPS = {"Mul", "Div"}  # by a constant: stride/anchor scaling (a bias Add alone is not decoding)
_PASS_OPS = _ELEMENTWISE | {"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "Relu", "Split", "Slice", "Concat",
                            "Flatten", "Gather", "Exp", "Pow", "Sqrt", "Abs", "Clip"}


def _output_heads(graph: ir.Graph, decode_only: bool) -> dict[str, ir.Node]:
    """Conv/Gemm/MatMul nodes with a constant weight whose output reaches a graph output through no other
    weighted node — the heads. With ``decode_only``, only those whose path to the output scales by a
    constant (stride/anchor ``Mul``/``Div``) or takes a ``Pow``/``Exp``: their outputs are decoded into
    coordinates (or de-standardized values), where int8 rounding of the head's input becomes pixels of
    box error. A bias ``Add`` alone does not count."""
    heads: dict[str, ir.Node] = {}
    for i, node in enumerate(graph):
        if not _is_onnx(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if len(node.inputs) < 2 or not _is_weight(node.inputs[1]):
            continue
        stack, seen = [node.outputs[0]], set()
        reaches, decodes, pure = False, False, True
        while stack and pure:
            v = stack.pop()
            reaches |= v.is_graph_output()
            for user, _slot in v.uses():
                if id(user) in seen:
                    continue
                seen.add(id(user))
                if not _is_onnx(user, *_PASS_OPS):
                    pure = False  # another weighted (or unknown) op reads it: not a head
                    break
                if user.op_type in ("Pow", "Exp") or (user.op_type in _SCALE_OPS and any(
                        v2 is not None and v2.const_value is not None and v2.const_value.size > 0
                        for v2 in user.inputs)):
                    decodes = True
                stack.extend(user.outputs)
        if reaches and pure and (decodes or not decode_only):
            heads[node.name or f"#{i}"] = node
    return heads


def _softmax_region(graph: ir.Graph) -> set[int]:
    """Nodes between an attention score and its Softmax (mask/bias adds, scaling): numerically
    sensitive — masks hold huge negatives or -inf that no 8-bit range represents."""
    region: set[int] = set()
    stack = [n for n in graph if _is_onnx(n, "Softmax", "LogSoftmax")]
    while stack:
        node = stack.pop()
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) not in region and _is_onnx(p, *_ELEMENTWISE):
                region.add(id(p))
                stack.append(p)
    return region


def _is_activation(v: ir.Value | None) -> bool:
    """A float tensor computed at run time (not a constant)."""
    if v is None or v.const_value is not None:
        return False
    if v.is_graph_input():
        return v.dtype == ir.DataType.FLOAT
    p = v.producer()
    if p is not None and _is_onnx(p, "DequantizeLinear", "Constant"):
        return False
    return v.dtype == ir.DataType.FLOAT


def _clip_bound(node: ir.Node) -> float | None:
    """M for a ``Clip(x, 0, M)`` with constant inputs (opset ≥ 11 form), else None."""
    if "min" in node.attributes or "max" in node.attributes or len(node.inputs) < 3:
        return None
    lo, hi = _const_array(node.inputs[1]), _const_array(node.inputs[2])
    if lo is None or hi is None or lo.size != 1 or hi.size != 1 or float(lo) != 0.0:
        return None
    m = float(hi)
    return m if m > 0 and math.isfinite(m) else None


def _is_silu(node: ir.Node) -> bool:
    """``Mul(x, Sigmoid(x))`` (SiLU/Swish as exported), either operand order."""
    if len(node.inputs) != 2 or not all(_is_activation(v) for v in node.inputs):
        return False
    for a, b in (node.inputs, node.inputs[::-1]):
        p = b.producer()
        if p is not None and _is_onnx(p, "Sigmoid") and p.inputs[0] is a:
            return True
    return False


def _sole_consumer(v: ir.Value) -> ir.Node | None:
    uses = v.uses()
    if len(uses) != 1 or v.is_graph_output():
        return None
    return uses[0][0]


def _dq_parts(v: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(quantized, scale, zero point) of the DequantizeLinear producing ``v``."""
    p = v.producer() if v is not None else None
    if p is None or not _is_onnx(p, "DequantizeLinear") or "block_size" in p.attributes:
        return None
    return p.inputs[0], p.inputs[1], (p.inputs[2] if len(p.inputs) > 2 else None)


def _dq_scale(v: ir.Value | None) -> np.ndarray | None:
    parts = _dq_parts(v)
    return None if parts is None else _const_array(parts[1])


def _same_qparams(dq: ir.Node, q: ir.Node) -> bool:
    a = [_const_array(x) for x in dq.inputs[1:3]]
    b = [_const_array(x) for x in q.inputs[1:3]]
    if any(x is None for x in a + b):
        return False
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and a[1].dtype == b[1].dtype and np.array_equal(
        a[1], b[1])


def _infer_shapes(model: ir.Model, context: Any) -> None:
    if context is not None and context.cache.get("shapes_current"):
        return
    from onnxshrink.model import infer_shapes

    try:
        infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is best effort; capture refuses untyped values
        logger.debug("shape inference failed: %s", e)


def _calib_key(model: ir.Model, names: list[str], data: Any, samples: int) -> str:
    """Hash of what calibration statistics depend on: the graph, its weights, the tensors, the data."""
    h = hashlib.sha256()
    for node in model.graph:
        h.update(f"{node.domain}:{node.op_type}:{[v.name if v else '' for v in node.inputs]}:"
                 f"{[v.name for v in node.outputs]}:{sorted((k, repr(a.value)) for k, a in node.attributes.items() if a.type != ir.AttributeType.GRAPH)}".encode())
    for name, v in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if v.const_value is not None:
            h.update(v.const_value.tobytes())
    h.update(repr(names).encode())
    h.update(str(samples).encode())
    for i, sample in enumerate(data.samples(samples)):
        for k in sorted(sample):
            h.update(k.encode())
            h.update(np.ascontiguousarray(sample[k]).tobytes())
    return h.hexdigest()[:32]


def _run_outputs(context: Any, model: ir.Model, samples: int) -> list[np.ndarray]:
    """The first output of ``model`` for every sample of the context's data, one array per batch."""
    data = context.data
    first = model.graph.outputs[0].name
    with context.capture(model, [], with_outputs=True) as cap:
        chunks = [np.asarray(b[first]) for b in cap.run(data, limit=min(samples, data.num_samples))]
    return chunks


def _reference(outs: list[np.ndarray], metric: str, context: Any) -> dict[str, Any]:
    labels = getattr(context, "labels", None)
    y = np.concatenate([o.reshape(len(o), -1) if o.ndim > 1 else o.reshape(1, -1) for o in outs])
    if metric == "auto":
        if labels is not None:
            metric = "accuracy"
        elif y.ndim == 2 and y.shape[1] > 1 and outs[0].ndim == 2:
            metric = "top1"
        else:
            metric = "cosine"
    if metric == "accuracy" and labels is None:
        raise UsageError("metric=accuracy needs --labels", option="metric", pass_name="quant",
                         hint="give --labels labels.npy, or metric=top1")
    ref = {"metric": metric, "y": y}
    if metric == "accuracy":
        lab = np.asarray(labels).reshape(-1)[: len(y)]
        ref["labels"] = lab
        ref["acc"] = float(np.mean(y.argmax(axis=1) == lab)) * 100
    return ref


def _drop(ref: dict[str, Any], outs: list[np.ndarray], context: Any) -> float:
    y = ref["y"]
    c = np.concatenate([o.reshape(len(o), -1) if o.ndim > 1 else o.reshape(1, -1) for o in outs])
    m = ref["metric"]
    if m == "top1":
        return float(100.0 - np.mean(c.argmax(axis=1) == y.argmax(axis=1)) * 100)
    if m == "accuracy":
        return float(ref["acc"] - np.mean(c.argmax(axis=1) == ref["labels"]) * 100)
    if m == "cosine":
        num = np.sum(y * c, axis=1)
        den = np.linalg.norm(y, axis=1) * np.linalg.norm(c, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        return float(1.0 - np.mean(cos))
    return float(np.linalg.norm(y - c) / max(np.linalg.norm(y), 1e-30))


def _append_input(node: ir.Node, value: ir.Value) -> None:
    node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(len(node.inputs) - 1, value)
