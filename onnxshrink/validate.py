"""Validation: run the original and the optimized model in onnxruntime on the same inputs and compare.

Sessions are created from file paths (safe past 2 GB). Metrics are accumulated over all samples, so memory
does not grow with the data set. Per float output:

* ``max_abs``, ``mean_abs`` — absolute error;
* ``rel_l2`` = ‖cand − ref‖₂ / ‖ref‖₂ over all samples (the gated metric);
* ``cosine`` = ⟨ref, cand⟩ / (‖ref‖‖cand‖);
* ``snr_db`` = 10·log10(‖ref‖² / ‖cand − ref‖²);
* ``top1`` — fraction of rows whose argmax over the last axis agrees, when the output looks like
  scores (rank ≥ 2, last axis > 1);
* ``worst_slice_rel_l2`` / ``worst_slice`` — the largest ``rel_l2`` of one index along the last axis or
  axis 1 (up to 4096 indices; indices holding under 1e-8 of the mean energy are skipped). A detector's
  output mixes pixel coordinates and probabilities in one tensor: whole-tensor ``rel_l2`` 0.019 hid score
  columns 45% off. Not gated (the tolerance is for the whole output); when a slice is over the tolerance
  and 5× the whole output's error, the result carries a note naming it.

Integer and boolean outputs are compared exactly: ``mismatch`` is the fraction of differing elements and
is gated instead of ``rel_l2``. NaN in the same place in both counts as equal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import numpy as np

from onnxshrink.calib import Dataset
from onnxshrink.errors import UsageError

__all__ = ["Tolerances", "OutputMetrics", "ValidationResult", "compare_models", "parse_tolerances", "make_session",
           "Latency", "measure_latency", "worst_part",
           "interleaved_times", "best_of_rounds"]

logger = logging.getLogger(__name__)

MAX_BATCH = 32
#: Above this many bytes (both models' files and external data together), validation opens one session at
#: a time — the original's outputs are kept, its session closed, then the optimized model runs — and turns
#: off onnxruntime's weight prepacking, so peak memory stays near one model's size instead of two or more.
SEQUENTIAL_BYTES = 1 << 30


@dataclasses.dataclass
class Tolerances:
    """Allowed ``rel_l2`` (float outputs) or ``mismatch`` fraction (integer outputs), per output."""

    default: float
    per_output: dict[str, float] = dataclasses.field(default_factory=dict)

    def for_output(self, name: str) -> float:
        """The tolerance of one output."""
        return self.per_output.get(name, self.default)


def parse_tolerances(items: list[str] | None, default: float) -> Tolerances:
    """Parse ``--tol`` items: ``1e-3`` sets the default, ``logits=1e-2`` one output.

    Raises:
        UsageError: malformed or negative value.
    """
    tol = Tolerances(default)
    for item in items or []:
        name, _, val = item.rpartition("=")
        try:
            value = float(val)
        except ValueError:
            raise UsageError(f"bad --tol {item!r}", hint="write 1e-3 or OUTPUT=1e-3") from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"bad --tol {item!r}: must be a finite number >= 0", hint="write 1e-3 or OUTPUT=1e-3")
        if name:
            tol.per_output[name] = value
        else:
            tol.default = value
    return tol


@dataclasses.dataclass
class OutputMetrics:
    """Comparison figures of one output over all samples."""

    name: str
    kind: str  # "float" or "exact"
    tolerance: float
    passed: bool
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    snr_db: float | None = None
    top1: float | None = None
    mismatch: float = 0.0
    note: str = ""
    worst_slice_rel_l2: float | None = None
    worst_slice: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict (inf/nan turned into strings)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


@dataclasses.dataclass
class ValidationResult:
    """The verdict: ``passed``, ``failed`` or ``skipped`` (with the reason), and per-output metrics."""

    status: str
    reason: str = ""
    samples: int = 0
    source: str = ""
    outputs: list[OutputMetrics] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True unless the comparison ran and failed."""
        return self.status != "failed"

    def worst(self) -> OutputMetrics | None:
        """The output furthest from its tolerance."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: (o.rel_l2 if o.kind == "float" else o.mismatch) / max(o.tolerance, 1e-30))

    def to_dict(self) -> dict:
        """JSON-ready dict with stable keys."""
        return {
            "status": self.status,
            "reason": self.reason,
            "samples": self.samples,
            "source": self.source,
            "seconds": round(self.seconds, 4),
            "notes": list(self.notes),
            "outputs": [o.to_dict() for o in self.outputs],
        }


class _Acc:
    """Running sums for one output (``slices``: also per index of the last axis and axis 1, for model
    outputs; per-layer comparisons of intermediate tensors do not need them)."""

    def __init__(self, slices: bool = False) -> None:
        self.with_slices = slices
        self.kind: str | None = None
        self.ref_sq = self.diff_sq = self.cand_sq = self.dot = 0.0
        self.abs_sum = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.mismatch = 0
        self.top1_agree = 0
        self.top1_rows = 0
        self.nan_mismatch = 0
        self.slices: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}  # axis -> (ref², diff²) per index

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.kind is None:
            self.kind = "float" if ref.dtype.kind in "fc" else "exact"
        if self.kind == "exact":
            self.mismatch += int(np.count_nonzero(ref != cand))
            self.count += ref.size
            return
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        both_nan = np.isnan(r) & np.isnan(c)
        nan_only = np.isnan(r) ^ np.isnan(c)
        self.nan_mismatch += int(np.count_nonzero(nan_only))
        r = np.where(both_nan, 0.0, r)
        c = np.where(both_nan, 0.0, c)
        with np.errstate(invalid="ignore", over="ignore"):
            d = c - r
            finite = np.isfinite(d)
            d_f = np.where(finite, d, 0.0)
            r_f = np.where(np.isfinite(r), r, 0.0)
            c_f = np.where(np.isfinite(c), c, 0.0)
            self.nan_mismatch += int(np.count_nonzero(~finite & ~both_nan & ~nan_only & (r != c)))
        r_sq, d_sq = r_f * r_f, d_f * d_f
        self.ref_sq += float(np.sum(r_sq))
        self.cand_sq += float(np.sum(c_f * c_f))
        self.dot += float(np.sum(r_f * c_f))
        self.diff_sq += float(np.sum(d_sq))
        a = np.abs(d_f)
        self.abs_sum += float(a.sum())
        self.max_abs = max(self.max_abs, float(a.max()) if a.size else 0.0)
        self.count += r.size
        for axis in _slice_axes(ref.shape) if self.with_slices else ():
            other = tuple(i for i in range(ref.ndim) if i != axis)
            rs, ds = np.sum(r_sq, axis=other), np.sum(d_sq, axis=other)
            prev = self.slices.get(axis, (np.zeros_like(rs), np.zeros_like(ds)))
            # a dynamic axis that changes size between batches has no per-index meaning: dropped
            self.slices[axis] = None if prev is None or prev[0].shape != rs.shape else (prev[0] + rs, prev[1] + ds)
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            self.top1_agree += int(np.count_nonzero(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
            self.top1_rows += int(np.prod(ref.shape[:-1]))

    def result(self, name: str, tol: float) -> OutputMetrics:
        if self.kind == "exact":
            frac = self.mismatch / max(self.count, 1)
            return OutputMetrics(name, "exact", tol, frac <= tol, mismatch=frac,
                                 max_abs=0.0 if not self.mismatch else math.nan)
        if self.nan_mismatch:
            return OutputMetrics(
                name, "float", tol, False, max_abs=math.inf, mean_abs=math.inf, rel_l2=math.inf,
                cosine=0.0, note=f"{self.nan_mismatch} elements are NaN/Inf in only one model",
            )
        ref_norm = math.sqrt(self.ref_sq)
        diff_norm = math.sqrt(self.diff_sq)
        if ref_norm > 0:
            rel = diff_norm / ref_norm
        else:
            rel = 0.0 if diff_norm == 0 else math.inf
        denom = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        cosine = self.dot / denom if denom > 0 else (1.0 if diff_norm == 0 else 0.0)
        snr = None if self.diff_sq == 0 else (10 * math.log10(self.ref_sq / self.diff_sq) if self.ref_sq > 0 else -math.inf)
        top1 = self.top1_agree / self.top1_rows if self.top1_rows else None
        worst, where = self._worst_slice()
        return OutputMetrics(
            name, "float", tol, rel <= tol,
            max_abs=self.max_abs, mean_abs=self.abs_sum / max(self.count, 1), rel_l2=rel,
            cosine=cosine, snr_db=snr, top1=top1, worst_slice_rel_l2=worst, worst_slice=where,
        )

    def _worst_slice(self) -> tuple[float | None, str]:
        best: tuple[float | None, str] = (None, "")
        for axis, sums in sorted(self.slices.items()):
            if sums is None:
                continue
            ref_sq, diff_sq = sums
            live = ref_sq >= 1e-8 * float(ref_sq.mean()) if ref_sq.size else ref_sq > 0
            live &= ref_sq > 0
            if not live.any():
                continue
            rel = np.sqrt(np.where(live, diff_sq, 0.0) / np.where(live, ref_sq, 1.0))
            i = int(np.argmax(rel))
            if best[0] is None or float(rel[i]) > best[0]:
                best = (float(rel[i]), f"axis {axis} index {i}")
        return best



def worst_part(o: OutputMetrics) -> str:
    """``0.471 (axis 2 index 11)``: the worst index of a float output's last axis or axis 1, or ``-``."""
    if o.kind != "float" or o.worst_slice_rel_l2 is None:
        return "-"
    return f"{o.worst_slice_rel_l2:.3g} ({o.worst_slice})"


