"""Compare two models: outputs over a data set (with distributions), task metrics, and per-layer error.

``compare(ref, cand, data=..., labels=...)`` runs both models in onnxruntime on the same inputs.

**Outputs.** The per-output metrics are validation's (:func:`onnxshrink.validate.compare_models`:
max/mean abs, relative L2 — the gated metric —, cosine, SNR, top-1 agreement; integer outputs compared
exactly), plus distributions over samples: the per-sample relative L2 ``‖c_i − r_i‖ / ‖r_i‖`` of every
row (axis 0) with its percentiles and a log-scale histogram, and top-5 agreement (the reference's argmax
is in the candidate's five best). Outputs are matched by name, else by position when both models have
the same number of outputs.

**Task metrics** (``labels``: one integer per sample): for a score output (``[N, C]``, ``C > 1``) top-1
and top-5 accuracy of both models and the delta; for an integer output with one value per row, the
exact-match rate. ``max_drop`` gates the top-1 (or exact-match) drop.

**Per layer** (``per_layer=True``): intermediate tensors of the reference are matched to the candidate's
by structure, not by name — walking both graphs from the inputs, a reference node matches a candidate
node of the same op type whose data inputs are the matched tensors. On the way:

* *transparent* ops (QuantizeLinear, DequantizeLinear, Identity, Dropout, Cast) are looked through: the
  float tensor ``X`` of the reference matches the DequantizeLinear output that the candidate's consumers
  read; weights are constants whichever way they are stored (initializer, Constant, DQ of int8);
* a reference Conv/ConvTranspose/Gemm followed by BatchNormalization matches a candidate node with no
  BatchNormalization after it through the BN's output (BN fused into the weights);
* a reference Conv/Gemm/MatMul whose output shape differs from the candidate node with the same input,
  where that candidate node's only consumer is a node of the same kind with the right shape, matches the
  second one (a low-rank split into two nodes).

Both models are then captured with :class:`~onnxshrink.capture.ActivationCapture` in groups planned by
:func:`~onnxshrink.capture.plan_groups` within a byte budget — one group of tensors at a time, streamed
batch by batch into running sums — so memory is one batch of one group, never every tensor at once.
For each matched tensor: relative L2, SNR, cosine and max abs error of the candidate against the
reference; the *added* error is its relative L2 minus the largest relative L2 of its matched inputs
(``snr_drop_db`` likewise in SNR). Layers are ranked by added error, so the layer where the accuracy is
lost comes first, not the ones that merely inherit the error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxshrink.calib import Dataset, input_specs, load_data, synthetic_data
from onnxshrink.errors import DataError, InputError, UsageError
from onnxshrink.validate import OutputMetrics, Tolerances, _Acc, compare_models, measure_latency, worst_part

__all__ = [
    "compare",
    "CompareResult",
    "OutputDiff",
    "LayerDiff",
    "LayerMatch",
    "match_layers",
    "load_labels",
    "weight_bytes_by_op",
    "COMPARE_SCHEMA_VERSION",
]

COMPARE_SCHEMA_VERSION = 1
DEFAULT_TOLERANCE = 1e-5
#: Bins of the per-sample relative-L2 histogram: powers of ten from 1e-8 to 1e2 (plus under/overflow).
HIST_EDGES = [0.0] + [10.0 ** e for e in range(-8, 3)] + [math.inf]

TRANSPARENT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Identity", "Dropout", "Cast"})
LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
BN_FUSABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Sum", "Max", "Min"})

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------------
# Result objects


def _clean(x: Any) -> Any:
    """JSON-safe floats: inf/nan become strings, others rounded to 6 significant digits."""
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


@dataclasses.dataclass
class OutputDiff:
    """One output: validation's metrics plus distributions over samples and task metrics."""

    metrics: OutputMetrics
    cand_name: str
    top5: float | None = None
    per_sample: dict[str, float] = dataclasses.field(default_factory=dict)  # p50, p90, p99, max, mean
    histogram: list[int] = dataclasses.field(default_factory=list)  # counts over HIST_EDGES
    task: dict[str, Any] | None = None  # metric, ref, cand, delta (+ top5 ones)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = self.metrics.to_dict()
        d["cand_name"] = self.cand_name
        d["top5"] = self.top5
        d["per_sample_rel_l2" if self.metrics.kind == "float" else "per_sample_mismatch"] = dict(self.per_sample)
        d["histogram"] = {"edges": [str(e) if not math.isfinite(e) else e for e in HIST_EDGES],
                          "counts": list(self.histogram)}
        d["task"] = self.task
        return _clean(d)


@dataclasses.dataclass
class LayerMatch:
    """A reference tensor and its counterpart in the candidate, and how they were matched."""

    ref: str  # tensor name in the reference
    cand: str  # tensor name in the candidate (the one its consumers read)
    ref_node: str
    cand_node: str
    op: str
    how: str  # "same op", "QDQ", "fused BN", "low-rank split", "input", ...
    shape: list[int | str] | None
    inputs: list[str]  # reference tensor names of the matched data inputs
    index: int = 0  # position in the reference graph (topological)


