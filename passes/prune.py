"""prune: structured channel pruning on the ONNX graph, with least-squares reconstruction from data.

**Groups.** :mod:`onnxshrink.passes.channels` finds the channels that must be cut together: a Conv's
output channels, the BatchNorm/activation/pooling/Pad/Resize/Q-DQ after it, every branch of a residual
``Add``/``Sub``/``Mul``, Concat inputs (at their channel offsets) and Split outputs, depthwise and grouped
Convs (whose ``group`` count shrinks with them), ConvTranspose, and a ``Flatten``/flattening ``Reshape``
into Gemm/MatMul (each channel is a block of ``H·W`` rows of the weight). A group that reaches a graph
output, is read by an op we do not model (Transpose, Softmax, LayerNorm, custom ops, subgraphs, ...), has
a weight shared with another node, or is excluded by the user, is not cut; every such group is counted as
a decline with its reason and listed in the pass details.

**Importance** of channel ``c`` in a group (summed over the group's weights ``W`` with the channel on
axis ``a``; each weight's scores are divided by their mean so that layers of different scale count alike):

* ``l1``: ``Σ|W[..c..]|``; ``l2``: ``‖W[..c..]‖₂``;
* ``bn``: ``|γ_c|`` of the group's unfused BatchNorm (groups without one fall back to ``l2``, counted);
* ``act``: ``Σ_consumers sqrt(E[x_c²])·‖W_cons[:, c]‖₂`` — the size of what channel ``c`` contributes to
  each consumer, with ``E[x_c²]`` measured on ``--data`` in onnxruntime (:class:`ActivationCapture`).

**Selection.** ``scope=local`` removes ``ratio`` of every group; ``scope=global`` ranks all channels by
importance normalised per group (score / group mean) and removes the lowest ``ratio`` of all prunable
channels. In both, a group loses at most ``max_ratio`` of its channels and keeps a multiple of
``round_to`` (rounded up, so fewer channels are removed) and of its grouped-conv unit; a Split output keeps
at least one channel. ``target_macs=f`` (0 < f < 1) replaces ``ratio``: the smallest ratio whose model
keeps at most ``f`` of the MACs is found by bisection on the MAC count of the rewritten graph
(``MACs(node) × kept_in/in × kept_out/out``).

**Rewrite.** Every cut writes a new initializer (``np.take`` along the cut axes), the old one is dropped
once unused; group counts of depthwise/grouped Convs, Split sizes and Reshape shape constants are fixed;
intermediate value shapes are cleared and re-inferred. Graph outputs keep their shapes by construction.

**Reconstruction** (``recon=lsq``; ``auto`` = ``lsq`` when data is given). For every consumer
(Conv with group 1, Gemm, MatMul) whose input channels were cut, in graph order, we capture ``X`` = its
input in the *pruned, already partly reconstructed* model and ``Y`` = its output in the *original* model
(restricted to its kept output channels), on the same calibration batches, and solve
``min_W ‖[X 1]·W − Y‖² + λ‖W‖²`` through the normal equations ``(XᵀX + λI) W = XᵀY``, accumulated
over batches (memory: one batch plus the ``(d+1)²`` and ``(d+1)×m`` accumulators, ``d`` = kept inputs ×
kernel size; rows per batch are capped by subsampling output positions). Conv rows are im2col patches
(strides, pads, dilations, ``auto_pad``). ``λ = ridge · mean(diag XᵀX)``. Fitting to the original outputs
from the pruned inputs lets each layer absorb the error of the layers before it. The fitted weights are
kept only if their calibration error is below the plain pruned weights' error (else counted as
``recon_kept_plain``).

**Tolerance.** Pruning changes the outputs by design, so validation cannot be exact: the pass declares
a relative-L2 tolerance of 0.5 on the outputs. That gate catches a *broken* rewrite (a channel
misalignment gives unrelated outputs, rel-L2 around 1 or more) while a working prune with reconstruction
stays well below it (digits nets at −40 % MACs: 0.1–0.3); it is not an accuracy verdict. Accuracy is
measured with labels (``benchmarks/bench_prune.py``); pass ``--tol`` to gate tighter.

Preconditions: value shapes inferable (static channel counts; static spatial dims after a flatten); float
weights; main graph only (values used in subgraphs are not cut). Run after ``fold`` (BatchNorm fused or
not both work) and before ``quant``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxshrink.errors import UsageError
from onnxshrink.model import name_matcher, unique_name
from onnxshrink.passes.channels import ChannelGraph, Consumer, Layout, analyze, kept_count, layout_indices
from onnxshrink.registry import ShrinkPass, option, register

__all__ = ["PruneOptions", "PrunePass", "exclusion_matcher"]

logger = logging.getLogger(__name__)

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MAX_ROWS_PER_BATCH = 8192
_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    """Options of the prune pass."""

    ratio: float = option(0.3, "fraction of the prunable channels to remove (ignored when target_macs is set)")
    scope: Literal["local", "global"] = option(
        "local", "local: the same ratio in every group; global: rank all channels together")
    importance: Literal["l1", "l2", "bn", "act"] = option(
        "l2", "channel importance: weight L1/L2 norm, BatchNorm scale, or activation statistics (needs data)")
    max_ratio: float = option(0.8, "at most this fraction of any one group is removed")
    round_to: int = option(1, "kept channel counts are rounded up to a multiple of this (e.g. 8)")
    exclude: str | None = option(
        None, "node names never pruned as producers: items joined by '|' (or '+'); a glob (* ? []) matches "
              "the whole name, a plain item any name containing it")
    target_macs: float = option(0.0, "keep at most this fraction of the MACs (0 < f < 1; 0: use ratio)")
    recon: Literal["auto", "lsq", "none"] = option(
        "auto", "least-squares reconstruction of consumer weights (auto: lsq when data is given)")
    samples: int = option(256, "calibration samples used for act importance and reconstruction")
    ridge: float = option(1e-3, "ridge term of the least-squares fit, relative to mean(diag(XᵀX))")
    latency: bool = option(False, "measure ORT CPU latency (batch 1, one thread) before/after, total and per node")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError("max_ratio must be in (0, 1]")
        if self.round_to < 1:
            raise ValueError("round_to must be >= 1")
        if not 0.0 <= self.target_macs < 1.0:
            raise ValueError("target_macs must be in [0, 1) (0: off)")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")


def exclusion_matcher(pattern: str | None):
    """A predicate on nodes from the ``exclude`` option (:func:`onnxshrink.model.name_matcher`)."""
    match = name_matcher(pattern)
    return lambda node: match(node.name)


@register("prune", PruneOptions, summary="structured channel pruning with least-squares reconstruction",
          must_precede=("quant",))
class PrunePass(ShrinkPass):
    """Remove whole channels; re-fit consumer weights on calibration data (see the module docstring)."""

    tolerance = 0.5

    def run(self, model: ir.Model) -> bool:
        opts: PruneOptions = self.options
        self.details: dict[str, Any] = {}
        data = self.context.data
        recon = opts.recon
        if recon == "auto":
            recon = "lsq" if data is not None else "none"
        if recon == "lsq" and data is None:
            raise UsageError("prune(recon=lsq) needs --data", pass_name="prune", option="recon",
                             hint="give calibration data with --data, or use recon=none")
        if opts.importance == "act" and data is None:
            raise UsageError("prune(importance=act) needs --data", pass_name="prune", option="importance",
                             hint="give calibration data with --data, or use importance=l2")
        self._infer_shapes(model)
        cg = analyze(model, exclusion_matcher(opts.exclude))
        roots = cg.roots()
        prunable = []
        blocked_rows = []
        for r in roots:
            g = cg.groups[r]
            if g.reasons:
                self.decline(f"group not pruned: {g.reasons[0]}")
                blocked_rows.append({"group": g.label, "channels": g.size, "reason": g.reasons[0]})
            elif g.size <= g.unit:
                self.decline("group not pruned: too few channels")
                blocked_rows.append({"group": g.label, "channels": g.size, "reason": "too few channels"})
            else:
                prunable.append(r)
        self.details["blocked"] = blocked_rows
        self.count("groups", len(roots))
        self.count("groups_prunable", len(prunable))
        if not prunable or (opts.ratio == 0 and opts.target_macs == 0):
            return False
        scores = self._importance(model, cg, prunable)
        keep = self._select(cg, prunable, scores)
        keep = {r: k for r, k in keep.items() if len(k) < cg.groups[r].size}
        if not keep:
            return False
        targets = [c for c in cg.consumers
                   if len(layout_indices(cg, c.layout, keep)) < c.layout.channels * c.layout.inner]
        layer_rows = self._layer_rows(cg, keep)
        lat_before = _measure_latency(model, self.context) if opts.latency else None
        originals = []
        if recon == "lsq" and targets:
            originals = self._open_original(model, targets)
        try:
            self._rewrite(model, cg, keep)
            self.count("groups_pruned", len(keep))
            self.count("channels_before", sum(cg.groups[r].size for r in prunable))
            self.count("channels_removed", sum(cg.groups[r].size - len(k) for r, k in keep.items()))
            if recon == "lsq" and targets:
                errs = self._reconstruct(model, cg, keep, targets, originals)
                for row in layer_rows:
                    if row["node"] in errs:
                        row["recon_rel_err"] = list(errs[row["node"]])
        finally:
            for cap in originals:
                cap.close()
        if lat_before is not None:
            lat_after = _measure_latency(model, self.context)
            self._latency_stats(model, layer_rows, lat_before, lat_after)
        self.layers = layer_rows
        return True

    def _latency_stats(self, model: ir.Model, rows: list[dict[str, Any]], before: tuple[float, dict[str, float]],
                       after: tuple[float, dict[str, float]]) -> None:
        # onnxruntime fuses Conv+BN/Add/activation and renames the fused (NCHWc) node after the last fused
        # value; map such names back to the MAC node the chain starts from
        owner: dict[str, str] = {}
        for node in model.graph:
            if node.op_type not in _WEIGHT_OPS:
                continue
            key = node.name or node.op_type
            owner[key] = key
            v = node.outputs[0]
            for _ in range(4):
                owner.setdefault(v.name or "", key)
                uses = v.uses()
                if len(uses) != 1 or uses[0].node.op_type not in ("Relu", "Clip", "Add", "BatchNormalization",
                                                                   "Sigmoid", "LeakyRelu", "HardSigmoid", "Sum"):
                    break
                v = uses[0].node.outputs[0]

        def by_node(per: dict[str, float]) -> dict[str, float]:
            out: dict[str, float] = {}
            for k, us in per.items():
                k2 = k[:-len("_nchwc")] if k.endswith("_nchwc") else k
                if k2 in owner:
                    out[owner[k2]] = out.get(owner[k2], 0.0) + us
            return out

        before = (before[0], by_node(before[1]))
        after = (after[0], by_node(after[1]))
        self.details["latency_ms"] = [round(before[0], 4), round(after[0], 4)]
        self.details["latency_ratio"] = round(after[0] / before[0], 4) if before[0] > 0 else None
        self.count("latency_us_before", int(round(1000 * before[0])))
        self.count("latency_us_after", int(round(1000 * after[0])))
        for row in rows:
            b, a = before[1].get(row["node"]), after[1].get(row["node"])
            row["latency_us"] = [None if b is None else round(b, 1), None if a is None else round(a, 1)]

    # ---- shapes ----------------------------------------------------------------------------------------
    def _infer_shapes(self, model: ir.Model) -> None:
        if self.context.cache.pop("shapes_current", False):
            return
        try:
            ir_common.ShapeInferencePass(strict_mode=False)(model)
        except Exception as e:
            self.decline(f"shape inference failed ({type(e).__name__}); groups with unknown shapes are blocked")

    # ---- importance -------------------------------------------------------------------------------------
    def _importance(self, model: ir.Model, cg: ChannelGraph, prunable: list[int]) -> dict[int, np.ndarray]:
        opts: PruneOptions = self.options
        pset = set(prunable)
        norm = "l1" if opts.importance == "l1" else "l2"
        scores = {r: np.zeros(cg.groups[r].size) for r in prunable}
        weight_scores = {r: np.zeros(cg.groups[r].size) for r in prunable}
        arrays: dict[tuple[int, int], np.ndarray] = {}

        def arr(node: ir.Node, i: int) -> np.ndarray:
            key = (id(node), i)
            if key not in arrays:
                arrays[key] = np.asarray(node.inputs[i].const_value.numpy(), dtype=np.float64)
            return arrays[key]

        for cut in cg.cuts:
            if not any(cg.find(s.group) in pset for s in cut.layout.segs):
                continue
            if not (cut.index == 0 and cut.node.op_type == "DequantizeLinear") and not (
                    cut.index == 1 and cut.node.op_type in _WEIGHT_OPS):
                continue
            w = arr(cut.node, cut.index)
            moved = np.moveaxis(w, cut.axis, 0).reshape(w.shape[cut.axis], -1)
            s = np.abs(moved).sum(1) if norm == "l1" else np.sqrt((moved ** 2).sum(1))
            _scatter(cg, cut.layout, s / (s.mean() + _EPS), weight_scores, pset)
        if opts.importance in ("l1", "l2"):
            return weight_scores
        if opts.importance == "bn":
            have = set()
            for cut in cg.cuts:
                if cut.node.op_type == "BatchNormalization" and cut.index == 1:
                    gamma = np.abs(arr(cut.node, 1)).reshape(-1)
                    touched = _scatter(cg, cut.layout, gamma / (gamma.mean() + _EPS), scores, pset)
                    have |= touched
            for r in prunable:
                if r not in have:
                    scores[r] = weight_scores[r]
                    self.count("bn_fallback_l2")
            return scores
        # act: sqrt(E[x²]) of each consumer input channel × the norm of its weight column
        stats = self._activation_power(model, cg, prunable)
        have = set()
        for c in cg.consumers:
            if c.value.name not in stats or not any(cg.find(s.group) in pset for s in c.layout.segs):
                continue
            w = arr(c.node, 1) if c.node.inputs[1].const_value is not None else None
            if w is None:
                continue
            moved = np.moveaxis(w, c.weight_axis, 0).reshape(w.shape[c.weight_axis], -1)
            col = np.sqrt((moved ** 2).sum(1))
            power = stats[c.value.name]
            if power.shape[0] != col.shape[0]:
                continue
            s = np.sqrt(power) * col
            have |= _scatter(cg, c.layout, s / (s.mean() + _EPS), scores, pset)
        for r in prunable:
            if r not in have:
                scores[r] = weight_scores[r]
                self.count("act_fallback_l2")
        return scores

    def _activation_power(self, model: ir.Model, cg: ChannelGraph, prunable: list[int]) -> dict[str, np.ndarray]:
        from onnxshrink.capture import plan_groups

        pset = set(prunable)
        wanted: dict[str, Layout] = {}
        for c in cg.consumers:
            if c.value.name and any(cg.find(s.group) in pset for s in c.layout.segs):
                wanted.setdefault(c.value.name, c.layout)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for names in plan_groups(model, list(wanted)):
            with self.context.capture(model, names) as cap:
                for batch in cap.run(self.context.data, limit=self.options.samples,
                                     progress=self.context.progress, label="prune: activation statistics"):
                    for n in names:
                        x = np.asarray(batch[n], dtype=np.float64)
                        ax = wanted[n].axis
                        m = np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1)
                        sums[n] = sums.get(n, 0) + (m ** 2).sum(1)
                        counts[n] = counts.get(n, 0) + m.shape[1]
        return {n: sums[n] / max(counts[n], 1) for n in sums}

    # ---- selection ----------------------------------------------------------------------------------------
    def _select(self, cg: ChannelGraph, prunable: list[int], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        opts: PruneOptions = self.options
        if opts.target_macs > 0:
            total = sum(m.macs for m in cg.mac_nodes)
            if total <= 0:
                self.decline("target_macs: the model has no MACs the pass can count")
                return {}
            goal = opts.target_macs * total
            lo, hi = 0.0, 0.999
            best = self._select_ratio(cg, prunable, scores, hi)
            if _estimate_macs(cg, best) > goal:
                self.decline("target_macs not reachable within max_ratio and blocked groups")
                self.details["target_macs_reached"] = _estimate_macs(cg, best) / total
                return best
            for _ in range(30):
                mid = (lo + hi) / 2
                sel = self._select_ratio(cg, prunable, scores, mid)
                if _estimate_macs(cg, sel) <= goal:
                    hi, best = mid, sel
                else:
                    lo = mid
            self.details["ratio_for_target"] = round(hi, 4)
            return best
        return self._select_ratio(cg, prunable, scores, opts.ratio)

    def _select_ratio(self, cg: ChannelGraph, prunable: list[int], scores: dict[int, np.ndarray],
                      ratio: float) -> dict[int, np.ndarray]:
        opts: PruneOptions = self.options
        # work in units (grouped convs keep whole conv groups)
        unit_scores = {}
        for r in prunable:
            u = cg.groups[r].unit
            unit_scores[r] = scores[r].reshape(-1, u).sum(1) / u
        n_prune: dict[int, int] = {}
        caps = {}
        for r in prunable:
            g = cg.groups[r]
            nunits = g.size // g.unit
            caps[r] = min(int(math.floor(opts.max_ratio * nunits + 1e-9)), nunits - 1)
        if opts.scope == "local":
            for r in prunable:
                nunits = cg.groups[r].size // cg.groups[r].unit
                n_prune[r] = min(int(math.floor(ratio * nunits + 1e-9)), caps[r])
        else:
            entries = []
            for r in prunable:
                s = unit_scores[r] / (unit_scores[r].mean() + _EPS)
                u = cg.groups[r].unit
                entries += [(float(v), r, u) for v in s]
            entries.sort(key=lambda e: e[0])
            budget = ratio * sum(cg.groups[r].size for r in prunable)
            n_prune = {r: 0 for r in prunable}
            removed = 0
            for _, r, u in entries:
                if removed + u > budget + 1e-9:
                    break
                if n_prune[r] < caps[r]:
                    n_prune[r] += 1
                    removed += u
        keep: dict[int, np.ndarray] = {}
        for r in prunable:
            g = cg.groups[r]
            u = g.unit
            nunits = g.size // u
            kept_units = nunits - n_prune.get(r, 0)
            kept = kept_units * u
            if opts.round_to > 1:
                kept = min(g.size, int(math.ceil(kept / opts.round_to) * opts.round_to))
                kept_units = min(nunits, int(math.ceil(kept / u)))
            order = np.argsort(-unit_scores[r], kind="stable")
            chosen = np.sort(order[:kept_units])
            idx = (chosen[:, None] * u + np.arange(u)[None, :]).reshape(-1)
            for start, length in g.min_ranges:
                if not ((idx >= start) & (idx < start + length)).any():
                    best = start + int(np.argmax(scores[r][start:start + length]))
                    idx = np.sort(np.append(idx, best))
            keep[r] = idx.astype(np.int64)
        return keep

    # ---- report rows -----------------------------------------------------------------------------------------
    def _layer_rows(self, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> list[dict[str, Any]]:
        rows = []
        for mn in cg.mac_nodes:
            fin = kept_count(cg, mn.in_layout, keep) if mn.in_layout is not None else 1.0
            fout = kept_count(cg, mn.out_layout, keep) if mn.out_layout is not None else 1.0
            frac = fout if mn.passthrough else fin * fout
            w = mn.node.inputs[1]
            params = int(np.prod(w.shape.numpy())) if w is not None and w.shape is not None and \
                all(isinstance(d, int) for d in w.shape) else 0
            cin = mn.in_layout.channels if mn.in_layout is not None else None
            cout = mn.out_layout.channels if mn.out_layout is not None else None
            rows.append({
                "node": mn.node.name or mn.node.op_type,
                "op": mn.node.op_type,
                "in_channels": [cin, None if cin is None else round(cin * fin)],
                "out_channels": [cout, None if cout is None else round(cout * fout)],
                "macs": [mn.macs, int(round(mn.macs * frac))],
                "weight_params": [params, int(round(params * frac))],
                "recon_rel_err": None,
            })
        return rows

    # ---- rewrite ------------------------------------------------------------------------------------------
    def _rewrite(self, model: ir.Model, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> None:
        graph = model.graph
        plans: dict[tuple[int, int], tuple[ir.Node, int, dict[int, np.ndarray]]] = {}
        for cut in cg.cuts:
            idx = layout_indices(cg, cut.layout, keep)
            full = cut.layout.channels * cut.layout.inner
            if len(idx) == full:
                continue
            key = (id(cut.node), cut.index)
            plans.setdefault(key, (cut.node, cut.index, {}))[2][cut.axis] = idx
        for node, index, axes in plans.values():
            old = node.inputs[index]
            a = old.const_value.numpy()
            for ax, idx in axes.items():
                if a.shape[ax] != max(idx.max() + 1, 0) and a.shape[ax] < idx.max() + 1:
                    raise RuntimeError(f"prune: cut of {old.name} axis {ax} out of range")
                a = np.take(a, idx, axis=ax)
            _replace_const(graph, node, index, np.ascontiguousarray(a), old.const_value.dtype)
            self.count("tensors_cut")
        for fix in cg.fixes:
            counts = [len(layout_indices(cg, lay, keep)) for lay in fix.layouts]
            if fix.kind == "group":
                full = fix.layouts[0].channels
                if counts[0] == full:
                    continue
                fix.node.attributes["group"] = ir.AttrInt64("group", counts[0] // fix.unit)
                self.count("group_counts_fixed")
            elif fix.kind == "split":
                if counts == [lay.channels for lay in fix.layouts]:
                    continue
                _set_split_sizes(model, fix.node, counts)
                self.count("split_sizes_fixed")
            elif fix.kind == "reshape":
                shape = np.asarray(fix.node.inputs[1].const_value.numpy()).copy()
                shape[1] = counts[0]
                _replace_const(graph, fix.node, 1, shape.astype(np.int64), ir.DataType.INT64)
                self.count("reshape_shapes_fixed")
        _reinfer_shapes(model)

    # ---- reconstruction ----------------------------------------------------------------------------------
    def _open_original(self, model: ir.Model, targets: list[Consumer]) -> list[Any]:
        from onnxshrink.capture import plan_groups

        names = list(dict.fromkeys(t.node.outputs[0].name for t in targets))
        caps = []
        try:
            for group in plan_groups(model, names):
                caps.append(self.context.capture(model, group))
        except Exception:
            for c in caps:
                c.close()
            raise
        return caps

    def _reconstruct(self, model: ir.Model, cg: ChannelGraph, keep: dict[int, np.ndarray],
                     targets: list[Consumer], originals: list[Any]) -> dict[str, tuple[float, float]]:

        opts: PruneOptions = self.options
        by_name = {}
        for cap in originals:
            for n in cap.names:
                by_name[n] = cap
        order = {id(n): i for i, n in enumerate(model.graph)}
        targets = sorted(targets, key=lambda t: order.get(id(t.node), 0))
        errs: dict[str, tuple[float, float]] = {}
        rng = np.random.default_rng(0)
        for t in targets:
            node = t.node
            op = node.op_type
            if op == "Conv" and node.attributes.get_int("group", 1) != 1:
                self.decline("recon: grouped Conv", node)
                continue
            if op == "Gemm" and node.attributes.get_int("transA", 0):
                self.decline("recon: Gemm with transA", node)
                continue
            w_val = node.inputs[1]
            if w_val is None or w_val.const_value is None or w_val.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
                self.decline("recon: weight is not a float constant", node)
                continue
            out_name = node.outputs[0].name
            kept_out = layout_indices(cg, t.out_layout, keep) if t.out_layout is not None else None
            W0 = np.asarray(w_val.const_value.numpy(), dtype=np.float64)
            has_bias_in = len(node.inputs) > 2 and node.inputs[2] is not None
            b0 = np.asarray(node.inputs[2].const_value.numpy(), dtype=np.float64).reshape(-1) \
                if has_bias_in and node.inputs[2].const_value is not None else None
            if has_bias_in and b0 is None:
                self.decline("recon: bias is not constant", node)
                continue
            fit_bias = op != "MatMul"
            # plain weights as a matrix [d, m]
            if op == "Conv":
                M = W0.shape[0]
                Wm = W0.reshape(M, -1).T
            elif op == "Gemm":
                alpha = node.attributes.get_float("alpha", 1.0)
                beta = node.attributes.get_float("beta", 1.0)
                Wm = (W0.T if node.attributes.get_int("transB", 0) else W0) * alpha
                M = Wm.shape[1]
                if b0 is not None:
                    b0 = np.broadcast_to(b0 * beta, (M,)).copy() if b0.size in (1, M) else None
                    if b0 is None:
                        self.decline("recon: Gemm bias is not per output", node)
                        continue
            else:
                Wm = W0
                M = Wm.shape[1]
            d = Wm.shape[0]
            dim = d + (1 if fit_bias else 0)
            A = np.zeros((dim, dim))
            B = np.zeros((dim, M))
            yy = 0.0
            rows_total = 0
            try:
                with self.context.capture(model, [t.value.name]) as pc:
                    oc = by_name[out_name]
                    for ob, pb in zip(oc.run(self.context.data, limit=opts.samples),
                                      pc.run(self.context.data, limit=opts.samples)):
                        x = np.asarray(pb[t.value.name], dtype=np.float64)
                        y = np.asarray(ob[out_name], dtype=np.float64)
                        X, Y = _rows(node, x, y, kept_out, rng)
                        if X is None:
                            raise ValueError("shapes of the captured tensors do not match")
                        if fit_bias:
                            X = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
                        A += X.T @ X
                        B += X.T @ Y
                        yy += float((Y * Y).sum())
                        rows_total += X.shape[0]
            except (ValueError, RuntimeError) as e:
                logger.debug("prune: recon of %s failed: %s", node.name, e)
                self.decline("recon: activations could not be captured", node)
                continue
            if rows_total == 0 or yy <= 0:
                self.decline("recon: no calibration rows", node)
                continue
            lam = opts.ridge * float(np.mean(np.diag(A)[:d])) + _EPS
            reg = np.eye(dim) * lam
            if fit_bias:
                reg[d, d] = _EPS
            try:
                Wfit = np.linalg.solve(A + reg, B)
            except np.linalg.LinAlgError:
                Wfit = np.linalg.lstsq(A + reg, B, rcond=None)[0]
            W0full = np.concatenate([Wm, (b0 if b0 is not None else np.zeros(M))[None, :]], axis=0) \
                if fit_bias else Wm

            def err(Wx: np.ndarray) -> float:
                return float(np.sum(Wx * (A @ Wx)) - 2 * np.sum(Wx * B) + yy)

            e0, e1 = max(err(W0full), 0.0), max(err(Wfit), 0.0)
            errs[node.name or op] = (round(math.sqrt(e0 / yy), 5), round(math.sqrt(min(e0, e1) / yy), 5))
            if not e1 < e0:
                self.count("recon_kept_plain")
                continue
            self._write_fit(model, node, Wfit, d, M, fit_bias, W0.shape)
            self.count("layers_reconstructed")
        return errs

    def _write_fit(self, model: ir.Model, node: ir.Node, Wfit: np.ndarray, d: int, M: int, fit_bias: bool,
                   w_shape: tuple[int, ...]) -> None:
        graph = model.graph
        op = node.op_type
        dtype = node.inputs[1].const_value.dtype
        np_dt = np.float32 if dtype == ir.DataType.FLOAT else np.float64
        Wm = Wfit[:d]
        bias = Wfit[d] if fit_bias else None
        if op == "Conv":
            _replace_const(graph, node, 1, Wm.T.reshape(w_shape).astype(np_dt), dtype)
        elif op == "Gemm":
            trans_b = node.attributes.get_int("transB", 0)
            _replace_const(graph, node, 1, (Wm.T if trans_b else Wm).astype(np_dt), dtype)
            node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            _replace_const(graph, node, 1, Wm.astype(np_dt), dtype)
        if bias is not None:
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            if node.inputs[2] is None:
                v = _new_const(graph, f"{node.name or op}_bias_pruned", bias.astype(np_dt), dtype)
                node.replace_input_with(2, v)
            else:
                _replace_const(graph, node, 2, bias.astype(np_dt), dtype)

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        try:
            cg = analyze(model)
        except Exception:
            return ""
        roots = cg.roots()
        ok = [r for r in roots if not cg.groups[r].reasons and cg.groups[r].size > cg.groups[r].unit]
        if not roots:
            return ""
        return f"{len(ok)} of {len(roots)} channel groups prunable ({sum(cg.groups[r].size for r in ok)} channels)"


# ---- helpers ---------------------------------------------------------------------------------------------------

def _scatter(cg: ChannelGraph, layout: Layout, values: np.ndarray, acc: dict[int, np.ndarray],
             pset: set[int]) -> set[int]:
    """Add per-index ``values`` along ``layout``'s axis to the per-channel arrays of its groups."""
    v = np.asarray(values, dtype=np.float64)
    if layout.inner > 1:
        v = v.reshape(-1, layout.inner).sum(1)
    touched = set()
    off = 0
    for s in cg.segs(layout):
        if s.group in pset and s.group in acc:
            acc[s.group][s.start:s.start + s.length] += v[off:off + s.length]
            touched.add(s.group)
        off += s.length
    return touched