def _slice_axes(shape: tuple[int, ...]) -> list[int]:
    """Axes whose indices are compared one by one: the last (columns) and axis 1 (channels), batch excluded."""
    axes = [a for a in {len(shape) - 1, 1} if 1 <= a < len(shape) and 2 <= shape[a] <= 4096]
    return sorted(axes)


def _accumulate(accs: dict[str, _Acc], out_names: list[str], ref_out: list, cand_out: list,
                observer: Callable[[str, np.ndarray, np.ndarray], None] | None = None) -> str | None:
    """Add one run's outputs to the running metrics (and hand float/integer ones to ``observer``);
    return a failure reason (shape/structure) or None."""
    for name, r, c in zip(out_names, ref_out, cand_out):
        if isinstance(r, (list, tuple)) or isinstance(c, (list, tuple)):
            # sequence outputs: compare element by element, flattened into one vector
            if not isinstance(r, (list, tuple)) or not isinstance(c, (list, tuple)) or len(r) != len(c) or any(
                np.shape(x) != np.shape(y) for x, y in zip(r, c)
            ):
                return f"sequence output {name!r} differs in length or shapes"
            r = np.concatenate([np.ravel(x) for x in r]) if r else np.zeros(0)
            c = np.concatenate([np.ravel(x) for x in c]) if c else np.zeros(0)
        elif isinstance(r, dict) or isinstance(c, dict):
            if r != c:
                return f"map output {name!r} differs"
            continue
        r = np.asarray(r)
        c = np.asarray(c)
        if r.shape != c.shape:
            return f"output {name!r} has shape {list(c.shape)}, the original {list(r.shape)}"
        if r.dtype.kind == "O" or r.dtype.kind in "US":
            accs[name].kind = "exact"
        accs[name].add(r, c)
        if observer is not None and (accs[name].kind == "float" or r.dtype.kind in "iub"):
            observer(name, r, c)
    return None