@dataclasses.dataclass
class LayerDiff:
    """Error of one matched tensor over the data, and the error it adds."""

    match: LayerMatch
    rel_l2: float
    snr_db: float | None
    cosine: float
    max_abs: float
    input_rel_l2: float
    added_rel_l2: float
    snr_drop_db: float | None
    rank: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        m = self.match
        return _clean({
            "rank": self.rank, "index": m.index, "ref": m.ref, "cand": m.cand, "ref_node": m.ref_node,
            "cand_node": m.cand_node, "op": m.op, "how": m.how, "shape": m.shape, "inputs": m.inputs,
            "rel_l2": self.rel_l2, "snr_db": self.snr_db, "cosine": self.cosine, "max_abs": self.max_abs,
            "input_rel_l2": self.input_rel_l2, "added_rel_l2": self.added_rel_l2, "snr_drop_db": self.snr_drop_db,
        })


@dataclasses.dataclass
class PerLayer:
    """The per-layer section: ranked layers and what could not be matched."""

    layers: list[LayerDiff]
    unmatched_ref: list[str]
    fused_ref: list[str]
    ref_tensors: int
    cand_tensors: int
    groups: int
    budget_bytes: int
    peak_batch_bytes: int
    samples: int
    seconds: float

    def ranked(self) -> list[LayerDiff]:
        """Layers by added error, largest first."""
        return sorted(self.layers, key=lambda x: x.rank)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "matched": len(self.layers), "ref_tensors": self.ref_tensors, "cand_tensors": self.cand_tensors,
            "unmatched_ref": list(self.unmatched_ref), "fused_ref": list(self.fused_ref), "groups": self.groups, "budget_bytes": self.budget_bytes,
            "peak_batch_bytes": self.peak_batch_bytes, "samples": self.samples, "seconds": round(self.seconds, 4),
            "layers": [x.to_dict() for x in self.ranked()],
        }


