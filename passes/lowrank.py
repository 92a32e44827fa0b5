"""lowrank: split Gemm/MatMul/Conv layers into two (or three) smaller ones, with a data-aware rank choice.

**The split.** Every candidate is viewed as one or more matrices acting on the right of its input,
``y = x · W_g`` with ``W_g`` of shape ``[d_in, d_out]`` (one per convolution group). A rank-``r``
factorization ``W_g ≈ A_g · B_g`` (``A_g [d_in, r]``, ``B_g [r, d_out]``) becomes two nodes:

* ``MatMul(x, W)`` (weight ``[K, N]`` on the right, ``x`` of any rank ≥ 1) → ``MatMul(MatMul(x, A), B)``;
* ``MatMul(W, x)`` (weight ``[M, K]`` on the left, batched ``x [..., K, N]``) → ``MatMul(Bᵀ, MatMul(Aᵀ, x))``;
* ``Gemm(a, b, c)`` with a constant ``b`` → ``Gemm(Gemm(a, A; transA), B, c; beta)``; with a constant ``a``
  → ``Gemm(Bᵀ, Gemm(Aᵀ, b; transB), c; beta)``. ``alpha`` is folded into the factors, the bias ``c``
  (and ``beta``) stays on the second node (a refitted bias replaces it, ``beta`` 1);
* ``Conv`` ``[M, C/g, *k]`` → a ``Conv`` with the same kernel size, strides, pads, dilations, auto_pad and
  groups but ``g·r`` outputs, then a 1×1 ``Conv`` (groups ``g``) to ``M`` channels with the bias (channel
  decomposition; each group ``g`` has its own factors, ``W_g`` is the group's ``[M/g, C/g·kh·kw]`` kernel
  transposed). Depthwise convolutions (one input channel per group) are skipped.
* ``tucker=true``: a ``group=1`` k×k ``Conv`` becomes the Tucker-2 sandwich 1×1 (``C → r_in``) → k×k
  core (``r_in → r_out``, original strides/pads/dilations) → 1×1 (``r_out → M``, with the bias); factors by
  HOSVD of the kernel's two channel modes refined by two HOOI sweeps. Tucker-2 is data-free.

**Data-aware factors (``method=asvd``, the default when ``--data`` is given).** Plain SVD minimises
``‖W − AB‖_F``, which ignores which input directions the data uses. With the input activations ``X``
(rows = the vectors the weight multiplies: tokens for MatMul, batch rows for Gemm, im2col patches for
Conv), the output error is ``‖X(W − AB)‖_F = ‖S(W − AB)‖_F`` where ``S = (XᵀX)^½`` (symmetric square
root). So the SVD of the *whitened* weight ``S·W = UΣVᵀ`` truncated to ``r`` gives the optimal factors
``A = S⁻¹·U_r·Σ_r^½``, ``B = Σ_r^½·V_rᵀ``, and the discarded ``Σσ²`` is exactly the output energy lost
on the calibration data (the truncation-aware whitening of SVD-LLM; ASVD's diagonal scaling is the
special case of a diagonal ``S``). ``XᵀX`` is accumulated in float64 batch by batch while
onnxruntime streams the data through :class:`~onnxshrink.capture.ActivationCapture` (memory ``d×d`` per
layer input, never the samples), then damped: ``XᵀX + damping·mean(diag)·I``. For Conv the statistic
is the **im2col patch covariance** (``C/g·kh·kw`` square per group, padding zeros included), i.e. exact
for the k×k→1×1 split; convolutions whose patch is longer than ``MAX_PATCH_DIM`` fall back to plain SVD
(declined with that reason).

**Refit (``refit=rrr``, the default with asvd).** Truncating each layer on its own ignores that the layers
before it were truncated too, and per-layer errors compound (thin 1×1 convolutions at rank 8 have relative
output errors of 0.2–0.6 each). Once the ranks are chosen, every split is fitted again, in graph order, on
the inputs ``x`` that the model *with the splits before it* feeds it, against the outputs ``y = o·W + b``
of the original layer on the original inputs ``o`` (same calibration samples): reduced-rank regression —
the ridge solution ``W* = (Cxx + λI)⁻¹·(Cxy + λW)`` (shrunk towards the original weight, so directions the
data does not reach keep it) projected on the top ``r`` eigenvectors ``V`` of the fitted outputs'
covariance ``W*ᵀ·Cxx·W*``, ``A·B = W*·V·Vᵀ``. Where the layer has a bias slot (Conv, Gemm with the
weight on the right and a per-output or no ``C``) the covariances are centred and a new bias is fitted
(one is added where there was none); MatMul keeps none. Only sums are streamed (``Σxxᵀ``, ``Σxyᵀ``,
``Σx``, ``Σy``, ``Σ‖y‖²``: ``d² + d·m`` per fold of the layer being fitted, never the samples), from one
onnxruntime session in which every candidate's weight and bias can be replaced. The batches are split by parity into two folds: the
ridge ``λ = ridge·100^k·mean(diag Cxx)`` (k < ``RIDGE_STEPS``) is chosen by cross-fitting (fitted on one
fold, the error measured on the other), and the refit is kept only if that held-out error is below the
SVD factors' error — a layer with fewer calibration rows than inputs would otherwise memorise them (counted
as ``refit_kept_plain``). A layer whose input no split changes is fitted from its activation statistics
(there ``W* = W`` and the fit is the centred whitened SVD plus a bias correction). Tucker layers and layers
without statistics keep their factors. The report gives each refitted layer's ``refit_error``: its
relative output error on the calibration rows with the SVD factors and with the refit (held-out).

**Rank choice** (ranks are multiples of ``round_to``; exactly one mode applies):

* ``rank=N`` (N > 0): the same rank for every layer (testing, or a known target).
* ``budget=B`` (B > 0, needs data): ``B`` is the largest allowed relative L2 error of the model outputs
  on the first ``samples`` samples of ``--data``. Every layer's sensitivity is *measured*: onnxruntime
  runs the whole model with only that layer's weight replaced by its rank-r reconstruction (one session;
  the weight is fed as an overridable initializer) for up to 8 candidate ranks per layer. Ranks are then
  allocated greedily by the smallest error increase per unit saved, assuming independent errors add in
  squares (``E² ≈ Σ e_l²``), and the final choice is measured with every split at once; while it is over
  budget the last allocation steps are undone. ``objective=params|macs|both`` says what a step saves
  (default both: the sum of its fractions of the candidates' total parameters and MACs). With refit the
  sensitivities are those of the refitted layer alone, and since later refits absorb earlier errors the
  sum of squares overstates the error: the greedy steps are walked without that cap and each is kept
  only if the *measured* error, refitting every split from the changed layer on, stays within ``B``
  (the steps the sum allows are tried at once first, halved while over budget; a layer whose step is
  refused gets no lower rank). That error is cross-fitted — splits refitted on the even batches,
  measured on the odd ones and vice versa (``budget_heldout_error_ppm``) — so that a refit cannot pass
  by memorising its rows; the choice is then refitted on all batches and measured on them
  (``budget_error_ppm`` ≤ ``B``; steps are undone while it is not).
* ``ratio=P`` (0 < P < 1): every layer keeps the largest rank whose parameters are ≤ ``(1−P)`` of the
  original (P = fraction of parameters removed per split layer, as in ``prune(ratio=)``).
* otherwise ``energy=E`` (default 0.95): the smallest rank keeping a fraction ``E`` of the squared
  singular values — of the whitened weight under asvd, i.e. a fraction E of the layer's output energy on
  the data. ``energy`` is ignored when ``rank``, ``budget`` or ``ratio`` is set.

**When a split is kept.** Only where it reduces both parameters and MACs by at least ``min_saving`` of
the layer (a split at rank ``r`` costs ``r·(d_in + d_out)`` instead of ``d_in·d_out``), and, with
``min_speedup=s`` (s > 0), only where the layer alone runs at least ``s`` times faster in onnxruntime on
the CPU (a one-layer model before and after, dynamic dims set to 1, timed in interleaved rounds, best
per-run time of each, so other load on the machine hurts both alike). Every candidate layer is
listed in the stats (``stats["layers"]``): name, op, weight shape, rank, parameters and MACs saved, the
estimated local error, measured latencies, and the reason it was kept or declined.

**Preconditions.** Float weights (float32/float64/float16) that are initializers (not graph inputs) or
``Constant`` nodes, 2-D for Gemm/MatMul; a weight used by any other node is never changed (declined). Only
the main graph is rewritten. Factors are new initializers, so a later ``quant`` quantizes them like any
weight (``lowrank`` must precede ``quant``).

**Tolerance.** The split is exact at full rank (rel. L2 ≤ 1e-5, tested), and lossy by design below it.
The default validation tolerance is 0.25 relative L2 (cosine ≈ 0.97): far below the error of a broken
rewrite (a wrong transpose or axis gives ≈ 1–1.4) yet loose enough for energy/ratio choices that make no
promise about the outputs. With ``budget=B`` the pass promises ``B`` on the calibration samples, so the
tolerance is ``max(1.5·B, 1e-5)`` (the margin covers validation samples beyond the calibration subset).
``--tol`` overrides both.

**Cost.** Refit runs the model once per split layer (twice per calibration batch: with the splits, and
the original, whose activations are kept up to ``ORIG_CACHE_BYTES``); budget mode does that for every
accepted or refused step from the changed layer on. The small solves run with one BLAS thread when
``threadpoolctl`` is installed (see :func:`_one_blas_thread`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxshrink.errors import UsageError
from onnxshrink.model import constant_value, taken_names, unique_name
from onnxshrink.registry import ShrinkPass, option, register

__all__ = ["LowrankOptions", "LowrankPass", "MAX_PATCH_DIM"]

logger = logging.getLogger(__name__)

#: Longest im2col patch (``C/g·kh·kw``) whose covariance is accumulated for asvd; longer ones use plain SVD.
MAX_PATCH_DIM = 4608
#: Interleaved timing rounds per layer for ``min_speedup`` (best per-run time of each model is kept).
LATENCY_ROUNDS = 9
#: Most candidate ranks per layer whose sensitivity is measured in budget mode.
MAX_PROBES = 8
#: Ridge candidates of the refit (``ridge·100^k``, k < RIDGE_STEPS), chosen by cross-fitting.
RIDGE_STEPS = 4
#: Bytes of original-model activations kept between refit runs (beyond it they are computed again).
ORIG_CACHE_BYTES = 128 << 20
_ONNX = ("", "ai.onnx")
_ROW_KEYS = ("layer", "op", "shape", "rank", "params", "params_saved", "macs", "macs_saved", "local_error",
             "output_error", "refit_error", "latency_ms", "method", "reason")
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16}


@dataclasses.dataclass(frozen=True)
class LowrankOptions:
    """Options of the lowrank pass. Rank mode: ``rank`` > ``budget`` > ``ratio`` > ``energy`` (0 = unset)."""

    energy: float = option(0.95, "kept fraction of squared singular values (used when rank, budget and ratio are 0)")
    ratio: float = option(0.0, "fraction of each split layer's parameters to remove (0: unset)")
    budget: float = option(0.0, "largest relative L2 error of the outputs on --data, spread by measured sensitivity (0: unset)")
    rank: int = option(0, "the same rank for every layer (0: unset)")
    method: Literal["auto", "svd", "asvd"] = option(
        "auto", "svd: weights only; asvd: whitened by activation covariance from --data; auto: asvd with data")
    round_to: int = option(8, "ranks are multiples of this")
    tucker: bool = option(False, "k×k group-1 Conv as a Tucker-2 sandwich 1×1 → k×k → 1×1 instead of k×k → 1×1")
    min_saving: float = option(0.1, "keep a split only if it removes at least this fraction of the layer's params and MACs")
    min_speedup: float = option(0.0, "keep a split only if the layer runs this many times faster in ORT CPU (0: not measured)")
    objective: Literal["both", "params", "macs"] = option(
        "both", "what budget mode saves first: parameters, MACs, or both (fractions of the candidates' totals)")
    samples: int = option(128, "calibration samples used for activation statistics, sensitivity and refit")
    damping: float = option(0.01, "diagonal loading of the activation covariance, relative to its mean diagonal")
    ridge: float = option(1e-4, "ridge of the refit's least squares, relative to the mean diagonal of XᵀX")
    refit: Literal["auto", "rrr", "none"] = option(
        "auto", "rrr: refit each split (factors and bias), in graph order, from the inputs the compressed model "
        "feeds it to the original layer's outputs (reduced-rank regression on --data); auto: rrr with asvd")

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError("energy must be in (0, 1]")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        if self.budget < 0:
            raise ValueError("budget must be >= 0")
        if self.rank < 0:
            raise ValueError("rank must be >= 0")
        if sum(bool(x) for x in (self.ratio, self.budget, self.rank)) > 1:
            raise ValueError("give at most one of rank, budget, ratio (energy applies when none is set)")
        if self.round_to < 1:
            raise ValueError("round_to must be >= 1")
        if not 0.0 <= self.min_saving < 1.0:
            raise ValueError("min_saving must be in [0, 1)")
        if self.min_speedup < 0:
            raise ValueError("min_speedup must be >= 0")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.damping < 0:
            raise ValueError("damping must be >= 0")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")

    @property
    def mode(self) -> str:
        """The rank mode in force: ``rank``, ``budget``, ``ratio`` or ``energy``."""
        if self.rank:
            return "rank"
        if self.budget:
            return "budget"
        if self.ratio:
            return "ratio"
        return "energy"


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread while the refit does its many small solves and eigendecompositions: threaded BLAS
    is slower on small matrices, and several times slower on a loaded machine (bert_tiny budget mode: 45 s
    vs 8 s on 2 shared cores). Uses ``threadpoolctl`` (a dependency); if it is missing nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# -- candidates -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    node: ir.Node
    kind: str  # mm_right | mm_left | gemm_right | gemm_left | conv | tucker
    w_index: int
    act_index: int
    wshape: tuple[int, ...]
    groups: int
    d_in: int
    d_out: int  # per group
    rows: int  # output rows per sample (dynamic dims = 1): MACs = rows · params for SVD splits
    stat_key: tuple | None = None
    # filled later
    wmats: list[np.ndarray] | None = None
    whiten: list[tuple[np.ndarray, np.ndarray] | None] | None = None
    svd: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    ladder: list[tuple[Any, int, int, float]] = dataclasses.field(default_factory=list)
    choice: Any = None
    measured: dict = dataclasses.field(default_factory=dict)
    reason: str = ""
    latency: tuple[float, float] | None = None
    tucker_shapes: tuple | None = None  # (C, M, k, in_spatial, out_spatial)
    bias: str | None = None  # refit may set the bias: "replace" (constant per-output bias), "add" (none yet)
    stats: list[tuple[np.ndarray, np.ndarray]] | None = None  # per group (Σxxᵀ, Σx) of the original inputs
    rows_seen: int = 0  # rows behind ``stats`` (per group)
    fit: _Fit | None = None  # the refitted split (refit=rrr), else factors come from the SVD

    @property
    def name(self) -> str:
        return self.node.name or (self.node.outputs[0].name or "?")

    @property
    def params(self) -> int:
        return self.groups * self.d_in * self.d_out if self.kind != "tucker" else int(np.prod(self.wshape))

    @property
    def macs(self) -> int:
        if self.kind == "tucker":
            c, m, k, _, so = self.tucker_shapes
            return so * m * c * k
        return self.rows * self.params

    def cost(self, cfg: Any) -> tuple[int, int]:
        """Parameters and MACs of the split at ``cfg`` (a rank, or (r_in, r_out) for Tucker)."""
        if self.kind == "tucker":
            c, m, k, si, so = self.tucker_shapes
            r1, r2 = cfg
            return c * r1 + r1 * r2 * k + r2 * m, si * c * r1 + so * (r1 * r2 * k + r2 * m)
        p = self.groups * cfg * (self.d_in + self.d_out)
        return p, self.rows * p


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]


def _static(value: ir.Value | None) -> bool:
    return value is not None and value.shape is not None and all(isinstance(d, int) for d in value.shape)


def _conv_pads(node: ir.Node, in_sp: list[int] | None, k: list[int], strides: list[int], dil: list[int]) -> list[int] | None:
    nd = len(k)
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = node.attributes.get_ints("pads", None)
        return list(pads) if pads is not None else [0] * (2 * nd)
    if auto == "VALID":
        return [0] * (2 * nd)
    if in_sp is None:
        return None
    begin, end = [], []
    for i in range(nd):
        out = -(-in_sp[i] // strides[i])
        total = max((out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - in_sp[i], 0)
        small, big = total // 2, total - total // 2
        if auto == "SAME_UPPER":
            begin.append(small), end.append(big)
        else:
            begin.append(big), end.append(small)
    return begin + end


# -- math ------------------------------------------------------------------------------------------------


def _whitener(cov: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric square root of the damped covariance and its inverse."""
    d = cov.shape[0]
    cov = (cov + cov.T) / 2
    mean_diag = float(np.trace(cov)) / d if d else 0.0
    if mean_diag <= 0:
        mean_diag = 1.0
    cov = cov + (damping * mean_diag + 1e-12 * mean_diag) * np.eye(d)
    lam, q = np.linalg.eigh(cov)
    lam = np.maximum(lam, 1e-12 * mean_diag)
    root = np.sqrt(lam)
    return (q * root) @ q.T, (q / root) @ q.T