def make_session(path: str | os.PathLike, *, low_memory: bool = False, threads: int | None = None) -> Any:
    """An onnxruntime CPU session created from a file path, with warnings silenced.

    ``low_memory`` turns off weight prepacking (a second, packed copy of every MatMul/Conv weight) and the
    memory arena: slower, but a big model is held once. ``threads`` pins intra-op threads (and one
    inter-op thread), for timing.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if low_memory:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


def _files_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus its external-data files (0 if unreadable)."""
    try:
        from onnxshrink.model import external_data_files

        p = os.fspath(path)
        return os.path.getsize(p) + sum(os.path.getsize(f) for f in external_data_files(p) if f.is_file())
    except OSError:
        return 0


def _compare_sequential(ref_path: str | os.PathLike, cand_path: str | os.PathLike, data: Dataset,
                        tolerances: Tolerances, *, limit: int | None, batch: bool) -> ValidationResult:
    """:func:`compare_models` for big models: one onnxruntime session at a time (see ``SEQUENTIAL_BYTES``)."""
    import gc

    start = time.perf_counter()
    note = "models over 1 GiB: validated with one onnxruntime session at a time, without weight prepacking"
    try:
        ref = make_session(ref_path, low_memory=True)
    except Exception as e:
        return ValidationResult("skipped", f"onnxruntime cannot load the original model: {_first_line(e)}",
                                source=data.source, seconds=time.perf_counter() - start, notes=[note])
    out_names = [o.name for o in ref.get_outputs()]
    batchable = batch and _batchable(ref) and _batchable_file(cand_path)
    ref_outs = []
    for feed in data.batches(MAX_BATCH, batchable, limit):
        try:
            ref_outs.append(ref.run(out_names, feed))
        except Exception as e:
            if batchable:
                del ref
                gc.collect()
                return _compare_sequential(ref_path, cand_path, data, tolerances, limit=limit, batch=False)
            return ValidationResult("skipped", f"onnxruntime cannot run the original model: {_first_line(e)}",
                                    source=data.source, seconds=time.perf_counter() - start, notes=[note])
    del ref
    gc.collect()
    try:
        cand = make_session(cand_path, low_memory=True)
    except Exception as e:
        return ValidationResult("failed", f"onnxruntime cannot load the optimized model: {_first_line(e)}",
                                source=data.source, seconds=time.perf_counter() - start, notes=[note])
    cand_names = {o.name for o in cand.get_outputs()}
    missing = [n for n in out_names if n not in cand_names]
    if missing:
        return ValidationResult("failed", f"optimized model lacks output(s) {', '.join(missing)}",
                                source=data.source, seconds=time.perf_counter() - start, notes=[note])
    accs = {n: _Acc(slices=True) for n in out_names}
    for feed, ref_out in zip(data.batches(MAX_BATCH, batchable, limit), ref_outs):
        try:
            cand_out = cand.run(out_names, feed)
        except Exception as e:
            return ValidationResult("failed", f"onnxruntime cannot run the optimized model: {_first_line(e)}",
                                    source=data.source, seconds=time.perf_counter() - start, notes=[note])
        failure = _accumulate(accs, out_names, ref_out, cand_out)
        if failure:
            return ValidationResult("failed", failure, source=data.source, seconds=time.perf_counter() - start,
                                    notes=[note])
    result = _verdict(accs, out_names, tolerances, data, limit, start)
    result.notes.append(note)
    return result