@dataclasses.dataclass
class CompareResult:
    """Everything ``compare`` measured. ``verdict`` is ``passed`` or ``failed``."""

    ref: str
    cand: str
    verdict: str
    reason: str
    samples: int
    source: str
    outputs: list[OutputDiff]
    per_layer: PerLayer | None = None
    latency: dict[str, Any] | None = None
    size: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    max_drop: float | None = None
    version: str = ""

    @property
    def passed(self) -> bool:
        """True if every output is within its tolerance (and the accuracy drop within ``max_drop``)."""
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the documented, stable keys."""
        return {
            "schema": COMPARE_SCHEMA_VERSION,
            "tool": "onnxshrink",
            "command": "compare",
            "version": self.version,
            "ref": self.ref,
            "cand": self.cand,
            "verdict": self.verdict,
            "reason": self.reason,
            "samples": self.samples,
            "source": self.source,
            "seconds": round(self.seconds, 4),
            "max_drop": self.max_drop,
            "outputs": [o.to_dict() for o in self.outputs],
            "per_layer": self.per_layer.to_dict() if self.per_layer is not None else None,
            "latency": _clean(self.latency) if self.latency is not None else None,
            "size": self.size,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    # -- text renderers -------------------------------------------------------------------------

    def _output_rows(self) -> list[list[str]]:
        rows = []
        for o in self.outputs:
            m = o.metrics
            ps = o.per_sample
            rows.append([
                m.name, m.kind, _g(m.rel_l2) if m.kind == "float" else f"mismatch {_g(m.mismatch)}", worst_part(m),
                f"{_g(ps.get('p50'))} / {_g(ps.get('p90'))} / {_g(ps.get('p99'))} / {_g(ps.get('max'))}",
                _g(m.max_abs), "-" if m.snr_db is None else f"{m.snr_db:.1f}",
                _pct(m.top1), _pct(o.top5), _g(m.tolerance), "yes" if m.passed else "NO",
            ])
        return rows

    _OUTPUT_COLS = ["output", "kind", "rel L2", "worst part", "per-sample p50/p90/p99/max", "max abs", "SNR dB",
                    "top-1 agree", "top-5 agree", "tol", "ok"]

    def _task_rows(self) -> list[list[str]]:
        rows = []
        for o in self.outputs:
            t = o.task
            if not t or t.get("ref") is None:
                continue
            rows.append([o.metrics.name, t["metric"], _pct(t["ref"]), _pct(t["cand"]), _pp(t["delta"])])
            if t.get("ref_top5") is not None:
                rows.append([o.metrics.name, "top-5", _pct(t["ref_top5"]), _pct(t["cand_top5"]),
                             _pp(t["delta_top5"])])
        return rows

    def _layer_rows(self, n: int = 15) -> list[list[str]]:
        if self.per_layer is None:
            return []
        rows = []
        for x in self.per_layer.ranked()[:n]:
            rows.append([str(x.rank), x.match.ref_node or x.match.ref, x.match.op, x.match.how, _g(x.rel_l2),
                         _g(x.added_rel_l2), "-" if x.snr_db is None else f"{x.snr_db:.1f}",
                         "-" if x.snr_drop_db is None else f"{x.snr_drop_db:.1f}"])
        return rows

    _LAYER_COLS = ["#", "layer (reference node)", "op", "matched by", "rel L2", "added", "SNR dB", "SNR drop"]

    def _headline(self) -> str:
        head = f"compare: {self.verdict.upper()} on {self.samples} sample(s) from {self.source}"
        return head + (f" — {self.reason}" if self.reason else "")

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown."""
        lines = ["# onnxshrink compare", "", f"- reference: `{self.ref}`", f"- candidate: `{self.cand}`",
                 f"- verdict: **{self.verdict}**" + (f" — {self.reason}" if self.reason else ""),
                 f"- samples: {self.samples} from `{self.source}`", f"- time: {self.seconds:.2f} s", ""]
        lines += _md_table(self._OUTPUT_COLS, self._output_rows())
        task = self._task_rows()
        if task:
            lines += ["", "## Task metrics (labels)", ""]
            lines += _md_table(["output", "metric", "reference", "candidate", "delta"], task)
        if self.latency:
            lat = self.latency
            lines += ["", "## Latency (onnxruntime CPU, batch 1, median)", "",
                      f"- reference {lat['ref_ms']:.3f} ms, candidate {lat['cand_ms']:.3f} ms "
                      f"({lat['speedup']:.2f}x) over {lat['runs']} runs"]
        if self.per_layer is not None:
            pl = self.per_layer
            lines += ["", "## Per layer (ranked by added error)", "",
                      f"{len(pl.layers)} of {pl.ref_tensors} reference tensors matched; captured in {pl.groups} "
                      f"group(s) within {_bytes(pl.budget_bytes)}; peak {_bytes(pl.peak_batch_bytes)} of tensors "
                      f"per batch", ""]
            lines += _md_table(self._LAYER_COLS, self._layer_rows())
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def render(self, console: Any = None) -> None:
        """Print rich tables to ``console`` (stdout by default)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console(highlight=False)

        def table(title: str, cols: list[str], rows: list[list[str]]) -> None:
            t = Table(title=title, show_header=True, header_style="bold")
            for c in cols:
                t.add_column(c, overflow="fold")
            for r in rows:
                t.add_row(*[escape(x) for x in r])
            console.print(t)

        console.print(f"[bold]onnxshrink compare[/bold] {escape(self.ref)} ↔ {escape(self.cand)}")
        table("outputs", self._OUTPUT_COLS, self._output_rows())
        if self._task_rows():
            table("task metrics (labels)", ["output", "metric", "reference", "candidate", "delta"], self._task_rows())
        if self.per_layer is not None:
            table("per layer, ranked by added error (top 15)", self._LAYER_COLS, self._layer_rows())
        if self.latency:
            lat = self.latency
            console.print(f"latency (ORT CPU, batch 1, median of {lat['runs']}): reference {lat['ref_ms']:.3f} ms, "
                          f"candidate {lat['cand_ms']:.3f} ms ({lat['speedup']:.2f}x)", highlight=False)
        color = "green" if self.passed else "red"
        console.print(f"[{color}]{escape(self._headline())}[/{color}]", highlight=False)
        for n in self.notes:
            console.print(f"note: {escape(n)}", highlight=False)


def _g(x: float | None, digits: int = 3, dash: str = "-") -> str:
    """A metric for a table: ``digits`` significant digits, ``dash`` for a missing value."""
    if x is None:
        return dash
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _pct(x: float | None, dash: str = "-") -> str:
    return dash if x is None else f"{100 * x:.2f}%"


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f} pp"


def _bytes(n: int | None) -> str:
    from onnxshrink.report import _human_bytes

    return _human_bytes(n)


def _md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------------------------------
# Outputs: distributions and task metrics (fed by compare_models' observer)


class _OutputObserver:
    """Per-output per-sample errors, top-5 agreement and label metrics, batch by batch."""

    def __init__(self, labels: np.ndarray | None) -> None:
        self.labels = labels
        self.reset()

    def reset(self) -> None:
        self.per_sample: dict[str, list[np.ndarray]] = {}
        self.top5: dict[str, list[int]] = {}
        self.task: dict[str, dict[str, Any]] = {}
        self.offset: dict[str, int] = {}

    def __call__(self, name: str, ref: np.ndarray, cand: np.ndarray) -> None:
        rows = ref.shape[0] if ref.ndim >= 1 else 1
        r = ref.reshape(rows, -1)
        c = cand.reshape(rows, -1)
        if ref.dtype.kind in "fc":
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                num = np.sqrt(np.sum((c64 - r64) ** 2, axis=1))
                den = np.sqrt(np.sum(r64 ** 2, axis=1))
                err = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.inf, 0.0))
            err = np.where(np.isnan(err), np.inf, err)
        else:
            err = np.mean(r != c, axis=1).astype(np.float64) if r.shape[1] else np.zeros(rows)
        self.per_sample.setdefault(name, []).append(err)
        scores = ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] > 1
        if scores:
            k = min(5, ref.shape[-1])
            ref_best = np.argmax(ref, axis=-1)[..., None]
            cand_topk = np.argpartition(-cand, k - 1, axis=-1)[..., :k]
            acc = self.top5.setdefault(name, [0, 0])
            acc[0] += int(np.count_nonzero(np.any(cand_topk == ref_best, axis=-1)))
            acc[1] += int(ref_best.size)
        if self.labels is None:
            return
        off = self.offset.get(name, 0)
        self.offset[name] = off + rows
        t = self.task.setdefault(name, {"ok": True})
        if not t["ok"]:
            return
        if off + rows > len(self.labels):
            t["ok"] = False
            return
        y = self.labels[off:off + rows]
        if scores and ref.ndim == 2:
            C = ref.shape[-1]
            t["metric"] = "top-1"
            for who, s in (("ref", ref), ("cand", cand)):
                t[f"{who}_top1"] = t.get(f"{who}_top1", 0) + int(np.count_nonzero(np.argmax(s, axis=-1) == y))
                if C > 5:
                    top = np.argpartition(-s, 4, axis=-1)[:, :5]
                    t[f"{who}_top5"] = t.get(f"{who}_top5", 0) + int(np.count_nonzero(np.any(top == y[:, None], axis=-1)))
        elif ref.dtype.kind in "iub" and r.shape[1] == 1:
            t["metric"] = "exact match"
            t["ref_top1"] = t.get("ref_top1", 0) + int(np.count_nonzero(r[:, 0] == y))
            t["cand_top1"] = t.get("cand_top1", 0) + int(np.count_nonzero(c[:, 0] == y))
        else:
            t["ok"] = False

    def finish(self, m: OutputMetrics, cand_name: str) -> OutputDiff:
        name = m.name
        errs = np.concatenate(self.per_sample[name]) if self.per_sample.get(name) else np.zeros(0)
        per_sample: dict[str, float] = {}
        hist: list[int] = []
        if errs.size:
            finite = errs[np.isfinite(errs)]
            base = finite if finite.size else np.zeros(1)
            per_sample = {
                "mean": float(np.mean(base)), "p50": float(np.percentile(base, 50)),
                "p90": float(np.percentile(base, 90)), "p99": float(np.percentile(base, 99)),
                "max": float(np.max(errs)),
            }
            hist = [int(x) for x in np.histogram(np.clip(errs, 0, 1e300), bins=np.array(HIST_EDGES[:-1] + [1e301]))[0]]
        top5 = None
        if name in self.top5 and self.top5[name][1]:
            top5 = self.top5[name][0] / self.top5[name][1]
        task = None
        t = self.task.get(name)
        if t is not None and t.get("ok") and "metric" in t and self.offset.get(name) == len(self.labels):
            n = len(self.labels)
            task = {"metric": t["metric"], "ref": t["ref_top1"] / n, "cand": t["cand_top1"] / n,
                    "delta": (t["cand_top1"] - t["ref_top1"]) / n, "ref_top5": None, "cand_top5": None,
                    "delta_top5": None, "samples": n}
            if "ref_top5" in t:
                task.update(ref_top5=t["ref_top5"] / n, cand_top5=t["cand_top5"] / n,
                            delta_top5=(t["cand_top5"] - t["ref_top5"]) / n)
        return OutputDiff(m, cand_name, top5=top5, per_sample=per_sample, histogram=hist, task=task)


def load_labels(path: str | os.PathLike, num_samples: int) -> np.ndarray:
    """Read ``--labels``: a ``.npy`` of integers, one per sample (``[N]`` or ``[N, 1]``).

    Raises:
        DataError: unreadable, not integers, or a count that differs from the data's.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DataError(f"labels file {p} does not exist")
    try:
        y = np.load(p, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read labels {p}: {type(e).__name__}: {e}", hint="save them with numpy.save") from e
    if isinstance(y, np.lib.npyio.NpzFile):
        raise DataError(f"labels {p} is an .npz", hint="save one integer array with numpy.save (.npy)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iub":
        raise DataError(f"labels {p}: expected integers [N], got {y.dtype} {list(y.shape)}",
                        hint="one integer class index per sample")
    if len(y) != num_samples:
        raise DataError(f"labels {p} has {len(y)} entries, the data {num_samples} samples",
                        hint="give one label per sample, in the data's order")
    return y.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Per-layer matching


class _GraphView:
    """Constants, canonical (transparent-free) values and consumers of one main graph."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.nodes = list(model.graph)
        self.const: set[int] = set()
        input_ids = {id(v) for v in model.graph.inputs}
        for v in model.graph.initializers.values():
            if id(v) not in input_ids:
                self.const.add(id(v))
        for node in self.nodes:
            ins = [v for v in node.inputs if v is not None]
            if (node.op_type in ("Constant", "ConstantOfShape") and all(id(v) in self.const for v in ins)) or (
                ins and all(id(v) in self.const for v in ins)
            ):
                for o in node.outputs:
                    self.const.add(id(o))
        self.order = {id(n): i for i, n in enumerate(self.nodes)}

    def is_const(self, v: ir.Value | None) -> bool:
        return v is None or id(v) in self.const

    def transparent(self, node: ir.Node) -> bool:
        return (node.op_type in TRANSPARENT_OPS and node.domain in ("", "ai.onnx") and bool(node.inputs)
                and not self.is_const(node.inputs[0]))

    def canon(self, v: ir.Value) -> ir.Value:
        """Look back through transparent ops to the value they carry."""
        seen = 0
        while True:
            p = v.producer()
            if p is None or not self.transparent(p) or seen > 64:
                return v
            v = p.inputs[0]  # type: ignore[assignment]
            seen += 1

    def rep(self, v: ir.Value) -> ir.Value:
        """The value consumers actually read: forward through a single chain of transparent ops."""
        for _ in range(64):
            if v.is_graph_output():
                return v
            cons = list(v.consumers())
            if len(cons) != 1 or not self.transparent(cons[0]) or cons[0].inputs[0] is not v:
                return v
            v = cons[0].outputs[0]
        return v

    def consumers(self, v: ir.Value) -> list[ir.Node]:
        """Non-transparent consumers of ``v`` or of any transparent chain from it."""
        out: list[ir.Node] = []
        stack, seen = [v], set()
        while stack:
            x = stack.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            for n in x.consumers():
                if self.transparent(n) and n.inputs[0] is x:
                    stack.extend(n.outputs[:1])
                elif n not in out:
                    out.append(n)
        return sorted(out, key=lambda n: self.order.get(id(n), 0))

    def data_inputs(self, node: ir.Node) -> list[ir.Value]:
        return [self.canon(v) for v in node.inputs if v is not None and not self.is_const(v)]

    def sole_consumer(self, v: ir.Value, ops: frozenset[str] | set[str]) -> ir.Node | None:
        if v.is_graph_output():
            return None
        cons = self.consumers(v)
        if len(cons) == 1 and cons[0].op_type in ops:
            return cons[0]
        return None

    def through_qdq(self, v: ir.Value) -> bool:
        r = self.rep(v)
        p = r.producer()
        return r is not v and p is not None and p.op_type == "DequantizeLinear"


def _shape(v: ir.Value) -> list[int | str] | None:
    if v.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in v.shape]


def _shapes_fit(a: ir.Value, b: ir.Value) -> bool:
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None:
        return True
    if len(sa) != len(sb):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(sa, sb))


def _infer(model: ir.Model) -> None:
    from onnx_ir.passes import common as ir_common

    try:
        ir_common.ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # custom ops: shapes downstream may stay unknown
        pass


def match_layers(ref: ir.Model, cand: ir.Model) -> tuple[list[LayerMatch], list[str], list[str]]:
    """Match the reference's intermediate tensors to the candidate's, by structure (see module doc).

    Both models should have inferred shapes. Returns the matches in the reference's topological order,
    the names of reference node outputs left unmatched, and those with no counterpart because the
    BatchNormalization after them was fused (a Conv's output before its BN).
    """
    R, C = _GraphView(ref), _GraphView(cand)
    pairs: dict[int, ir.Value] = {}  # id(ref canonical value) -> cand canonical value
    used: set[int] = set()  # ids of candidate nodes already matched
    absorbed: set[int] = set()  # ids of reference nodes folded into a match
    matches: list[LayerMatch] = []
    cand_inputs = [v for v in cand.graph.inputs if not v.is_initializer()]
    by_name = {v.name: v for v in cand_inputs}
    ref_inputs = [v for v in ref.graph.inputs if not v.is_initializer()]
    for i, v in enumerate(ref_inputs):
        c = by_name.get(v.name) or (cand_inputs[i] if len(cand_inputs) == len(ref_inputs) else None)
        if c is not None:
            pairs[id(v)] = c
    unmatched: list[str] = []
    fused: list[str] = []  # reference tensors with no counterpart because BN was fused after them

    def add(ref_v: ir.Value, cand_v: ir.Value, ref_node: ir.Node, cand_node: ir.Node, how: str,
            inputs: list[ir.Value]) -> None:
        pairs[id(ref_v)] = cand_v
        rr, cr = R.rep(ref_v), C.rep(cand_v)
        if C.through_qdq(cand_v) and how == "same op":
            how = "QDQ"
        elif C.through_qdq(cand_v):
            how += " + QDQ"
        matches.append(LayerMatch(rr.name or "", cr.name or "", ref_node.name or "", cand_node.name or "",
                                  ref_node.op_type, how, _shape(ref_v), [x.name or "" for x in inputs],
                                  index=len(matches)))

    for n in R.nodes:
        if id(n) in absorbed or R.transparent(n):
            continue
        ins = R.data_inputs(n)
        if not ins:
            continue  # constant subgraph
        if any(id(v) not in pairs for v in ins):
            unmatched += [o.name or "" for o in n.outputs]
            continue
        want = [pairs[id(v)] for v in ins]
        cands = [c for c in C.consumers(want[0]) if id(c) not in used and c.op_type == n.op_type
                 and len(c.outputs) == len(n.outputs)]
        found = None
        for c in cands:
            got = C.data_inputs(c)
            if [id(x) for x in got] == [id(x) for x in want] or (
                n.op_type in COMMUTATIVE_OPS and sorted(map(id, got)) == sorted(map(id, want))
            ):
                found = c
                break
        if found is None:
            unmatched += [o.name or "" for o in n.outputs]
            continue
        used.add(id(found))
        if len(n.outputs) > 1:
            for ro, co in zip(n.outputs, found.outputs):
                if _shapes_fit(ro, co):
                    add(ro, co, n, found, "same op", ins)
            continue
        ro, final, how = n.outputs[0], found, "same op"
        co = found.outputs[0]
        if n.op_type in LINEAR_OPS and not _shapes_fit(ro, co):
            second = C.sole_consumer(co, {n.op_type})
            if second is not None and id(second) not in used:
                final, how = second, "low-rank split"
                used.add(id(second))
                co = second.outputs[0]
        # BatchNormalization fused into the candidate's node: match the reference's BN output.
        ref_bn = R.sole_consumer(ro, {"BatchNormalization"}) if n.op_type in BN_FUSABLE_OPS else None
        if ref_bn is not None and C.sole_consumer(co, {"BatchNormalization"}) is None:
            absorbed.add(id(ref_bn))
            fused.append(ro.name or "")
            ro = ref_bn.outputs[0]
            how = "fused BN" if how == "same op" else how + " + fused BN"
        if not _shapes_fit(ro, co):
            unmatched.append(ro.name or "")
            continue
        add(ro, co, n, final, how, ins)
    return matches, unmatched, fused


# --------------------------------------------------------------------------------------------------
# Per-layer capture


def _per_layer(ref: ir.Model, cand: ir.Model, data: Dataset, *, budget_bytes: int, limit: int | None,
               progress: Progress | None) -> PerLayer:
    from onnxshrink.capture import ActivationCapture, capturable, plan_groups

    start = time.perf_counter()
    matches, unmatched, fused = match_layers(ref, cand)
    rcap, ccap = capturable(ref), capturable(cand)
    matches = [m for m in matches if m.ref in rcap and m.cand in ccap]
    ref_names = list(dict.fromkeys(m.ref for m in matches))
    # half the budget for each model: the candidate's tensors have the same shapes
    groups = plan_groups(ref, ref_names, budget_bytes=max(1, budget_bytes // 2)) if ref_names else []
    by_ref: dict[str, list[LayerMatch]] = {}
    for m in matches:
        by_ref.setdefault(m.ref, []).append(m)
    accs: dict[tuple[str, str], _Acc] = {}
    bad: set[tuple[str, str]] = set()
    total = data.num_samples if limit is None else min(limit, data.num_samples)
    peak = 0
    with_batches = True
    for gi, group in enumerate(groups):
        cand_names = list(dict.fromkeys(m.cand for r in group for m in by_ref[r]))
        label = f"per-layer capture, group {gi + 1}/{len(groups)}"
        with ActivationCapture(ref, group) as rc, ActivationCapture(cand, cand_names) as cc:
            while True:
                max_batch = 32 if (with_batches and rc.batchable and cc.batchable) else 1
                part: dict[tuple[str, str], _Acc] = {}
                done = 0
                aligned = True
                for rb, cb in zip(rc.run(data, limit=limit, max_batch=max_batch),
                                  cc.run(data, limit=limit, max_batch=max_batch)):
                    rows_r = {len(a) for a in rb.values() if np.ndim(a)}
                    rows_c = {len(a) for a in cb.values() if np.ndim(a)}
                    if max_batch > 1 and rows_r != rows_c:
                        aligned = False  # one model fell back to single samples: redo both unbatched
                        break
                    peak = max(peak, sum(a.nbytes for a in rb.values()) + sum(a.nbytes for a in cb.values()))
                    for r in group:
                        for m in by_ref[r]:
                            key = (m.ref, m.cand)
                            if key in bad:
                                continue
                            a, b = np.asarray(rb[m.ref]), np.asarray(cb[m.cand])
                            if a.shape != b.shape or a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
                                bad.add(key)
                                continue
                            part.setdefault(key, _Acc()).add(a, b)
                    done += len(next(iter(rb.values()))) if max_batch > 1 and rb else 1
                    del rb, cb
                    if progress is not None:
                        progress(label, min(done, total), total)
                if aligned:
                    accs.update(part)
                    break
                with_batches = False
    layers: list[LayerDiff] = []
    err_of: dict[str, float] = {}
    snr_of: dict[str, float | None] = {}
    ref_inputs = {v.name for v in ref.graph.inputs}
    for m in matches:
        key = (m.ref, m.cand)
        if key in bad or key not in accs:
            unmatched.append(m.ref)
            continue
        res = accs[key].result(m.ref, 0.0)
        err_of[m.ref] = res.rel_l2
        snr_of[m.ref] = res.snr_db
        in_errs = [0.0 if i in ref_inputs else err_of.get(i, 0.0) for i in m.inputs] or [0.0]
        in_err = max(in_errs)
        in_snrs = [snr_of.get(i) for i in m.inputs if i not in ref_inputs]
        in_snr = min((s for s in in_snrs if s is not None), default=None)
        if res.snr_db is None:
            drop: float | None = 0.0  # exact here
        elif in_snr is None:
            drop = None  # inputs exact: no finite SNR to drop from
        else:
            drop = in_snr - res.snr_db
        added = res.rel_l2 - in_err if math.isfinite(res.rel_l2) else math.inf
        layers.append(LayerDiff(m, res.rel_l2, res.snr_db, res.cosine, res.max_abs, in_err, added, drop))
    for i, x in enumerate(sorted(layers, key=lambda x: (-x.added_rel_l2, x.match.index))):
        x.rank = i + 1
    return PerLayer(layers, sorted(set(u for u in unmatched if u)), fused, ref_tensors=len(rcap) - len(ref_inputs & set(rcap)),
                    cand_tensors=len(ccap), groups=len(groups), budget_bytes=budget_bytes, peak_batch_bytes=peak,
                    samples=total, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Size and latency


def weight_bytes_by_op(model: ir.Model) -> dict[str, int]:
    """Weight bytes (initializers and Constant tensors) by the op type that uses them; a weight read
    through DequantizeLinear/Cast counts for the op behind it (a QDQ Conv's int8 weight is a Conv's)."""
    view = _GraphView(model)
    out: dict[str, int] = {}

    def owner(v: ir.Value) -> str:
        stack, seen = [v], 0
        while stack and seen < 16:
            seen += 1
            x = stack.pop(0)
            for n in x.consumers():
                if n.op_type in TRANSPARENT_OPS or (n.op_type in ("Reshape", "Transpose", "Unsqueeze")
                                                    and view.is_const(n.outputs[0])):
                    stack.extend(n.outputs[:1])
                else:
                    return n.op_type
        return "(unused)"

    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None:
            key = owner(value)
            out[key] = out.get(key, 0) + int(t.nbytes)
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            t = node.attributes["value"].value
            key = owner(node.outputs[0])
            out[key] = out.get(key, 0) + int(getattr(t, "nbytes", 0))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def size_section(ref: ir.Model, cand: ir.Model, ref_path: str | os.PathLike,
                 cand_path: str | os.PathLike) -> dict[str, Any]:
    """Stats and weight bytes by op type of both models."""
    from onnxshrink.model import model_stats

    bs, cs = model_stats(ref), model_stats(cand)
    bs.file_bytes = Path(ref_path).stat().st_size
    cs.file_bytes = Path(cand_path).stat().st_size
    wb, wc = weight_bytes_by_op(ref), weight_bytes_by_op(cand)
    ops = sorted(set(wb) | set(wc), key=lambda k: -(wb.get(k, 0) + wc.get(k, 0)))
    nodes = sorted(set(bs.op_counts) | set(cs.op_counts))
    return {
        "before": bs.to_dict(), "after": cs.to_dict(),
        "weight_bytes_by_op": {k: [wb.get(k, 0), wc.get(k, 0)] for k in ops},
        "nodes_by_op": {k: [bs.op_counts.get(k, 0), cs.op_counts.get(k, 0)] for k in nodes},
    }


# --------------------------------------------------------------------------------------------------
# Entry point


def _output_map(ref: ir.Model, cand: ir.Model, notes: list[str]) -> dict[str, str]:
    rn = [v.name for v in ref.graph.outputs]
    cn = [v.name for v in cand.graph.outputs]
    if all(n in cn for n in rn):
        return {}
    if len(rn) == len(cn):
        mapping = {r: c for r, c in zip(rn, cn) if r != c}
        notes.append("outputs matched by position: " + ", ".join(f"{r} ↔ {c}" for r, c in mapping.items()))
        return mapping
    missing = [n for n in rn if n not in cn]
    raise InputError(f"the candidate has no output {missing[0]!r} and a different number of outputs",
                     hint=f"the candidate's outputs are {', '.join(map(repr, cn))}")


def compare(
    ref: str | os.PathLike,
    cand: str | os.PathLike,
    *,
    data: str | os.PathLike | Dataset | None = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    tolerance: float | Tolerances | None = None,
    max_drop: float | None = None,
    per_layer: bool = False,
    budget_bytes: int = 256 << 20,
    latency_runs: int = 0,
    limit: int | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    progress: Progress | None = None,
    size: bool = True,
) -> CompareResult:
    """Compare ``cand`` against ``ref`` on the same inputs (see the module docstring).

    Args:
        ref, cand: model files (sessions are created from paths, so >2 GB is safe).
        data: ``--data`` (an .npz, a folder or a :class:`Dataset`); default deterministic synthetic inputs.
        labels: one integer per sample (an .npy path or an array) for task metrics.
        tolerance: allowed relative L2 (float outputs) / mismatch fraction (integer outputs), default 1e-5.
        max_drop: allowed drop of top-1 (or exact-match) accuracy, as a fraction (0.01 = 1 point).
        per_layer: also match and rank intermediate tensors.
        budget_bytes: bytes of captured tensors per batch for ``per_layer`` (both models together).
        latency_runs: if > 0, median onnxruntime CPU latency of both models over this many runs.
        limit: use at most this many samples.
        input_shapes: shapes for dynamic inputs when synthesizing data.
        progress: callback ``(label, done, total)``.
        size: include the size section (stats and weight bytes by op type).

    Raises:
        ModelLoadError / DataError / UsageError: bad models, data, labels or options (exit 2);
        InputError: onnxruntime cannot run the reference.
    """
    from onnxshrink import __version__
    from onnxshrink.model import load_model

    start = time.perf_counter()
    ref_m, cand_m = load_model(ref), load_model(cand)
    notes: list[str] = []
    specs = input_specs(ref_m)
    cand_specs = {s.name for s in input_specs(cand_m)}
    if {s.name for s in specs} != cand_specs:
        raise InputError(
            f"the models take different inputs: {sorted(s.name for s in specs)} vs {sorted(cand_specs)}",
            hint="compare two versions of the same model",
        )
    if isinstance(data, Dataset):
        dataset = data
    elif data is not None:
        dataset = load_data(data, specs)
    else:
        dataset, shape_notes = synthetic_data(specs, input_shapes)
        notes += [f"synthetic inputs: {n}" for n in shape_notes] or ["synthetic inputs (no --data)"]
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    n_samples = dataset.num_samples if limit is None else min(limit, dataset.num_samples)
    y = None
    if labels is not None:
        y = labels if isinstance(labels, np.ndarray) else load_labels(labels, dataset.num_samples)
        if len(y) != dataset.num_samples:
            raise DataError(f"{len(y)} labels for {dataset.num_samples} samples")
        y = y[:n_samples]
    elif max_drop is not None:
        raise UsageError("--max-drop needs --labels")
    tol = tolerance if isinstance(tolerance, Tolerances) else Tolerances(
        DEFAULT_TOLERANCE if tolerance is None else float(tolerance))
    out_names = [v.name for v in ref_m.graph.outputs]
    unknown = [n for n in tol.per_output if n not in out_names]
    if unknown:
        raise UsageError(f"--tol names unknown output {unknown[0]!r}",
                         hint=f"the reference's outputs are {', '.join(map(repr, out_names))}")
    omap = _output_map(ref_m, cand_m, notes)
    observer = _OutputObserver(y)
    val = compare_models(ref, cand, dataset, tol, limit=limit, output_map=omap, observer=observer,
                         progress=progress)
    if val.status == "skipped":
        raise InputError(val.reason, hint="check that onnxruntime can run the reference model")
    outputs = [observer.finish(m, omap.get(m.name, m.name)) for m in val.outputs]
    verdict = "passed" if val.status == "passed" else "failed"
    reasons = [val.reason] if val.reason else []
    if y is not None and not any(o.task for o in outputs):
        notes.append("labels given but no output is [N, classes] scores or one integer per sample: no task metric")
    if max_drop is not None:
        for o in outputs:
            if o.task and -o.task["delta"] > max_drop + 1e-12:
                verdict = "failed"
                reasons.append(f"output {o.metrics.name!r} {o.task['metric']} accuracy drops "
                               f"{-100 * o.task['delta']:.2f} pp > --max-drop {100 * max_drop:.2f} pp")
    result = CompareResult(str(ref), str(cand), verdict, "; ".join(reasons), val.samples or n_samples,
                           dataset.source, outputs, notes=notes + val.notes, max_drop=max_drop, version=__version__)
    if val.outputs and (per_layer or size):
        _infer(ref_m)
        _infer(cand_m)
    if size:
        result.size = size_section(ref_m, cand_m, ref, cand)
    if per_layer and val.outputs:
        result.per_layer = _per_layer(ref_m, cand_m, dataset, budget_bytes=budget_bytes, limit=limit,
                                      progress=progress)
    if latency_runs > 0 and val.outputs:
        measured = measure_latency(ref, cand, dataset, batches=(1,), runs=latency_runs)
        if measured:
            r_ms, c_ms = measured[0].before_ms, measured[0].after_ms
            result.latency = {"ref_ms": r_ms, "cand_ms": c_ms, "speedup": r_ms / c_ms if c_ms > 0 else None,
                              "runs": latency_runs, "batch": 1}
    result.seconds = time.perf_counter() - start
    return result