def _measure_latency(model: ir.Model, context: Any, runs: int = 60) -> tuple[float, dict[str, float]]:
    """Median ms per run of ``model`` in ORT CPU (one thread, batch 1, first sample of the data or a
    synthetic one), and median µs per node from onnxruntime's profiler (a separate, profiled session)."""
    import json
    import shutil
    import statistics
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from onnxshrink.calib import input_specs, synthetic_data
    from onnxshrink.model import save_model
    from onnxshrink.validate import interleaved_times

    data = context.data
    if data is None:
        data, _ = synthetic_data(input_specs(model), context.input_shapes, num_samples=1)
    feed = next(iter(data.samples(1)))
    tmp = Path(tempfile.mkdtemp(prefix="onnxshrink-prune-lat-"))
    try:
        path = tmp / "m.onnx"
        save_model(model, path)

        def sess(profile: bool) -> Any:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            if profile:
                so.enable_profiling = True
                so.profile_file_prefix = str(tmp / "prof")
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        total = 1000 * statistics.median(interleaved_times([sess(False)], feed, runs)[0])
        ps = sess(True)
        for _ in range(min(runs, 20)):
            ps.run(None, feed)
        prof = ps.end_profiling()
        per: dict[str, list[float]] = {}
        for ev in json.loads(Path(prof).read_text()):
            if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
                name = str(ev["name"])[: -len("_kernel_time")]
                per.setdefault(name, []).append(float(ev.get("dur", 0)))
        return total, {k: float(np.median(v)) for k, v in per.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _estimate_macs(cg: ChannelGraph, keep: dict[int, np.ndarray]) -> float:
    total = 0.0
    for mn in cg.mac_nodes:
        fin = kept_count(cg, mn.in_layout, keep) if mn.in_layout is not None else 1.0
        fout = kept_count(cg, mn.out_layout, keep) if mn.out_layout is not None else 1.0
        total += mn.macs * (fout if mn.passthrough else fin * fout)
    return total


def _new_const(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None) -> ir.Value:
    name = unique_name(base, graph.initializers)
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _replace_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, dtype: ir.DataType | None) -> None:
    old = node.inputs[index]
    base = (old.name or "w") if old is not None else "w"
    base = base if base.endswith("_pruned") else f"{base}_pruned"
    new = _new_const(graph, base, array, dtype)
    node.replace_input_with(index, new)
    if old is not None and not old.uses() and not old.is_graph_output() and not old.is_graph_input() \
            and old.name in graph.initializers and graph.initializers[old.name] is old:
        graph.initializers.pop(old.name)