def _batchable_file(path: str | os.PathLike) -> bool:
    """Like :func:`_batchable` for a model file not opened in onnxruntime (every input's axis 0 dynamic)."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return False
    inits = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _batchable(session: Any) -> bool:
    for inp in session.get_inputs():
        shape = inp.shape
        if not shape or isinstance(shape[0], int):
            return False
    return True


def compare_models(
    ref_path: str | os.PathLike,
    cand_path: str | os.PathLike,
    data: Dataset,
    tolerances: Tolerances,
    *,
    ref_session: Any = None,
    limit: int | None = None,
    batch: bool = True,
    output_map: dict[str, str] | None = None,
    observer: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ValidationResult:
    """Run both models on ``data`` and compare every output of the reference.

    Args:
        ref_path: the original model (file).
        cand_path: the optimized model (file).
        data: the inputs.
        tolerances: allowed error per output.
        ref_session: a session of ``ref_path`` to reuse (optional).
        limit: compare on at most this many samples.
        batch: feed up to 32 samples at once when every input's axis 0 is dynamic.
        output_map: the candidate's name for a reference output, where it differs (default: same name).
        observer: called as ``observer(name, ref, cand)`` with the arrays of every float/integer output
            of every batch (``onnxshrink.compare`` builds distributions and task metrics from it).
        progress: callback ``(label, done, total)`` after every batch.

    Returns:
        A :class:`ValidationResult`: ``skipped`` if onnxruntime cannot run the original (the reason says
        why), ``failed`` if the optimized model does not load/run or any output is out of tolerance.
    """
    start = time.perf_counter()
    if (ref_session is None and observer is None and output_map is None
            and _files_bytes(ref_path) + _files_bytes(cand_path) > SEQUENTIAL_BYTES):
        return _compare_sequential(ref_path, cand_path, data, tolerances, limit=limit, batch=batch)
    try:
        ref = ref_session or make_session(ref_path)
    except Exception as e:
        return ValidationResult("skipped", f"onnxruntime cannot load the original model: {_first_line(e)}",
                                source=data.source, seconds=time.perf_counter() - start)
    try:
        cand = make_session(cand_path)
    except Exception as e:
        return ValidationResult("failed", f"onnxruntime cannot load the optimized model: {_first_line(e)}",
                                source=data.source, seconds=time.perf_counter() - start)
    out_names = [o.name for o in ref.get_outputs()]
    cand_names = {o.name for o in cand.get_outputs()}
    output_map = dict(output_map or {})
    cand_out_names = [output_map.get(n, n) for n in out_names]
    missing = [n for n, c in zip(out_names, cand_out_names) if c not in cand_names]
    if missing:
        return ValidationResult("failed", f"optimized model lacks output(s) {', '.join(missing)}",
                                source=data.source, seconds=time.perf_counter() - start)
    accs = {n: _Acc(slices=True) for n in out_names}
    batchable = batch and _batchable(ref) and _batchable(cand)
    samples = 0
    total = data.num_samples if limit is None else min(limit, data.num_samples)
    for feed in data.batches(MAX_BATCH, batchable, limit):
        try:
            ref_out = ref.run(out_names, feed)
        except Exception as e:
            if batchable:
                # Some models declare a dynamic batch axis but only run with batch 1: retry unbatched.
                if observer is not None and hasattr(observer, "reset"):
                    observer.reset()  # it may have seen batches already
                return compare_models(ref_path, cand_path, data, tolerances, ref_session=ref, limit=limit,
                                      batch=False, output_map=output_map, observer=observer, progress=progress)
            return ValidationResult("skipped", f"onnxruntime cannot run the original model: {_first_line(e)}",
                                    source=data.source, seconds=time.perf_counter() - start)
        try:
            cand_out = cand.run(cand_out_names, feed)
        except Exception as e:
            return ValidationResult("failed", f"onnxruntime cannot run the optimized model: {_first_line(e)}",
                                    source=data.source, seconds=time.perf_counter() - start)
        failure = _accumulate(accs, out_names, ref_out, cand_out, observer)
        if failure:
            return ValidationResult("failed", failure, source=data.source, seconds=time.perf_counter() - start)
        samples += len(next(iter(feed.values()))) if batchable and feed else 1
        if progress is not None:
            progress("comparing outputs", min(samples, total), total)
    return _verdict(accs, out_names, tolerances, data, limit, start)


def _verdict(accs: dict[str, _Acc], out_names: list[str], tolerances: Tolerances, data: Dataset,
             limit: int | None, start: float) -> ValidationResult:
    """The final result from the accumulated metrics."""
    # feeds may hold several samples each: report samples, not runs
    samples = data.num_samples if limit is None else min(limit, data.num_samples)
    for acc in accs.values():
        if acc.kind is None:  # an output never compared (maps): count it as exact and equal
            acc.kind = "exact"
    metrics = [accs[n].result(n, tolerances.for_output(n)) for n in out_names]
    status = "passed" if all(m.passed for m in metrics) else "failed"
    notes = [
        f"output {m.name!r}: {m.worst_slice} has rel_l2 {m.worst_slice_rel_l2:.3g} while the whole output has "
        f"{m.rel_l2:.3g} — a part of a mixed-range output is far off (not gated; check it)"
        for m in metrics if m.kind == "float" and m.worst_slice_rel_l2 is not None and math.isfinite(m.rel_l2)
        and m.worst_slice_rel_l2 > max(m.tolerance, 5 * m.rel_l2)]
    reason = ""
    if status == "failed":
        bad = [m for m in metrics if not m.passed]
        reason = "; ".join(
            f"output {m.name!r} " + (f"rel_l2 {m.rel_l2:.3g}" if m.kind == "float" else f"mismatch {m.mismatch:.3g}")
            + f" > tolerance {m.tolerance:.3g}" for m in bad
        )
    return ValidationResult(status, reason, samples=samples, source=data.source, outputs=metrics,
                            seconds=time.perf_counter() - start, notes=notes)



@dataclasses.dataclass
class Latency:
    """onnxruntime CPU latency of the original and the optimized model, measured side by side."""

    before_ms: float
    after_ms: float
    batch: int
    runs: int
    threads: int = 1

    @property
    def ratio(self) -> float:
        """after / before (below 1: faster)."""
        return self.after_ms / self.before_ms if self.before_ms > 0 else float("nan")

    @property
    def slower(self) -> bool:
        """True if the optimized model is measurably slower (more than 5%, beyond timing noise)."""
        return self.ratio > 1.05

    def to_dict(self) -> dict:
        return {"before_ms": round(self.before_ms, 4), "after_ms": round(self.after_ms, 4),
                "ratio": round(self.ratio, 4), "batch": self.batch, "runs": self.runs, "threads": self.threads,
                "slower": self.slower}


def interleaved_times(sessions: list[Any], feed: dict[str, Any], runs: int, *, warmup: int = 5,
                      per_round: int = 1) -> list[list[float]]:
    """Seconds of every run of each session: ``warmup`` untimed runs each, then ``runs`` rounds in which
    each session runs ``per_round`` times in turn, so machine load hits all of them alike."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feed)
                times[i].append(time.perf_counter() - t)
    return times