def _factors(layer: _Layer, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group (A [d_in, r], B [r, d_out]) with A·B the best rank-r approximation (whitened if asvd)."""
    out = []
    for g, (u, s, vt) in enumerate(layer.svd):
        r_g = min(r, len(s))
        sq = np.sqrt(s[:r_g])
        a = u[:, :r_g] * sq
        b = sq[:, None] * vt[:r_g]
        w = layer.whiten[g] if layer.whiten else None
        if w is not None:
            a = w[1] @ a
        if r_g < r:  # pad with zeros (rank above the matrix rank): keeps every group's rank equal
            a = np.concatenate([a, np.zeros((a.shape[0], r - r_g))], axis=1)
            b = np.concatenate([b, np.zeros((r - r_g, b.shape[1]))], axis=0)
        out.append((a, b))
    return out


@dataclasses.dataclass
class _Fit:
    """A split fitted by reduced-rank regression (refit=rrr)."""

    factors: list[tuple[np.ndarray, np.ndarray]]  # per group (A [d_in, r], B [r, d_out])
    bias: np.ndarray | None  # the new bias of all outputs (None: the node's own bias stays)
    error: tuple[float, float]  # relative layer output error on the calibration rows: SVD factors, refit
    arrays: tuple[np.ndarray, np.ndarray | None] | None = None  # weight and bias as probe overrides (cached)


class _Moments:
    """Sums over calibration rows of one group: ``x`` the layer's input in the compressed model and ``y``
    the original layer's output ``o·W + b`` on the same sample (``o``: its input in the original model).
    Memory ``d² + d·m`` floats, whatever the number of rows."""

    def __init__(self, d: int, m: int) -> None:
        self.xx, self.xy = np.zeros((d, d)), np.zeros((d, m))
        self.x, self.y = np.zeros(d), np.zeros(m)
        self.yy = 0.0
        self.n = 0

    @classmethod
    def unchanged(cls, cov: np.ndarray, total: np.ndarray, n: int, w: np.ndarray,
                  b0: np.ndarray | None) -> _Moments:
        """The moments when no split before the layer changes its input (``x = o``), from ``Σooᵀ``, ``Σo``."""
        m = cls.__new__(cls)
        m.xx, m.x, m.n = cov, total, n
        m.xy = cov @ w
        m.y = total @ w
        m.yy = float(np.sum(w * m.xy))
        if b0 is not None:
            m.xy = m.xy + np.outer(total, b0)
            m.yy += 2.0 * float(m.y @ b0) + n * float(b0 @ b0)
            m.y = m.y + n * b0
        return m

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.x += x.sum(axis=0)
        self.y += y.sum(axis=0)
        self.yy += float(np.sum(y * y))
        self.n += x.shape[0]

    def __add__(self, other: _Moments) -> _Moments:
        m = _Moments.__new__(_Moments)
        for k in ("xx", "xy", "x", "y", "yy", "n"):
            setattr(m, k, getattr(self, k) + getattr(other, k))
        return m


def _residual(mo: _Moments, mat: np.ndarray, c: np.ndarray | None) -> float:
    """``Σ‖y − x·mat − c‖²`` over the rows of ``mo`` (``c`` None: no bias), from the sums alone."""
    res = mo.yy - 2.0 * float(np.sum(mat * mo.xy)) + float(np.sum(mat * (mo.xx @ mat)))
    if c is not None:
        res += -2.0 * float(c @ mo.y) + 2.0 * float((mo.x @ mat) @ c) + mo.n * float(c @ c)
    return max(res, 0.0)


def _rrr(mo: _Moments, w: np.ndarray, r: int, ridge: float,
         fit_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reduced-rank regression of the original outputs ``y = o·W + b0`` on the current inputs ``x``.

    Returns ``(A, B, c)``: ``x·A·B + c`` (``c`` None when the bias is not fitted) approximately minimises ``Σ‖y − x·A·B − c‖² + λ‖A·B − W‖²`` over rank-``r``
    products: the ridge solution
    ``W* = (Cxx + λI)⁻¹·(Cxy + λW)`` (shrunk towards the original weight, so directions the data does not
    reach keep it; ``W* = W`` exactly when ``x = o``) projected on the top-``r`` eigenvectors ``V`` of the
    fitted outputs' covariance ``W*ᵀ·Cxx·W*``; ``C`` is centred when the bias is fitted and
    ``λ = ridge·mean(diag Cxx)``. ``A·B = W*·V·Vᵀ`` is split as ``U·S^½``, ``S^½·Qᵀ·Vᵀ`` from the SVD
    ``W*·V = U·S·Qᵀ`` (balanced scales).
    """
    n = max(mo.n, 1)
    if fit_bias:
        cxx = mo.xx - np.outer(mo.x, mo.x) / n
        cxy = mo.xy - np.outer(mo.x, mo.y) / n
    else:
        cxx, cxy = mo.xx, mo.xy
    d, m = w.shape
    mean_diag = float(np.trace(cxx)) / d if d else 0.0
    if mean_diag <= 0:
        mean_diag = 1.0
    lam = ridge * mean_diag + 1e-12 * mean_diag
    reg = cxx + lam * np.eye(d)
    try:
        w_star = np.linalg.solve(reg, cxy + lam * w)
    except np.linalg.LinAlgError:
        w_star = np.linalg.lstsq(reg, cxy + lam * w, rcond=None)[0]
    f = w_star.T @ cxx @ w_star
    _, v = np.linalg.eigh((f + f.T) / 2)
    r_g = min(r, m)
    v = v[:, ::-1][:, :r_g]
    u, s, qt = np.linalg.svd(w_star @ v, full_matrices=False)
    sq = np.sqrt(s)
    a = u * sq
    b = (sq[:, None] * qt) @ v.T
    if r_g < r:
        a = np.concatenate([a, np.zeros((d, r - r_g))], axis=1)
        b = np.concatenate([b, np.zeros((r - r_g, m))], axis=0)
    c = (mo.y - mo.x @ (a @ b)) / n if fit_bias else None
    return a, b, c


def _tail_error(layer: _Layer, r: int) -> float:
    """Relative (whitened) Frobenius error of the rank-r truncation, over all groups."""
    tail = total = 0.0
    for _, s, _ in layer.svd:
        s2 = s.astype(np.float64) ** 2
        total += float(s2.sum())
        tail += float(s2[r:].sum())
    return math.sqrt(tail / total) if total > 0 else 0.0


def _energy_rank(layer: _Layer, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values in every group (met up to 1e-9)."""
    r = 1
    for _, s, _ in layer.svd:
        s2 = s.astype(np.float64) ** 2
        tot = s2.sum()
        if tot <= 0:
            continue
        kept = np.cumsum(s2) / tot
        r = max(r, int(np.searchsorted(kept, energy - 1e-9)) + 1)
    return r


def _tucker(w: np.ndarray, r1: int, r2: int, sweeps: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a kernel ``[M, C, *k]``: (U_in [C, r1], core [r2, r1, *k], U_out [M, r2])."""
    m, c = w.shape[:2]
    w0 = w.reshape(m, -1)
    w1 = np.moveaxis(w, 1, 0).reshape(c, -1)
    u_out = np.linalg.svd(w0, full_matrices=False)[0][:, :r2]
    u_in = np.linalg.svd(w1, full_matrices=False)[0][:, :r1]
    for _ in range(sweeps):
        t = np.einsum("mc...,cr->mr...", w, u_in).reshape(m, -1)
        u_out = np.linalg.svd(t, full_matrices=False)[0][:, :r2]
        t = np.einsum("mc...,ms->cs...", w, u_out).reshape(c, -1)
        u_in = np.linalg.svd(t, full_matrices=False)[0][:, :r1]
    core = np.einsum("mc...,ms,cr->sr...", w, u_out, u_in)
    return u_in, core, u_out


def _tucker_dense(u_in: np.ndarray, core: np.ndarray, u_out: np.ndarray) -> np.ndarray:
    return np.einsum("sr...,ms,cr->mc...", core, u_out, u_in)


def _round_up(r: int, q: int) -> int:
    return int(math.ceil(r / q) * q)


# -- the pass --------------------------------------------------------------------------------------------


@register("lowrank", LowrankOptions, must_precede=("quant",),
          summary="split Gemm/MatMul/Conv into two low-rank layers (activation-aware SVD, Tucker-2)")
class LowrankPass(ShrinkPass):
    """Low-rank split of layers with constant weights; see the module docstring for math and preconditions."""

    tolerance = 0.25

    @classmethod
    def validation_tolerance(cls, options: LowrankOptions) -> float:
        """0.25 rel. L2 in general; ``max(1.5·budget, 1e-5)`` when an output budget is promised."""
        if options.budget:
            return max(1.5 * options.budget, 1e-5)
        return cls.tolerance

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        """How many Gemm/MatMul/Conv layers have a constant, unshared float weight (weights not read)."""
        n = params = 0
        for node in model.graph:
            if node.domain not in _ONNX or node.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            for i in ((0, 1) if node.op_type != "Conv" else (1,)):
                v = node.inputs[i] if len(node.inputs) > i else None
                t = constant_value(v)
                if t is None or t.dtype not in _FLOATS or len(v.uses()) > 1:
                    continue
                shape = [int(d) for d in t.shape.numpy()]
                if node.op_type == "Conv" and len(shape) > 1 and shape[1] == 1 and node.attributes.get_int("group", 1) > 1:
                    continue
                n += 1
                params += int(np.prod(shape))
                break
        if not n:
            return "no Gemm/MatMul/Conv with a constant weight"
        return f"{n} Gemm/MatMul/Conv layer(s) with constant weights ({params:,} params) could be split"

    def run(self, model: ir.Model) -> bool:
        o: LowrankOptions = self.options
        data = self.context.data
        method = o.method
        if method == "auto":
            method = "asvd" if data is not None else "svd"
        if method == "asvd" and data is None:
            raise UsageError("lowrank(method=asvd) needs --data", pass_name=self.name, option="method",
                             hint="give calibration data with --data, or use method=svd")
        if o.mode == "budget" and data is None:
            raise UsageError("lowrank(budget=...) needs --data to measure the output error", pass_name=self.name,
                             option="budget", hint="give --data, or choose ranks by energy= or ratio=")
        refit = o.refit
        if refit == "auto":
            refit = "rrr" if method == "asvd" else "none"
        if refit == "rrr" and data is None:
            raise UsageError("lowrank(refit=rrr) needs --data", pass_name=self.name, option="refit",
                             hint="give calibration data with --data, or use refit=none")
        self._method = method
        self._refit_on = refit == "rrr"
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if not self.context.cache.pop("shapes_current", False):
            try:
                ir_common.ShapeInferencePass(strict_mode=False)(model)
            except Exception as e:  # odd models: fewer shapes known, fewer MACs counted
                logger.debug("lowrank: shape inference failed: %s", e)
        layers = self._candidates(model)
        self.count("candidates", len(layers))
        if not layers:
            return False
        if method == "asvd" or self._refit_on:
            self._collect_stats(model, layers, data, whiten=method == "asvd")
        for layer in layers:
            self._decompose(layer)
        live = [l for l in layers if not l.reason]
        budget_error = None
        if o.mode == "budget":
            with _one_blas_thread() if self._refit_on else contextlib.nullcontext():
                budget_error = self._allocate_budget(model, live, data)
        else:
            for layer in live:
                self._choose(layer)
        live = [l for l in layers if not l.reason]
        fitted = o.mode == "budget"  # the allocation refitted (and measured) its choice
        if o.min_speedup > 0:
            for layer in live:
                self._check_latency(model, layer)
            if any(l.reason for l in live):
                fitted = False  # fewer splits: refit the rest on their new inputs
        live = [l for l in layers if not l.reason]
        if self._refit_on and live and not fitted:
            cfgs = {id(l): l.choice for l in live}
            with _ProbeSession(model, live, data, o.samples, biases=True) as probe, _one_blas_thread():
                fits = self._refit(probe, live, cfgs, {})
                if budget_error is not None:
                    budget_error = probe.error(self._feeds_of(probe, live, cfgs, fits))
            for layer in live:
                layer.fit = fits.get(id(layer))
        if budget_error is not None:
            self.count("budget_error_ppm", int(round(budget_error * 1e6)))
        for layer in live:
            if layer.fit is not None:
                self.count("layers_refit" if layer.fit.error[1] < layer.fit.error[0] else "refit_kept_plain")
        modified = False
        names = taken_names(model.graph)
        for layer in layers:
            if layer.reason:
                continue
            self._emit(model.graph, layer, names)
            modified = True
            p0, m0 = layer.params, layer.macs
            p1, m1 = layer.cost(layer.choice)
            self.count("split")
            self.count(f"split_{layer.node.op_type.lower()}" + ("_tucker" if layer.kind == "tucker" else ""))
            self.count("params_saved", p0 - p1)
            self.count("macs_saved", m0 - m1)
            layer.reason = "split"
        for layer in layers:
            self._record(layer)
        if modified:  # shapes of the new intermediate values (MACs in the report, later passes)
            try:
                ir_common.ShapeInferencePass(strict_mode=False)(model)
            except Exception as e:
                logger.debug("lowrank: shape inference after the split failed: %s", e)
        return modified

    # -- discovery ---------------------------------------------------------------------------------------

    def _decline_layer(self, layer: _Layer, reason: str) -> None:
        layer.reason = reason
        self.decline(reason, layer.node)

    def _candidates(self, model: ir.Model) -> list[_Layer]:
        layers: list[_Layer] = []
        for node in model.graph:
            if node.domain not in _ONNX or node.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            layer = self._classify(node)
            if layer is not None:
                layer.bias = _bias_mode(layer)
                layers.append(layer)
        return layers

    def _skip(self, node: ir.Node, reason: str) -> None:
        self.decline(reason, node)
        row = dict.fromkeys(_ROW_KEYS)
        row.update(layer=node.name or node.outputs[0].name, op=node.op_type, params_saved=0, macs_saved=0,
                   reason=reason)
        self.layers.append(row)

    def _classify(self, node: ir.Node) -> _Layer | None:
        op = node.op_type
        ins = list(node.inputs)
        if op in ("MatMul", "Gemm"):
            if len(ins) < 2 or ins[0] is None or ins[1] is None:
                return None
            consts = [constant_value(v) is not None for v in ins[:2]]
            if all(consts):
                self._skip(node, "both inputs constant (fold it)")
                return None
            if not any(consts):
                self._skip(node, "no constant weight")
                return None
            w_index = 0 if consts[0] else 1
        else:
            if len(ins) < 2 or ins[1] is None:
                return None
            if constant_value(ins[1]) is None:
                self._skip(node, "weight is not constant")
                return None
            w_index = 1
        wv = ins[w_index]
        tensor = constant_value(wv)
        if tensor.dtype not in _FLOATS:
            self._skip(node, f"weight dtype {tensor.dtype.name} is not float")
            return None
        if len(wv.uses()) > 1:
            self._skip(node, "weight shared with another node")
            return None
        wshape = tuple(int(d) for d in tensor.shape.numpy())
        act = ins[1 - w_index] if op != "Conv" else ins[0]
        out = node.outputs[0]
        out_dims = _dims(out)
        if op == "MatMul":
            if len(wshape) != 2:
                self._skip(node, "weight is not 2-D")
                return None
            if w_index == 1:
                k, n = wshape
                rows = int(np.prod(out_dims[:-1])) if out_dims else 1
                return _Layer(node, "mm_right", 1, 0, wshape, 1, k, n, rows, stat_key=(act.name, "last"))
            m, k = wshape
            rows = int(np.prod(out_dims) // m) if out_dims else 1
            return _Layer(node, "mm_left", 0, 1, wshape, 1, k, m, rows, stat_key=(act.name, "cols"))
        if op == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            if self._opset < 11:
                self._skip(node, "Gemm split needs opset >= 11 (optional C)")
                return None
            if alpha == 0:
                self._skip(node, "alpha is 0")
                return None
            ta = node.attributes.get_int("transA", 0)
            tb = node.attributes.get_int("transB", 0)
            if len(wshape) != 2:
                self._skip(node, "weight is not 2-D")
                return None
            if w_index == 1:
                k, n = (wshape[1], wshape[0]) if tb else wshape
                rows = out_dims[0] if out_dims else 1
                return _Layer(node, "gemm_right", 1, 0, wshape, 1, k, n, rows,
                              stat_key=(act.name, "rowsT" if ta else "rows"))
            m, k = (wshape[1], wshape[0]) if ta else wshape
            rows = out_dims[1] if out_dims and len(out_dims) > 1 else 1
            return _Layer(node, "gemm_left", 0, 1, wshape, 1, k, m, rows,
                          stat_key=(act.name, "colsT" if tb else "cols"))
        # Conv
        if len(wshape) < 3:
            self._skip(node, "weight rank below 3")
            return None
        g = node.attributes.get_int("group", 1)
        m, cg = wshape[0], wshape[1]
        ksz = list(wshape[2:])
        if cg == 1 and g > 1:
            self._skip(node, "depthwise conv")
            return None
        if m % g:
            self._skip(node, "output channels not divisible by group")
            return None
        nd = len(ksz)
        strides = list(node.attributes.get_ints("strides", [1] * nd))
        dil = list(node.attributes.get_ints("dilations", [1] * nd))
        in_dims = _dims(act)
        in_sp = in_dims[2:] if in_dims and len(in_dims) == nd + 2 else None
        pads = _conv_pads(node, in_sp if _static(act) else None, ksz, strides, dil)
        if pads is None:
            self._skip(node, "auto_pad with unknown input size")
            return None
        out_sp = int(np.prod(out_dims[2:])) if out_dims and len(out_dims) == nd + 2 else 1
        kprod = int(np.prod(ksz))
        key = (act.name, "patch", tuple(ksz), tuple(strides), tuple(pads), tuple(dil), g)
        if self.options.tucker and g == 1 and kprod > 1:
            if not (_static(act) and _static(out)) and not (in_sp and out_dims):
                self._skip(node, "tucker needs known spatial sizes")
                return None
            layer = _Layer(node, "tucker", 1, 0, wshape, 1, cg * kprod, m, out_sp, stat_key=None)
            layer.tucker_shapes = (cg, m, kprod, int(np.prod(in_sp)) if in_sp else 1, out_sp)
            return layer
        return _Layer(node, "conv", 1, 0, wshape, g, cg * kprod, m // g, out_sp, stat_key=key)

    # -- statistics --------------------------------------------------------------------------------------

    def _collect_stats(self, model: ir.Model, layers: list[_Layer], data: Any, whiten: bool = True) -> None:
        """Accumulate XᵀX (and, for refit, ΣX) for every distinct (activation, layout) in one streaming pass
        per capture group; whiten the layers' weights with it when ``whiten`` (asvd)."""
        from onnxshrink.capture import plan_groups

        o: LowrankOptions = self.options
        wanted: dict[tuple, list[_Layer]] = {}
        for layer in layers:
            if layer.reason or layer.stat_key is None:
                continue
            if layer.kind == "conv" and layer.d_in > MAX_PATCH_DIM:
                layer.stat_key = None
                self.decline("im2col patch too long for covariance: plain svd", layer.node)
                continue
            wanted.setdefault(layer.stat_key, []).append(layer)
        if not wanted:
            return
        names = list(dict.fromkeys(k[0] for k in wanted))
        covs: dict[tuple, list[np.ndarray]] = {}
        sums: dict[tuple, list[np.ndarray]] = {}
        counts: dict[tuple, int] = {}
        for group in plan_groups(model, names):
            keys = [k for k in wanted if k[0] in group]
            with self.context.capture(model, group) as cap:
                for batch in cap.run(data, limit=o.samples, progress=self.context.progress,
                                     label="lowrank: activation statistics"):
                    for key in keys:
                        x = np.asarray(batch[key[0]])
                        if x.dtype.kind != "f":
                            continue
                        acc = covs.setdefault(key, [])
                        tot = sums.setdefault(key, [])
                        for gi, rows in enumerate(_rows(x, key)):
                            rows = rows.astype(np.float64, copy=False)
                            c = rows.T @ rows
                            if gi < len(acc):
                                acc[gi] += c
                                tot[gi] += rows.sum(axis=0)
                            else:
                                acc.append(c)
                                tot.append(rows.sum(axis=0))
                            if gi == 0:
                                counts[key] = counts.get(key, 0) + rows.shape[0]
        for key, ls in wanted.items():
            cov = covs.get(key)
            for layer in ls:
                if cov is None or len(cov) != layer.groups or cov[0].shape[0] != layer.d_in:
                    layer.stat_key = None
                    self.decline("no activation statistics: plain svd", layer.node)
                    continue
                if whiten:
                    layer.whiten = [_whitener(c, o.damping) for c in cov]
                if self._refit_on:
                    layer.stats = list(zip(cov, sums[key]))
                    layer.rows_seen = counts[key]

    # -- factorization and rank choice -------------------------------------------------------------------

    def _weight(self, layer: _Layer) -> np.ndarray:
        return np.asarray(constant_value(layer.node.inputs[layer.w_index]).numpy(), dtype=np.float64)

    def _decompose(self, layer: _Layer) -> None:
        o: LowrankOptions = self.options
        if layer.kind == "tucker":
            self._tucker_ladder(layer)
            return
        # profitable ranks only: r·(d_in+d_out) ≤ (1 − min_saving)·d_in·d_out
        r_max = int(math.floor((1 - o.min_saving) * layer.d_in * layer.d_out / (layer.d_in + layer.d_out) - 1e-9))
        ranks = [r for r in range(o.round_to, r_max + 1, o.round_to)]
        if not ranks:
            self._decline_layer(layer, f"no rank (multiple of {o.round_to}) saves {o.min_saving:.0%}")
            return
        w = self._weight(layer)
        mats = self._matrices(layer, w)
        layer.wmats = mats
        layer.svd = []
        for g, mat in enumerate(mats):
            wt = layer.whiten[g][0] @ mat if layer.whiten else mat
            u, s, vt = np.linalg.svd(wt, full_matrices=False)
            layer.svd.append((u, s, vt))
        for r in ranks:
            p, m = layer.cost(r)
            layer.ladder.append((r, p, m, _tail_error(layer, r)))

    def _matrices(self, layer: _Layer, w: np.ndarray) -> list[np.ndarray]:
        """The weight as per-group right-multiplied matrices ``[d_in, d_out]``."""
        k = layer.kind
        node = layer.node
        if k == "mm_right":
            return [w]
        if k == "mm_left":
            return [w.T]
        if k == "gemm_right":
            alpha = node.attributes.get_float("alpha", 1.0)
            return [alpha * (w.T if node.attributes.get_int("transB", 0) else w)]
        if k == "gemm_left":
            alpha = node.attributes.get_float("alpha", 1.0)
            opa = w.T if node.attributes.get_int("transA", 0) else w
            return [alpha * opa.T]
        g, mg = layer.groups, layer.d_out
        return [w[i * mg:(i + 1) * mg].reshape(mg, -1).T for i in range(g)]

    def _dense(self, layer: _Layer, cfg: Any, factors: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
        """The rank-``cfg`` reconstruction (of ``factors``, else of the SVD) in the weight's own layout and
        dtype (for sensitivity probes)."""
        dtype = _FLOATS[constant_value(layer.node.inputs[layer.w_index]).dtype]
        node = layer.node
        if layer.kind == "tucker":
            return _tucker_dense(*self._tucker_factors(layer, cfg)).astype(dtype)
        mats = [a @ b for a, b in (factors if factors is not None else _factors(layer, cfg))]
        k = layer.kind
        if k == "mm_right":
            w = mats[0]
        elif k == "mm_left":
            w = mats[0].T
        elif k == "gemm_right":
            w = mats[0] / node.attributes.get_float("alpha", 1.0)
            w = w.T if node.attributes.get_int("transB", 0) else w
        elif k == "gemm_left":
            w = (mats[0] / node.attributes.get_float("alpha", 1.0)).T
            w = w.T if node.attributes.get_int("transA", 0) else w
        else:
            w = np.concatenate([m.T.reshape((layer.d_out,) + layer.wshape[1:]) for m in mats], axis=0)
        return np.ascontiguousarray(w).astype(dtype)

    def _tucker_factors(self, layer: _Layer, cfg: tuple[int, int]):
        key = ("tucker", cfg)
        if key not in layer.measured:
            layer.measured[key] = _tucker(self._weight(layer), cfg[0], cfg[1])
        return layer.measured[key]

    def _tucker_ladder(self, layer: _Layer) -> None:
        o: LowrankOptions = self.options
        c, m, _, _, _ = layer.tucker_shapes
        w = self._weight(layer)
        layer.svd = [(None, np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1), compute_uv=False), None),
                     (None, np.linalg.svd(w.reshape(m, -1), compute_uv=False), None)]
        p0, m0 = layer.params, layer.macs
        seen = set()
        for r1 in range(o.round_to, c + o.round_to, o.round_to):
            r1 = min(r1, c)
            r2 = min(m, max(o.round_to, _round_up(int(round(r1 * m / c)), o.round_to)))
            if (r1, r2) in seen:
                continue
            seen.add((r1, r2))
            p, mm = layer.cost((r1, r2))
            if p <= (1 - o.min_saving) * p0 and mm <= (1 - o.min_saving) * m0:
                layer.ladder.append(((r1, r2), p, mm, float("nan")))
        if not layer.ladder:
            self._decline_layer(layer, f"no Tucker-2 ranks (multiples of {o.round_to}) save {o.min_saving:.0%}")
            return
        norm = float(np.linalg.norm(w))
        for i, (cfg, p, mm, _) in enumerate(layer.ladder):
            err = float(np.linalg.norm(_tucker_dense(*self._tucker_factors(layer, cfg)) - w)) / norm if norm else 0.0
            layer.ladder[i] = (cfg, p, mm, err)

    def _choose(self, layer: _Layer) -> None:
        o: LowrankOptions = self.options
        mode = o.mode
        cfgs = [c for c, *_ in layer.ladder]
        if layer.kind == "tucker":
            c, m, _, _, _ = layer.tucker_shapes
            if mode == "rank":
                want = (min(o.rank, c), min(o.rank, m))
            elif mode == "ratio":
                ok = [e for e in layer.ladder if e[1] <= (1 - o.ratio) * layer.params]
                want = max(ok, key=lambda e: e[1])[0] if ok else None
            else:
                r1 = min(c, _round_up(_energy_rank_s(layer.svd[0][1], o.energy), o.round_to))
                r2 = min(m, _round_up(_energy_rank_s(layer.svd[1][1], o.energy), o.round_to))
                want = (r1, r2)
            if want is None:
                self._decline_layer(layer, f"ratio {o.ratio} not reachable with round_to={o.round_to}")
                return
            p, mm = layer.cost(want)
            if p > (1 - o.min_saving) * layer.params or mm > (1 - o.min_saving) * layer.macs:
                self._decline_layer(layer, f"rank {want} too high to save {o.min_saving:.0%}")
                return
            layer.choice = want
            return
        if mode == "rank":
            want = o.rank
        elif mode == "ratio":
            ok = [r for r, p, _, _ in layer.ladder if p <= (1 - o.ratio) * layer.params]
            if not ok:
                self._decline_layer(layer, f"ratio {o.ratio} not reachable with round_to={o.round_to}")
                return
            want = max(ok)
        else:
            want = _round_up(_energy_rank(layer, o.energy), o.round_to)
        if want not in cfgs:
            self._decline_layer(layer, f"rank {want} too high to save {o.min_saving:.0%}"
                                if want > max(cfgs) else f"rank {want} not a candidate")
            return
        layer.choice = want

    # -- refit -------------------------------------------------------------------------------------------

    def _refittable(self, layer: _Layer) -> bool:
        return self._refit_on and layer.stats is not None and layer.svd is not None and layer.kind != "tucker"

    def _orig_bias(self, layer: _Layer) -> np.ndarray | None:
        """The node's own bias over all outputs (``beta`` applied) when refit replaces it, else None."""
        if layer.bias != "replace":
            return None
        node = layer.node
        b = np.asarray(constant_value(node.inputs[2]).numpy(), dtype=np.float64).reshape(-1)
        if node.op_type == "Gemm":
            b = b * node.attributes.get_float("beta", 1.0)
        return np.broadcast_to(b, (layer.groups * layer.d_out,)).copy()

    def _fit_layer(self, layer: _Layer, cfg: int, folds: list[list[_Moments]]) -> _Fit:
        """Refit every group of ``layer`` at rank ``cfg`` from its input moments (per fold, per group).

        With two folds (calibration batches split by parity) the ridge is chosen from
        ``ridge·100^k`` (k < ``RIDGE_STEPS``) by cross-fitting — fitted on one fold, the output error
        measured on the other — and the refit is kept only if that held-out error is below the SVD
        factors' error (which are not fitted on these rows); the final fit uses both folds. With one fold
        (one batch, or an input no split changes) the ridge is ``ridge`` and the comparison is in-sample.
        """
        o: LowrankOptions = self.options
        b0 = self._orig_bias(layer)
        plain = _factors(layer, cfg)
        m = layer.d_out
        fit_bias = layer.bias is not None
        groups = range(layer.groups)
        ws = layer.wmats
        bg = [b0[g * m:(g + 1) * m] if b0 is not None else None for g in groups]
        total = folds[0] if len(folds) == 1 else [a + b for a, b in zip(*folds)]
        energy = sum(mo.yy for mo in total)
        res_plain = sum(_residual(total[g], plain[g][0] @ plain[g][1], bg[g]) for g in groups)
        best: tuple[float, float] | None = None
        for ridge in sorted({o.ridge * 100.0 ** k for k in range(RIDGE_STEPS if len(folds) == 2 else 1)}):
            res = 0.0
            for g in groups:
                if len(folds) == 2:
                    for k in (0, 1):
                        a, b, c = _rrr(folds[k][g], ws[g], cfg, ridge, fit_bias)
                        res += _residual(folds[1 - k][g], a @ b, c)
                else:
                    a, b, c = _rrr(total[g], ws[g], cfg, ridge, fit_bias)
                    res += _residual(total[g], a @ b, c)
            if best is None or res < best[0]:
                best = (res, ridge)

        def rel(res: float) -> float:
            return math.sqrt(res / energy) if energy > 0 else 0.0

        res_fit, ridge = best
        if not res_fit < res_plain:
            return _Fit(plain, None, (rel(res_plain), rel(res_plain)))
        fits = [_rrr(total[g], ws[g], cfg, ridge, fit_bias) for g in groups]
        bias = np.concatenate([c for _, _, c in fits]) if fit_bias else None
        return _Fit([(a, b) for a, b, _ in fits], bias, (rel(res_plain), rel(res_fit)))

    def _alone_fit(self, layer: _Layer, cfg: int) -> _Fit:
        """The refit when no split before the layer changes its input (from the activation statistics).
        The last one is kept (one rank per layer: memory stays one split per layer)."""
        kept = layer.measured.get("alone")
        if kept is None or kept[0] != cfg:
            b0 = self._orig_bias(layer)
            m = layer.d_out
            moments = [_Moments.unchanged(c, t, layer.rows_seen, layer.wmats[g],
                                          b0[g * m:(g + 1) * m] if b0 is not None else None)
                       for g, (c, t) in enumerate(layer.stats)]
            kept = layer.measured["alone"] = (cfg, self._fit_layer(layer, cfg, [moments]))
        return kept[1]

    def _moments(self, probe: _ProbeSession, layer: _Layer, feeds: dict[str, np.ndarray],
                 batches: list[int]) -> list[list[_Moments]]:
        """Stream the layer's input rows on ``batches`` with ``feeds`` (the splits before it), and its
        original outputs (its input in the original model times the original weight, plus the bias);
        moments per fold (the batches split by parity; one fold if there is one batch), per group."""
        name = layer.node.inputs[layer.act_index].name
        b0 = self._orig_bias(layer)
        m = layer.d_out
        n_folds = 2 if len(batches) > 1 else 1
        folds = [[_Moments(layer.d_in, m) for _ in range(layer.groups)] for _ in range(n_folds)]
        for pos, i in enumerate(batches):
            x = _rows(probe.value(name, i, feeds), layer.stat_key)
            orig = _rows(probe.value(name, i, None), layer.stat_key)
            for g, (mo, xg, og) in enumerate(zip(folds[pos % n_folds], x, orig)):
                y = og.astype(np.float64, copy=False) @ layer.wmats[g]
                if b0 is not None:
                    y += b0[g * m:(g + 1) * m]
                mo.add(xg.astype(np.float64, copy=False), y)
        self.count("refit_runs")
        return folds

    def _refit(self, probe: _ProbeSession, order: list[_Layer], cfgs: dict[int, Any],
               fits: dict[int, _Fit | None], start: int = 0,
               batches: list[int] | None = None) -> dict[int, _Fit | None]:
        """Fit, in graph order from ``order[start]`` on, every layer split in ``cfgs`` (id → rank) on the
        inputs that the model with the splits before it feeds it (on ``batches``, default all); fits before
        ``start`` come from ``fits``. Layers that cannot be refitted (Tucker, no statistics) keep their
        SVD factors (None); a layer no split before it changes is fitted from its activation statistics."""
        batches = list(range(len(probe.batches))) if batches is None else batches
        new = {id(l): fits.get(id(l)) for l in order[:start] if id(l) in cfgs}
        changed = bool(new)
        for layer in order[start:]:
            if id(layer) not in cfgs:
                continue
            cfg = cfgs[id(layer)]
            if not self._refittable(layer):
                new[id(layer)] = None
            elif not changed:
                new[id(layer)] = self._alone_fit(layer, cfg)
            else:
                feeds = self._feeds_of(probe, order, cfgs, new)
                new[id(layer)] = self._fit_layer(layer, cfg, self._moments(probe, layer, feeds, batches))
            changed = True
        return new

    def _arrays(self, layer: _Layer, cfg: Any, fit: _Fit | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The split's weight (and new bias, or None) as the node's own inputs would hold them."""
        if fit is None:  # the SVD factors: the last rank's weight is kept
            kept = layer.measured.get("dense")
            if kept is None or kept[0] != cfg:
                kept = layer.measured["dense"] = (cfg, (self._dense(layer, cfg), None))
            return kept[1]
        if fit.arrays is None:
            bias = None
            if fit.bias is not None:
                dtype = _FLOATS[constant_value(layer.node.inputs[layer.w_index]).dtype]
                beta = layer.node.attributes.get_float("beta", 1.0) if layer.node.op_type == "Gemm" else 1.0
                bias = (fit.bias / beta).astype(dtype)
            fit.arrays = (self._dense(layer, cfg, fit.factors), bias)
        return fit.arrays

    def _feeds_of(self, probe: _ProbeSession, layers: list[_Layer], cfgs: dict[int, Any],
                  fits: dict[int, _Fit | None]) -> dict[str, np.ndarray]:
        """Probe overrides for every layer in ``fits`` (its fit, or its SVD factors when None)."""
        feeds: dict[str, np.ndarray] = {}
        for layer in layers:
            if id(layer) in fits:
                feeds.update(probe.feeds(layer, *self._arrays(layer, cfgs[id(layer)], fits[id(layer)])))
        return feeds

    # -- budget mode -------------------------------------------------------------------------------------

    def _allocate_budget(self, model: ir.Model, layers: list[_Layer], data: Any) -> float:
        """Choose the ranks under the output error budget; returns the measured error of the choice."""
        o: LowrankOptions = self.options
        if not layers:
            return 0.0
        refit = self._refit_on
        with _ProbeSession(model, layers, data, o.samples, biases=refit) as probe:
            # sensitivity: output error with one layer at a time replaced by its rank-r split
            for layer in layers:
                lad = layer.ladder
                if len(lad) > MAX_PROBES:
                    idx = np.unique(np.linspace(0, len(lad) - 1, MAX_PROBES).round().astype(int))
                    layer.ladder = lad = [lad[i] for i in idx]
                errs = []
                for cfg, *_ in lad:
                    fit = self._alone_fit(layer, cfg) if self._refittable(layer) else None
                    errs.append(probe.error(probe.feeds(layer, *self._arrays(layer, cfg, fit))))
                layer.measured["errors"] = errs
                self.count("sensitivity_runs", len(lad))
            if refit:
                state, fits, err = self._accept_measured(probe, layers)
            else:
                state, err = self._greedy_then_back_off(probe, layers)
                fits = {}
        for layer in layers:
            j = state.get(id(layer), -1)
            if j < 0:
                alone = min(layer.measured.get("errors") or [math.inf])
                self._decline_layer(layer, "error budget used by other layers" if alone <= o.budget
                                    else "too sensitive for the error budget")
            else:
                layer.choice = layer.ladder[j][0]
                layer.fit = fits.get(id(layer))
                layer.measured["output_error"] = layer.measured["errors"][j]
        return err

    def _greedy_steps(self, layers: list[_Layer], budget2: float) -> list[tuple[_Layer, int, float]]:
        """Allocation steps (layer, ladder index, squared-error increase) by the smallest increase of the
        squared error per unit saved, assuming independent errors add in squares, while the sum stays
        within ``budget2``."""
        o: LowrankOptions = self.options
        tot_p = float(sum(l.params for l in layers)) or 1.0
        tot_m = float(sum(l.macs for l in layers)) or 1.0
        w_p = 0.0 if o.objective == "macs" else 1.0
        w_m = 0.0 if o.objective == "params" else 1.0

        def size(layer: _Layer, j: int) -> float:
            p, m = (layer.params, layer.macs) if j < 0 else layer.ladder[j][1:3]
            return w_p * p / tot_p + w_m * m / tot_m

        state = {id(l): -1 for l in layers}  # index into the ladder, -1 = not split
        total = 0.0
        steps: list[tuple[_Layer, int, float]] = []
        while True:
            best = None
            for layer in layers:
                cur = state[id(layer)]
                e_cur = layer.measured["errors"][cur] ** 2 if cur >= 0 else 0.0
                p_cur = size(layer, cur)
                for j in range(len(layer.ladder)):
                    p_new = size(layer, j)
                    if p_new >= p_cur:
                        continue
                    de = layer.measured["errors"][j] ** 2 - e_cur
                    if total + de > budget2:
                        continue
                    score = max(de, 0.0) / (p_cur - p_new)
                    if best is None or score < best[0] - 1e-18:
                        best = (score, layer, j, de)
            if best is None:
                return steps
            _, layer, j, de = best
            steps.append((layer, j, de))
            state[id(layer)] = j
            total += de

    def _greedy_then_back_off(self, probe: _ProbeSession, layers: list[_Layer]) -> tuple[dict[int, int], float]:
        """Without refit: the greedy allocation within the budget, checked with every split at once; the
        last steps are undone while the measured error is over budget."""
        o: LowrankOptions = self.options
        steps = self._greedy_steps(layers, o.budget ** 2)
        while True:
            state: dict[int, int] = {}
            for layer, j, _ in steps:
                state[id(layer)] = j
            cfgs = {id(l): l.ladder[state[id(l)]][0] for l in layers if id(l) in state}
            fits = {k: None for k in cfgs}
            err = probe.error(self._feeds_of(probe, layers, cfgs, fits)) if cfgs else 0.0
            self.count("budget_checks")
            if err <= o.budget or not steps:
                return state, err
            steps.pop()

    def _accept_measured(self, probe: _ProbeSession, layers: list[_Layer]
                         ) -> tuple[dict[int, int], dict[int, _Fit | None], float]:
        """With refit: walk the greedy steps with no budget cap (the independent-error sum overstates the
        error once later splits are refitted to absorb earlier ones) and keep each step whose measured
        error, after refitting every split from the changed layer on, is within the budget; a layer whose
        step is refused gets no lower rank. The steps the independent-error sum allows are tried first all
        at once (halving them while that is over budget), the rest one by one.

        The error of a choice is *cross-fitted* when there are two or more calibration batches: the splits
        are refitted on the even batches and the error measured on the odd ones, and vice versa, so a fit
        that only memorises its rows does not pass for a good one (a layer whose input no split before it
        changes is fitted from the statistics of all batches: there the fit only re-whitens the original
        weight and sets the bias). The final choice is refitted on all batches and measured on them; while
        that error is over budget the last accepted steps are undone.
        """
        o: LowrankOptions = self.options
        pos = {id(l): i for i, l in enumerate(layers)}
        n = len(probe.batches)
        halves = [list(range(0, n, 2)), list(range(1, n, 2))] if n > 1 else [list(range(n))]
        steps = self._greedy_steps(layers, math.inf)

        def cfgs_of(st: dict[int, int]) -> dict[int, Any]:
            return {id(l): l.ladder[st[id(l)]][0] for l in layers if id(l) in st}

        def check(st: dict[int, int], start: int, fits: list[dict]) -> tuple[float, list[dict]]:
            """Cross-fitted error of the state ``st``, refitting from ``order[start]`` on."""
            cfgs = cfgs_of(st)
            trial = [self._refit(probe, layers, cfgs, fits[h], start, halves[h]) for h in range(len(halves))]
            num = den = 0.0
            for h, hf in enumerate(trial):
                a, b = probe.sums(self._feeds_of(probe, layers, cfgs, hf), halves[-1 - h])
                num, den = num + a, den + b
            self.count("budget_checks")
            return probe.relative((num, den)), trial

        def state_after(k: int) -> dict[int, int]:
            st: dict[int, int] = {}
            for layer, j, _ in steps[:k]:
                st[id(layer)] = j
            return st

        # the prefix of steps the independent-error model allows, halved while over budget
        k, total = 0, 0.0
        while k < len(steps) and total + steps[k][2] <= o.budget ** 2:
            total += steps[k][2]
            k += 1
        state: dict[int, int] = {}
        fits: list[dict[int, _Fit | None]] = [{} for _ in halves]
        heldout = 0.0
        lo, hi = 0, k  # state_after(lo) is accepted
        while hi > lo:
            e, trial = check(state_after(hi), 0, [{} for _ in halves])
            if e <= o.budget:
                lo, state, fits, heldout = hi, state_after(hi), trial, e
                break
            hi = lo + (hi - lo) // 2
        history: list[dict[int, int]] = [{}] + ([state] if state else [])
        refused: set[int] = set()
        for layer, j, _ in steps[lo:]:
            if id(layer) in refused:
                continue
            trial_state = {**state, id(layer): j}
            e, trial = check(trial_state, pos[id(layer)], fits)
            if e <= o.budget:
                state, fits, heldout = trial_state, trial, e
                history.append(state)
            else:
                refused.add(id(layer))
        if len(history) > 1 and len(halves) > 1:
            self.count("budget_heldout_error_ppm", int(round(heldout * 1e6)))
        while True:  # the choice fitted on all batches, within the budget on them
            state = history[-1]
            cfgs = cfgs_of(state)
            final = self._refit(probe, layers, cfgs, {})
            err = probe.error(self._feeds_of(probe, layers, cfgs, final)) if cfgs else 0.0
            self.count("budget_checks")
            if err <= o.budget or len(history) == 1:
                return state, final, err
            history.pop()

    # -- latency -----------------------------------------------------------------------------------------

    def _check_latency(self, model: ir.Model, layer: _Layer) -> None:
        o: LowrankOptions = self.options
        try:
            before, after = _measure_latency(self, model, layer)
        except Exception as e:  # a micro-model ORT cannot build: do not guess
            self._decline_layer(layer, f"latency not measurable ({type(e).__name__})")
            return
        layer.latency = (before, after)
        if before / after < o.min_speedup:
            self._decline_layer(layer, f"measured speedup {before / after:.2f}x < {o.min_speedup}")

    # -- rewrite -----------------------------------------------------------------------------------------

    def _emit(self, graph: ir.Graph, layer: _Layer, names: set[str]) -> None:
        node = layer.node
        wv = node.inputs[layer.w_index]
        dtype = _FLOATS[constant_value(wv).dtype]
        base = (node.name or wv.name or "lowrank").strip("/").replace("/", "_")
        x = node.inputs[layer.act_index]
        new_nodes: list[ir.Node] = []

        def init(suffix: str, arr: np.ndarray) -> ir.Value:
            name = unique_name(f"{base}_lowrank_{suffix}", names)
            t = ir.tensor(np.ascontiguousarray(arr.astype(dtype)), name=name)
            v = ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
            graph.register_initializer(v)
            return v

        def mk(op: str, inputs: list, attrs: dict, suffix: str) -> ir.Value:
            n = ir.Node("", op, inputs, attributes=ir.convenience.convert_attributes(attrs),
                        num_outputs=1, name=f"{node.name or base}/lowrank_{suffix}")
            n.outputs[0].name = unique_name(f"{base}_lowrank_{suffix}_out", names)
            new_nodes.append(n)
            return n.outputs[0]

        k = layer.kind
        bias = list(node.inputs[2:3]) if len(node.inputs) > 2 and node.inputs[2] is not None else []
        fit = layer.fit if k != "tucker" else None
        new_bias = fit is not None and fit.bias is not None
        old_bias = bias[0] if bias else None
        if new_bias:  # the refitted bias (beta already applied) replaces the node's own
            bias = [init("bias", fit.bias)]
        if k == "tucker":
            u_in, core, u_out = self._tucker_factors(layer, layer.choice)
            nd = len(layer.wshape) - 2
            one = [1] * nd
            h1 = mk("Conv", [x, init("in", u_in.T.reshape(u_in.shape[1], -1, *one))], {"kernel_shape": one}, "in")
            attrs = _conv_attrs(node)
            h2 = mk("Conv", [h1, init("core", core)], attrs, "core")
            y = mk("Conv", [h2, init("out", u_out.reshape(u_out.shape[0], -1, *one)), *bias], {"kernel_shape": one}, "out")
        else:
            facs = fit.factors if fit is not None else _factors(layer, layer.choice)
            r = layer.choice
            if k == "mm_right":
                a, b = facs[0]
                y = mk("MatMul", [mk("MatMul", [x, init("a", a)], {}, "a"), init("b", b)], {}, "b")
            elif k == "mm_left":
                a, b = facs[0]
                y = mk("MatMul", [init("b", b.T), mk("MatMul", [init("a", a.T), x], {}, "a")], {}, "b")
            elif k == "gemm_right":
                a, b = facs[0]
                ta = node.attributes.get_int("transA", 0)
                h = mk("Gemm", [x, init("a", a)], {"transA": ta} if ta else {}, "a")
                attrs = {"beta": node.attributes.get_float("beta", 1.0)} if bias and not new_bias else {}
                y = mk("Gemm", [h, init("b", b), *bias], attrs, "b")
            elif k == "gemm_left":
                a, b = facs[0]
                tb = node.attributes.get_int("transB", 0)
                h = mk("Gemm", [init("a", a.T), x], {"transB": tb} if tb else {}, "a")
                attrs = {"beta": node.attributes.get_float("beta", 1.0)} if bias else {}
                y = mk("Gemm", [init("b", b.T), h, *bias], attrs, "b")
            else:
                g = layer.groups
                ksp = layer.wshape[2:]
                wa = np.concatenate([a.T.reshape((r,) + layer.wshape[1:]) for a, _ in facs], axis=0)
                wb = np.concatenate([b.T.reshape((layer.d_out, r) + (1,) * len(ksp)) for _, b in facs], axis=0)
                attrs = _conv_attrs(node)
                h = mk("Conv", [x, init("a", wa)], attrs, "a")
                attrs2 = {"kernel_shape": [1] * len(ksp)}
                if g > 1:
                    attrs2["group"] = g
                y = mk("Conv", [h, init("b", wb), *bias], attrs2, "b")
        out = node.outputs[0]
        y.type, y.shape = out.type, out.shape
        graph.insert_before(node, new_nodes)
        old_name = out.name
        is_output = out.is_graph_output()
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if is_output:
            y.name = old_name
        _drop_if_unused(graph, wv)
        if new_bias and old_bias is not None:
            _drop_if_unused(graph, old_bias)

    def _record(self, layer: _Layer) -> None:
        row: dict[str, Any] = {"layer": layer.name, "op": layer.node.op_type + ("/tucker" if layer.kind == "tucker" else ""),
                               "shape": list(layer.wshape), "rank": None, "params": layer.params,
                               "params_saved": 0, "macs": layer.macs, "macs_saved": 0,
                               "local_error": None, "output_error": None, "refit_error": None, "latency_ms": None,
                               "method": self._method if layer.whiten else ("svd" if layer.kind != "tucker" else "tucker"),
                               "reason": layer.reason}
        cfg = layer.choice
        if cfg is not None:
            p, m = layer.cost(cfg)
            row["rank"] = list(cfg) if isinstance(cfg, tuple) else int(cfg)
            if layer.reason == "split":
                row["params_saved"], row["macs_saved"] = layer.params - p, layer.macs - m
            for c, _, _, err in layer.ladder:
                if c == cfg:
                    row["local_error"] = round(float(err), 5)
            if "output_error" in layer.measured:
                row["output_error"] = round(float(layer.measured["output_error"]), 6)
            if layer.fit is not None and layer.reason == "split":
                row["refit_error"] = [round(float(e), 5) for e in layer.fit.error]
        if layer.latency is not None:
            row["latency_ms"] = [round(layer.latency[0] * 1e3, 4), round(layer.latency[1] * 1e3, 4)]
        self.layers.append(row)


def _energy_rank_s(s: np.ndarray, energy: float) -> int:
    s2 = s.astype(np.float64) ** 2
    tot = s2.sum()
    if tot <= 0:
        return 1
    return int(np.searchsorted(np.cumsum(s2) / tot, energy - 1e-9)) + 1


def _bias_mode(layer: _Layer) -> str | None:
    """How refit may set the layer's bias: ``replace`` a constant per-output bias, ``add`` one where there
    is none, or None (MatMul, a weight on the left, a bias that is not per output, Gemm with beta 0)."""
    node = layer.node
    if layer.kind == "conv":
        n_out = layer.groups * layer.d_out
    elif layer.kind == "gemm_right":
        if node.attributes.get_float("beta", 1.0) == 0.0:
            return None
        n_out = layer.d_out
    else:
        return None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is None:
        return "add"
    t = constant_value(b)
    if t is None or t.dtype != constant_value(node.inputs[layer.w_index]).dtype:
        return None
    shape = tuple(int(d) for d in t.shape.numpy())
    ok = ((n_out,),) if layer.kind == "conv" else ((), (1,), (n_out,), (1, 1), (1, n_out))
    return "replace" if shape in ok else None


def _rows(x: np.ndarray, key: tuple) -> list[np.ndarray]:
    """The activation ``x`` (one batch) as the row vectors its weight multiplies, per group."""
    kind = key[1]
    if kind == "last":
        return [x.reshape(-1, x.shape[-1])]
    if kind == "cols":
        x2 = x.reshape(1, -1) if x.ndim == 1 else np.moveaxis(x, -2, -1)
        return [x2.reshape(-1, x2.shape[-1])]
    if kind == "rows":
        return [x]
    if kind == "rowsT":
        return [x.T]
    if kind == "colsT":
        return [x]
    # im2col patches per group
    _, _, ksz, strides, pads, dil, g = key
    return _patch_rows(x, ksz, strides, pads, dil, g)


def _patch_rows(x: np.ndarray, ksz, strides, pads, dil, g) -> list[np.ndarray]:
    nd = len(ksz)
    n, c = x.shape[:2]
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, width)
    win = tuple((k - 1) * d + 1 for k, d in zip(ksz, dil))
    v = np.lib.stride_tricks.sliding_window_view(xp, win, axis=tuple(range(2, 2 + nd)))
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
          + tuple(slice(None, None, d) for d in dil)]
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    v = v.transpose(perm)  # [N, *out, C, *k]
    cg = c // g
    out = []
    for gi in range(g):
        part = v[(Ellipsis, slice(gi * cg, (gi + 1) * cg)) + (slice(None),) * nd] if g > 1 else v
        out.append(part.reshape(-1, cg * int(np.prod(ksz))))
    return out


def _conv_attrs(node: ir.Node) -> dict:
    attrs = {}
    for name in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"):
        a = node.attributes.get(name)
        if a is not None:
            attrs[name] = a.value
    if "kernel_shape" in attrs:
        attrs.pop("kernel_shape")  # the core kernel's shape comes from its weight
    return attrs


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        graph.initializers.pop(value.name)
        return
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and prod.graph is graph:
        graph.remove(prod, safe=True)


# -- onnxruntime helpers ---------------------------------------------------------------------------------


class _ProbeSession:
    """One onnxruntime session over the model with every candidate weight an overridable input.

    :meth:`error` runs the calibration samples with some weights (and, for refit, biases) replaced and
    returns the largest relative L2 error over the float outputs, against the unmodified model's outputs
    (computed once). :meth:`value` returns one candidate's input activation for one batch, with or without
    replacements (the session also outputs every candidate's input; onnxruntime computes only what a run
    asks for). The model is edited only while the session is created and restored exactly afterwards.
    """

    def __init__(self, model: ir.Model, layers: list[_Layer], data: Any, samples: int, biases: bool = False) -> None:
        from onnxshrink.model import save_model
        from onnxshrink.validate import make_session

        self._dir = tempfile.mkdtemp(prefix="onnxshrink-lowrank-")
        graph = model.graph
        self.feed_names: dict[int, str] = {}
        self.bias_names: dict[int, str] = {}
        added: list[tuple[ir.Node, int, ir.Value | None, ir.Value, int]] = []
        names = taken_names(graph)
        input_names = {v.name for v in graph.inputs}
        saved_outputs = list(graph.outputs)

        def overridable(layer: _Layer, index: int, array: np.ndarray) -> str:
            node = layer.node
            name = unique_name(f"lowrank_probe_{len(added)}", names)
            # a copy: serializing renames the tensor object, which the original value must keep
            tensor = ir.tensor(array, name=name)
            v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            graph.register_initializer(v)
            graph.inputs.append(v)
            n_inputs = len(node.inputs)
            if index >= n_inputs:
                node.resize_inputs(index + 1)
            old = node.inputs[index]
            node.replace_input_with(index, v)
            added.append((node, index, old, v, n_inputs))
            return name

        try:
            for layer in layers:
                wv = layer.node.inputs[layer.w_index]
                self.feed_names[id(layer)] = overridable(layer, layer.w_index, constant_value(wv).numpy())
                if biases and layer.bias is not None:
                    n_out = layer.groups * layer.d_out
                    dtype = _FLOATS[constant_value(wv).dtype]
                    if layer.bias == "replace":
                        b = constant_value(layer.node.inputs[2]).numpy().reshape(-1)
                        b = np.broadcast_to(b, (n_out,)).astype(dtype)
                    else:
                        b = np.zeros(n_out, dtype)
                    self.bias_names[id(layer)] = overridable(layer, 2, b)
            self.acts = {}
            for layer in layers:
                act = layer.node.inputs[layer.act_index]
                self.acts[act.name] = act.name in input_names
                if not self.acts[act.name] and not act.is_graph_output():
                    graph.outputs.append(act)
            path = os.path.join(self._dir, "probe.onnx")
            save_model(model, path)
        finally:
            graph.outputs.clear()
            graph.outputs.extend(saved_outputs)
            for node, index, old, v, n_inputs in reversed(added):
                node.replace_input_with(index, old)
                if len(node.inputs) > n_inputs:
                    node.resize_inputs(n_inputs)
                graph.inputs.remove(v)
                graph.initializers.pop(v.name)
        self.session = make_session(path)
        overridden = set(self.feed_names.values()) | set(self.bias_names.values())
        real = [i for i in self.session.get_inputs() if i.name not in overridden]
        batchable = all(i.shape and not isinstance(i.shape[0], int) for i in real)
        self.batches = list(data.batches(32, batchable, samples))
        self.out_names = [v.name for v in saved_outputs]
        self.ref = [self.session.run(self.out_names, feed) for feed in self.batches]
        self._orig: dict[str, list[np.ndarray]] = {}
        self._orig_bytes = 0

    def feeds(self, layer: _Layer, weight: np.ndarray, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The overrides that replace ``layer``'s weight (and bias) in :meth:`error` and :meth:`value`."""
        out = {self.feed_names[id(layer)]: weight}
        if bias is not None:
            out[self.bias_names[id(layer)]] = bias
        return out

    def value(self, name: str, batch: int, overrides: dict[str, np.ndarray] | None) -> np.ndarray:
        """A candidate's input activation on batch ``batch`` (``overrides`` None: the original model; those
        are kept while they fit in ``ORIG_CACHE_BYTES``)."""
        feed = self.batches[batch]
        if self.acts[name]:
            return np.asarray(feed[name])
        if overrides is None:
            cached = self._orig.get(name)
            if cached is not None and batch < len(cached):
                return cached[batch]
        x = np.asarray(self.session.run([name], {**feed, **(overrides or {})})[0])
        if overrides is None:
            cached = self._orig.setdefault(name, [])
            if len(cached) == batch and self._orig_bytes + x.nbytes <= ORIG_CACHE_BYTES:
                cached.append(x)
                self._orig_bytes += x.nbytes
        return x

    def error(self, overrides: dict[str, np.ndarray]) -> float:
        """Largest relative L2 error of the float outputs with ``overrides`` (see :meth:`feeds`)."""
        return self.relative(self.sums(overrides))

    def sums(self, overrides: dict[str, np.ndarray], batches: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per output, the squared error and the squared reference over ``batches`` (default: all)."""
        num = np.zeros(len(self.out_names))
        den = np.zeros(len(self.out_names))
        for k in range(len(self.batches)) if batches is None else batches:
            got = self.session.run(self.out_names, {**self.batches[k], **overrides})
            for i, (a, b) in enumerate(zip(self.ref[k], got)):
                a = np.asarray(a)
                if a.dtype.kind != "f":
                    continue
                a = a.astype(np.float64)
                num[i] += float(((np.asarray(b, dtype=np.float64) - a) ** 2).sum())
                den[i] += float((a ** 2).sum())
        return num, den

    @staticmethod
    def relative(sums: tuple[np.ndarray, np.ndarray]) -> float:
        """The largest relative L2 error of :meth:`sums` (added up over several calls)."""
        rel = [math.sqrt(n / d) if d > 0 else math.sqrt(n) for n, d in zip(*sums)]
        return max(rel) if rel else 0.0

    def close(self) -> None:
        self.session = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _ProbeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _measure_latency(p: LowrankPass, model: ir.Model, layer: _Layer) -> tuple[float, float]:
    """Best seconds per run of the layer alone, before and after the split (dynamic dims = 1)."""
    from onnxshrink.model import save_model
    from onnxshrink.validate import best_of_rounds, make_session

    node = layer.node
    x = node.inputs[layer.act_index]
    xdims = _dims(x)
    if xdims is None or x.dtype is None:
        raise ValueError("unknown activation shape")
    opset = model.opset_imports.get("", 17)
    rng = np.random.default_rng(0)
    xin = rng.standard_normal(xdims).astype(_FLOATS.get(x.dtype, np.float32))
    sessions = []
    tmp = tempfile.mkdtemp(prefix="onnxshrink-lat-")
    try:
        for split in (False, True):
            xv = ir.Value(name="x", shape=ir.Shape(xdims), type=ir.TensorType(x.dtype))
            inputs = []
            inits = []
            for i, v in enumerate(node.inputs):
                if i == layer.act_index:
                    inputs.append(xv)
                elif v is None:
                    inputs.append(None)
                else:
                    t = ir.tensor(constant_value(v).numpy(), name=f"w{i}")  # a copy (see _ProbeSession)
                    c = ir.Value(name=f"w{i}", shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
                    inits.append(c)
                    inputs.append(c)
            n = ir.Node("", node.op_type, inputs, attributes=list(node.attributes.values()), num_outputs=1, name="n")
            g = ir.Graph([xv], [n.outputs[0]], nodes=[n], initializers=inits, opset_imports={"": opset})
            n.outputs[0].name = "y"
            n.outputs[0].type = node.outputs[0].type
            mini = ir.Model(g, ir_version=8)
            if split:
                sub = dataclasses.replace(layer, node=n)
                p._emit(g, sub, taken_names(g))
            path = os.path.join(tmp, f"m{int(split)}.onnx")
            save_model(mini, path)
            sessions.append(make_session(path))
        best = best_of_rounds(sessions, {"x": xin}, LATENCY_ROUNDS, min_seconds=0.01, max_runs=100)
    finally:
        sessions.clear()
        shutil.rmtree(tmp, ignore_errors=True)
    return best[0], best[1]