def _set_split_sizes(model: ir.Model, node: ir.Node, sizes: list[int]) -> None:
    graph = model.graph
    arr = np.asarray(sizes, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        _replace_const(graph, node, 1, arr, ir.DataType.INT64)
        return
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    if opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    node.attributes.pop("num_outputs", None)
    node.resize_inputs(2)
    node.replace_input_with(1, _new_const(graph, f"{node.name or 'split'}_sizes_pruned", arr, ir.DataType.INT64))


def _reinfer_shapes(model: ir.Model) -> None:
    """Clear the shapes of intermediate values (they changed) and infer them again."""
    for node in model.graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    ir_common.ShapeInferencePass(strict_mode=False)(model)


def _conv_pads(node: ir.Node, x_spatial: list[int], k: list[int], s: list[int], dil: list[int]) -> list[tuple[int, int]]:
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    nd = len(k)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            out = -(-x_spatial[i] // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * dil[i] + 1 - x_spatial[i], 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
        return pads
    if auto == "VALID":
        return [(0, 0)] * nd
    p = list(node.attributes.get_ints("pads", [0] * (2 * nd)) or [0] * (2 * nd))
    return [(p[i], p[i + nd]) for i in range(nd)]


def _rows(node: ir.Node, x: np.ndarray, y: np.ndarray, kept_out: np.ndarray | None,
          rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Least-squares rows for one batch: inputs X [rows, d] and targets Y [rows, m]."""
    op = node.op_type
    if kept_out is not None:
        axis = 1 if op in ("Conv", "Gemm") else y.ndim - 1
        y = np.take(y, kept_out, axis=axis)
    if op in ("Gemm", "MatMul"):
        X = x.reshape(-1, x.shape[-1]) if op == "MatMul" else x.reshape(x.shape[0], -1)
        Y = y.reshape(-1, y.shape[-1]) if op == "MatMul" else y.reshape(y.shape[0], -1)
        if X.shape[0] != Y.shape[0]:
            return None, None
        if X.shape[0] > _MAX_ROWS_PER_BATCH:
            sel = rng.choice(X.shape[0], _MAX_ROWS_PER_BATCH, replace=False)
            X, Y = X[sel], Y[sel]
        return X, Y
    w_shape = node.inputs[1].shape
    k = [int(d) for d in list(w_shape)[2:]]
    nd = len(k)
    s = list(node.attributes.get_ints("strides", [1] * nd) or [1] * nd)
    dil = list(node.attributes.get_ints("dilations", [1] * nd) or [1] * nd)
    pads = _conv_pads(node, list(x.shape[2:]), k, s, dil)
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    span = [(k[i] - 1) * dil[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    # win: [B, C, *pos, *span] -> take dilation and stride
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s[i]) for i in range(nd)) + \
        tuple(slice(None, None, dil[i]) for i in range(nd))
    win = win[sl]
    out_sp = list(y.shape[2:])
    win = win[(slice(None), slice(None)) + tuple(slice(0, out_sp[i]) for i in range(nd))]
    if list(win.shape[2:2 + nd]) != out_sp:
        return None, None
    B = x.shape[0]
    n_pos = B * int(np.prod(out_sp))
    # move C after the positions: [B, *pos, C, *k]
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    win = win.transpose(perm)
    yt = np.moveaxis(y, 1, -1)  # [B, *pos, M]
    if n_pos > _MAX_ROWS_PER_BATCH:
        flat = np.sort(rng.choice(n_pos, _MAX_ROWS_PER_BATCH, replace=False))
        idx = np.unravel_index(flat, [B] + out_sp)
        X = win[idx].reshape(len(flat), -1)
        Y = yt[idx].reshape(len(flat), -1)
    else:
        X = win.reshape(n_pos, -1)
        Y = yt.reshape(n_pos, -1)
    return X, Y