def best_of_rounds(sessions: list[Any], feed: dict[str, Any], rounds: int, *, min_seconds: float,
                   max_runs: int | None = None, warmup: int = 5) -> list[float]:
    """Best seconds per run of each session over interleaved rounds; in a round a session runs until
    ``min_seconds`` have passed (or ``max_runs``). The best of each is robust to other load on a shared
    machine, for sub-millisecond models where one run is below the timer's noise."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    best = [math.inf] * len(sessions)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            k, t0 = 0, time.perf_counter()
            while True:
                s.run(None, feed)
                k += 1
                elapsed = time.perf_counter() - t0
                if elapsed > min_seconds or (max_runs is not None and k >= max_runs):
                    break
            best[i] = min(best[i], elapsed / k)
    return best


def measure_latency(ref_path: str | os.PathLike, cand_path: str | os.PathLike, data: Dataset, *,
                    batches: tuple[int, ...] = (1,), runs: int = 50, threads: int = 1) -> list[Latency]:
    """Median latency of both models at each batch size, from one session per model, with runs
    interleaved so machine load affects both alike.

    A batch size the models cannot take (static batch axis) is measured at 1; sizes that end up equal are
    measured once. Returns an empty list when either model cannot run in onnxruntime.
    """
    try:
        ref, cand = make_session(ref_path, threads=threads), make_session(cand_path, threads=threads)
        batchable = _batchable(ref) and _batchable(cand)
        out: dict[int, Latency] = {}
        for batch in batches:
            feed = next(iter(data.batches(batch, batchable and batch > 1)))
            n = len(next(iter(feed.values()))) if feed and batchable and batch > 1 else 1
            if n in out:
                continue
            times = interleaved_times([ref, cand], feed, runs, warmup=3)
            out[n] = Latency(float(np.median(times[0]) * 1000), float(np.median(times[1]) * 1000), n, runs, threads)
    except Exception:  # noqa: BLE001 - latency is informative; validation reports run failures
        return []
    return list(out.values())
